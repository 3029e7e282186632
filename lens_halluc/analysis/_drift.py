"""Drift: how far each head's attention moves from the initial model during instruction tuning.

For each instruction-tuning checkpoint and the initial model (base LM + stage-1 projector; the
organism's ``projector`` stage): per head and query row, the Jensen–Shannon divergence between
the two models' attention rows on the same teacher-forced sequence (renormalised over the keys
both can attend to — the causal prefix ``k ≤ q`` — natural log, ε = 1e-8), averaged over rows,
then over samples (table), then over the chosen heads (summary curve). The reference
(``analyze_js_div_in_training.py``) averages over a group's heads per sample, then over samples:
the same number when every sample has every head.

Groups (:data:`FLAVOURS_DRIFT`): the top ``k`` heads (``k = 3`` in the reference, ``HA_K["drift"]``;
its plot says "Top 3") against the ``k`` lowest-scoring heads (``against="lowest"``, the
reference's ``non_hal_heads[:3]``) or against every other head (``against="others"``, the
``corrected`` flavour).

Example
-------
>>> from lens_halluc.models.default import list_checkpoints, organism_path
>>> res = lh.analysis.drift(organism_path("projector"), list_checkpoints(), "runs/attribution_heads")  # doctest: +SKIP
>>> res.summary                      # the curve: mean JS per checkpoint and head group              # doctest: +SKIP
"""
from __future__ import annotations

import gc
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from ..data.flavour import check_flavour, resolve
from ..models.spec import TokenRole
from ._attention import as_attribution, attention_maps, mean, resolve_k, sample_inputs, select_samples
from ._groups import HALLUCINATION, LOWEST, OTHER, Head, comparison_groups, group_of
from ._result import AnalysisResult, frame

COLUMNS = ("checkpoint", "step", "layer", "head", "js", "group")
CURVE_COLUMNS = ("checkpoint", "step", "group", "n_heads", "js")

#: ``reference``: hallucination heads vs the k lowest-scoring heads (HA's Fig. 5); ``corrected``: vs
#: every other head. ``k`` is the reference's (3) in both unless given.
FLAVOURS_DRIFT = {"reference": {"against": "lowest"}, "corrected": {"against": "others"}}


def js_divergence(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-8, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Jensen–Shannon divergence (natural log) between distributions along the last axis.

    ``p``, ``q``: ``[..., K]`` non-negative weights (need not be normalised). ``mask``: optional
    bool ``[..., K]`` (broadcastable) of the keys both can attend to; keys outside it are dropped.
    Both are smoothed with ``eps`` on the kept keys and renormalised to sum to 1, then
    ``JS = ½ KL(p‖m) + ½ KL(q‖m)`` with ``m = (p + q) / 2``; ``0 ≤ JS ≤ ln 2``.
    Returns ``[...]`` in float64.

    Example
    -------
    >>> float(js_divergence(torch.tensor([0.5, 0.5]), torch.tensor([0.5, 0.5])))
    0.0
    >>> round(float(js_divergence(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))), 4)   # ≈ ln 2
    0.6931
    """
    p, q = torch.as_tensor(p, dtype=torch.float64), torch.as_tensor(q, dtype=torch.float64)
    keep = torch.ones_like(p, dtype=torch.bool) if mask is None else torch.as_tensor(mask, dtype=torch.bool).expand_as(p)
    w = keep.to(torch.float64)
    # smoothing keeps the logs finite where one model gives a key exactly 0; renormalising makes
    # rows comparable even when they come in unnormalised or cut to the shared keys
    p = (p.clamp_min(0) + eps) * w
    q = (q.clamp_min(0) + eps) * w
    p = p / p.sum(-1, keepdim=True)
    q = q / q.sum(-1, keepdim=True)
    from ..interventions.dola import jensen_shannon  # imported here: the interventions package is heavy

    # The one JS of the package (interventions.dola) takes log-probabilities over every key. A key
    # outside the mask gets log p = log q = 0 there: p = q = m = 1 makes its term exactly 0, so the
    # sum runs over the kept keys only.
    one = torch.ones_like(p)
    return jensen_shannon(torch.log(torch.where(keep, p, one)), torch.log(torch.where(keep, q, one)))


@dataclass(frozen=True)
class DriftConfig:
    """``n_samples``: first N captions; ``rows``: query rows averaged — ``"all"`` positions
    (default) or ``"text"`` (positions after the image); ``eps``: JS smoothing."""

    n_samples: int | None = None
    rows: str = "all"
    eps: float = 1e-8


def row_js(att_a: torch.Tensor, att_b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-row JS between two causal attention maps ``[..., T, T]`` → ``[..., T]`` (keys ``≤ q``)."""
    t = att_a.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()  # row q may attend to keys 0..q in both models
    return js_divergence(att_a, att_b, eps=eps, mask=causal)


def _load(model, device, dtype):
    from ..models.loading import load_vlm

    return model if hasattr(model, "spec") else load_vlm(model, device=device, dtype=dtype)


