"""Caption a COCO-format dataset (greedy, sampled or beam search): ``python -m lens_halluc.caption``.

Writes one ``{"image_id", "caption", ...}`` line per image to ``--out`` (the format the CHAIR CLI
reads) and resumes an interrupted run (refusing to resume one made with other options;
they are recorded in ``<out>.config.json``). A file that is not ours (no such record) is refused and
left as it is, and a second process writing the same ``--out`` is refused.

Example
-------
    python -m lens_halluc.caption --instances world/instances.json --image-dir world/images \\
        --out runs/captions.jsonl --max-new-tokens 64 --limit 50
"""
from __future__ import annotations

import argparse

from .common import add_image_args, add_model_args, friendly_errors, image_kwargs, load_model_from_args, positive_int
from .token_choice import add_token_choice_args, token_choice
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
    p.add_argument("--max-new-tokens", type=positive_int, default=128, help="caption token budget (>= 1)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="images per batch (>= 1)")
    p.add_argument("--limit", type=positive_int, default=None, help="caption only the first N images (N >= 1)")
    p.add_argument("--overwrite", action="store_true", help="start afresh instead of resuming")
    add_token_choice_args(p)
    add_image_args(p)
    return p


def main(argv: list[str] | None = None) -> None:
    """Caption the dataset into ``--out`` (resuming it).

    >>> main(["--instances", "w/instances.json", "--image-dir", "w/images", "--out", "c.jsonl"])  # doctest: +SKIP
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    sampling = token_choice(parser, args)  # validated before anything loads
    with friendly_errors("lens_halluc.caption"):
        from ..data.coco import CocoDataset
        from ..data.outputs import results_file
        from ..generation.runner import caption_dataset

        with results_file(args.out, "captions"):  # ours or refused; one writer at a time
            dataset = CocoDataset.load(args.instances, image_dir=args.image_dir, **image_kwargs(args))
            dataset.check_images(dataset.image_ids[: args.limit])  # every image, before the model loads
            vlm = load_model_from_args(args)
            out = caption_dataset(vlm, dataset, args.out, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                                  batch_size=args.batch_size, limit=args.limit, overwrite=args.overwrite,
                                  check_options=True, sampling=sampling)
        print(f"captions written to {out}")

