"""Agreement between two head rankings (e.g. attribution patching vs exact ablation).

Example
-------
>>> rank_agreement("runs/exact/head_scores.csv", "runs/atp/head_scores.csv", top_k=5)   # doctest: +SKIP
{'spearman': 0.91, 'kendall': 0.78, 'top_k_overlap': 0.8, 'n_heads': 48}
>>> rank_agreement(exact_attr, atp_attr, top_k=5)       # two fitted Attributions      # doctest: +SKIP
"""
from __future__ import annotations

import csv
from pathlib import Path


def read_scores(path: str | Path) -> dict[tuple[int, int], float]:
    """``{(layer, head): score}`` from a ``head_scores.csv``."""
    with Path(path).open() as f:
        return {(int(r["layer"]), int(r["head"])): float(r["score"]) for r in csv.DictReader(f)}


def as_scores(scores) -> dict[tuple[int, int], float]:
    """``{(layer, head): score}`` from a dict, a fitted ``Attribution``, a scores DataFrame or a CSV path."""
    if isinstance(scores, dict):
        return scores
    frame = getattr(scores, "scores_", scores)
    if hasattr(frame, "columns"):
        return {(int(l), int(h)): float(s) for l, h, s in zip(frame["layer"], frame["head"], frame["score"])}
    return read_scores(scores)


def rank_agreement(a, b, top_k: int = 20) -> dict:
    """Spearman and Kendall correlation of two score tables over the same heads, and top-k overlap.

    ``a``, ``b``: anything :func:`as_scores` takes.
    """
    from scipy.stats import kendalltau, spearmanr

    sa, sb = as_scores(a), as_scores(b)
    if set(sa) != set(sb):
        raise ValueError("the two score tables cover different heads; they come from different models.")
    heads = sorted(sa)
    xa, xb = [sa[h] for h in heads], [sb[h] for h in heads]
    top = lambda s: {h for h, _ in sorted(s.items(), key=lambda kv: -kv[1])[:top_k]}  # noqa: E731
    return {"spearman": float(spearmanr(xa, xb).statistic), "kendall": float(kendalltau(xa, xb).statistic),
            "top_k_overlap": len(top(sa) & top(sb)) / top_k, "top_k": top_k, "n_heads": len(heads)}
