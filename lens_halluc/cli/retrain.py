"""Re-train a model against hallucination: TFHH, SEED-style distillation or Causal-LLaVA's module.

Examples
--------
On the shipped organism (training scenes of its world), heads from the attribution run::

    python -m lens_halluc.retrain --method tfhh --heads figures/top_heads.json --out runs/retrain/tfhh
    python -m lens_halluc.retrain --method tfhh --heads figures/top_heads.json --control random \\
        --out runs/retrain/tfhh-random                  # same k, random heads (the control)
    python -m lens_halluc.retrain --method seed --out runs/retrain/seed
    python -m lens_halluc.retrain --method causal --out runs/retrain/causal
    python -m lens_halluc.retrain --method tfhh --heads figures/top_heads.json --flavour corrected \\
        --out runs/retrain/tfhh-corrected               # our variant instead of the paper's code

``--flavour reference`` (the default) trains what each paper's code trains (TFHH: HA's loss, the
top 30 heads of the heads file, the LM head, lr 2e-5; seed: the SEED reproduction's α = 0.3
signal share, quantile β, LoRA r 64, lr 2e-6; causal: Causal-LLaVA's two summed cross-attentions
with the whole language model training, lr 2e-5); ``--flavour corrected`` our variants (see
FIDELITY.md). Every flavour-dependent flag defaults to the flavour's value; given, it wins.

On a real LLaVA with COCO captions (the causal module also needs a confounder export with
``objects.json``, see ``python -m lens_halluc.analysis confounders``)::

    python -m lens_halluc.retrain --method tfhh --heads top_heads.json --model llava-hf/llava-1.5-7b-hf \\
        --device cuda --dtype bfloat16 --instances instances_train2014.json \\
        --references captions_train2014.json --image-dir train2014 --n-train 5000 --out runs/retrain/llava-tfhh

``OUT`` becomes a checkpoint (``python -m lens_halluc.intervene --method greedy --model OUT`` scores
it) with ``training.json`` (config, losses, seconds, trained parameters, separability before and
after) and ``losses.csv``. A finished ``OUT`` is not trained again (``--overwrite`` to redo); one made
with other options is refused ("OUT holds a retrain run with steps=150 ...; use a new --out or
--overwrite"). ``OUT`` carries a marker (``.lens_halluc.json``): a directory with files we did not
write is refused, ``--overwrite`` removes only what an earlier run wrote, and a second process
writing the same ``OUT`` is refused.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

from ..data.flavour import FLAVOURS
from .common import (add_image_args, add_model_args, fraction, image_kwargs, friendly_errors, load_heads, load_model_from_args,
                     non_negative_float, non_negative_int, positive_float, positive_int)

PROG = "python -m lens_halluc.retrain"
METHODS = ("tfhh", "seed", "causal")


def _sites(text: str) -> str:
    """``--sites``: a comma list of ``lm`` and ``projector``."""
    parts = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in parts if s not in ("lm", "projector")]
    if not parts or bad:
        raise argparse.ArgumentTypeError(f"expected a comma list of lm, projector, got {text!r}")
    return ",".join(parts)


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m lens_halluc.retrain`` flags.

    Example
    -------
    >>> build_parser().parse_args(["--method", "seed", "--out", "runs/x"]).steps
    150
    """
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--out", required=True, type=Path, help="directory of the re-trained checkpoint")
    p.add_argument("--flavour", choices=FLAVOURS, default="reference",
                   help="reference: what the paper's code trains (default); corrected: our variant (FIDELITY.md)")
    p.add_argument("--steps", type=positive_int, default=150, help="optimiser steps (>= 1; default 150)")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="learning rate, > 0 (reference: tfhh 2e-5, seed 2e-6, causal 2e-5; corrected: 1e-3, 5e-4, 1e-3)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="examples per step (>= 1; default 16)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="training seed (>= 0)")
    p.add_argument("--overwrite", action="store_true", help="train again even if OUT holds a finished run")
    p.add_argument("--no-progress", action="store_true")
    add_model_args(p)
    add_image_args(p)
    d = p.add_argument_group("training data (default: the organism's training scenes)")
    d.add_argument("--n-train", type=positive_int, default=2000, help="training examples (>= 1; default 2000)")
    d.add_argument("--question-fraction", type=fraction, default=0.5,
                   help="organism: share of yes/no questions, between 0 and 1 (0.5)")
    d.add_argument("--instances", default=None, help="COCO instances JSON (real data)")
    d.add_argument("--references", default=None, help="COCO captions JSON (real data: the training captions)")
    d.add_argument("--image-dir", default=None, help="image directory (real data)")
    d.add_argument("--confounder-data", type=Path, default=None,
                   help="export with objects.json for the confounder dictionary / separability (organism: exported)")
    d.add_argument("--separability-images", type=non_negative_int, default=200,
                   help="images for separability before/after (0 skips; default 200)")
    t = p.add_argument_group("tfhh")
    t.add_argument("--heads", default=None, help="top_heads.json of the hallucination heads")
    t.add_argument("--k", type=positive_int, default=None,
                   help="train the first k heads of --heads (reference 30, from head_scores.csv beside it when the "
                        "file lists fewer; corrected: the file's own k)")
    t.add_argument("--lambda", dest="lam", type=non_negative_float, default=2.0,
                   help="weight of the text-attention term, >= 0 (2)")
    t.add_argument("--train-lm-head", action=argparse.BooleanOptionalAction, default=None,
                   help="also train the LM head (reference: yes; corrected: no)")
    t.add_argument("--text-mass", choices=("not-image", "text"), default=None,
                   help="text attention = mass on every non-image key (reference) or on TEXT-role keys (corrected)")
    t.add_argument("--rows", choices=("answer", "predicting"), default=None,
                   help="loss rows: the answer tokens (reference) or the rows predicting them (corrected)")
    t.add_argument("--loss-mean", choices=("per-layer", "pooled"), default=None,
                   help="mean within each layer then over layers (reference) or one pooled mean (corrected)")
    t.add_argument("--control", choices=("none", "random"), default="none",
                   help="random: train k random heads (not the listed ones) instead, as the control")
    t.add_argument("--control-seed", type=non_negative_int, default=0, help="seed of the random heads (>= 0)")
    s = p.add_argument_group("seed (distillation)")
    s.add_argument("--rank", type=positive_int, default=None, help="LoRA rank, >= 1 (reference 64, corrected 8)")
    s.add_argument("--lora-alpha", type=positive_int, default=None, help="LoRA alpha (reference 128, corrected 16)")
    s.add_argument("--lora-dropout", type=fraction, default=None, help="LoRA dropout (reference 0.05, corrected 0)")
    noise = s.add_mutually_exclusive_group()
    noise.add_argument("--signal", type=fraction, default=None,
                       help="signal share α of the teacher's noisy image x' = √α·x + √(1−α)·ε, between 0 and 1 "
                            "(reference 0.3, corrected 0.7)")
    noise.add_argument("--noise", type=fraction, default=None,
                       help="noise share 1 − α, between 0 and 1 (the flag before --signal: --noise 0.3 = --signal 0.7)")
    s.add_argument("--beta-schedule", choices=("quantile", "continuous"), default=None,
                   help="β per sample by confidence quantiles (reference) or β_max·(1 − max p) (corrected)")
    s.add_argument("--temperature", type=positive_float, default=2.0, help="distillation temperature T, > 0 (2)")
    s.add_argument("--w", type=fraction, default=0.7, help="KL weight w, between 0 and 1; CE gets 1 - w (0.7)")
    s.add_argument("--beta-max", type=non_negative_float, default=1.0,
                   help="largest purification weight β of the continuous schedule, >= 0 (1)")
    c = p.add_argument_group("causal")
    c.add_argument("--sites", type=_sites, default="lm", help="comma list of lm, projector (default lm)")
    c.add_argument("--module", choices=("reference", "corrected"), default=None,
                   help="module kind: Causal-LLaVA's (reference) or ours (corrected)")
    c.add_argument("--trainable", choices=("model", "module"), default=None,
                   help="what trains: language model + projector + module (reference) or the module (corrected)")
    c.add_argument("--train-projector", action="store_true", help="with --trainable module: train the projector too")
    c.add_argument("--module-heads", type=positive_int, default=None,
                   help="attention heads of the causal module (reference: the model's; corrected 4)")
    c.add_argument("--dict-images", type=positive_int, default=200, help="images for the confounder dictionary (>= 1; 200)")
    return p


