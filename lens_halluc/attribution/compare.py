"""Agreement between two head rankings (e.g. attribution patching vs exact ablation).

Example
-------
>>> rank_agreement("runs/exact/head_scores.csv", "runs/atp/head_scores.csv", top_k=5)   # doctest: +SKIP
{'spearman': 0.91, 'kendall': 0.78, 'top_k_overlap': 0.8, 'n_heads': 48}
"""
from __future__ import annotations

import csv
from pathlib import Path


def read_scores(path: str | Path) -> dict[tuple[int, int], float]:
    """``{(layer, head): score}`` from a ``head_scores.csv``."""
    with Path(path).open() as f:
        return {(int(r["layer"]), int(r["head"])): float(r["score"]) for r in csv.DictReader(f)}


def rank_agreement(a: str | Path | dict, b: str | Path | dict, top_k: int = 20) -> dict:
    """Spearman and Kendall correlation of two score tables over the same heads, and top-k overlap."""
    from scipy.stats import kendalltau, spearmanr

    sa = a if isinstance(a, dict) else read_scores(a)
    sb = b if isinstance(b, dict) else read_scores(b)
    if set(sa) != set(sb):
        raise ValueError("the two score tables cover different heads; they come from different models.")
    heads = sorted(sa)
    xa, xb = [sa[h] for h in heads], [sb[h] for h in heads]
    top = lambda s: {h for h, _ in sorted(s.items(), key=lambda kv: -kv[1])[:top_k]}  # noqa: E731
    return {"spearman": float(spearmanr(xa, xb).statistic), "kendall": float(kendalltau(xa, xb).statistic),
            "top_k_overlap": len(top(sa) & top(sb)) / top_k, "top_k": top_k, "n_heads": len(heads)}
