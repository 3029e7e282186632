"""Findings summary: one table of the headline numbers read from the result files in figures/.

    python analyses/summary.py [--figures figures] [--out figures/summary.md]

Reads bias_summary.csv, inheritance_summary.csv, drift_curve.csv, confounders_separability.csv,
reweighting_summary.csv, top_heads.json and (if present) atp_agreement.json, and writes a Markdown
table answering the study's questions. Every number comes from those files; a missing file gives a
row saying which file is missing (regenerate it with the matching analyses/*.py script).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path


class Missing(Exception):
    """A result file (or the rows a question needs) is absent."""


def read_csv(folder: Path, name: str) -> list[dict]:
    """Rows of ``folder/name`` as dicts of strings; :class:`Missing` when the file is absent."""
    path = folder / name
    if not path.is_file():
        raise Missing(f"{name} is missing from {folder}")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def pick(rows: list[dict], name: str, **where) -> dict:
    """The one row whose columns equal ``where`` (compared as strings)."""
    hits = [r for r in rows if all(r.get(k) == str(v) for k, v in where.items())]
    if len(hits) != 1:
        raise Missing(f"{name} has {len(hits)} rows with {where} (expected 1)")
    return hits[0]


def f3(x) -> str:
    return "nan" if math.isnan(float(x)) else f"{float(x):.3f}"


def yes_no(flag: bool) -> str:
    return "**yes**" if flag else "**no**"


# ---------------------------------------------------------------------------- one function per question
def q_heads(d: Path) -> tuple[str, str, str, str]:
    p = d / "top_heads.json"
    if not p.is_file():
        raise Missing(f"top_heads.json is missing from {d}")
    top = json.loads(p.read_text())
    heads = ", ".join(f"L{l}H{h}" for l, h in top["heads"])
    return ("Which heads are the hallucination heads?", f"k = {top.get('k', len(top['heads']))}",
            f"{heads} ({top.get('scope', '?')} {top.get('ablation', '?')} ablation, {top.get('metric', '?')})",
            "top_heads.json")


def q_bias(d: Path):
    rows = read_csv(d, "bias_summary.csv")
    hal = pick(rows, "bias_summary.csv", group="hallucination", hallucinated=True)
    alls = pick(rows, "bias_summary.csv", group="all", hallucinated=True)
    a, b = float(hal["text_share"]), float(alls["text_share"])
    return ("Do hallucination heads favour text at hallucinated objects?", yes_no(a > b),
            f"text share {f3(a)} (hallucination heads) vs {f3(b)} (all heads)", "bias_summary.csv")


def q_inheritance(d: Path):
    rows = read_csv(d, "inheritance_summary.csv")
    a = float(pick(rows, "inheritance_summary.csv", group="hallucination")["mean_cosine"])
    # the reference compares with the lowest-scoring heads (against="lowest"); "other" with against="others"
    g = next(r["group"] for r in rows if r["group"] != "hallucination")
    b = float(pick(rows, "inheritance_summary.csv", group=g)["mean_cosine"])
    return ("Are they inherited from the base LM?", yes_no(a > b),
            f"mean cosine to the base LM {f3(a)} (hallucination) vs {f3(b)} ({g} heads)", "inheritance_summary.csv")


def q_drift(d: Path):
    rows = read_csv(d, "drift_curve.csv")
    if not rows:
        raise Missing("drift_curve.csv has no rows")
    last = max(int(r["step"]) for r in rows)
    ck = pick(rows, "drift_curve.csv", step=last, group="hallucination")
    a = float(ck["js"])
    g = next(r["group"] for r in rows if r["group"] != "hallucination")  # lowest (reference) or other
    b = float(pick(rows, "drift_curve.csv", step=last, group=g)["js"])
    return (f"Did they drift less than the {g}-scoring heads in visual instruction tuning?" if g == "lowest" else
            "Did they drift less than other heads in visual instruction tuning?", yes_no(a < b),
            f"JS at {ck['checkpoint']} {f3(a)} (hallucination) vs {f3(b)} ({g} heads)", "drift_curve.csv")


def q_separability(d: Path):
    rows = read_csv(d, "confounders_separability.csv")
    parts, closer = [], []
    for modality in ("visual", "text"):
        mod = sorted((r for r in rows if r["modality"] == modality), key=lambda r: int(r["layer"]))
        if not mod:
            parts.append(f"{modality}: no rows")
            continue
        ratios = [float(r["pair_distance_ratio"]) for r in mod]
        half = len(mod) // 2 or 1
        early, late = ratios[:half], ratios[half:] or ratios[:half]
        parts.append(f"{modality}: layers {mod[0]['layer']}–{mod[half - 1]['layer']} mean {f3(sum(early) / len(early))}, "
                     f"layers {mod[half]['layer'] if len(mod) > half else mod[-1]['layer']}–{mod[-1]['layer']} mean "
                     f"{f3(sum(late) / len(late))} (range {f3(min(ratios))}–{f3(max(ratios))})")
        closer.append(sum(ratios) / len(ratios) < 1)
    return ("Are co-occurring objects entangled (pair distance / random-pair distance < 1)?",
            " / ".join(f"{m}: {yes_no(c)}" for m, c in zip(("visual", "text"), closer)) or "—",
            "; ".join(parts), "confounders_separability.csv")


def q_reweighting(d: Path, key_group: str, alpha: float | None):
    rows = read_csv(d, "reweighting_summary.csv")
    mine = [r for r in rows if r["key_group"] == key_group and r["renormalize"] == "False"]
    if not mine:
        raise Missing(f"reweighting_summary.csv has no {key_group}-key rows without renormalisation")
    alphas = sorted({float(r["alpha"]) for r in mine})
    if alpha is None:  # the strongest up-weighting that was run
        alpha = alphas[-1]
    if alpha not in alphas:
        raise Missing(f"reweighting_summary.csv has no {key_group} α = {alpha:g} rows")
    at = {g: next((r for r in mine if r["group"] == g and float(r["alpha"]) == alpha), None)
          for g in ("hallucination", "random")}
    base = next((r for r in mine if r["group"] == "hallucination" and float(r["alpha"]) == 1.0), None)
    if None in at.values() or base is None:
        raise Missing(f"reweighting_summary.csv lacks the α = 1 or α = {alpha:g} rows of both head groups")
    h, r = at["hallucination"], at["random"]
    drop_h = float(base["CHAIR_i"]) - float(h["CHAIR_i"])
    drop_r = float(base["CHAIR_i"]) - float(r["CHAIR_i"])
    nums = (f"CHAIR_i {f3(base['CHAIR_i'])} → {f3(h['CHAIR_i'])} (hallucination heads) vs {f3(r['CHAIR_i'])} "
            f"(random, mean of {r['n_draws']}); CHAIR_s {f3(h['CHAIR_s'])} vs {f3(r['CHAIR_s'])}")
    if not math.isnan(float(h.get("partner_rate", "nan") or "nan")):
        nums += f"; partner mentioned {f3(base['partner_rate'])} → {f3(h['partner_rate'])} vs {f3(r['partner_rate'])}"
    if h.get("repeat_rate") not in (None, "", "nan"):
        # CHAIR does not see repetition: say when fewer hallucinations come with repeated objects
        nums += (f"; captions repeating an object {f3(base['repeat_rate'])} → {f3(h['repeat_rate'])} "
                 f"vs {f3(r['repeat_rate'])}")
    nums += f"; Recall {f3(h['Recall'])} vs {f3(r['Recall'])}"
    verb = "down-weighting their text attention" if key_group == "text" else "up-weighting their image attention"
    return (f"Does {verb} (α = {alpha:g}, no renormalisation) reduce hallucination more than for random heads?",
            yes_no(drop_h > drop_r), nums, "reweighting_summary.csv")


def q_atp(d: Path):
    p = d / "atp_agreement.json"
    if not p.is_file():
        raise Missing(f"atp_agreement.json is missing from {d}")
    a = json.loads(p.read_text())
    return ("Does attribution patching rank heads like exact ablation?", f"Spearman {f3(a['spearman'])}",
            f"Kendall {f3(a['kendall'])}, top-{a['top_k']} overlap {f3(a['top_k_overlap'])} over {a['n_heads']} heads",
            "atp_agreement.json")


QUESTIONS = [q_heads, q_bias, q_inheritance, q_drift, q_separability,
             lambda d: q_reweighting(d, "text", 0.0), lambda d: q_reweighting(d, "image", None), q_atp]


def summary_markdown(folder: str | Path) -> str:
    """The Markdown summary of the result files in ``folder``.

    Returns the text: a heading, a table ``| question | answer | numbers | source |`` with one row per
    question (or a "missing" row naming the absent file), and the list of missing inputs.

    Example
    -------
    >>> print(summary_markdown("figures"))                                    # doctest: +SKIP
    """
    d = Path(folder)
    lines = ["# Findings summary", "",
             f"Numbers read from the result files in `{d}` (regenerate them with `analyses/*.py`).", "",
             "| question | answer | numbers | source |", "|---|---|---|---|"]
    missing = []
    for q in QUESTIONS:
        try:
            row = q(d)
        except Missing as e:
            missing.append(str(e))
            lines.append(f"| — | missing | {e} | — |")
            continue
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in row) + " |")
    if missing:
        lines += ["", "Missing inputs:", *(f"- {m}" for m in missing)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--figures", type=Path, default=Path("figures"), help="folder with the result files")
    p.add_argument("--out", type=Path, default=None, help="output Markdown (default: FIGURES/summary.md)")
    args = p.parse_args()
    out = args.out or args.figures / "summary.md"
    text = summary_markdown(args.figures)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text, end="")
    print(f"written to {out}")
