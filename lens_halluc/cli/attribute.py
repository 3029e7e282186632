"""Attribute hallucinated words to attention heads: ``python -m lens_halluc.attribute``.

With no arguments it runs on the shipped model organism's break split (anchor present, partner
absent): greedy captions, CHAIR targets, the exact influence of every head on every object word
(local zero-ablation, all heads in one batched pass per caption), and the score
``S = mean_Hal I − mean_NonHal I``. On a real model::

    python -m lens_halluc.attribute --model llava-hf/llava-1.5-7b-hf --device cuda --dtype bfloat16 \\
        --instances annotations/instances_val2014.json --references annotations/captions_val2014.json \\
        --image-dir val2014/ --n-images 500 --top-k 20 --out runs/llava-attr

Outputs in ``--out``: head_scores.csv, top_heads.json, tokens.csv, influences.npz, samples.jsonl,
heads.html, heads.png, manifest.json (what ``lh.Attribution(...).fit(...).save(out)`` writes,
byte for byte) and timings.json (the one file that differs between equal runs: times, and this
command's options), + captions*.jsonl and parts/ for resuming. Rerun the same command to resume.
``--out`` carries a marker (``.lens_halluc.json``) listing what this command wrote: a directory
with other files is refused, ``--overwrite`` removes only what the marker lists, and a second
process on the same ``--out`` is refused. Parts are keyed by a hash of their inputs (another
``--metric`` computes new ones beside the old); captions made with another model, prompt, token
budget or dataset are refused ("use a new --out or --overwrite").
``torchrun --nproc-per-node N -m lens_halluc.attribute ...`` shards images.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .common import add_image_args, add_model_args, friendly_errors, image_kwargs, non_negative_int, positive_int


# lens_halluc.attribution.METRICS, spelled out so that --help does not import torch (a test keeps them equal)
METRIC_CHOICES = ("prob_diff", "abs_prob_diff", "log_prob_diff")


def build_parser() -> argparse.ArgumentParser:
    """The command's flags.

    Example
    -------
    >>> build_parser().parse_args(["--n-images", "20"]).n_images
    20
    """
    from ..models.prompts import CAPTION_PROMPT

    p = argparse.ArgumentParser(prog="python -m lens_halluc.attribute", description=__doc__.split("\n\n")[0],
                                epilog="Rerun the same command to resume an interrupted run.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    d = p.add_argument_group("data (default: the organism's break split)")
    d.add_argument("--instances", type=Path, default=None, help="COCO instances JSON")
    d.add_argument("--references", type=Path, default=None, help="COCO captions JSON (CHAIR ground truth)")
    d.add_argument("--image-dir", type=Path, default=None, help="directory of the image files")
    d.add_argument("--n-images", type=positive_int, default=200,
                   help="images to caption (first N after shuffling with --seed; N >= 1)")
    d.add_argument("--seed", type=non_negative_int, default=0, help="image sampling seed (>= 0)")
    a = p.add_argument_group("attribution")
    a.add_argument("--scope", choices=("local", "global"), default="local",
                   help="ablate at the predicting position only (reference) or everywhere")
    a.add_argument("--ablation", choices=("zero", "mean"), default="zero",
                   help="replace a head's output by zero or by its mean over the captions")
    a.add_argument("--metric", choices=METRIC_CHOICES, default="prob_diff",
                   help="influence of a head on a token: p - p_ablated (the reference's default), "
                        "|p - p_ablated|, or log p - log p_ablated")
    a.add_argument("--method", choices=("exact", "atp", "naive"), default="exact",
                   help="exact batched ablation, attribution patching, or the per-head loop")
    a.add_argument("--top-k", type=positive_int, default=None,
                   help="heads in top_heads.json, between 1 and the model's number of heads "
                        "(default: min(20, 10%% of all heads))")
    a.add_argument("--keep", choices=("hallucinated", "all"), default="hallucinated",
                   help="captions to attribute: those with ≥ 1 hallucination (reference) or all")
    a.add_argument("--chunk-size", type=positive_int, default=1024,
                   help="exact local: most copy rows per decoder-layer call (memory bound; >= 1)")
    g = p.add_argument_group("generation")
    g.add_argument("--prompt", default=CAPTION_PROMPT)
    g.add_argument("--max-new-tokens", type=positive_int, default=128, help="caption token budget (>= 1)")
    g.add_argument("--batch-size", type=positive_int, default=16, help="captioning batch size (>= 1)")
    o = p.add_argument_group("output")
    o.add_argument("--out", type=Path, default=Path("runs/attribute"), help="run directory")
    o.add_argument("--overwrite", action="store_true",
                   help="discard what earlier runs of this command wrote in --out (only that; --out must be ours)")
    o.add_argument("--no-png", action="store_true", help="skip the static PNG")
    o.add_argument("--no-progress", action="store_true")
    add_image_args(p)
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


def _data(instances: Path | None, references: Path | None, image_dir: Path | None, model, n: int, **images):
    """(dataset, description): the user's COCO files, or the organism's break split (seed 1) of ``model``'s world."""
    from ..data.coco import CocoDataset

    if instances is not None:
        if image_dir is None:
            raise ValueError("--instances needs --image-dir (and --references for CHAIR's caption ground truth).")
        return CocoDataset.load(instances, references, image_dir, **images), {
            "instances": str(instances), "references": str(references), "image_dir": str(image_dir)}
    from .. import organism
    from ..models.loading import resolve_model_path

    try:  # exported once into the shared cache (keyed by the world and the arguments), then reused
        ds = organism.split("break", n=n, seed=1, model=resolve_model_path(model) if model else None)
    except ValueError as e:
        raise ValueError(f"{e} Or pass --instances, --references and --image-dir for a real dataset.") from None
    return ds, {"organism_split": "break", "n": n, "seed": 1, "image_dir": str(ds.image_dir)}


