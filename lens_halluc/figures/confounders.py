"""Figures of the confounder analysis, built from its tables (never from the model).

* :func:`pca_scatter` (and :func:`pca_scatter_2d` / :func:`pca_scatter_3d`): the PCA rows of
  :func:`lens_halluc.analysis.pca_views`, one object and its most co-occurring partners
  highlighted. Highlighting is by **category id** looked up in each row, never by row position.
* :func:`separability_lines`: silhouette, scatter ratio and pair-distance ratio per layer, one line
  per modality, from :func:`lens_halluc.analysis.separability` rows (the ``table`` of
  :func:`lens_halluc.analysis.confounders`).

Example
-------
>>> fig = pca_scatter(pca_views(dictionary, "text", 6, 2), highlight=18, partners=[34, 1, 17])  # doctest: +SKIP
>>> save_figure(fig, "figures/confounders_pca_text_2d")                                         # doctest: +SKIP
"""
from __future__ import annotations

from typing import Mapping, Sequence

from ..data.tables import table_rows

HIGHLIGHT_COLOR = "#d62728"
PARTNER_COLOR = "#ff7f0e"
OTHER_COLOR = "#7f7f7f"


def _groups(rows: Sequence[Mapping], highlight: int, partners: Sequence[int]):
    partners = [int(p) for p in partners if int(p) != int(highlight)]
    by_id = {int(r["category_id"]): r for r in rows}
    missing = [c for c in [int(highlight)] + partners if c not in by_id]
    if int(highlight) in missing:
        raise KeyError(f"category id {highlight} has no row in this PCA view (no instance in this modality).")
    hi = [by_id[int(highlight)]]
    pa = [by_id[c] for c in partners if c in by_id]
    rest = [r for r in rows if int(r["category_id"]) != int(highlight) and int(r["category_id"]) not in partners]
    return [("other categories", rest, OTHER_COLOR, 8), ("co-occurring partners", pa, PARTNER_COLOR, 12),
            (f"{hi[0]['name']} (highlighted)", hi, HIGHLIGHT_COLOR, 16)]


def pca_scatter(rows: Sequence[Mapping], highlight: int, partners: Sequence[int] = (), title: str | None = None):
    """2-D or 3-D (when rows carry ``pc3``) scatter of category means in PCA space.

    ``rows``: ``pca_views`` rows (``category_id``, ``name``, ``pc1``, ``pc2`` [, ``pc3``],
    ``explained_pc*``) of one layer and modality; ``highlight``: category id drawn in red;
    ``partners``: category ids drawn in orange (e.g. ``most_cooccurring(highlight, cooc, 3)``).

    >>> fig = pca_scatter(rows, highlight=18, partners=[34])                    # doctest: +SKIP
    """
    import plotly.graph_objects as go

    rows = table_rows(rows)
    if not rows:
        raise ValueError("no PCA rows to draw.")
    three = "pc3" in rows[0]
    fig = go.Figure()
    for label, group, color, size in _groups(rows, highlight, partners):
        if not group:
            continue
        common = dict(mode="markers+text", name=label, text=[r["name"] for r in group], textposition="top center",
                      marker={"color": color, "size": size if not three else size * 0.6, "line": {"width": 0}},
                      customdata=[[int(r["category_id"])] for r in group])
        if three:
            fig.add_trace(go.Scatter3d(x=[r["pc1"] for r in group], y=[r["pc2"] for r in group], z=[r["pc3"] for r in group],
                                       hovertemplate="%{text} (id %{customdata[0]})<extra></extra>", **common))
        else:
            fig.add_trace(go.Scatter(x=[r["pc1"] for r in group], y=[r["pc2"] for r in group],
                                     hovertemplate="%{text} (id %{customdata[0]})<br>PC1 %{x:.3g}, PC2 %{y:.3g}<extra></extra>",
                                     **common))

    def axis(j: int) -> str:
        key = f"explained_pc{j}"
        return f"PC{j} ({100 * rows[0][key]:.0f}%)" if key in rows[0] else f"PC{j}"

    fig.update_layout(title=title or "Category means (standardised) in PCA space", template="plotly_white",
                      legend={"orientation": "h", "y": -0.12})
    if three:
        # Plotly's default camera (eye 1.25, 1.25, 1.25) fills the scene's viewport with the axis box, so
        # the point labels and axis titles near its edges were cut off in the PNG: step the camera back
        # and give the scene the whole figure above the legend.
        # WebGL clips everything outside the axis box, so a label at the edge of the data lost its end
        # ("cloc"): pad each range by 15% of its span.
        def padded(key: str) -> list[float]:
            vals = [float(r[key]) for r in rows]
            lo, hi = min(vals), max(vals)
            pad = 0.15 * (hi - lo) or 1.0
            return [lo - pad, hi + pad]

        fig.update_layout(scene={"xaxis": {"title": axis(1), "range": padded("pc1")},
                                 "yaxis": {"title": axis(2), "range": padded("pc2")},
                                 "zaxis": {"title": axis(3), "range": padded("pc3")},
                                 "camera": {"eye": {"x": 1.55, "y": 1.55, "z": 1.1}},
                                 "domain": {"x": [0, 1], "y": [0.08, 1]}},
                          margin={"l": 10, "r": 10, "t": 70, "b": 10}, legend={"orientation": "h", "y": 0.02})
    else:
        fig.update_layout(xaxis_title=axis(1), yaxis_title=axis(2))
    return fig