def _examples(args, vlm):
    if args.instances or args.image_dir or args.references:
        if not (args.references and args.image_dir):
            raise ValueError("real training data needs --references (captions JSON) and --image-dir.")
        from ..data.coco import CocoDataset
        from ..training import coco_caption_examples

        ds = CocoDataset.load(args.instances, args.references, args.image_dir, **image_kwargs(args))
        return coco_caption_examples(ds, args.n_train, args.seed)
    from ..organism.examples import training_examples

    return training_examples(vlm.path, args.n_train, seed=0, question_fraction=args.question_fraction)


def _confounder_data(args, vlm, n: int) -> Path | None:
    if args.confounder_data is not None:
        if not (args.confounder_data / "objects.json").is_file():
            raise FileNotFoundError(f"{args.confounder_data / 'objects.json'} not found: --confounder-data must be an "
                                    "export with per-object patches (python -m lens_halluc.organism export, or your own).")
        return args.confounder_data
    from ..organism import split_dir

    try:  # the organism's own scenes (normal split, seed 1), exported once beside OUT
        return split_dir("normal", n=n, seed=1, model=vlm.path, cache_dir=args.out.parent / "_data")
    except ValueError:  # not an organism checkpoint: no default export
        return None


def _tfhh_k(args) -> int | None:
    """How many heads of ``--heads`` TFHH trains: ``--k``, else the flavour's (reference 30, corrected the file's k).

    The reference takes ``hal_heads[:30]``: at most the heads there are. So without ``--k``, a file
    listing fewer than 30 heads and no ``head_scores.csv`` beside it (to rank the others) gives all
    its heads; with ``head_scores.csv`` the first 30 of its ranking.
    """
    from ..training import FLAVOURS_TFHH

    if args.k is not None:
        return args.k
    k = FLAVOURS_TFHH[args.flavour]["k"]
    if k is None:
        return None
    path = Path(args.heads)
    path = path / "top_heads.json" if path.is_dir() else path
    if (path.parent / "head_scores.csv").is_file():
        return k
    data = json.loads(path.read_text())
    listed = data.get("heads", []) if isinstance(data, dict) else data
    return min(k, len(listed))


