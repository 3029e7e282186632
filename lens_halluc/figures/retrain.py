"""Training curves of the re-trained models (figures/retrain_losses.{html,png}).

Example
-------
>>> fig = training_curves({"tfhh": "runs/retrain/tfhh", "seed": "runs/retrain/seed"})   # doctest: +SKIP
>>> fig = training_curves({"tfhh": lh.train.tfhh(vlm, heads, examples).losses})         # doctest: +SKIP
>>> save_figure(fig, "figures/retrain_losses")                                          # doctest: +SKIP
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping


def read_losses(model_dir: str | Path):
    """``losses.csv`` of a re-trained checkpoint as a DataFrame (``step``, ``loss``, one column per part).

    Example
    -------
    >>> read_losses("runs/retrain/tfhh").columns.tolist()                      # doctest: +SKIP
    ['step', 'loss', 'ce', 'text_attention_log', 'text_attention']
    """
    import pandas as pd

    return pd.read_csv(Path(model_dir) / "losses.csv")


def training_curves(runs: Mapping[str, object]):
    """One panel per run: its total loss and each part per step. Returns a plotly Figure.

    ``runs``: name → a re-trained checkpoint directory (its ``losses.csv``) or a losses DataFrame
    (``Retrained.losses``).

    Example
    -------
    >>> training_curves({"seed": "runs/retrain/seed"}).layout.title.text        # doctest: +SKIP
    'Re-training: loss per step (and its parts)'
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    names = list(runs)
    fig = make_subplots(rows=1, cols=max(1, len(names)), subplot_titles=names, horizontal_spacing=0.06)
    for i, name in enumerate(names, start=1):
        run = runs[name]
        table = run if hasattr(run, "columns") else read_losses(run)
        for k in table.columns:
            if k == "step":
                continue
            fig.add_trace(go.Scatter(x=table["step"].tolist(), y=table[k].tolist(), mode="lines", name=f"{name}: {k}",
                                     legendgroup=name), row=1, col=i)
        fig.update_xaxes(title_text="step", row=1, col=i)
    fig.update_layout(template="plotly_white", title="Re-training: loss per step (and its parts)")
    return fig
