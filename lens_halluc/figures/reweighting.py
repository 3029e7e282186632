"""Figure of attention re-weighting (Fig. 6): CHAIR_i, partner rate and Recall vs α per key group.

Built from the ``summary`` of :func:`lens_halluc.analysis.reweighting` (DataFrame or dict rows). One column per key group
(text keys × α ≤ 1, image keys × α ≥ 1), one row per metric; hallucination heads in red, random
heads in grey with error bars spanning the min–max over draws; solid = no renormalisation (the
reference), dashed = renormalised rows.

Example
-------
>>> fig = reweighting_figure(res.summary)                                 # doctest: +SKIP
>>> save_figure(fig, "figures/reweighting", height=900)                   # doctest: +SKIP
"""
from __future__ import annotations

import math
from typing import Sequence

from ..data.tables import table_rows

COLORS = {"hallucination": "#d62728", "random": "#7f7f7f"}
LABELS = {"CHAIR_i": "CHAIR_i", "CHAIR_s": "CHAIR_s", "partner_rate": "partner mentioned (break)", "Recall": "Recall",
          "Len": "caption length"}


def reweighting_figure(summary: Sequence[dict], metrics: Sequence[str] = ("CHAIR_i", "partner_rate", "Recall"),
                       title: str | None = None):
    """Metric vs α, hallucination vs random heads (mean ± range over draws), one column per key group.

    ``summary``: rows ``{group, key_group, alpha, renormalize, n_draws, <metric>, <metric>_min,
    <metric>_max}``. Metrics that are NaN everywhere (e.g. ``partner_rate`` on a dataset without
    probes) are left out. Returns a ``plotly.graph_objects.Figure``.

    Example
    -------
    >>> fig = reweighting_figure(summary, metrics=("CHAIR_i",))               # doctest: +SKIP
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    summary = table_rows(summary)
    metrics = [m for m in metrics if any(not math.isnan(float(r[m])) for r in summary)]
    groups = [g for g in ("text", "image") if any(r["key_group"] == g for r in summary)]
    titles = [f"{LABELS.get(m, m)} — {g} keys × α" for m in metrics for g in groups]
    fig = make_subplots(rows=len(metrics), cols=len(groups), subplot_titles=titles, shared_xaxes=False,
                        vertical_spacing=0.14, horizontal_spacing=0.1)
    seen = set()
    for i, m in enumerate(metrics, start=1):
        for j, kg in enumerate(groups, start=1):
            for group in ("hallucination", "random"):
                for ren in (False, True):
                    rows = sorted((r for r in summary if r["group"] == group and r["key_group"] == kg
                                   and bool(r["renormalize"]) == ren), key=lambda r: float(r["alpha"]))
                    if not rows:
                        continue
                    y = [float(r[m]) for r in rows]
                    err = None
                    if group == "random":  # the spread over random draws, so one lucky draw is visible
                        err = {"type": "data", "symmetric": False, "thickness": 1, "width": 3,
                               "array": [float(r[f"{m}_max"]) - v for r, v in zip(rows, y)],
                               "arrayminus": [v - float(r[f"{m}_min"]) for r, v in zip(rows, y)]}
                    name = f"{group} heads{' (renormalised)' if ren else ''}"
                    fig.add_trace(go.Scatter(
                        x=[float(r["alpha"]) for r in rows], y=y, error_y=err, mode="lines+markers", name=name,
                        legendgroup=name, showlegend=name not in seen,
                        line={"color": COLORS[group], "dash": "dash" if ren else "solid"},
                        hovertemplate=f"{name}<br>α = %{{x}}<br>{m} = %{{y:.3f}}<extra></extra>"), row=i, col=j)
                    seen.add(name)
            fig.update_xaxes(title_text=f"α ({kg} keys)", row=i, col=j,
                             autorange="reversed" if kg == "text" else True)  # text: weaker to the right
            fig.update_yaxes(title_text=LABELS.get(m, m), rangemode="tozero", row=i, col=j)
    fig.update_layout(template="plotly_white", title=title or "Attention re-weighting: hallucination vs random heads",
                      legend={"orientation": "h", "y": -0.06})
    return fig
