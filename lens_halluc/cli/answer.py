"""Answer yes/no questions (POPE format) about images: ``python -m lens_halluc.answer``.

Reads ``{"question_id", "image", "text"}`` lines, writes ``{"question_id", "text"}`` answers (the
format ``python -m lens_halluc.pope score`` reads) and resumes an interrupted run (refusing to
resume one made with other options; they are recorded in ``<out>.config.json``).

Example
-------
    python -m lens_halluc.answer --questions pope_adversarial.jsonl --image-dir world/images \\
        --out runs/answers.jsonl
"""
from __future__ import annotations

import argparse

from .common import add_model_args, friendly_errors, load_model_from_args


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``python -m lens_halluc.answer``."""
    p = argparse.ArgumentParser(prog="python -m lens_halluc.answer", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    p.add_argument("--questions", required=True, help="POPE-format questions JSONL")
    p.add_argument("--image-dir", required=True, help="directory of the image files")
    p.add_argument("--out", required=True, help="output answers JSONL (appended to and resumed); the options are recorded in OUT.config.json and resuming with other options is refused")
    p.add_argument("--prompt-suffix", default="", help="text appended to every question")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="answer only the first N questions")
    p.add_argument("--overwrite", action="store_true", help="start afresh instead of resuming")
    return p


def main(argv: list[str] | None = None) -> None:
    """Answer the questions into ``--out`` (resuming it).

    >>> main(["--questions", "q.jsonl", "--image-dir", "w/images", "--out", "a.jsonl"])  # doctest: +SKIP
    """
    args = build_parser().parse_args(argv)
    with friendly_errors("lens_halluc.answer"):
        from ..data.pope import read_questions
        from ..generation.runner import answer_questions

        questions = read_questions(args.questions)
        vlm = load_model_from_args(args)
        out = answer_questions(vlm, questions, args.image_dir, args.out, max_new_tokens=args.max_new_tokens,
                               batch_size=args.batch_size, limit=args.limit, prompt_suffix=args.prompt_suffix,
                               overwrite=args.overwrite,
                              check_options=True)
        print(f"answers written to {out}")

