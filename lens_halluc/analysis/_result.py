"""The result object every analysis returns: tidy tables, a figure, and one way to save them.

:class:`AnalysisResult` holds ``table`` (the tidy per-item DataFrame), ``summary`` (a DataFrame
per head group or per curve point) and ``params`` (what it was computed with). ``figure()``
builds the plotly figure from the tables through :mod:`lens_halluc.figures` (imported when
called: computing code never imports plotly). ``save(dir)`` writes every table of
:meth:`~AnalysisResult.tables` with :func:`lens_halluc.data.tables.write_table` (the one CSV
writer) and the figure with :func:`lens_halluc.figures.io.save_figure`, under the file names
``python -m lens_halluc.analysis <name>`` writes.

Example
-------
>>> res = lh.analysis.bias(vlm, "runs/attribution_heads", n_samples=20)     # doctest: +SKIP
>>> res.summary                                                            # doctest: +SKIP
>>> res.figure().show()                                                    # doctest: +SKIP
>>> res.save("runs/bias")                                                  # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pandas as pd


@dataclass(repr=False)
class AnalysisResult:
    """Base of the analyses' results.

    Attributes
    ----------
    table : the tidy table (one row per item: token × head, sample × head, ...).
    summary : the aggregate (per head group, per checkpoint, per α, ...).
    params : the arguments the analysis ran with (k, n_samples, heads, ...).

    Example
    -------
    >>> r = AnalysisResult(pd.DataFrame({"a": [1]}), pd.DataFrame({"b": [2.0]}))
    >>> sorted(r.tables())
    ['analysis', 'analysis_summary']
    """

    table: pd.DataFrame
    summary: pd.DataFrame
    params: dict = field(default_factory=dict)

    #: file stem of the table, the figure and (with ``_summary``) the summary
    name: ClassVar[str] = "analysis"
    #: (width, height) of the static figure
    figure_size: ClassVar[tuple[int, int]] = (900, 600)

    def tables(self) -> dict[str, pd.DataFrame]:
        """``{file stem: DataFrame}`` that :meth:`save` writes as ``<stem>.csv``."""
        return {self.name: self.table, f"{self.name}_summary": self.summary}

    def figure(self):
        """The plotly figure of this result (built from its tables)."""
        raise NotImplementedError(f"{type(self).__name__} has no figure.")

    def save(self, out_dir: str | Path, png: bool = True) -> list[Path]:
        """Write the CSV tables and the figure (``.html``, ``.png`` when a browser is found) into ``out_dir``.

        Returns the paths written.
        """
        from ..data.tables import write_table
        from ..figures.io import save_figure

        out = Path(out_dir)
        written = [write_table(frame, out / f"{stem}.csv") for stem, frame in self.tables().items()]
        width, height = self.figure_size
        written += save_figure(self.figure(), out / self.name, png=png, width=width, height=height)
        return written

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(table=<{len(self.table)} rows × {self.table.shape[1]} columns>, "
                f"summary=<{len(self.summary)} rows>, params={self.params!r})")

    def _repr_html_(self) -> str:  # Jupyter shows the summary
        return f"<b>{type(self).__name__}</b> ({len(self.table)} table rows)" + self.summary._repr_html_()


def frame(rows, columns) -> pd.DataFrame:
    """A DataFrame of dict rows with exactly ``columns``, in that order (also when ``rows`` is empty)."""
    return pd.DataFrame(list(rows), columns=list(columns))
