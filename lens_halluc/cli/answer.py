"""Answer yes/no questions (POPE format) about images: ``python -m lens_halluc.answer``.

Reads ``{"question_id", "image", "text"}`` lines, writes ``{"question_id", "text"}`` answers (the
format ``python -m lens_halluc.pope score`` reads) and resumes an interrupted run (refusing to
resume one made with other options; they are recorded in ``<out>.config.json``). A file that is
not ours is refused and left as it is; a second process writing the same ``--out`` is refused.

Example
-------
    python -m lens_halluc.answer --questions pope_adversarial.jsonl --image-dir world/images \\
        --out runs/answers.jsonl
"""
from __future__ import annotations

import argparse

from .common import add_image_args, add_model_args, friendly_errors, image_kwargs, load_model_from_args, positive_int
from .token_choice import add_token_choice_args, token_choice


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``python -m lens_halluc.answer``."""
    p = argparse.ArgumentParser(prog="python -m lens_halluc.answer", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    p.add_argument("--questions", required=True, help="POPE-format questions JSONL")
    p.add_argument("--image-dir", required=True, help="directory of the image files")
    p.add_argument("--out", required=True, help="output answers JSONL (appended to and resumed); the options are recorded in OUT.config.json and resuming with other options is refused")
    p.add_argument("--prompt-suffix", default="", help="text appended to every question")
    p.add_argument("--max-new-tokens", type=positive_int, default=16, help="answer token budget (>= 1)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="questions per batch (>= 1)")
    p.add_argument("--limit", type=positive_int, default=None, help="answer only the first N questions (N >= 1)")
    p.add_argument("--overwrite", action="store_true", help="start afresh instead of resuming")
    add_token_choice_args(p)
    add_image_args(p)
    return p


def main(argv: list[str] | None = None) -> None:
    """Answer the questions into ``--out`` (resuming it).

    >>> main(["--questions", "q.jsonl", "--image-dir", "w/images", "--out", "a.jsonl"])  # doctest: +SKIP
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    sampling = token_choice(parser, args)  # validated before anything loads
    with friendly_errors("lens_halluc.answer"):
        from ..data.outputs import results_file
        from ..data.pope import check_question_images, read_questions
        from ..generation.runner import answer_questions

        with results_file(args.out, "answers"):  # ours or refused; one writer at a time
            questions = read_questions(args.questions)
            check_question_images(questions[: args.limit], args.image_dir, **image_kwargs(args))  # before the model loads
            vlm = load_model_from_args(args)
            out = answer_questions(vlm, questions, args.image_dir, args.out, max_new_tokens=args.max_new_tokens,
                                   batch_size=args.batch_size, limit=args.limit, prompt_suffix=args.prompt_suffix,
                                   overwrite=args.overwrite, check_options=True, sampling=sampling, **image_kwargs(args))
        print(f"answers written to {out}")