def _image_ids(dataset, n: int, seed: int) -> list[int]:
    """The first ``n`` image ids after shuffling with ``seed``, in dataset order; their files must exist."""
    import numpy as np

    ids = list(dataset.image_ids)
    np.random.default_rng(seed).shuffle(ids)
    ids = sorted(ids[:n], key=dataset.image_ids.index)
    dataset.check_images(ids)  # inside --image-dir, present, decodable, within --max-image-pixels
    return ids


def main(argv: list[str] | None = None) -> None:
    """Flags → captions (resumable, one file per rank) → ``Attribution(...).fit`` → ``.save(--out)``.

    Example
    -------
    >>> main(["--n-images", "20", "--max-new-tokens", "30", "--out", "/tmp/attr", "--no-png"])   # doctest: +SKIP
    """
    args = build_parser().parse_args(argv)
    with friendly_errors("lens_halluc.attribute"):
        attr = _attribute(args)
    if attr is None:  # a torchrun rank other than 0
        return
    print(f"attributed {len(attr.tokens_)} object tokens ({attr.n_hallucinated_} hallucinated) in "
          f"{len(attr.samples_)} captions; {attr.timings_['total_s']:.1f} s")
    print("top heads (layer, head, score):")
    for r in attr.scores_.iloc[: attr.top_k_].itertuples():
        print(f"  L{r.layer:>2} H{r.head:>2}  {r.score:+.4f}")
    figure = args.out / ("heads.png" if (args.out / "heads.png").is_file() and not args.no_png else "heads.html")
    print(f"figure: {figure}\nresults: {args.out}")
    sys.stdout.flush()


# what an attribution run (CLI or Attribution.save) writes: a run dir without a marker is taken as ours
ADOPT = ("manifest.json", "head_scores.csv", "top_heads.json", "tokens.csv", "influences.npz", "samples.jsonl",
         "heads.html", "heads.png", "plotly.min.js", "timings.json", "captions.rank*.jsonl*", "parts", "cache")


def _attribute(args):
    from contextlib import ExitStack

    from ..data.outputs import output_dir

    rank, world = _distributed()
    with ExitStack() as stack:
        if rank == 0:  # one marker and one lock per --out; --overwrite removes only what an earlier run wrote
            # options=None: the parts are keyed by a hash of their inputs and the captions refuse other
            # options themselves (captions.rankN.jsonl.config.json), so a rerun never mixes stale results
            stack.enter_context(output_dir(args.out, "attribute", overwrite=args.overwrite, adopt=ADOPT))
        _barrier(world)
        return _attribute_in(args, rank, world)


def _attribute_in(args, rank: int, world: int):
    from ..attribution.result import TIMINGS, Attribution
    from ..data.outputs import write_text_atomic
    from ..generation.jsonl import read_jsonl
    from ..generation.runner import caption_dataset
    from .common import load_model_from_args

    out: Path = args.out
    t0 = time.time()
    data = lambda: _data(args.instances, args.references, args.image_dir, args.model, args.n_images,  # noqa: E731
                         **image_kwargs(args))
    dataset, data_info = data() if rank == 0 else (None, None)  # rank 0 exports the organism split first
    _barrier(world)
    if rank != 0:
        dataset, data_info = data()
    vlm = load_model_from_args(args)
    ids = _image_ids(dataset, args.n_images, args.seed)  # bad images are reported before captioning starts

    # 1. captions, one file per rank, resumable; made with other options (model, prompt, tokens, data) → refused
    caption_dataset(vlm, dataset, out / f"captions.rank{rank}.jsonl", prompt=args.prompt,
                    max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                    image_ids=[i for k, i in enumerate(ids) if k % world == rank], progress=not args.no_progress,
                    check_options=True)
    _barrier(world)
    rows = {}
    for f in sorted(out.glob("captions.rank*.jsonl")):
        rows.update({r["image_id"]: r for r in read_jsonl(f, torn_tail=True)})
    rows = [rows[i] for i in ids if i in rows]
    captioning_s = time.time() - t0

    # 2. influences, one part per caption under out/parts/<hash of the inputs>/, resumable
    attr = Attribution(scope=args.scope, ablation=args.ablation, metric=args.metric, method=args.method,
                       keep=args.keep, top_k=args.top_k, chunk_size=args.chunk_size,
                       progress=not args.no_progress and rank == 0)
    if world > 1:
        job = attr.plan(vlm, rows, dataset, cache_dir=out / "parts")
        if rank == 0:
            job.means()  # computed once, read by the other ranks
        _barrier(world)
        job.run(rank=rank, world=world, progress=attr.progress)
        _barrier(world)
        if rank != 0:
            return None
    attr.fit(vlm, rows, dataset, cache_dir=out / "parts")  # every part is cached by now under torchrun
    attribution_s = time.time() - t0 - captioning_s

    # 3. files (rank 0)
    attr.save(out, png=not args.no_png)
    timings = {"captioning_s": captioning_s, "attribution_s": attribution_s, "total_s": time.time() - t0}
    attr.timings_ = {k: round(v, 2) for k, v in timings.items()}
    cli = {"data": data_info, "seed": args.seed, "n_images": len(ids), "prompt": args.prompt,
           "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "world_size": world}
    write_text_atomic(out / TIMINGS, json.dumps({"timings": attr.timings_, "command": cli}, indent=1))
    return attr


if __name__ == "__main__":
    main()
