"""Caption a COCO-format dataset with greedy decoding: ``python -m lens_halluc.caption``.

Writes one ``{"image_id", "caption", ...}`` line per image to ``--out`` (the format the CHAIR CLI
reads) and resumes an interrupted run (refusing to resume one made with other options;
they are recorded in ``<out>.config.json``).

Example
-------
    python -m lens_halluc.caption --instances world/instances.json --image-dir world/images \\
        --out runs/captions.jsonl --max-new-tokens 64 --limit 50
"""
from __future__ import annotations

import argparse

from .common import add_model_args, friendly_errors, load_model_from_args
from ..models.prompts import CAPTION_PROMPT


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``python -m lens_halluc.caption``."""
    p = argparse.ArgumentParser(prog="python -m lens_halluc.caption", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    p.add_argument("--instances", required=True, help="COCO instances JSON listing the images")
    p.add_argument("--image-dir", required=True, help="directory of the image files")
    p.add_argument("--out", required=True, help="output JSONL (appended to and resumed); the options are recorded in OUT.config.json and resuming with other options is refused")
    p.add_argument("--prompt", default=CAPTION_PROMPT, help="user prompt")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="caption only the first N images")
    p.add_argument("--overwrite", action="store_true", help="start afresh instead of resuming")
    return p


def main(argv: list[str] | None = None) -> None:
    """Caption the dataset into ``--out`` (resuming it).

    >>> main(["--instances", "w/instances.json", "--image-dir", "w/images", "--out", "c.jsonl"])  # doctest: +SKIP
    """
    args = build_parser().parse_args(argv)
    with friendly_errors("lens_halluc.caption"):
        from ..data.coco import CocoDataset
        from ..generation.runner import caption_dataset

        dataset = CocoDataset.load(args.instances, image_dir=args.image_dir)
        vlm = load_model_from_args(args)
        out = caption_dataset(vlm, dataset, args.out, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                              batch_size=args.batch_size, limit=args.limit, overwrite=args.overwrite,
                              check_options=True)
        print(f"captions written to {out}")

