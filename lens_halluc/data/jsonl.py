"""JSON-lines files, the format of every per-item result in lens_halluc (captions, answers, questions).

Example
-------
>>> for lineno, row in iter_jsonl("captions.jsonl", "captions"):      # doctest: +SKIP
...     print(lineno, row["image_id"])
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from .coco import DataError


def iter_jsonl(path: str | Path, what: str = "JSONL", error: type[Exception] = DataError,
               hint: str = "", allow_array: bool = False,
               torn_tail: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each non-blank line; errors name the file and the line.

    With ``allow_array``, a file holding one JSON array of objects is accepted too (some POPE copies
    are saved that way; the item index stands in for the line number). Off by default: a one-line
    JSONL whose line is an array is then reported as a bad line. ``error`` is the exception type
    raised and ``hint`` is appended to its message (what a line should look like).

    A last line without its newline that is not valid JSON is what a process killed while writing
    leaves: with ``torn_tail`` it is skipped (the writer resumes it); otherwise the error says so.
    """
    path = Path(path)
    hint = f"; {hint}" if hint else ""
    if not path.is_file():
        raise error(f"{what} file not found: {path}. Pass the path of an existing JSON-lines file{hint}.")
    text = path.read_text(encoding="utf-8")
    if allow_array and text.lstrip().startswith("["):
        try:
            items = list(enumerate(json.loads(text), 1))
        except json.JSONDecodeError as e:
            raise error(f"{what} file {path} starts with '[' but is not valid JSON ({e}){hint}.") from e
    else:
        items = []
        lines = text.splitlines()
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                items.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                if lineno == len(lines) and not text.endswith("\n"):
                    if torn_tail:
                        continue
                    raise error(f"{what} file {path}, line {lineno} is cut short (not valid JSON and no final "
                                f"newline: the writer was interrupted?); rerun the command that writes it to "
                                f"finish it, or remove that line{hint}.") from e
                raise error(f"{what} file {path}, line {lineno}: not valid JSON ({e.msg}){hint}.") from e
    for lineno, row in items:
        if not isinstance(row, dict):
            raise error(f"{what} file {path}, line {lineno}: a JSON {type(row).__name__}, not an object{hint}.")
        yield lineno, row


def read_jsonl(path: str | Path, what: str = "JSONL", error: type[Exception] = DataError,
               allow_array: bool = False, torn_tail: bool = False) -> list[dict[str, Any]]:
    """All objects of a JSON-lines file (see :func:`iter_jsonl`).

    >>> rows = read_jsonl("answers.jsonl", "answers")   # doctest: +SKIP
    """
    return [row for _, row in iter_jsonl(path, what, error, allow_array=allow_array, torn_tail=torn_tail)]


def write_jsonl(rows: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Write one JSON object per line (a temporary file, fsynced, renamed: never torn); creates parent folders.

    >>> write_jsonl([{"question_id": 1, "text": "yes"}], "out/answers.jsonl")  # doctest: +SKIP
    """
    from .outputs import write_text_atomic

    return write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))
