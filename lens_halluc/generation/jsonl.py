"""Append-only JSONL results that survive interruption.

A run writes one line per finished item and fsyncs it; on restart it reads the keys already done
and skips them. A line cut short by a crash (text after the last newline that is not a complete
JSON object) is dropped (the file is truncated to its last complete line), so nothing is
duplicated or lost; a complete last line that only lacks its newline is kept. A file whose lines
are not our rows (e.g. one JSON document written by ``json.dump``) is refused, never truncated.

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
        keep = data.rfind(b"\n") + 1  # what follows the last newline may be a torn write
        lines = data[:keep].decode("utf-8", errors="replace").splitlines()
        for n, line in enumerate(lines, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                    self.done.add(row[self.key])
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{self.path}, line {n} is not a results row with {self.key!r} ({e!r}), so "
                                     "it cannot be resumed; it was left as it is. Pass another --out (or remove "
                                     "that line if this is our file).") from None
        tail = data[keep:]
        if not tail.strip():
            return
        try:
            row = json.loads(tail)
        except (json.JSONDecodeError, UnicodeDecodeError):
            row = None
        if isinstance(row, dict) and self.key in row:  # complete, only its newline was lost: keep it
            with self.path.open("ab") as f:
                f.write(b"\n")
                f.flush()
                os.fsync(f.fileno())
            self.done.add(row[self.key])
        elif row is not None or (not lines and not tail.lstrip().startswith(b"{")):
            # complete JSON that is not one of our rows, or a one-line file that never was a row: not ours
            raise ValueError(f"{self.path} is not a JSON-lines results file with {self.key!r} rows (it ends with "
                             "complete JSON that is not such a row); it was left as it is. Pass another --out.")
        else:  # a row cut short by a crash: drop it (it is recomputed)
            with self.path.open("r+b") as f:
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())

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
            yield from read_jsonl(self.path, torn_tail=True)
