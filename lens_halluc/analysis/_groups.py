"""The one naming of head groups shared by every analysis (columns ``group`` of their tables).

* ``"hallucination"`` — the attributed hallucination heads (top-k attribution score);
* ``"lowest"`` — the k lowest-scoring heads (bias; inheritance and drift with ``against="lowest"``,
  the reference's ``non_hal_heads[:k]``);
* ``"all"`` — every head (bias);
* ``"other"`` — every head that is not a hallucination head (inheritance, drift with ``against="others"``);
* ``"random"`` — random control heads drawn by :func:`lens_halluc.models.heads.random_heads` (re-weighting).

:func:`comparison_groups` gives the pair an analysis compares (``against``: :data:`AGAINST`).

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
#: What inheritance and drift compare the hallucination heads with: the k lowest-scoring heads
#: (the reference) or every other head.
AGAINST = ("lowest", "others")


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


def comparison_groups(scores: Sequence[dict], k: int, against: str = "lowest") -> dict[str, list[Head]]:
    """The hallucination heads (top k) and what they are compared with.

    ``against="lowest"``: ``{"hallucination": top k, "lowest": k lowest}`` (the reference's
    ``hal_heads[:k]`` vs ``non_hal_heads[:k]``; the two overlap when ``2k`` exceeds the heads);
    ``"others"``: ``{"hallucination": top k, "other": every other head}``.

    Example
    -------
    >>> rows = [{"layer": 0, "head": h, "score": float(-h)} for h in range(4)]
    >>> comparison_groups(rows, 1), comparison_groups(rows, 1, "others")["other"]
    ({'hallucination': [(0, 0)], 'lowest': [(0, 3)]}, [(0, 1), (0, 2), (0, 3)])
    """
    if against not in AGAINST:
        raise ValueError(f"against must be one of {AGAINST} (the k lowest-scoring heads, or every other head), "
                         f"got {against!r}.")
    g = head_groups(scores, k)
    if against == "lowest":
        return {HALLUCINATION: g[HALLUCINATION], LOWEST: g[LOWEST]}
    hal = set(g[HALLUCINATION])
    return {HALLUCINATION: g[HALLUCINATION], OTHER: [h for h in g[ALL] if h not in hal]}


def group_of(head: Head, hallucination_heads: Sequence[Head], lowest_heads: Sequence[Head] = ()) -> str:
    """``"hallucination"`` if ``head`` is one of ``hallucination_heads``, else ``"lowest"`` if it is
    one of ``lowest_heads``, else ``"other"``.

    Example
    -------
    >>> group_of((0, 0), [(0, 0)]), group_of((0, 1), [(0, 0)], [(0, 1)]), group_of((0, 2), [(0, 0)])
    ('hallucination', 'lowest', 'other')
    """
    if tuple(head) in {tuple(h) for h in hallucination_heads}:
        return HALLUCINATION
    return LOWEST if tuple(head) in {tuple(h) for h in lowest_heads} else OTHER
