"""Re-train a model against hallucination: TFHH, SEED-style distillation or Causal-LLaVA's module.

Examples
--------
On the shipped organism (training scenes of its world), heads from the attribution run::

    python -m lens_halluc.retrain --method tfhh --heads figures/top_heads.json --out runs/retrain/tfhh
    python -m lens_halluc.retrain --method tfhh --heads figures/top_heads.json --control random \\
        --out runs/retrain/tfhh-random                  # same k, random heads (the control)
    python -m lens_halluc.retrain --method seed --out runs/retrain/seed
    python -m lens_halluc.retrain --method causal --out runs/retrain/causal

On a real LLaVA with COCO captions (the causal module also needs a confounder export with
``objects.json``, see ``python -m lens_halluc.analysis confounders``)::

    python -m lens_halluc.retrain --method tfhh --heads top_heads.json --model llava-hf/llava-1.5-7b-hf \\
        --device cuda --dtype bfloat16 --instances instances_train2014.json \\
        --references captions_train2014.json --image-dir train2014 --n-train 5000 --out runs/retrain/llava-tfhh

``OUT`` becomes a checkpoint (``python -m lens_halluc.intervene --method greedy --model OUT`` scores
it) with ``training.json`` (config, losses, seconds, trained parameters, separability before and
after) and ``losses.csv``. A finished ``OUT`` is not trained again (``--overwrite`` to redo).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from .cli.common import add_model_args, friendly_errors, load_model_from_args

PROG = "python -m lens_halluc.retrain"
METHODS = ("tfhh", "seed", "causal")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--out", required=True, type=Path, help="directory of the re-trained checkpoint")
    p.add_argument("--steps", type=int, default=150, help="optimiser steps (default 150)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (tfhh 1e-3, seed 5e-4, causal 1e-3)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="train again even if OUT holds a finished run")
    p.add_argument("--no-progress", action="store_true")
    add_model_args(p)
    d = p.add_argument_group("training data (default: the organism's training scenes)")
    d.add_argument("--n-train", type=int, default=2000, help="training examples (default 2000)")
    d.add_argument("--question-fraction", type=float, default=0.5, help="organism: share of yes/no questions (0.5)")
    d.add_argument("--instances", default=None, help="COCO instances JSON (real data)")
    d.add_argument("--references", default=None, help="COCO captions JSON (real data: the training captions)")
    d.add_argument("--image-dir", default=None, help="image directory (real data)")
    d.add_argument("--confounder-data", type=Path, default=None,
                   help="export with objects.json for the confounder dictionary / separability (organism: exported)")
    d.add_argument("--separability-images", type=int, default=200,
                   help="images for separability before/after (0 skips; default 200)")
    t = p.add_argument_group("tfhh")
    t.add_argument("--heads", default=None, help="top_heads.json of the hallucination heads")
    t.add_argument("--lambda", dest="lam", type=float, default=2.0, help="weight of the text-attention term (2)")
    t.add_argument("--train-lm-head", action="store_true", help="also train the LM head")
    t.add_argument("--control", choices=("none", "random"), default="none",
                   help="random: train k random heads (not the listed ones) instead, as the control")
    t.add_argument("--control-seed", type=int, default=0)
    s = p.add_argument_group("seed (distillation)")
    s.add_argument("--rank", type=int, default=8, help="LoRA rank (8)")
    s.add_argument("--noise", type=float, default=0.3, help="noise fraction α of the teacher's noisy image (0.3)")
    s.add_argument("--temperature", type=float, default=2.0, help="distillation temperature T (2)")
    s.add_argument("--w", type=float, default=0.7, help="KL weight w; CE gets 1 - w (0.7)")
    s.add_argument("--beta-max", type=float, default=1.0, help="largest purification weight β (1)")
    c = p.add_argument_group("causal")
    c.add_argument("--sites", default="lm", help="comma list of lm, projector (default lm)")
    c.add_argument("--train-projector", action="store_true", help="train the projector with the module")
    c.add_argument("--module-heads", type=int, default=4)
    c.add_argument("--dict-images", type=int, default=200, help="images for the confounder dictionary (200)")
    return p


def _examples(args, vlm):
    from .training import coco_caption_examples, organism_examples

    if args.instances or args.image_dir or args.references:
        if not (args.references and args.image_dir):
            raise ValueError("real training data needs --references (captions JSON) and --image-dir.")
        from .data.coco import CocoDataset

        ds = CocoDataset.load(args.instances, args.references, args.image_dir)
        return coco_caption_examples(ds, args.n_train, args.seed)
    return organism_examples(vlm.path, args.n_train, seed=0, question_fraction=args.question_fraction)


def _confounder_data(args, vlm, n: int) -> Path | None:
    if args.confounder_data is not None:
        if not (args.confounder_data / "objects.json").is_file():
            raise FileNotFoundError(f"{args.confounder_data / 'objects.json'} not found: --confounder-data must be an "
                                    "export with per-object patches (python -m lens_halluc.organism export, or your own).")
        return args.confounder_data
    from .analysis.confounders import _organism_data

    try:
        return _organism_data(vlm.path, args.out.parent / "_data", n)
    except ValueError:
        return None


def separability_summary(vlm, data_dir: Path, n_images: int) -> dict:
    """Separability at the last layer (visual and text): silhouette, scatter ratio, co-occurring-pair distance ratio."""
    from .analysis.confounders import collect_representations, cooccurrence_counts, load_export, separability

    ds, objects, pairs = load_export(data_dir)
    ids = ds.image_ids[:n_images]
    L = vlm.spec.n_layers
    reps = collect_representations(vlm, ds, objects, layers=[L], image_ids=ids)
    rows = separability(reps, pairs, cooccurrence_counts(ds, ids))
    return {r["modality"]: {k: r[k] for k in ("silhouette", "scatter_ratio", "pair_distance_ratio")} | {"layer": L}
            for r in rows}


def run(args) -> dict:
    from .training import (CausalConfig, ConfounderAttention, DistillConfig, TFHHConfig, attach_causal_module,
                           build_confounder_dictionary, load_training_info, train_causal, train_seed_distillation,
                           train_tfhh)

    done = load_training_info(args.out)
    if done is not None and not args.overwrite:
        print(f"{args.out} already holds a finished {done['method']} run (--overwrite to train again).")
        return done
    vlm = load_model_from_args(args)
    source = vlm.path
    progress = not args.no_progress
    heads = None
    if args.method == "tfhh":
        if not args.heads:
            raise ValueError("--method tfhh needs --heads top_heads.json (written by python -m lens_halluc.attribute).")
        from .intervene import read_heads

        heads = [tuple(h) for h in vlm.spec.check_heads(read_heads(args.heads))]
        if args.control == "random":
            from .analysis.reweighting import random_heads

            heads = random_heads(vlm.spec.n_layers, vlm.spec.n_heads, heads, len(heads), 1, args.control_seed)[0]
    elif args.control != "none":
        raise ValueError("--control random applies to --method tfhh only.")
    examples = _examples(args, vlm)
    sep_data = _confounder_data(args, vlm, max(args.separability_images, args.dict_images)) \
        if (args.separability_images or args.method == "causal") else None
    before = separability_summary(vlm, sep_data, args.separability_images) if sep_data and args.separability_images else None

    if args.method == "tfhh":
        cfg = TFHHConfig(steps=args.steps, lr=args.lr or 1e-3, lam=args.lam, batch_size=args.batch_size,
                         train_lm_head=args.train_lm_head, seed=args.seed)
        res = train_tfhh(vlm, examples, heads, cfg, progress)
        res.info.update(control=args.control, heads_source=str(args.heads))
    elif args.method == "seed":
        cfg = DistillConfig(steps=args.steps, lr=args.lr or 5e-4, batch_size=args.batch_size, rank=args.rank,
                            noise=args.noise, temperature=args.temperature, w=args.w, beta_max=args.beta_max,
                            seed=args.seed)
        res = train_seed_distillation(vlm, examples, cfg, progress)
    else:
        if sep_data is None:
            raise ValueError("--method causal needs a confounder export: pass --confounder-data DIR (with objects.json).")
        sites = tuple(s for s in args.sites.split(",") if s)
        for site in sites:
            D = build_confounder_dictionary(vlm, sep_data, site, args.dict_images)
            attach_causal_module(vlm, ConfounderAttention(D, n_heads=args.module_heads), site)
        cfg = CausalConfig(steps=args.steps, lr=args.lr or 1e-3, batch_size=args.batch_size, n_heads=args.module_heads,
                           sites=sites, train_projector=args.train_projector, seed=args.seed)
        res = train_causal(vlm, examples, cfg, progress)
    if before is not None:
        res.info["separability"] = {"before": before, "after": separability_summary(vlm, sep_data, args.separability_images)}
    res.info["n_examples"] = len(examples)
    res.save(vlm, args.out, source)
    summary = res.to_dict()
    print(json.dumps({k: summary[k] for k in ("method", "steps", "seconds", "trained_params", "initial_loss", "final_loss")}))
    print(f"checkpoint: {args.out}")
    return summary


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.n_train < 1:
        build_parser().error("--steps, --batch-size and --n-train must be positive.")
    with friendly_errors(PROG):
        return run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