@torch.no_grad()
def attention_drift(initial, checkpoints: Mapping[str, object], samples: Sequence[dict],
                    heads: Sequence[Head] | None = None, hallucination_heads: Sequence[Head] = (),
                    config: DriftConfig = DriftConfig(), device: str = "cpu", dtype=None,
                    progress: bool = True, lowest_heads: Sequence[Head] = ()) -> list[dict]:
    """JS divergence of every head's attention rows between each checkpoint and the initial model.

    Parameters
    ----------
    initial : :class:`~lens_halluc.models.loading.LoadedVLM` of the initial model (or its path).
    checkpoints : ``{name: LoadedVLM or path}`` in training order; paths are loaded one at a time
        (``device``, ``dtype``) and released, so 7B checkpoints need not all fit in memory.
    samples : samples.jsonl rows (the same teacher-forced ids go through every model).
    heads : ``(layer, head)`` pairs (None = all); ``hallucination_heads`` (then ``lowest_heads``)
        label the ``group`` column ``hallucination`` (``lowest``); the rest ``other``.
    progress : a tqdm bar over checkpoints × samples (``False`` for none).

    Returns
    -------
    Rows ``{checkpoint, step, layer, head, js, group}``: ``js`` averaged over query rows, then
    over samples; ``step`` = the checkpoint's index in ``checkpoints`` (1-based).

    Example
    -------
    >>> rows = attention_drift(initial, {"checkpoint-1": path1}, run.samples[:5])    # doctest: +SKIP
    """
    if config.rows not in ("all", "text"):
        raise ValueError(f"rows must be 'all' or 'text', not {config.rows!r}.")
    initial = _load(initial, device, dtype)
    spec = initial.spec
    heads = spec.check_heads(heads) if heads is not None else [(l, h) for l in range(spec.n_layers) for h in range(spec.n_heads)]
    li = torch.tensor([l for l, _ in heads])
    hi = torch.tensor([h for _, h in heads])
    chosen = select_samples(samples, config.n_samples)
    if not chosen:
        raise ValueError("no samples to analyse.")
    from tqdm.auto import tqdm

    out = []
    bar = tqdm(total=len(checkpoints) * len(chosen), desc="drift", unit="sample", disable=not progress)
    for step, (name, ckpt) in enumerate(checkpoints.items(), start=1):
        bar.set_postfix_str(str(name))
        model = _load(ckpt, device, dtype)
        if (model.spec.n_layers, model.spec.n_heads) != (spec.n_layers, spec.n_heads):
            raise ValueError(f"checkpoint {name} has {model.spec.n_layers}×{model.spec.n_heads} heads, the initial "
                             f"model {spec.n_layers}×{spec.n_heads}.")
        per_sample = []
        for s in chosen:
            ids = s["input_ids"]
            # initial attention is recomputed per checkpoint: caching [L,H,T,T] per sample is too big for 7B
            a0 = attention_maps(initial.model, ids, **sample_inputs(initial, s))[li, hi]  # [K, T, T]
            a1 = attention_maps(model.model, ids, **sample_inputs(model, s))[li, hi]
            js = row_js(a1, a0, eps=config.eps)  # [K, T]
            if config.rows == "text":
                roles = spec.token_roles(torch.tensor(ids))[0]
                js = js[:, roles == int(TokenRole.TEXT)]
            per_sample.append(js.mean(-1))  # average over rows first
            bar.update()
        js_heads = torch.stack(per_sample).mean(0)  # then over samples: [K]
        for j, (layer, head) in enumerate(heads):
            out.append({"checkpoint": str(name), "step": step, "layer": layer, "head": head,
                        "js": float(js_heads[j]), "group": group_of((layer, head), hallucination_heads, lowest_heads)})
        if model is not ckpt:  # we loaded it: free it before the next checkpoint
            del model
            gc.collect()
    bar.close()
    return out


def drift_curve(table: Sequence[dict], groups: dict[str, Sequence[Head]] | None = None) -> list[dict]:
    """Mean JS over the heads of each group, per checkpoint: rows ``{checkpoint, step, group, n_heads, js}``.

    ``groups``: ``{name: heads}`` (e.g. :func:`~lens_halluc.analysis.comparison_groups`; a head may
    be in two); None: the table's ``group`` column, ``hallucination`` and ``other``.

    Example
    -------
    >>> drift_curve(table)[0]                                           # doctest: +SKIP
    {'checkpoint': 'checkpoint-1', 'step': 1, 'group': 'hallucination', 'n_heads': 5, 'js': 0.01}
    """
    acc = defaultdict(list)
    names = {}
    if groups is None:
        order = (HALLUCINATION, OTHER)
        member = lambda r: [r["group"]]  # noqa: E731
    else:
        order = tuple(groups)
        sets = {g: {tuple(h) for h in hs} for g, hs in groups.items()}
        member = lambda r: [g for g in order if (r["layer"], r["head"]) in sets[g]]  # noqa: E731
    for r in table:
        for g in member(r):
            acc[(r["step"], g)].append(r["js"])
        names[r["step"]] = r["checkpoint"]
    return [{"checkpoint": names[step], "step": step, "group": g, "n_heads": len(acc[(step, g)]), "js": mean(acc[(step, g)])}
            for step in sorted(names) for g in order if (step, g) in acc]


