"""Command line of the model organism: ``python -m lens_halluc.organism <command> ...``.

Commands
--------
export   write one split of the synthetic world as a COCO-format dataset::

             python -m lens_halluc.organism export --split break --n 400 --seed 1 --out worlds/break
             python -m lens_halluc.organism export --split normal --n 2000 --seed 0 --out worlds/train \\
                 --world-seed 0 --world-config my_world.json   # JSON with WorldConfig overrides

Adding a command: write ``_register_<name>(subparsers)`` that adds its parser with
``subparsers.add_parser(name, ...)`` and sets ``func`` (a callable taking the parsed
``argparse.Namespace`` and returning an exit code) with ``set_defaults(func=...)``, then add it to
:data:`SUBCOMMANDS`. :func:`main` maps ``ValueError`` / ``FileExistsError`` / ``FileNotFoundError``
to a one-line ``error: ...`` and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from dataclasses import replace
from typing import Callable, Sequence

from ..data.options import non_negative_int, positive_int
from .export import export_split
from .world import SPLITS, World, WorldConfig

#: Adds one subcommand to the ``python -m lens_halluc.organism`` parser.
Registrar = Callable[["argparse._SubParsersAction"], None]


def _world_config(path: Path | None) -> WorldConfig:
    """Defaults, overridden by the fields of a JSON file when one is given."""
    if path is None:
        return WorldConfig()
    if not path.is_file():
        raise FileNotFoundError(f"world config file not found: {path}. Pass a JSON object of WorldConfig fields.")
    try:
        overrides = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"world config {path} is not valid JSON ({e}).") from e
    if not isinstance(overrides, dict):
        raise ValueError(f"world config {path} must hold a JSON object of WorldConfig fields.")
    return WorldConfig.from_dict(overrides)


def _run_export(args: argparse.Namespace) -> int:
    world = World(_world_config(args.world_config), seed=args.world_seed)
    out = export_split(world, args.split, args.n, args.seed, args.out, overwrite=args.overwrite)
    print(out)
    return 0


def _register_export(subparsers: "argparse._SubParsersAction") -> None:
    p = subparsers.add_parser(
        "export", help="write one split of the world as a COCO-format dataset",
        description="Write N scenes of a split (instances.json, captions.json, images/, pairs.json, "
                    "objects.json, probes.json, meta.json). Output is deterministic in its arguments.",
    )
    p.add_argument("--split", choices=SPLITS, required=True,
                   help="normal: training distribution; break: anchor A present, partner B absent; "
                        "control: neither A nor B present")
    p.add_argument("--n", type=positive_int, required=True, help="number of images (>= 1)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="sampling seed of this export (>= 0; default 0)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--world-seed", type=non_negative_int, default=0, help="seed of the world's glyphs (>= 0; default 0)")
    p.add_argument("--world-config", type=Path, default=None,
                   help="JSON file with WorldConfig field overrides (default: WorldConfig())")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export in --out")
    p.set_defaults(func=_run_export)


def _run_train(args: argparse.Namespace) -> int:
    from .recipe import RecipeConfig, train_organism

    overrides = json.loads(args.recipe_config.read_text()) if args.recipe_config else {}
    cfg = RecipeConfig.quick(**overrides) if args.quick else RecipeConfig(**overrides)
    cfg = replace(cfg, seed=args.seed, world_seed=args.world_seed)
    if args.world_config is not None:  # otherwise keep the recipe's own world (not WorldConfig())
        cfg = replace(cfg, world=_world_config(args.world_config))
    summary = train_organism(args.out, cfg, progress=not args.no_progress)
    print(json.dumps({"out": str(args.out), "timings_s": summary["timings_s"]}))
    return 0


def _register_train(subparsers: "argparse._SubParsersAction") -> None:
    p = subparsers.add_parser(
        "train", help="train the organism (base LM, vision, projector, instruction tuning)",
        description="Run the LLaVA-style recipe and save every stage with save_pretrained under --out: "
                    "base/, vision/, projector/, checkpoints/checkpoint-K/, final/, recipe.json.",
    )
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--seed", type=non_negative_int, default=0, help="training seed (>= 0; default 0)")
    p.add_argument("--world-seed", type=non_negative_int, default=0, help="seed of the world's glyphs (>= 0; default 0)")
    p.add_argument("--world-config", type=Path, default=None,
                   help="JSON file with WorldConfig fields (default: the recipe's world)")
    p.add_argument("--recipe-config", type=Path, default=None, help="JSON file with RecipeConfig overrides")
    p.add_argument("--quick", action="store_true", help="a few steps on a small model (smoke test)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_run_train)


def _run_path(args: argparse.Namespace) -> int:
    from .shipped import organism_path

    print(organism_path(args.stage, args.checkpoint))
    return 0


def _register_path(subparsers: "argparse._SubParsersAction") -> None:
    p = subparsers.add_parser("path", help="print the directory of a shipped organism checkpoint",
                              description="Print the directory of the shipped final model (default), of another "
                                          "stage, or of the K-th instruction-tuning checkpoint.")
    p.add_argument("--stage", choices=("base", "projector", "final"), default="final")
    p.add_argument("--checkpoint", type=positive_int, default=None, help="K-th stage-3 checkpoint (1-based, >= 1)")
    p.set_defaults(func=_run_path)


def _run_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import EvalConfig, evaluate_organism
    from .shipped import organism_path

    model = args.model or organism_path("final")
    heads = None
    if args.heads is not None:
        from ..models.heads import read_heads

        heads = tuple(read_heads(args.heads))  # errors name the file
    cfg = EvalConfig(n=args.n, localisation=not args.no_localisation, pope=not args.no_pope, heads=heads)
    report = evaluate_organism(model, args.out, cfg, progress=not args.no_progress)
    print(json.dumps({k: v for k, v in report.items() if k != "config"}))
    return 0


def _register_evaluate(subparsers: "argparse._SubParsersAction") -> None:
    p = subparsers.add_parser("evaluate", help="measure a checkpoint against the organism's targets",
                              description="Caption held-out normal/break/control splits, score CHAIR and POPE, "
                                          "and test head localisation; writes report.json under --out.")
    p.add_argument("--model", type=Path, default=None, help="organism checkpoint (default: shipped final)")
    p.add_argument("--out", type=Path, required=True, help="output directory (resumes captioning)")
    p.add_argument("--n", type=positive_int, default=400, help="images per split (>= 1; default 400)")
    p.add_argument("--no-pope", action="store_true")
    p.add_argument("--no-localisation", action="store_true")
    p.add_argument("--heads", type=Path, default=None,
                   help="top_heads.json (from lens_halluc.attribute) to ablate instead of the per-head sweep's top k")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run_evaluate)


#: Subcommand name -> registrar, in the order shown by ``--help``.
SUBCOMMANDS: dict[str, Registrar] = {
    "export": _register_export,
    "train": _register_train,
    "evaluate": _register_evaluate,
    "path": _register_path,
}


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m lens_halluc.organism`` parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="python -m lens_halluc.organism",
        description="The model organism of hallucination: synthetic world and checkpoint.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in SUBCOMMANDS.values():
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen subcommand; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, FileExistsError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
