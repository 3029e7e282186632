"""The one naming of head groups shared by every analysis (columns ``group`` of their tables).

* ``"hallucination"`` — the attributed hallucination heads (top-k attribution score);
* ``"lowest"`` — the k lowest-scoring heads (bias);
* ``"all"`` — every head (bias);
* ``"other"`` — every head that is not a hallucination head (inheritance, drift);
* ``"random"`` — random control heads drawn by :func:`lens_halluc.models.heads.random_heads` (re-weighting).

Example
-------
>>> head_groups([{"layer": 0, "head": 0, "score": 1.0}, {"layer": 0, "head": 1, "score": -1.0},
...              {"layer": 1, "head": 0, "score": 0.0}], k=1)
{'hallucination': [(0, 0)], 'lowest': [(0, 1)], 'all': [(0, 0), (0, 1), (1, 0)]}
>>> group_of((0, 1), [(0, 0)])
'other'
"""
from __future__ import annotations

from typing import Sequence

Head = tuple[int, int]

HALLUCINATION = "hallucination"
LOWEST = "lowest"
ALL = "all"
OTHER = "other"
RANDOM = "random"
#: Every group name, in the order tables list them.
GROUPS = (HALLUCINATION, LOWEST, ALL, OTHER, RANDOM)


def head_groups(scores: Sequence[dict], k: int) -> dict[str, list[Head]]:
    """Hallucination heads (top-k score), the k lowest-scoring heads, and all heads.

    ``scores``: a DataFrame (e.g. ``Attribution.scores_``) or rows with ``layer, head, score`` (any order). Returns
    ``{"hallucination": [...k], "lowest": [...k], "all": [...]}`` of ``(layer, head)`` pairs; ties
    break by (layer, head) so the groups are deterministic.

    Example
    -------
    >>> head_groups([{"layer": 0, "head": 0, "score": 2.0}, {"layer": 0, "head": 1, "score": 1.0}], k=1)["lowest"]
    [(0, 1)]
    """
    from ..data.tables import table_rows

    scores = table_rows(scores)
    if k < 1 or k > len(scores):
        raise ValueError(f"k = {k} heads requested from {len(scores)} scored heads; choose 1 ≤ k ≤ {len(scores)}.")
    ranked = sorted(scores, key=lambda r: (-float(r["score"]), int(r["layer"]), int(r["head"])))
    pairs = [(int(r["layer"]), int(r["head"])) for r in ranked]
    return {HALLUCINATION: pairs[:k], LOWEST: pairs[-k:], ALL: sorted(pairs)}


def group_of(head: Head, hallucination_heads: Sequence[Head]) -> str:
    """``"hallucination"`` if ``head`` is one of ``hallucination_heads``, else ``"other"``.

    Example
    -------
    >>> group_of((0, 0), [(0, 0)])
    'hallucination'
    """
    return HALLUCINATION if tuple(head) in {tuple(h) for h in hallucination_heads} else OTHER
