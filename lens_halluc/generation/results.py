"""Result objects of the generation runners: :class:`Captions` and :class:`Answers`.

Both are sequences of row dicts (the lines their JSONL files hold), with a DataFrame view,
``save`` / ``load`` in the format the ``python -m lens_halluc.caption`` / ``answer`` commands
write, and a ``config`` dict saying what produced them.

Example
-------
>>> caps = Captions([{"image_id": 1, "caption": "there is a dog .", "image": "000001.png",
...                   "prompt": "Describe.", "token_ids": [5, 6, 7, 8, 9]}])
>>> len(caps), caps[0]["caption"], list(caps.to_frame().columns)[:2]
(1, 'there is a dog .', ['image_id', 'caption'])
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from ..data.jsonl import read_jsonl, write_jsonl


class _Rows(Sequence):
    """Rows of one generation run (a list of dicts), keyed by :attr:`key`."""

    key = "id"
    columns: tuple[str, ...] = ()
    what = "rows"

    def __init__(self, rows: Sequence[Mapping[str, Any]] = (), config: Mapping[str, Any] | None = None,
                 generated: int | None = None):
        self.rows: list[dict] = [dict(r) for r in rows]
        self.config: dict = dict(config or {})
        # rows decoded by the call that made this object (the rest came from a cache)
        self.generated = len(self.rows) if generated is None else int(generated)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict]:
        return iter(self.rows)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return type(self)(self.rows[index], self.config, generated=0)
        return self.rows[index]

    def __eq__(self, other) -> bool:
        if isinstance(other, _Rows):
            return type(self) is type(other) and self.rows == other.rows
        return NotImplemented

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} {self.what})"

    def to_frame(self):
        """The rows as a ``pandas.DataFrame`` (one row per item, the file's columns)."""
        import pandas as pd

        frame = pd.DataFrame(self.rows)
        if frame.empty:
            return pd.DataFrame(columns=list(self.columns))
        return frame

    def save(self, path: str | Path) -> Path:
        """Write the rows as JSONL (one object per line, the runner's format); returns ``path``."""
        return write_jsonl(self.rows, path)

    @classmethod
    def load(cls, path: str | Path):
        """Rows of a JSONL file written by :meth:`save`, the runner or the command line."""
        return cls(read_jsonl(path, cls.what), config={"path": str(path)}, generated=0)


class Captions(_Rows):
    """Generated captions: rows ``{"image_id", "caption", "image", "prompt", "token_ids"}``.

    ``image`` is the image's file name and ``token_ids`` the generated ids (EOS excluded), so that
    CHAIR can align each mention to its token. ``config`` records the model, prompt, decoding
    strategy, token choice (``config["decoding"]``: ``{"kind": "greedy"}``, ``{"kind": "sample",
    "temperature", "top_k", "top_p", "seed", ...}`` or ``{"kind": "beams", "num_beams", ...}``),
    ``max_new_tokens`` and dataset that produced them; ``generated`` counts the rows this
    call decoded (the others came from ``cache_dir``).

    Example
    -------
    >>> caps = lh.caption(vlm, ds, max_new_tokens=40)              # doctest: +SKIP
    >>> caps.to_frame()[["image_id", "caption"]].head()              # doctest: +SKIP
    >>> caps.save("runs/captions.jsonl"); Captions.load("runs/captions.jsonl") == caps  # doctest: +SKIP
    True
    """

    key = "image_id"
    columns = ("image_id", "caption", "image", "prompt", "token_ids")
    what = "captions"

    @classmethod
    def load(cls, path: str | Path) -> "Captions":
        """Captions of a JSONL file (validated: every line needs an integer ``image_id`` and a ``caption``).

        >>> caps = Captions.load("runs/captions.jsonl")                  # doctest: +SKIP
        """
        from ..data.chair import read_captions

        return cls(read_captions(path), config={"path": str(path)}, generated=0)

    @property
    def image_ids(self) -> list[int]:
        """The captioned image ids, in row order."""
        return [r["image_id"] for r in self.rows]


class Answers(_Rows):
    """Answers to yes/no questions: rows ``{"question_id", "image", "prompt", "text"}``.

    ``config`` records the model, prompt suffix, strategy, token choice (``config["decoding"]``, as
    for :class:`Captions`) and ``max_new_tokens``.

    Example
    -------
    >>> answers = lh.answer(vlm, questions, ds.image_dir)            # doctest: +SKIP
    >>> lh.pope.score(questions, answers).summary["accuracy"]        # doctest: +SKIP
    """

    key = "question_id"
    columns = ("question_id", "image", "prompt", "text")
    what = "answers"
