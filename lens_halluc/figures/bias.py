"""Figure of attention bias: image vs text attention mass by head group, hallucinated vs real objects.

Built from the ``summary`` of :func:`lens_halluc.analysis.bias` (a DataFrame or dict rows), never from the model.

Example
-------
>>> fig = bias_figure(summary)                     # doctest: +SKIP
>>> save_figure(fig, "figures/bias")               # doctest: +SKIP
"""
from __future__ import annotations

from typing import Sequence

from ..data.tables import table_rows

GROUP_LABELS = {"hallucination": "hallucination heads", "lowest": "lowest-scoring heads", "all": "all heads"}


def bias_figure(summary: Sequence[dict], title: str | None = None):
    """Two panels (image mass, text mass) of grouped bars: head group × hallucinated/real object.

    ``summary``: DataFrame or rows ``{group, hallucinated, image_mass, text_mass, text_share, n_tokens}``.

    Example
    -------
    >>> fig = bias_figure(lh.analysis.bias(vlm, attr).summary)        # doctest: +SKIP
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    summary = table_rows(summary)
    groups = list(dict.fromkeys(r["group"] for r in summary))
    fig = make_subplots(rows=1, cols=2, subplot_titles=("attention on image tokens", "attention on text after the image"))
    colors = {True: "#d62728", False: "#1f77b4"}
    for col, key in enumerate(("image_mass", "text_mass"), start=1):
        for hal in (True, False):
            rows = {r["group"]: r for r in summary if r["hallucinated"] == hal}
            fig.add_trace(go.Bar(
                x=[GROUP_LABELS.get(g, g) for g in groups], y=[rows[g][key] if g in rows else None for g in groups],
                name="hallucinated objects" if hal else "real objects", marker_color=colors[hal],
                showlegend=col == 1, legendgroup=str(hal),
                customdata=[[rows[g]["text_share"], rows[g]["n_tokens"]] if g in rows else [None, None] for g in groups],
                hovertemplate="%{x}<br>mass %{y:.3f}<br>text share %{customdata[0]:.3f}<br>%{customdata[1]} tokens<extra></extra>",
            ), row=1, col=col)
    fig.update_layout(barmode="group", template="plotly_white",
                      title=title or "Attention at the position predicting an object word")
    fig.update_yaxes(title_text="mean attention mass", row=1, col=1)
    return fig
