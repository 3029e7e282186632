"""The one way lens_halluc writes a table: tidy rows → CSV text with one float format.

Every CSV the package writes goes through :func:`write_table` (or :func:`table_text`): floats as
``repr`` (shortest round-trip form), so equal results give byte-equal files on every run and
machine; other cells as Python prints them, ``None`` and NaN as an empty cell.

A table may be a :class:`pandas.DataFrame`, a sequence of dict rows, or a dict of columns.

Example
-------
>>> table_text([{"layer": 0, "head": 1, "score": 0.5}])
'layer,head,score\\n0,1,0.5\\n'
>>> import pandas as pd
>>> table_text(pd.DataFrame({"a": [1, 2], "b": [0.25, None]}), columns=["a", "b"])
'a,b\\n1,0.25\\n2,\\n'
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

Table = Any  # pandas.DataFrame | Sequence[Mapping] | Mapping[str, Sequence]


def table_rows(table: Table) -> list[dict]:
    """Dict rows of a DataFrame, a sequence of dict rows or a dict of columns (numpy scalars → Python)."""
    if hasattr(table, "to_dict") and hasattr(table, "columns"):  # a DataFrame
        rows = table.to_dict(orient="records")
    elif isinstance(table, Mapping):
        rows = [dict(zip(table, vals)) for vals in zip(*table.values())]
    else:
        rows = [dict(r) for r in table]
    return [{k: _plain(v) for k, v in r.items()} for r in rows]


def _plain(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    return v


def _cell(v: Any) -> Any:
    if v is None or (isinstance(v, float) and v != v):  # None and NaN: an empty cell (pandas reads NaN)
        return ""
    if isinstance(v, float):
        return repr(v)
    return v


def table_text(table: Table, columns: Sequence[str] | None = None) -> str:
    """CSV text of ``table`` (columns: ``columns`` or every key in first-seen order)."""
    rows = table_rows(table)
    if columns is None:
        if hasattr(table, "columns"):
            columns = [str(c) for c in table.columns]
        else:
            columns = []
            for r in rows:
                columns += [k for k in r if k not in columns]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([_cell(r.get(c)) for c in columns])
    return buf.getvalue()


def write_table(table: Table, path: str | Path, columns: Sequence[str] | None = None) -> Path:
    """Write ``table`` as CSV to ``path`` (parent directories created); returns the path.

    Example
    -------
    >>> write_table([{"a": 1.0}], "/tmp/lens_halluc_table.csv").read_text()
    'a\\n1.0\\n'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = table_text(table, columns)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def to_frame(table: Table, columns: Sequence[str] | None = None):
    """A :class:`pandas.DataFrame` of ``table`` (columns in the given order when ``columns`` is set)."""
    import pandas as pd

    if hasattr(table, "columns") and hasattr(table, "to_dict"):
        return table if columns is None else table[list(columns)]
    rows = table_rows(table)
    return pd.DataFrame(rows, columns=list(columns) if columns is not None else None)
