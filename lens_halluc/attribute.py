"""Attribute hallucinated words to attention heads: ``python -m lens_halluc.attribute``.

With no arguments it runs on the shipped model organism's break split (anchor present, partner
absent): greedy captions, CHAIR targets, the exact influence of every head on every object word
(local zero-ablation, all heads in one batched pass per caption), and the score
``S = mean_Hal I − mean_NonHal I``. On a real model::

    python -m lens_halluc.attribute --model llava-hf/llava-1.5-7b-hf --device cuda --dtype bfloat16 \\
        --instances annotations/instances_val2014.json --references annotations/captions_val2014.json \\
        --image-dir val2014/ --n-images 500 --top-k 20 --out runs/llava-attr

Outputs in ``--out``: head_scores.csv, top_heads.json, tokens.csv, influences.npz, samples.jsonl,
heads.html, heads.png, manifest.json (+ captions*.jsonl and parts/ for resuming). Rerun the same
command to resume. ``torchrun --nproc-per-node N -m lens_halluc.attribute ...`` shards images.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from .cli.common import add_model_args, friendly_errors
from .models.prompts import CAPTION_PROMPT


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lens_halluc.attribute", description=__doc__.split("\n\n")[0],
                                epilog="Rerun the same command to resume an interrupted run.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    d = p.add_argument_group("data (default: the organism's break split)")
    d.add_argument("--instances", type=Path, default=None, help="COCO instances JSON")
    d.add_argument("--references", type=Path, default=None, help="COCO captions JSON (CHAIR ground truth)")
    d.add_argument("--image-dir", type=Path, default=None, help="directory of the image files")
    d.add_argument("--n-images", type=int, default=200, help="images to caption (first N after shuffling with --seed)")
    d.add_argument("--seed", type=int, default=0, help="image sampling seed")
    a = p.add_argument_group("attribution")
    a.add_argument("--scope", choices=("local", "global"), default="local",
                   help="ablate at the predicting position only (reference) or everywhere")
    a.add_argument("--ablation", choices=("zero", "mean"), default="zero",
                   help="replace a head's output by zero or by its mean over the captions")
    a.add_argument("--metric", choices=("prob_diff", "log_prob_diff"), default="prob_diff")
    a.add_argument("--method", choices=("exact", "atp", "naive"), default="exact",
                   help="exact batched ablation, attribution patching, or the per-head loop")
    a.add_argument("--top-k", type=int, default=None,
                   help="heads in top_heads.json (default: min(20, 10%% of all heads))")
    a.add_argument("--keep", choices=("hallucinated", "all"), default="hallucinated",
                   help="captions to attribute: those with ≥ 1 hallucination (reference) or all")
    a.add_argument("--chunk-size", type=int, default=1024, help="exact local: most copy rows per decoder-layer call (memory bound)")
    g = p.add_argument_group("generation")
    g.add_argument("--prompt", default=CAPTION_PROMPT)
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--batch-size", type=int, default=16)
    o = p.add_argument_group("output")
    o.add_argument("--out", type=Path, default=Path("runs/attribute"), help="run directory")
    o.add_argument("--overwrite", action="store_true", help="discard previous results in --out")
    o.add_argument("--no-png", action="store_true", help="skip the static PNG")
    o.add_argument("--no-progress", action="store_true")
    return p


def _distributed():
    """(rank, world_size) under torchrun, initialising the process group; (0, 1) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _data(args, out: Path):
    """The dataset to attribute on: user files, or the organism's break split exported under ``out``."""
    from .data.coco import CocoDataset

    if args.instances is not None:
        if args.image_dir is None:
            raise ValueError("--instances needs --image-dir (and --references for CHAIR's caption ground truth).")
        return CocoDataset.load(args.instances, args.references, args.image_dir), {
            "instances": str(args.instances), "references": str(args.references), "image_dir": str(args.image_dir)}
    from .models.loading import resolve_model_path
    from .organism.export import export_split
    from .organism.recipe import read_organism_meta

    model_dir = resolve_model_path(args.model)
    try:
        world, _ = read_organism_meta(model_dir)
    except FileNotFoundError:
        raise ValueError(f"{model_dir} is not an organism checkpoint: pass --instances, --references and "
                         "--image-dir for a real dataset.") from None
    d = out / "data" / f"break-{args.n_images}"
    if not (d / "meta.json").is_file():
        export_split(world, "break", args.n_images, 1, d, overwrite=True)
    return (CocoDataset.load(d / "instances.json", d / "captions.json", d / "images"),
            {"organism_split": "break", "n": args.n_images, "seed": 1, "dir": str(d)})