def pca_scatter_2d(rows: Sequence[Mapping], highlight: int, partners: Sequence[int] = (), title: str | None = None):
    """2-D view: :func:`pca_scatter` on ``pc1``/``pc2`` (a ``pc3`` column is ignored).

    >>> fig = pca_scatter_2d(pca_views(d, "visual", 0, 2), 18, [34])            # doctest: +SKIP
    """
    return pca_scatter([{k: v for k, v in r.items() if k not in ("pc3", "explained_pc3")} for r in table_rows(rows)],
                       highlight, partners, title)


def pca_scatter_3d(rows: Sequence[Mapping], highlight: int, partners: Sequence[int] = (), title: str | None = None):
    """3-D view: :func:`pca_scatter` on rows with ``pc3`` (from ``pca_views(..., n_components=3)``).

    >>> fig = pca_scatter_3d(pca_views(d, "visual", 0, 3), 18, [34])            # doctest: +SKIP
    """
    rows = table_rows(rows)
    if not rows or "pc3" not in rows[0]:
        raise ValueError("3-D view needs rows with pc3: call pca_views(..., n_components=3).")
    return pca_scatter(rows, highlight, partners, title)


METRICS = (("silhouette", "silhouette"), ("scatter_ratio", "between/within scatter"),
           ("pair_distance_ratio", "co-occurring / other pair distance"))


def separability_lines(rows: Sequence[Mapping], title: str | None = None):
    """Per-layer lines of silhouette, scatter ratio and pair-distance ratio, one line per modality.

    ``rows``: :func:`lens_halluc.analysis.separability` rows or DataFrame (or the CSV read back).
    A dotted line at 1 on the pair panel marks "no closer than other pairs".

    >>> fig = separability_lines(separability(reps, pairs))                    # doctest: +SKIP
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    rows = table_rows(rows)
    fig = make_subplots(rows=1, cols=len(METRICS), subplot_titles=[t for _, t in METRICS])
    colors = {"visual": "#1f77b4", "text": "#2ca02c"}
    for mod in sorted({r["modality"] for r in rows}):
        mine = sorted((r for r in rows if r["modality"] == mod), key=lambda r: int(r["layer"]))
        for j, (key, _) in enumerate(METRICS):
            fig.add_trace(go.Scatter(x=[int(r["layer"]) for r in mine], y=[float(r[key]) for r in mine], mode="lines+markers",
                                     name=mod, legendgroup=mod, showlegend=j == 0,
                                     line={"color": colors.get(mod)}), row=1, col=j + 1)
    fig.add_hline(y=1.0, line_dash="dot", line_color="gray", row=1, col=len(METRICS))
    fig.update_xaxes(title_text="layer (0 = projector / embeddings)", dtick=1)
    fig.update_layout(title=title or "Category separability per layer", template="plotly_white")
    return fig