def run(args: argparse.Namespace) -> dict:
    """Flags → ``lens_halluc.train.<method>(...)`` → ``.save(OUT)``; returns the ``training.json`` record."""
    from .. import training as train
    from ..models.heads import random_heads, read_heads

    done = train.load_training_info(args.out)
    if done is not None and not args.overwrite:
        print(f"{args.out} already holds a finished {done['method']} run (--overwrite to train again).")
        return done
    if args.method == "tfhh":  # flag and heads-file errors before the model loads
        if not args.heads:
            raise ValueError("--method tfhh needs --heads top_heads.json (written by python -m lens_halluc.attribute).")
        read_heads(args.heads)
    vlm = load_model_from_args(args)
    heads = None
    if args.method == "tfhh":
        heads = load_heads(args.heads, vlm, k=_tfhh_k(args))  # errors name the file
        if args.control == "random":
            heads = random_heads(vlm, len(heads), exclude=heads, seed=args.control_seed)
    elif args.control != "none":
        raise ValueError("--control random applies to --method tfhh only.")
    examples = _examples(args, vlm)
    confounders = _confounder_data(args, vlm, max(args.separability_images, args.dict_images)) \
        if (args.separability_images or args.method == "causal") else None
    options = dict(steps=args.steps, batch_size=args.batch_size, seed=args.seed, lr=args.lr)
    common = dict(flavour=args.flavour, confounders=confounders, separability_images=args.separability_images,
                  progress=not args.no_progress)
    if args.method == "tfhh":
        res = train.tfhh(vlm, heads, examples, lam=args.lam, train_lm_head=args.train_lm_head, k=len(heads),
                         text_mass=args.text_mass, rows=args.rows, loss_mean=args.loss_mean,
                         info={"control": args.control, "heads_source": str(args.heads)}, **common, **options)
    elif args.method == "seed":
        res = train.seed_distill(vlm, examples, rank=args.rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                 signal=args.signal if args.noise is None else 1.0 - args.noise, beta_schedule=args.beta_schedule, temperature=args.temperature,
                                 w=args.w, beta_max=args.beta_max, **common, **options)
    else:
        if confounders is None:
            raise ValueError("--method causal needs a confounder export: pass --confounder-data DIR (with objects.json).")
        res = train.causal_module(vlm, examples, dict_images=args.dict_images, n_heads=args.module_heads,
                                  module=args.module, trainable=args.trainable,
                                  sites=tuple(s for s in args.sites.split(",") if s),
                                  train_projector=args.train_projector, **common, **options)
    res.save(args.out)
    print(json.dumps(res.summary))
    print(f"checkpoint: {args.out}")
    return res.record.to_dict()


def main(argv: Sequence[str] | None = None) -> dict:
    """Parse ``argv`` and run; input errors exit with status 2 and one line on stderr.

    Example
    -------
    >>> main(["--method", "seed", "--out", "runs/retrain/seed", "--steps", "150"])  # doctest: +SKIP
    """
    args = build_parser().parse_args(argv)
    from ..data.outputs import output_dir

    with friendly_errors(PROG), output_dir(args.out, "retrain", overwrite=args.overwrite, options=_options(args),
                                               adopt=("training.json", "*")):
        return run(args)


def _options(args: argparse.Namespace) -> dict:
    """The flags that change the re-trained model: a finished OUT made with others is refused, not returned."""
    skip = {"out", "overwrite", "no_progress"}
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in sorted(vars(args).items()) if k not in skip}
