"""Figure of attention drift during instruction tuning: JS curve per head group + last-checkpoint heatmap.

Built from the ``summary`` (curve) and ``last`` tables of :func:`lens_halluc.analysis.drift`.

Example
-------
>>> fig = drift_figure(curve, last, n_layers=6, n_heads=8)        # doctest: +SKIP
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..data.tables import table_rows
from .heads import GROUP_COLORS, GROUP_LABELS


def drift_figure(curve: Sequence[dict], last: Sequence[dict], n_layers: int, n_heads: int, title: str | None = None):
    """Left: mean JS vs checkpoint per group. Right: per-head JS at the last checkpoint.

    ``curve``: DataFrame or rows ``{checkpoint, step, group, js}``; ``last``: rows ``{layer, head, js, group}``.

    Example
    -------
    >>> res = lh.analysis.drift(initial, checkpoints, attr)                  # doctest: +SKIP
    >>> fig = drift_figure(res.summary, res.last, n_layers=6, n_heads=8)     # doctest: +SKIP
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    curve, last = table_rows(curve), table_rows(last)
    fig = make_subplots(rows=1, cols=2, column_widths=[0.5, 0.5],
                        subplot_titles=("JS divergence from the initial model", "per head, last checkpoint"))
    for g in dict.fromkeys(r["group"] for r in curve):  # hallucination vs lowest-scoring (reference) or other heads
        rows = sorted((r for r in curve if r["group"] == g), key=lambda r: r["step"])
        fig.add_trace(go.Scatter(x=[r["checkpoint"] for r in rows], y=[r["js"] for r in rows], mode="lines+markers",
                                 name=GROUP_LABELS.get(g, f"{g} heads"), line={"color": GROUP_COLORS.get(g)}),
                      row=1, col=1)
    grid = np.full((n_layers, n_heads), np.nan)
    for r in last:
        grid[int(r["layer"]), int(r["head"])] = float(r["js"])
    fig.add_trace(go.Heatmap(z=grid, x=list(range(n_heads)), y=list(range(n_layers)), colorscale="Magma",
                             colorbar={"title": "JS"}, hovertemplate="layer %{y}, head %{x}<br>JS = %{z:.4f}<extra></extra>"),
                  row=1, col=2)
    hal = [r for r in last if r["group"] == "hallucination"]
    fig.add_trace(go.Scatter(x=[r["head"] for r in hal], y=[r["layer"] for r in hal], mode="markers", showlegend=False,
                             marker={"symbol": "square-open", "size": 20, "color": "cyan", "line": {"width": 2}},
                             hoverinfo="skip"), row=1, col=2)
    fig.update_xaxes(title_text="checkpoint", row=1, col=1)
    fig.update_yaxes(title_text="mean JS (nats)", rangemode="tozero", row=1, col=1)
    fig.update_yaxes(autorange="reversed", dtick=1, title_text="layer", row=1, col=2)
    fig.update_xaxes(dtick=1, title_text="head", row=1, col=2)
    fig.update_layout(template="plotly_white", title=title or "Attention drift during instruction tuning",
                      legend={"x": 0.22, "y": 0.08, "bgcolor": "rgba(255,255,255,0.7)"})
    return fig
