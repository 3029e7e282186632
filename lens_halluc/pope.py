"""POPE (polling-based object probing): ``lh.pope.build`` / ``lh.pope.score`` from Python, and the command line.

Example
-------
>>> import lens_halluc as lh                                              # doctest: +SKIP
>>> qs = lh.pope.build(ds, "adversarial", n_images=50, seed=0)           # doctest: +SKIP
>>> answers = lh.answer(vlm, qs, ds.image_dir, max_new_tokens=3)         # doctest: +SKIP
>>> res = lh.pope.score(qs, answers)                                     # doctest: +SKIP
>>> res.summary["f1"], res.per_question.head()                           # doctest: +SKIP

Command line: ``python -m lens_halluc.pope build|score`` (:mod:`lens_halluc.cli.pope`).
See :mod:`lens_halluc.data.pope` for the reference semantics.
"""
from .data.pope import (  # noqa: F401  (the API of lh.pope)
    PARSERS,
    SPLITS,
    PopeError,
    PopeResult,
    build,
    build_questions,
    parse_answer,
    read_answers,
    read_questions,
    score,
    write_jsonl,
)

__all__ = ["PARSERS", "SPLITS", "PopeError", "PopeResult", "build", "build_questions", "parse_answer", "read_answers",
           "read_questions", "score", "write_jsonl"]

if __name__ == "__main__":
    import sys

    from .cli.pope import main

    sys.exit(main())
