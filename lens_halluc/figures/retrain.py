"""Training curves of the re-trained models (figures/retrain_losses.{html,png}).

Example
-------
>>> fig = training_curves({"tfhh": "runs/retrain/tfhh", "seed": "runs/retrain/seed"})   # doctest: +SKIP
>>> save_figure(fig, "figures/retrain_losses")                                          # doctest: +SKIP
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Mapping


def read_losses(model_dir: str | Path) -> dict[str, list[float]]:
    """``losses.csv`` of a re-trained checkpoint as ``{column: [per step]}`` (``step``, ``loss``, parts)."""
    with open(Path(model_dir) / "losses.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {k: [float(r[k]) for r in rows] for k in (rows[0] if rows else {})}


def training_curves(runs: Mapping[str, str | Path]):
    """One panel per run: its total loss and each part per step. Returns a plotly Figure."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    names = list(runs)
    fig = make_subplots(rows=1, cols=max(1, len(names)), subplot_titles=names, horizontal_spacing=0.06)
    for i, name in enumerate(names, start=1):
        cols = read_losses(runs[name])
        for k, v in cols.items():
            if k == "step":
                continue
            fig.add_trace(go.Scatter(x=cols["step"], y=v, mode="lines", name=f"{name}: {k}", legendgroup=name),
                          row=1, col=i)
        fig.update_xaxes(title_text="step", row=1, col=i)
    fig.update_layout(template="plotly_white", title="Re-training: loss per step (and its parts)")
    return fig