def last_checkpoint_heads(table: Sequence[dict]) -> list[dict]:
    """Per-head JS at the last checkpoint (for a layers × heads heatmap): rows ``{layer, head, js, group}``."""
    if not table:
        return []
    last = max(r["step"] for r in table)
    return [{"layer": r["layer"], "head": r["head"], "js": r["js"], "group": r["group"]} for r in table if r["step"] == last]


LAST_COLUMNS = ("layer", "head", "js", "group")


# ---------------------------------------------------------------------------- API
class DriftResult(AnalysisResult):
    """:func:`drift` result: ``table`` (:data:`COLUMNS`, checkpoint × head), ``summary`` (the curve,
    :data:`CURVE_COLUMNS`: mean JS per checkpoint and head group), ``last`` (:data:`LAST_COLUMNS`,
    per head at the last checkpoint); files ``drift.csv``, ``drift_curve.csv``, ``drift_last.csv``,
    ``drift.html/.png``.

    Example
    -------
    >>> res.summary.pivot(index="step", columns="group", values="js")     # doctest: +SKIP
    """

    name = "drift"
    figure_size = (1200, 500)

    def __init__(self, table, summary, last, params=None):
        super().__init__(table, summary, params or {})
        self.last = last

    def tables(self):
        return {"drift": self.table, "drift_curve": self.summary, "drift_last": self.last}

    def figure(self, title: str | None = None):
        """JS curve per group + last-checkpoint heatmap (:func:`lens_halluc.figures.drift.drift_figure`)."""
        from ..figures.drift import drift_figure

        return drift_figure(self.summary, self.last, n_layers=self.params["n_layers"], n_heads=self.params["n_heads"],
                            title=title)


def drift(initial, checkpoints, attribution, k: int | None = None, n_samples: int | None = None,
          rows: str = "all", heads: Sequence[Head] | None = None, eps: float = 1e-8, device: str = "cpu",
          dtype=None, progress: bool = True, against: str | None = None, flavour: str = "reference") -> DriftResult:
    """JS divergence of every head's attention between each instruction-tuning checkpoint and the initial model.

    Parameters
    ----------
    initial : the initial model (base LM + stage-1 projector) as a LoadedVLM or a path; the organism's
        is ``lens_halluc.models.default.organism_path("projector")``.
    checkpoints : ``{name: LoadedVLM or path}`` in training order, or a sequence of paths (named by
        their folder); paths are loaded one at a time (``device``, ``dtype``). The organism's:
        ``lens_halluc.models.default.list_checkpoints()``.
    attribution : a fitted :class:`lens_halluc.attribution.Attribution` or its run directory (the
        captions and the hallucination heads).
    k : hallucination heads, and lowest-scoring heads they are compared with (default 3, the
        reference's: ``HA_K["drift"]``, ``analyze_js_div_in_training.py --top_k``). n_samples : first N captions.
    rows : query rows averaged, ``"all"`` or ``"text"``. heads : heads in the table (None = all).
    progress : a tqdm bar over checkpoints × samples (``False`` for none).
    against : ``"lowest"`` (the k lowest-scoring heads; ``reference`` flavour) or ``"others"``
        (every other head; ``corrected``). Default: the flavour's (:data:`FLAVOURS_DRIFT`).
    flavour : ``"reference"`` (default) or ``"corrected"``.

    Returns
    -------
    :class:`DriftResult`.

    Example
    -------
    >>> res = drift(organism_path("projector"), list_checkpoints(), attr, n_samples=8)   # doctest: +SKIP
    >>> res.figure().show()                                                              # doctest: +SKIP
    """
    if not isinstance(checkpoints, Mapping):
        checkpoints = {Path(p).name if isinstance(p, (str, Path)) else f"checkpoint-{i}": p
                       for i, p in enumerate(checkpoints, start=1)}
    if not checkpoints:
        raise ValueError("no checkpoints to compare with the initial model.")
    flavour = check_flavour(flavour, "drift")
    against = resolve(FLAVOURS_DRIFT, flavour, "against", against)
    run = as_attribution(attribution)
    k = resolve_k(run, "drift", k)
    groups = comparison_groups(run.head_scores, k, against)
    hal = groups[HALLUCINATION]
    initial = _load(initial, device, dtype)
    table = attention_drift(initial, checkpoints, run.samples, heads=heads, hallucination_heads=hal,
                            config=DriftConfig(n_samples=n_samples, rows=rows, eps=eps), device=device, dtype=dtype,
                            progress=progress, lowest_heads=groups.get(LOWEST, ()))
    return DriftResult(frame(table, COLUMNS), frame(drift_curve(table, groups), CURVE_COLUMNS),
                       frame(last_checkpoint_heads(table), LAST_COLUMNS),
                       params={"k": k, "against": against, "flavour": flavour, "n_samples": n_samples, "rows": rows,
                               "hallucination_heads": hal, "comparison_heads": groups.get(LOWEST, groups.get(OTHER)),
                               "checkpoints": list(checkpoints), "n_layers": initial.spec.n_layers,
                               "n_heads": initial.spec.n_heads})
