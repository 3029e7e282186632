"""Sets of attention heads: the reference's numbers of heads, the random-head control and heads files.

:data:`HA_K` is the one table of how many attributed heads each consumer takes in the reference
(Yang et al., ICLR 2025; TianyunYoung/Hallucination-Attribution); the analyses, interventions and
re-training read their default ``k`` from it. :func:`random_heads` is the one owner of control
draws (re-weighting curves, the random-head rows of interventions and re-training all call it).
:func:`read_heads` reads a ``top_heads.json`` (and, for a ``k`` beyond its list, the ranking of
``head_scores.csv`` beside it).

Example
-------
>>> random_heads((2, 4), 2, exclude=[(0, 0), (1, 3)], seed=0)
[(1, 0), (1, 1)]
>>> random_heads((2, 4), 2, exclude=[(0, 0), (1, 3)], seed=0, draws=2)
[[(1, 0), (1, 1)], [(0, 2), (1, 2)]]
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

Head = tuple[int, int]

#: Heads each consumer takes from the attribution ranking in the reference, for LLaVA-1.5-7B
#: (32 × 32 heads). Where each number is set (repository TianyunYoung/Hallucination-Attribution):
#:
#: * ``attribution`` 30 — ``LLaVA/eval_scripts/identify_attention_head.py`` ``--topk`` default 30:
#:   the length of ``hal_heads`` (top) and ``non_hal_heads`` (lowest) in ``attribution_result.json``
#:   (``LLaVA/bash_scripts/attribute.sh`` passes no ``--topk``);
#: * ``adhh`` 20 — ``baselines/bash_scripts/eval_adhh.sh`` ``top_k=20`` ("for llava-1.5, we use
#:   top_k=20, for minigpt4, we use top_k=10");
#: * ``reweight`` 20 — ``LLaVA/bash_scripts/analysis/attention_reweight_{txt,img}.sh`` ``top_k=20``
#:   (the script's own default is 10); the control is ``--random_heads``: ``random.sample`` of 20
#:   among *all* 1024 heads (``analyze_attention_reweight.py``);
#: * ``bias`` 20 — ``analyze_attention_bias.py`` ``--top_k`` default 20: ``hal_heads[:20]`` vs
#:   ``non_hal_heads[:20]`` (the 20 lowest-scoring heads);
#: * ``tfhh`` 30 — ``LLaVA/bash_scripts/targeted_finetune.sh`` ``--selective_tuning_top_k 30``;
#: * ``inheritance`` 1 — ``analyze_attention_inheritance.py`` ``--top_k`` default 1: ``hal_heads[:1]``
#:   vs ``non_hal_heads[:1]`` (the lowest-scoring head);
#: * ``drift`` 3 — ``analyze_js_div_in_training.py`` ``--top_k`` default 3 (the plot is labelled
#:   "Top 3"): ``hal_heads[:3]`` vs ``non_hal_heads[:3]`` (the 3 lowest-scoring heads).
#:
#: The shell scripts pass no ``--top_k`` to the bias, inheritance and drift analyses, so their
#: Python defaults apply. A model with fewer heads than a ``k`` needs its own ``k`` (the model
#: organism has 6 × 8 = 48 heads: pass the attribution's ``top_k_``).
HA_K: dict[str, int] = {"attribution": 30, "adhh": 20, "reweight": 20, "bias": 20, "tfhh": 30,
                        "inheritance": 1, "drift": 3}


def ha_k(consumer: str, k: int | None = None) -> int:
    """``k`` if given, else the reference's number of heads for ``consumer`` (a key of :data:`HA_K`).

    Example
    -------
    >>> ha_k("drift"), ha_k("drift", 5)
    (3, 5)
    """
    if k is not None:
        return int(k)
    try:
        return HA_K[consumer]
    except KeyError:
        raise KeyError(f"no reference k for {consumer!r}; HA_K has {sorted(HA_K)}.") from None


class HeadsFileError(ValueError):
    """A heads file that cannot be read as a list of (layer, head) pairs; the message names the file."""


def _shape(spec_or_vlm) -> tuple[int, int]:
    if isinstance(spec_or_vlm, tuple) and len(spec_or_vlm) == 2:
        return int(spec_or_vlm[0]), int(spec_or_vlm[1])
    spec = getattr(spec_or_vlm, "spec", spec_or_vlm)
    try:
        return int(spec.n_layers), int(spec.n_heads)
    except AttributeError:
        raise TypeError(f"random_heads needs a LoadedVLM, a ModelSpec or an (n_layers, n_heads) tuple, "
                        f"got {type(spec_or_vlm).__name__}.") from None


def random_heads(spec_or_vlm, k: int, exclude: Iterable[Head] = (), seed: int = 0, match_layers: bool = False,
                 draws: int | None = None) -> list[Head] | list[list[Head]]:
    """``k`` heads drawn uniformly without replacement among the heads not in ``exclude`` (sorted).

    Parameters
    ----------
    spec_or_vlm : a :class:`~lens_halluc.models.LoadedVLM`, a :class:`~lens_halluc.models.ModelSpec`
        or ``(n_layers, n_heads)``.
    k : heads per draw.
    exclude : heads never drawn (usually the attributed hallucination heads).
    seed : ``numpy.random.default_rng(seed)``; the same seed gives the same draws, and more draws
        keep the earlier ones.
    match_layers : draw, in every layer, as many heads as ``exclude`` has there (attributed heads
        cluster in a few layers; this control keeps their layer profile). Needs ``k == len(exclude)``.
    draws : ``None`` for one draw (a list of heads); an int for that many independent draws (a list
        of lists).

    Example
    -------
    >>> random_heads((6, 8), 3, exclude=[(0, 0), (0, 1), (5, 2)], seed=1, match_layers=True)
    [(0, 4), (0, 5), (5, 7)]
    """
    n_layers, n_heads = _shape(spec_or_vlm)
    excluded = {(int(l), int(h)) for l, h in exclude}
    k = int(k)
    n = 1 if draws is None else int(draws)
    if n < 1:
        raise ValueError(f"draws must be >= 1, got {draws}.")
    rng = np.random.default_rng(seed)
    if match_layers:
        per_layer = Counter(l for l, _ in excluded)
        if k != len(excluded):
            raise ValueError(f"match_layers=True draws as many heads per layer as `exclude` has, so k must equal "
                             f"len(exclude) = {len(excluded)}, got k={k}.")
        pools = {l: [(l, h) for h in range(n_heads) if (l, h) not in excluded] for l in sorted(per_layer)}
        for l, c in per_layer.items():
            if c > len(pools[l]):
                raise ValueError(f"layer {l} has {c} excluded heads and only {len(pools[l])} others to draw from.")
        out = [sorted(pools[l][int(i)] for l in sorted(per_layer)
                      for i in rng.choice(len(pools[l]), size=per_layer[l], replace=False)) for _ in range(n)]
    else:
        pool = [(l, h) for l in range(n_layers) for h in range(n_heads) if (l, h) not in excluded]
        if not 1 <= k <= len(pool):
            raise ValueError(f"cannot draw {k} random heads from the {len(pool)} heads outside `exclude` "
                             f"(k must be between 1 and {len(pool)}).")
        out = [sorted(pool[int(i)] for i in rng.choice(len(pool), size=k, replace=False)) for _ in range(n)]
    return out[0] if draws is None else out


def parse_heads(heads: Iterable, where: str = "heads") -> list[Head]:
    """``[[l, h], ...]`` → ``[(l, h), ...]``: integers only, no duplicates; errors name ``where``."""
    out: list[Head] = []
    for pair in heads:
        if isinstance(pair, (str, bytes)) or not hasattr(pair, "__len__") or len(pair) != 2:
            raise HeadsFileError(f"{where}: a head must be a [layer, head] pair of integers, got {pair!r}.")
        vals = []
        for v in pair:
            if isinstance(v, bool) or not (isinstance(v, (int, np.integer)) or (isinstance(v, float) and v.is_integer())):
                raise HeadsFileError(f"{where}: a head must be a [layer, head] pair of integers, got {pair!r}.")
            vals.append(int(v))
        if vals[0] < 0 or vals[1] < 0:
            raise HeadsFileError(f"{where}: layer and head indices must be >= 0, got {pair!r}.")
        h = (vals[0], vals[1])
        if h in out:
            raise HeadsFileError(f"{where}: head {list(h)} is listed twice.")
        out.append(h)
    return out


def read_heads(path: str | Path, k: int | None = None) -> list[Head]:
    """Heads of a ``top_heads.json`` (``{"heads": [[l, h], ...], "k": ...}``) or a plain ``[[l, h], ...]`` list.

    A directory means its ``top_heads.json``. ``k`` keeps the first ``k`` (default: the file's ``k``).
    A ``k`` larger than the list is taken from the full ranking of the ``head_scores.csv`` beside
    the file (an attribution run's directory; its first heads are the list's), so any consumer's
    ``k`` (:data:`HA_K`) can be read from a run that lists fewer; without that file it is an error.

    Example
    -------
    >>> read_heads("runs/demo/top_heads.json", k=5)                    # doctest: +SKIP
    [(0, 0), (1, 3), (2, 7), (0, 5), (3, 1)]
    """
    p = Path(path)
    if p.is_dir():
        p = p / "top_heads.json"
    if not p.is_file():
        raise FileNotFoundError(f"heads file not found: {path}. Pass a top_heads.json written by "
                                "`python -m lens_halluc.attribute`.")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HeadsFileError(f"{p} is not valid JSON ({e}); expected {{\"heads\": [[layer, head], ...]}} "
                             "as written by `python -m lens_halluc.attribute`.") from None
    if isinstance(data, dict):
        if "heads" not in data:
            raise HeadsFileError(f"{p} has no \"heads\" key (keys: {sorted(data)}); expected "
                                 "{\"heads\": [[layer, head], ...]}.")
        heads, file_k = data["heads"], data.get("k")
    else:
        heads, file_k = data, None
    if not isinstance(heads, list):
        raise HeadsFileError(f"{p}: \"heads\" must be a list of [layer, head] pairs, got {type(heads).__name__}.")
    out = parse_heads(heads, where=str(p))
    if not out:
        raise HeadsFileError(f"{p} lists no heads.")
    keep = k if k is not None else file_k
    if keep is not None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise HeadsFileError(f"{p}: k must be a positive integer, got {keep!r}.")
        if keep > len(out):
            ranked = _ranking(p.parent / "head_scores.csv")
            if ranked is None:
                raise HeadsFileError(f"{p} lists {len(out)} heads; cannot take the first {keep} "
                                     "(and there is no head_scores.csv beside it to rank the others).")
            if ranked[: len(out)] != out:
                raise HeadsFileError(f"{p} and the head_scores.csv beside it rank the heads differently; "
                                     "they come from different runs.")
            if keep > len(ranked):
                raise HeadsFileError(f"{p.parent / 'head_scores.csv'} scores {len(ranked)} heads; cannot take "
                                     f"the first {keep} (k must be between 1 and {len(ranked)}).")
            out = ranked
        out = out[:keep]
    return out


def _ranking(path: Path) -> list[Head] | None:
    """Heads of a ``head_scores.csv`` ranked by score (ties: layer, head), or None when there is no such file."""
    import csv

    if not path.is_file():
        return None
    with path.open(newline="") as f:
        rows = [(-float(r["score"]), int(r["layer"]), int(r["head"])) for r in csv.DictReader(f)]
    return [(l, h) for _, l, h in sorted(rows)]
