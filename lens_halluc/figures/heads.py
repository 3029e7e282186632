"""Figure of head attribution scores: a layers × heads heatmap with the top-k heads marked.

Built from the ``head_scores.csv`` rows (``layer, head, score, ...``), never from the model.

Example
-------
>>> fig = heads_heatmap(rows, n_layers=6, n_heads=8, top_k=5)          # doctest: +SKIP
>>> save_figure(fig, "runs/attribute/heads")                            # doctest: +SKIP
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def heads_heatmap(rows: Sequence[dict], n_layers: int, n_heads: int, top_k: int, title: str | None = None):
    """Plotly heatmap of ``score`` per (layer, head); the ``top_k`` highest are outlined and numbered."""
    import plotly.graph_objects as go

    grid = np.full((n_layers, n_heads), np.nan)
    for r in rows:
        grid[int(r["layer"]), int(r["head"])] = float(r["score"])
    ranked = sorted(rows, key=lambda r: -float(r["score"]))[:top_k]
    lim = float(np.nanmax(np.abs(grid))) or 1.0
    fig = go.Figure(go.Heatmap(
        z=grid, x=list(range(n_heads)), y=list(range(n_layers)), colorscale="RdBu", reversescale=True,
        zmin=-lim, zmax=lim, colorbar={"title": "score S"},
        hovertemplate="layer %{y}, head %{x}<br>S = %{z:.4g}<extra></extra>",
    ))
    fig.add_trace(go.Scatter(
        x=[int(r["head"]) for r in ranked], y=[int(r["layer"]) for r in ranked], mode="markers+text",
        marker={"symbol": "square-open", "size": 22, "color": "black", "line": {"width": 2}},
        text=[str(i + 1) for i in range(len(ranked))], textfont={"color": "black"}, name=f"top {top_k}",
        hovertemplate="rank %{text}: layer %{y}, head %{x}<extra></extra>",
    ))
    fig.update_layout(
        title=title or f"Hallucination score per head (top {top_k} marked)",
        xaxis_title="head", yaxis_title="layer", template="plotly_white",
        yaxis={"autorange": "reversed", "dtick": 1}, xaxis={"dtick": 1}, showlegend=False,
    )
    return fig


GROUP_LABELS = {"hallucination": "hallucination heads", "lowest": "lowest-scoring heads", "other": "other heads",
                "all": "all heads", "random": "random heads"}
"""How the head groups of the analyses' tables are named in figures."""
GROUP_COLORS = {"hallucination": "#d62728", "lowest": "#1f77b4", "other": "#7f7f7f", "all": "#2ca02c",
                "random": "#7f7f7f"}
"""One colour per head group, the same in every figure."""
