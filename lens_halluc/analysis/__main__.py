"""Command line of the analyses: ``python -m lens_halluc.analysis SUBCOMMAND --attribution DIR --out DIR``.

Subcommands come from :data:`SUBCOMMANDS`; each module exposes ``add_cli(subparsers)`` (which
sets ``func`` on its parser). Modules are imported lazily, and one that does not exist yet is
left out, so ``--help`` always works.

Example
-------
    python -m lens_halluc.analysis bias --attribution runs/attribution_heads --out runs/bias
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

SUBCOMMANDS: dict[str, str] = {
    "bias": "lens_halluc.analysis.bias",
    "inheritance": "lens_halluc.analysis.inheritance",
    "drift": "lens_halluc.analysis.drift",
    "confounders": "lens_halluc.analysis.confounders",
    "reweighting": "lens_halluc.analysis.reweighting",
}


def _unavailable(subparsers, name: str, reason: str) -> None:
    # a module that exists but fails to import stays visible, and says why when run
    p = subparsers.add_parser(name, help=f"(unavailable: {reason})", add_help=True)

    def fail(_args):
        raise SystemExit(f"python -m lens_halluc.analysis {name}: unavailable ({reason}).")

    p.set_defaults(func=fail)


def build_parser() -> argparse.ArgumentParser:
    """The parser with every importable subcommand registered."""
    p = argparse.ArgumentParser(prog="python -m lens_halluc.analysis", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, module in SUBCOMMANDS.items():
        if importlib.util.find_spec(module) is None:
            continue  # not written yet
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            _unavailable(sub, name, str(e))
            continue
        if not hasattr(mod, "add_cli"):
            _unavailable(sub, name, f"{module} has no add_cli()")
            continue
        mod.add_cli(sub)
    return p


def main(argv: list[str] | None = None) -> None:
    from ..cli.common import friendly_errors

    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        raise SystemExit(2)
    with friendly_errors(f"python -m lens_halluc.analysis {args.command}"):
        args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])


def run_figure_script(name: str, description: str, argv: list[str] | None = None) -> None:
    """What ``analyses/<name>.py`` does: ``--attribution DIR --out DIR`` (+ the analysis' own flags) → figures.

    The attribution run defaults to ``runs/attribution_heads`` (written by
    ``analyses/attribution_heads.py``) and the output to ``figures/``.

    Example
    -------
    >>> run_figure_script("bias", "attention bias figure", ["--n-samples", "50"])   # doctest: +SKIP
    """
    import time
    from pathlib import Path

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--attribution", type=Path, default=Path("runs/attribution_heads"))
    p.add_argument("--out", type=Path, default=Path("figures"))
    args, rest = p.parse_known_args(argv)
    if not (args.attribution / "top_heads.json").is_file():
        sys.exit(f"{args.attribution} holds no attribution run; run `python analyses/attribution_heads.py` first.")
    start = time.perf_counter()
    main([name, "--attribution", str(args.attribution), "--out", str(args.out), *rest])
    print(f"figures written to {args.out} ({time.perf_counter() - start:.0f} s)")
