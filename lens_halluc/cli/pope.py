"""POPE command line: build question files and score model answers (``python -m lens_halluc.pope``).

Examples
--------
Build the adversarial split (500 images x 3 positives x 3 negatives = 3000 questions)::

    python -m lens_halluc.pope build --instances instances_val2014.json \\
        --split adversarial --n-images 500 --seed 0 --out pope_adversarial.jsonl

``--flavour reference`` (the default) builds exactly what AoiDragon/POPE's ``main.py`` builds
(statistics over the sampled images, positives in annotation order); ``--flavour corrected``
counts over the whole dataset and samples positives; ``--stats-from`` overrides the statistics.

Score answers (one ``{"question_id": ..., "text": ...}`` per line)::

    python -m lens_halluc.pope score --questions pope_adversarial.jsonl \\
        --answers answers.jsonl --parser pope

The last line ``score`` prints is one JSON object with accuracy, precision, recall, f1 and
yes_ratio, so scripts can read it with ``json.loads(output.splitlines()[-1])``.

Named answer prompts (:data:`POPE_PROMPTS`, the suffix appended to each question when answering;
``python -m lens_halluc.pope prompts`` lists them): ``pope`` (none) and ``vcd`` (VCD's and
CausalMM's " Please answer this question with one word.")::

    python -m lens_halluc.answer ... --prompt-suffix "$(python -m lens_halluc.pope prompts --get vcd)"

See :mod:`lens_halluc.data.pope` for the reference semantics.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings

from ..data.coco import CocoDataset, DataError
from ..data.flavour import FLAVOURS
from .common import int_range, non_negative_int, positive_int
from ..data.pope import (  # noqa: F401  (POPE_PROMPTS / prompt_suffix: the named answer prompts, for the answer CLI)
    PARSERS,
    POPE_PROMPTS,
    SPLITS,
    STATS_FROM,
    build_questions,
    prompt_suffix,
    read_answers,
    read_questions,
    score,
    write_jsonl,
)


#: ``--n-images``: an integer >= 1, or ``all`` for every eligible image.
_n_images = int_range(1, none="all")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``python -m lens_halluc.pope``."""
    p = argparse.ArgumentParser(
        prog="python -m lens_halluc.pope",
        description="POPE object-hallucination benchmark: build yes/no question files from a COCO-format "
        "instances file, and score model answers (accuracy, precision, recall, F1, yes-ratio).",
        epilog="Example: python -m lens_halluc.pope build --instances instances_val2014.json "
        "--split adversarial --out pope_adversarial.jsonl && python -m lens_halluc.pope score "
        "--questions pope_adversarial.jsonl --answers answers.jsonl",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="{build,score,prompts}")

    b = sub.add_parser(
        "build", help="write a POPE question file (JSONL) for one split",
        description="Sample images with >= 3 distinct annotated categories and write, per image, "
        "N positive questions each followed by one negative (an absent object chosen by the split).",
    )
    b.add_argument("--instances", required=True, help="COCO-format instances JSON (images, annotations, categories)")
    b.add_argument("--split", required=True, choices=SPLITS,
                   help="how negatives are chosen: random (any absent object), popular (most frequent "
                   "absent object), adversarial (absent object co-occurring most with the positive)")
    b.add_argument("--n-images", type=_n_images, default=500,
                   help="images to sample, or 'all' for every eligible image (default: 500)")
    b.add_argument("--n-per-image", type=positive_int, default=3,
                   help="positive questions per image, each paired with one negative (default: 3)")
    b.add_argument("--seed", type=non_negative_int, default=0, help="sampling seed, >= 0; same seed -> same file (default: 0)")
    b.add_argument("--flavour", choices=FLAVOURS, default="reference",
                   help="reference: AoiDragon/POPE's main.py exactly (statistics over the sampled images, "
                   "positives = each image's first objects in annotation order, Python's random seeded with "
                   "--seed); corrected: statistics over the whole dataset, sampled positives, ties by "
                   "category id (default: reference)")
    b.add_argument("--stats-from", choices=STATS_FROM, default=None,
                   help="count object frequency / co-occurrence over the sampled images only or over the "
                   "whole dataset (default: the flavour's: sample for reference, dataset for corrected)")
    b.add_argument("--out", required=True, help="output question file (JSONL, POPE format)")

    s = sub.add_parser(
        "score", help="score model answers against a question file",
        description="Join answers to questions by question_id, parse each answer to yes/no and print "
        "the counts and metrics. The last line is a JSON object with accuracy, precision, recall, f1, "
        "yes_ratio.",
    )
    s.add_argument("--questions", required=True, help="POPE question file (JSONL: question_id, image, text, label)")
    s.add_argument("--answers", required=True,
                   help='model answers (JSONL, one {"question_id": ..., "text": ...} per line)')
    s.add_argument("--parser", choices=PARSERS, default="pope",
                   help="answer parser: pope (first sentence, 'No'/'not'/'no' word test; POPE/LLaVA) or "
                   "vcd (lower-cased substring test; VCD) (default: pope)")
    r = sub.add_parser(
        "prompts", help="list the named answer prompts (suffixes appended to each question)",
        description="Print the named answer-prompt suffixes as JSON ({name: suffix}); with --get NAME, "
        "print only that suffix (without a newline), e.g. for --prompt-suffix of python -m lens_halluc.answer.",
    )
    r.add_argument("--get", choices=sorted(POPE_PROMPTS), default=None, help="print one suffix only")
    return p


def _prompts(args: argparse.Namespace) -> None:
    if args.get is not None:
        sys.stdout.write(POPE_PROMPTS[args.get])
    else:
        print(json.dumps(POPE_PROMPTS, indent=1))


def _build(args: argparse.Namespace) -> None:
    ds = CocoDataset.load(args.instances)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = build_questions(ds, args.split, n_images=args.n_images, n_per_image=args.n_per_image,
                               seed=args.seed, stats_from=args.stats_from, flavour=args.flavour)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    out = write_jsonl(rows, args.out)
    n_img = len({r["image_id"] for r in rows})
    print(f"wrote {len(rows)} {args.split} questions ({args.flavour} flavour) for {n_img} images to {out}")


def _score(args: argparse.Namespace) -> None:
    questions = read_questions(args.questions)
    answers = read_answers(args.answers)
    m = score(questions, answers, parser=args.parser)
    print(f"questions: {m['n']}  parser: {m['parser']}")
    print("TP\tFP\tTN\tFN")
    print(f"{m['tp']}\t{m['fp']}\t{m['tn']}\t{m['fn']}")
    for key in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
        print(f"{key}: {m[key]:.4f}")
    print(json.dumps({k: m[k] for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")}))


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 1 bad input, 2 bad arguments).

    >>> main(["score", "--questions", "q.jsonl", "--answers", "a.jsonl"])   # doctest: +SKIP
    0
    """
    args = build_parser().parse_args(argv)
    try:
        {"build": _build, "score": _score, "prompts": _prompts}[args.command](args)
    except DataError as e:  # includes PopeError: input problems, reported without a traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # e.g. the output folder cannot be written
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0

