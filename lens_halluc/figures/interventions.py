"""Comparison table and figure of the hallucination interventions (figures/interventions.{md,csv,html,png}).

Built from the rows of ``python -m lens_halluc.intervene`` (``results.jsonl``): :func:`summary_table`
collapses the random-head control draws of a method to their mean (with the number of draws and the
min–max of CHAIR_i), :func:`markdown_table` renders the table, :func:`interventions_figure` draws
CHAIR_i vs Recall on the break split per method (hallucination heads vs random heads) and the POPE
accuracy per split.

Example
-------
>>> from lens_halluc.intervene import read_rows
>>> table = summary_table(read_rows("runs/interventions"))                    # doctest: +SKIP
>>> print(markdown_table(table))                                              # doctest: +SKIP
>>> save_figure(interventions_figure(table), "figures/interventions")         # doctest: +SKIP
"""
from __future__ import annotations

import json
import math
from typing import Sequence

CAPTION_METRICS = ("CHAIR_s", "CHAIR_i", "Recall", "Len")
POPE_SPLITS = ("random", "popular", "adversarial")
POPE_METRICS = ("accuracy", "f1", "yes_ratio")


def _f(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _label(row: dict) -> str:
    if row.get("label"):  # rows of lens_halluc.compare carry the user's label
        return str(row["label"])
    rt = row.get("retrained")
    if rt:
        extra = f"k={rt['n_heads']}, " if rt.get("n_heads") else ""
        extra += f"{rt['flavour']}, " if rt.get("flavour") else ""
        name = f"retrained: {rt['method']} ({extra}{rt.get('steps')} steps)"
        return name + (" — random heads" if rt.get("control") == "random" else "")
    opts = json.loads(row["options"]) if row.get("options") else {}
    shown = ", ".join(f"{k}={v}" for k, v in sorted(opts.items()) if v not in (None, False))
    name = row["method"] + (f" ({shown})" if shown else "")
    if row.get("control") == "random":
        name += " — random heads"
    return name


def summary_table(rows: Sequence[dict], caption_splits: Sequence[str] = ("break", "normal")) -> list[dict]:
    """One row per configuration; random-head control draws averaged (``n_draws``; ``*_min``/``*_max`` of CHAIR_i).

    Columns: ``label, method, options, control, n_heads, n_draws``, ``{split}_{CHAIR_s,CHAIR_i,Recall,Len}``
    (plus ``{split}_partner_rate`` where present), ``pope_{split}_{accuracy,f1,yes_ratio}``,
    ``sec_per_caption``, ``rel_time``. Greedy first, then the order of first appearance.
    """
    metrics = [f"{s}_{m}" for s in caption_splits for m in (*CAPTION_METRICS, "partner_rate")]
    metrics += [f"pope_{s}_{m}" for s in POPE_SPLITS for m in POPE_METRICS]
    metrics += ["sec_per_caption", "rel_time"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        rt = r.get("retrained")
        # re-trained models: the draws of a random-head control are separate checkpoints of one configuration
        model = (("retrained", rt["method"], rt.get("control"), rt.get("steps"), rt.get("n_heads"), rt.get("flavour"))
                 if rt else r.get("model"))
        groups.setdefault((r["method"], r.get("options", ""), r.get("control", "none"), model, r.get("n"),
                           r.get("label")), []).append(r)
    out = []
    for (method, options, control, _, _, _), rs in groups.items():
        rt = rs[0].get("retrained")
        row = {"label": _label(rs[0]), "method": f"retrained:{rt['method']}" if rt else method, "options": options,
               "control": "random" if rt and rt.get("control") == "random" else control,
               "n_heads": rs[0].get("n_heads", 0), "n_draws": len(rs)}
        if rt:
            row.update(train_seconds=rt.get("seconds"), trained_params=rt.get("trained_params"),
                       separability=rt.get("separability"))
        for m in metrics:
            vals = [_f(r.get(m)) for r in rs]
            vals = [v for v in vals if not math.isnan(v)]
            row[m] = sum(vals) / len(vals) if vals else math.nan
            if m.endswith("_CHAIR_i") and control == "random":
                row[f"{m}_min"] = min(vals) if vals else math.nan
                row[f"{m}_max"] = max(vals) if vals else math.nan
        out.append(row)
    out.sort(key=lambda r: r["method"] != "greedy")  # stable: greedy first
    # drop metric columns that are empty everywhere (e.g. normal_partner_rate)
    empty = {m for m in metrics if all(math.isnan(_f(r.get(m))) for r in out)}
    return [{k: v for k, v in r.items() if k not in empty} for r in out]


def markdown_table(table: Sequence[dict], caption_splits: Sequence[str] = ("break", "normal")) -> str:
    """Markdown table: method, caption metrics per split, POPE acc/F1/yes per split, relative time."""
    cols: list[tuple[str, str]] = [("label", "method"), ("n_draws", "draws")]
    for s in caption_splits:
        for m in (*CAPTION_METRICS, "partner_rate"):
            if any(f"{s}_{m}" in r for r in table):
                cols.append((f"{s}_{m}", f"{s} {m}"))
    for s in POPE_SPLITS:
        for m, short in zip(POPE_METRICS, ("acc", "F1", "yes")):
            if any(f"pope_{s}_{m}" in r for r in table):
                cols.append((f"pope_{s}_{m}", f"POPE {s[:3]} {short}"))
    cols += [("sec_per_caption", "s/caption"), ("rel_time", "time vs greedy")]
    if any("train_seconds" in r for r in table):
        cols += [("train_seconds", "train s"), ("trained_params", "trained params")]

    def fmt(k, v):
        if k == "label":
            return str(v).replace("|", "/")
        if k == "n_draws":
            return str(v)
        v = _f(v)
        if math.isnan(v):
            return "—"
        if k == "trained_params":
            return f"{int(v):,}"
        if k == "train_seconds":
            return f"{v:.0f}"
        if k == "sec_per_caption":
            return f"{v:.4f}"
        if k.endswith("_Len"):
            return f"{v:.1f}"
        if k == "rel_time":
            return f"{v:.2f}×"
        return f"{v:.3f}"

    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in table:
        lines.append("| " + " | ".join(fmt(k, r.get(k)) for k, _ in cols) + " |")
    return "\n".join(lines)


def interventions_figure(table: Sequence[dict], split: str = "break", title: str | None = None):
    """Left: CHAIR_i vs Recall on ``split`` per method (random-head controls hollow, with CHAIR_i range).
    Right: POPE accuracy per split (grouped bars). Returns a ``plotly.graph_objects.Figure``."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=(f"CHAIR_i vs Recall ({split} split)", "POPE accuracy"),
                        horizontal_spacing=0.12)
    from plotly.colors import qualitative

    # 9 + 24 distinct colours: methods share a colour only past 33 (the old 9-colour cycle gave TFHH DoLa's)
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
    palette += [c for c in qualitative.Dark24 if c.lower() not in {p.lower() for p in palette} | {"#222a2a"}]
    colors: dict[str, str] = {}
    for r in table:
        if r["method"] not in colors:
            n_other = sum(1 for m in colors if m != "greedy")
            colors[r["method"]] = "#000000" if r["method"] == "greedy" else palette[n_other % len(palette)]
    for r in table:
        x, y = _f(r.get(f"{split}_Recall")), _f(r.get(f"{split}_CHAIR_i"))
        if math.isnan(x) or math.isnan(y):
            continue
        ctrl = r.get("control") == "random"
        err = None
        if ctrl and f"{split}_CHAIR_i_min" in r:
            err = {"type": "data", "symmetric": False, "array": [r[f"{split}_CHAIR_i_max"] - y],
                   "arrayminus": [y - r[f"{split}_CHAIR_i_min"]], "thickness": 1, "width": 3}
        fig.add_trace(go.Scatter(x=[x], y=[y], error_y=err, mode="markers", name=r["label"], legendgroup=r["label"],
                                 marker={"size": 12, "color": colors[r["method"]],
                                         "symbol": "circle-open" if ctrl else "circle", "line": {"width": 2}},
                                 hovertemplate=f"{r['label']}<br>Recall %{{x:.3f}}<br>CHAIR_i %{{y:.3f}}<extra></extra>"),
                      row=1, col=1)
    for r in table:
        ys = [_f(r.get(f"pope_{s}_accuracy")) for s in POPE_SPLITS]
        if all(math.isnan(v) for v in ys):
            continue
        ctrl = r.get("control") == "random"
        fig.add_trace(go.Bar(x=list(POPE_SPLITS), y=ys, name=r["label"], legendgroup=r["label"], showlegend=False,
                             marker={"color": colors[r["method"]], "pattern": {"shape": "/" if ctrl else ""}}),
                      row=1, col=2)
    fig.update_xaxes(title_text="Recall", row=1, col=1)
    fig.update_yaxes(title_text="CHAIR_i (lower is better)", row=1, col=1)
    accs = [_f(r.get(f"pope_{s}_accuracy")) for r in table for s in POPE_SPLITS]
    low = min([a for a in accs if not math.isnan(a)] or [0.0])
    fig.update_yaxes(title_text="accuracy", range=[max(0.0, math.floor(low * 10) / 10 - 0.05), 1.0], row=1, col=2)
    fig.update_layout(barmode="group", template="plotly_white", title=title or "Interventions against hallucination",
                      legend={"font": {"size": 10}})
    return fig


def separability_markdown(table: Sequence[dict]) -> str:
    """Markdown table of the re-trained rows' separability at the last layer, before → after training.

    Columns per modality (visual, text): silhouette, between/within scatter ratio, co-occurring-pair
    distance ratio (see :func:`lens_halluc.analysis.confounders.separability`). Empty string when no
    row carries separability numbers.
    """
    rows = [r for r in table if r.get("separability")]
    if not rows:
        return ""
    metrics = (("silhouette", "silhouette"), ("scatter_ratio", "scatter ratio"), ("pair_distance_ratio", "pair/other"))
    head = ["method"] + [f"{mod} {name}" for mod in ("visual", "text") for _, name in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        sep = r["separability"]
        cells = [str(r["label"]).replace("|", "/")]
        for mod in ("visual", "text"):
            for key, _ in metrics:
                b = _f((sep.get("before") or {}).get(mod, {}).get(key))
                a = _f((sep.get("after") or {}).get(mod, {}).get(key))
                cells.append("—" if math.isnan(a) else f"{b:.3f} → {a:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
