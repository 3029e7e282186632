"""Append-only JSONL results that survive interruption.

A run writes one line per finished item and flushes it to disk; on restart it reads the keys
already done and skips them. A line cut short by a crash is dropped (the file is truncated to its
last complete line), so nothing is duplicated or lost.

Example
-------
>>> sink = ResumableJsonl("captions.jsonl", key="image_id")           # doctest: +SKIP
>>> todo = [i for i in image_ids if i not in sink.done]              # doctest: +SKIP
>>> sink.write([{"image_id": 1, "caption": "there is a cat ."}])     # doctest: +SKIP
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..data.jsonl import read_jsonl


class ResumableJsonl:
    """A JSONL file keyed by ``key``, opened for resuming.

    Attributes
    ----------
    path : the file.
    key : the field that identifies an item (``"image_id"``, ``"question_id"``...).
    done : keys of the complete lines already in the file.
    """

    def __init__(self, path: str | Path, key: str, overwrite: bool = False):
        self.path = Path(path)
        self.key = key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if overwrite and self.path.exists():
            self.path.unlink()
        self.done: set[Any] = set()
        if self.path.exists():
            self._recover()

    def _recover(self) -> None:
        data = self.path.read_bytes()
        keep = data.rfind(b"\n") + 1  # everything after the last newline is a torn write
        if keep < len(data):
            with self.path.open("r+b") as f:
                f.truncate(keep)
        for n, line in enumerate(data[:keep].decode().splitlines(), 1):
            if line.strip():
                try:
                    self.done.add(json.loads(line)[self.key])
                except (json.JSONDecodeError, KeyError) as e:
                    raise ValueError(f"{self.path}, line {n}: cannot resume from it ({e!r}); "
                                     "delete the file or pass --overwrite.") from e

    def write(self, rows: Iterable[dict]) -> None:
        """Append rows and force them to disk before returning."""
        rows = list(rows)
        if not rows:
            return
        with self.path.open("a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done.update(r[self.key] for r in rows)

    def rows(self) -> Iterator[dict]:
        """The records written so far."""
        if self.path.exists():
            yield from read_jsonl(self.path)