def run(args) -> dict:
    import shutil

    import torch

    from .attribution.pipeline import (TOKEN_COLUMNS, AttributionConfig, assemble, attribute_sample,
                                       collect_samples, head_scores, samples_jsonl, to_csv)
    from .cli.common import load_model_from_args
    from .generation.jsonl import read_jsonl
    from .generation.runner import caption_dataset

    rank, world = _distributed()
    out: Path = args.out
    if args.overwrite and rank == 0 and out.exists():
        shutil.rmtree(out)
    _barrier(world)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    timings = {}
    dataset, data_info = _data(args, out) if rank == 0 else (None, None)
    _barrier(world)
    if rank != 0:
        dataset, data_info = _data(args, out)
    vlm = load_model_from_args(args)
    cfg = AttributionConfig(scope=args.scope, ablation=args.ablation, metric=args.metric, method=args.method,
                            keep=args.keep, chunk_size=args.chunk_size,
                            top_k=args.top_k or min(20, max(1, round(0.1 * vlm.spec.n_total_heads))))
    ids = list(dataset.image_ids)
    np.random.default_rng(args.seed).shuffle(ids)
    ids = sorted(ids[: args.n_images], key=dataset.image_ids.index)
    missing = [i for i in ids if not (dataset.image_dir / dataset.images[i].file_name).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image file(s) missing from {dataset.image_dir} "
                                f"(first: {dataset.images[missing[0]].file_name}); check --image-dir.")

    # 1. captions, one file per rank, resumable
    caption_dataset(vlm, dataset, out / f"captions.rank{rank}.jsonl", prompt=args.prompt,
                    max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                    image_ids=[i for k, i in enumerate(ids) if k % world == rank], progress=not args.no_progress)
    _barrier(world)
    rows = {}
    for f in sorted(out.glob("captions.rank*.jsonl")):
        rows.update({r["image_id"]: r for r in read_jsonl(f)})
    rows = [rows[i] for i in ids if i in rows]
    timings["captioning_s"] = time.time() - t0

    # 2. targets from CHAIR, identical on every rank
    samples = collect_samples(vlm, dataset, rows, keep=cfg.keep)
    means = None
    if cfg.ablation == "mean":
        means_path = out / "means.npy"
        if not means_path.is_file():
            if rank == 0:
                from .attribution import head_means
                from .attribution.pipeline import sample_pixels

                # reference set: every caption position of the attributed captions
                seqs = [(torch.tensor(s.input_ids), sample_pixels(vlm, s)) for s in samples]
                pos = [list(range(s.n_prompt, len(s.input_ids))) for s in samples]
                np.save(means_path, head_means(vlm, seqs, pos).numpy())
            _barrier(world)
        means = torch.from_numpy(np.load(means_path))

    # 3. influences, one part per sample, resumable
    t1 = time.time()
    parts = out / "parts"
    parts.mkdir(exist_ok=True)
    from tqdm.auto import tqdm

    mine = [s for s in samples if s.sample_id % world == rank]
    for s in tqdm(mine, desc="attributing", disable=args.no_progress or rank != 0):
        attribute_sample(vlm, s, parts, cfg, means)
    timings["attribution_s"] = time.time() - t1
    _barrier(world)
    if rank != 0:
        return {}

    # 4. assemble tables, figure and manifest (rank 0)
    tables = assemble(parts, samples, vlm.spec.n_layers, vlm.spec.n_heads)
    scores = head_scores(tables.influence, tables.tokens["hallucinated"])
    top = [[r["layer"], r["head"]] for r in scores[: cfg.top_k]]
    (out / "head_scores.csv").write_text(to_csv(scores, ("layer", "head", "score", "mean_hal", "mean_nonhal")))
    (out / "tokens.csv").write_text(to_csv(tables.tokens, TOKEN_COLUMNS))
    np.savez(out / "influences.npz", influence=tables.influence)
    (out / "samples.jsonl").write_text(samples_jsonl(samples))
    (out / "top_heads.json").write_text(json.dumps({
        "heads": top, "k": cfg.top_k, "scores": [r["score"] for r in scores[: cfg.top_k]],
        "scope": cfg.scope, "ablation": cfg.ablation, "metric": cfg.metric, "method": cfg.method,
        "model": str(vlm.path)}, indent=1))
    from .figures.heads import heads_heatmap
    from .figures.io import save_figure

    fig = heads_heatmap(scores, vlm.spec.n_layers, vlm.spec.n_heads, cfg.top_k)
    figure_files = save_figure(fig, out / "heads", png=not args.no_png)
    timings["total_s"] = time.time() - t0
    n_hal = int(sum(tables.tokens["hallucinated"]))
    manifest = {
        "model": str(vlm.path), "spec": vlm.spec.__dict__ | {"eos_token_ids": list(vlm.spec.eos_token_ids)},
        "data": data_info, "config": cfg.__dict__, "seed": args.seed, "n_images": len(ids),
        "n_captions_attributed": len(samples), "n_tokens": len(tables.tokens["index"]), "n_hallucinated": n_hal,
        "prompt": args.prompt, "max_new_tokens": args.max_new_tokens, "world_size": world,
        "versions": _versions(), "timings": {k: round(v, 2) for k, v in timings.items()},
        "figures": [str(f) for f in figure_files],
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return {"top": top, "scores": scores, "out": out, "figures": figure_files, "manifest": manifest}


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("lens_halluc", "torch", "transformers", "nnsight", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    with friendly_errors("lens_halluc.attribute"):
        res = run(args)
    if not res:
        return
    m = res["manifest"]
    print(f"attributed {m['n_tokens']} object tokens ({m['n_hallucinated']} hallucinated) in "
          f"{m['n_captions_attributed']} captions; {m['timings']['total_s']:.1f} s")
    print("top heads (layer, head, score):")
    for r in res["scores"][: len(res["top"])]:
        print(f"  L{r['layer']:>2} H{r['head']:>2}  {r['score']:+.4f}")
    print(f"figure: {res['figures'][-1]}\nresults: {res['out']}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
