"""Figure of inheritance: per-head cosine between the VLM's and the base LM's text-to-text attention.

Built from the ``heads`` table of :func:`lens_halluc.analysis.inheritance` (per-head mean cosine).

Example
-------
>>> fig = inheritance_figure(per_head, n_layers=6, n_heads=8)     # doctest: +SKIP
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..data.tables import table_rows
from .heads import GROUP_COLORS, GROUP_LABELS


def inheritance_figure(per_head: Sequence[dict], n_layers: int, n_heads: int, title: str | None = None):
    """Left: layers × heads heatmap of cosine, hallucination heads outlined. Right: cosine by group.

    ``per_head``: DataFrame or rows ``{layer, head, group, cosine}``.

    Example
    -------
    >>> fig = inheritance_figure(res.heads, n_layers=6, n_heads=8)     # doctest: +SKIP
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    per_head = table_rows(per_head)
    grid = np.full((n_layers, n_heads), np.nan)
    for r in per_head:
        grid[int(r["layer"]), int(r["head"])] = float(r["cosine"])
    hal = [r for r in per_head if r["group"] == "hallucination"]
    # The colour bar lies flat under the heatmap (not between the panels, where it covered the
    # box plot's axis); the gap between the panels leaves room for the box plot's axis title.
    widths, gap = (0.62, 0.38), 0.12
    fig = make_subplots(rows=1, cols=2, column_widths=list(widths), horizontal_spacing=gap,
                        subplot_titles=("cosine per head", "hallucination heads vs comparison heads"))
    heat_end = (1 - gap) * widths[0]
    fig.add_trace(go.Heatmap(z=grid, x=list(range(n_heads)), y=list(range(n_layers)), colorscale="Viridis",
                             zmin=0, zmax=1,
                             colorbar={"title": {"text": "cosine", "side": "right"}, "orientation": "h",
                                       "x": heat_end / 2, "xanchor": "center", "len": heat_end, "lenmode": "fraction",
                                       "y": -0.2, "yanchor": "top", "thickness": 14},
                             hovertemplate="layer %{y}, head %{x}<br>cos = %{z:.3f}<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Scatter(x=[r["head"] for r in hal], y=[r["layer"] for r in hal], mode="markers",
                             marker={"symbol": "square-open", "size": 20, "color": "red", "line": {"width": 2}},
                             name="hallucination heads", hoverinfo="skip"), row=1, col=1)
    for g in dict.fromkeys(r["group"] for r in per_head if r["group"]):  # vs the lowest (reference) or other heads
        vals = [r["cosine"] for r in per_head if r["group"] == g]
        fig.add_trace(go.Box(y=vals, name=GROUP_LABELS.get(g, g), marker_color=GROUP_COLORS.get(g, "#7f7f7f"),
                             boxpoints="all", jitter=0.4, showlegend=False), row=1, col=2)
    fig.update_yaxes(autorange="reversed", dtick=1, title_text="layer", row=1, col=1)
    fig.update_xaxes(dtick=1, title_text="head", row=1, col=1)
    fig.update_yaxes(title_text="cosine (text-to-text attention)", row=1, col=2)
    fig.update_layout(template="plotly_white", title=title or "Inheritance: VLM vs base LM attention",
                      legend={"orientation": "h", "x": 1, "xanchor": "right", "y": -0.2, "yanchor": "top"},
                      margin={"b": 130})
    return fig
