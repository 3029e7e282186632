"""Score captions with CHAIR: ``python -m lens_halluc.chair``.

Reads one ``{"image_id": int, "caption": str}`` JSON object per line (other keys are ignored;
the file ``python -m lens_halluc.caption`` writes works as is), takes each image's ground truth
from the COCO instances and reference-captions files, and prints CHAIR_s, CHAIR_i, Recall and Len.
The last line printed is one JSON object with those four keys.

Example
-------
    python -m lens_halluc.chair --captions runs/captions.jsonl \\
        --instances annotations/instances_val2014.json --references annotations/captions_val2014.json \\
        --out runs/chair.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..data.flavour import FLAVOURS
from .common import friendly_errors


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``python -m lens_halluc.chair``."""
    p = argparse.ArgumentParser(
        prog="python -m lens_halluc.chair", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Score generated captions with CHAIR (object hallucination, Rohrbach et al. 2018).\n\n"
                    "Ground truth of an image = its instance categories + the objects its reference captions\n"
                    "name. The last line printed is a JSON object with CHAIR_s, CHAIR_i, Recall and Len.",
        epilog="CHAIR_i = hallucinated object mentions / all mentions (repeats count)\n"
               "CHAIR_s = captions with a hallucinated object / all captions\n"
               "Recall  = sum over captions |mentioned & truth| / sum |truth|\n"
               "Len     = mean caption length (reference: tokens after the two-word merges; corrected: words)\n"
               "Matching rules and deviations from the reference: lens_halluc/data/chair.py",
    )
    p.add_argument("--captions", required=True, metavar="C.jsonl",
                   help='generated captions, one {"image_id": int, "caption": str} object per line')
    p.add_argument("--instances", required=True, metavar="I.json",
                   help="COCO instances JSON of the captioned images (ground-truth objects)")
    p.add_argument("--references", required=True, metavar="R.json",
                   help="COCO captions JSON; objects named in an image's reference captions also count as present")
    p.add_argument("--out", metavar="D.json", default=None,
                   help='write {"summary": ..., "captions": [per-caption objects, mentions, spans]} here')
    p.add_argument("--synonyms", metavar="PATH", default=None,
                   help="CHAIR synonym table (default: the shipped 80-category MS-COCO table)")
    p.add_argument("--flavour", choices=FLAVOURS, default="reference",
                   help="reference (default): exactly LisaAnne/Hallucination utils/chair.py (its synonym parse, "
                        "pattern.en's slips, Len in tokens); corrected: normalised synonyms (' motor bike', "
                        "'iPhone' match), the bus/ties fix, Len in words")
    p.add_argument("--singular-fixes", action=argparse.BooleanOptionalAction, default=None,
                   help="repair (or, with --no-singular-fixes, reproduce) pattern.en's singularisation slips "
                        "(bus->bu, ties->ty); default: the flavour's (reference: reproduce, corrected: repair)")
    p.add_argument("--tokenizer", metavar="DIR", default=None,
                   help="local tokenizer directory; with it each mention gets the index of its first token in "
                        "the line's 'token_ids'")
    return p


def main(argv: list[str] | None = None) -> dict:
    """Score the captions file; prints the counts and the summary, returns the four CHAIR numbers.

    >>> main(["--captions", "c.jsonl", "--instances", "i.json", "--references", "r.json"])  # doctest: +SKIP
    {'CHAIR_s': ..., 'CHAIR_i': ..., 'Recall': ..., 'Len': ...}
    """
    args = build_parser().parse_args(argv)
    with friendly_errors("lens_halluc.chair"):
        from ..data.chair import CHAIR_KEYS, chair, read_captions
        from ..data.coco import CocoDataset, DataError

        rows = read_captions(args.captions, keep_line=True)
        dataset = CocoDataset.load(args.instances, captions=args.references)
        unknown = [r for r in rows if r["image_id"] not in dataset.images]
        if unknown:
            raise DataError(
                f"{len(unknown)} caption(s) name image ids that are not in {args.instances} (first: image_id "
                f"{unknown[0]['image_id']} on line {unknown[0]['_line']} of {args.captions}). Pass the instances "
                "file of the images that were captioned.")
        tokenizer = None
        if args.tokenizer is not None:
            tokenizer = _load_tokenizer(args.tokenizer)
        result = chair([{k: v for k, v in r.items() if k != "_line"} for r in rows], dataset, tokenizer=tokenizer,
                       synonyms=args.synonyms, singular_fixes=args.singular_fixes, flavour=args.flavour)
        # the command's output is the four CHAIR numbers (the extra rates are the API's)
        summary = {k: result.summary[k] for k in CHAIR_KEYS}
        n_mentions = sum(len(c["mentioned"]) for c in result.captions)
        n_halluc = sum(len(c["hallucinated"]) for c in result.captions)
        print(f"{len(result.captions)} captions, {n_mentions} object mentions, {n_halluc} hallucinated")
        if args.out is not None:
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"summary": summary, "captions": result.captions}, indent=1))
            print(f"details written to {out}")
        print(json.dumps(summary))
    return summary


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load a tokenizer from {path} ({e}); pass a local directory saved with "
                         "save_pretrained (--tokenizer).") from e

