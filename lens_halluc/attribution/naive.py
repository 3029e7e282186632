"""The quantity and its obviously-correct reference: one plain forward per ablated head.

Influence of head ``(l, h)`` on the target token ``y_t = input_ids[t]`` of a teacher-forced
sequence (Yang et al., ICLR 2025)::

    I_{l,h}(t) = m(p(y_t | x)) - m(p_{-(l,h)}(y_t | x))

``m`` is the identity (``metric="prob_diff"``, the reference's default) or ``log``
(``"log_prob_diff"``); ``"abs_prob_diff"`` is ``|p(y_t | x) - p_{-(l,h)}(y_t | x)|``. These are
the three ``influence_score`` choices of the reference (TianyunYoung/Hallucination-Attribution,
``LLaVA/eval_scripts/eval_utils/head_attribution.py``; ``identify_attention_head.py`` defaults to
``prob_diff``). ``-(l,h)``
replaces the head's output (its slice of the ``o_proj`` input) by zero (``ablation="zero"``) or by
a mean vector (``"mean"``), either at the predicting position ``q = t - 1`` only (``scope="local"``:
keys/values of earlier positions stay clean) or at every position (``scope="global"``).

This module also holds what every method shares (the result type, the metric, input checks), so
the fast methods in :mod:`.exact` and :mod:`.atp` are defined against the same code.

Inputs are a **single unpadded sequence** (batch 1): ``input_ids`` ``[T]`` or ``[1, T]``, the
processor's ``pixel_values`` and every other model input the processor returned (``**model_kwargs``:
``image_sizes``, ``image_grid_thw``, ``token_type_ids`` ..., per-token ones of length ``T``). Batch several captions by calling once per caption
(the prefix of each is cached separately anyway).

Example
-------
>>> res = naive_influences(vlm, enc["input_ids"], enc["pixel_values"], targets=[40, 45])  # doctest: +SKIP
>>> res.influence.shape                   # [n_targets, n_layers, n_heads]           # doctest: +SKIP
torch.Size([2, 32, 32])
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..hooks.ablation import ablate_heads

SCOPES = ("local", "global")
ABLATIONS = ("zero", "mean")
#: the reference's ``influence_score`` choices (its default: ``prob_diff``), in its order
METRICS = ("prob_diff", "abs_prob_diff", "log_prob_diff")
METHODS = ("exact", "naive", "atp")  # dispatched by lens_halluc.attribution.influences


@dataclass
class InfluenceResult:
    """Per-target, per-head influences of one sequence.

    Attributes
    ----------
    influence : float32 ``[n_targets, n_layers, n_heads]``, ``m(clean) - m(ablated)`` (its absolute
        value of the probability difference for ``abs_prob_diff``).
    clean : float32 ``[n_targets]``, ``p(y_t | x)`` from the plain forward of the sequence.
    ablated : float32 ``[n_targets, n_layers, n_heads]``, ``p_{-(l,h)}(y_t | x)`` (None for AtP,
        which estimates only the difference).
    targets, target_ids : LongTensor ``[n_targets]``: positions ``t`` and tokens ``y_t``.
    baseline : float32 ``[n_targets]``, the un-ablated probability the influence was taken against.
        Equal to ``clean`` for the naive method; for the exact method it comes from an un-ablated
        control copy computed in the same forward as the ablated copies (same kernels, same
        shapes), so numerical noise of the batched path cancels in the difference.
    control_gap : max |log p| difference over the vocabulary between the control copies and the
        plain forward (0.0 for naive): the self-check that the 4-D mask was honoured.
    """

    influence: torch.Tensor
    clean: torch.Tensor
    ablated: torch.Tensor | None
    targets: torch.Tensor
    target_ids: torch.Tensor
    scope: str
    ablation: str
    metric: str
    method: str
    baseline: torch.Tensor | None = None
    control_gap: float = 0.0
    extra: dict = field(default_factory=dict)


def metric_fn(metric: str):
    """``m`` applied to log-probabilities: ``exp`` for prob_diff and abs_prob_diff, identity for log_prob_diff."""
    if metric in ("prob_diff", "abs_prob_diff"):
        return torch.exp
    if metric == "log_prob_diff":
        return lambda logp: logp
    raise ValueError(f"unknown metric {metric!r}; choose one of {METRICS}.")


def metric_diff(metric: str, base_lp: torch.Tensor, abl_lp: torch.Tensor) -> torch.Tensor:
    """The influence from log-probabilities: ``m(base) - m(ablated)``, or ``|p - p_ablated|`` for abs_prob_diff.

    ``base_lp``, ``abl_lp``: ``log p(y_t)`` un-ablated and ablated (broadcastable). As the reference
    computes it: ``prob_diff`` = ``p - p'``, ``abs_prob_diff`` = ``(p - p').abs()``, ``log_prob_diff``
    = ``log p - log p'``.

    Example
    -------
    >>> lp = torch.log(torch.tensor([0.5])); ablp = torch.log(torch.tensor([0.75]))
    >>> [round(float(metric_diff(m, lp, ablp)[0]), 4) for m in METRICS]
    [-0.25, 0.25, -0.4055]
    """
    m = metric_fn(metric)
    diff = m(base_lp) - m(abl_lp)
    return diff.abs() if metric == "abs_prob_diff" else diff


def check_options(scope: str, ablation: str, metric: str, means: torch.Tensor | None, spec) -> torch.Tensor | None:
    """Validate the options; returns ``means`` as float ``[n_layers, n_heads, head_dim]`` (or None)."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; choose one of {SCOPES}.")
    if ablation not in ABLATIONS:
        raise ValueError(f"unknown ablation {ablation!r}; choose one of {ABLATIONS}.")
    metric_fn(metric)
    if ablation == "mean":
        if means is None:
            raise ValueError("ablation='mean' needs means=[n_layers, n_heads, head_dim]; "
                             "compute them with head_means().")
        want = (spec.n_layers, spec.n_heads, spec.head_dim)
        if tuple(means.shape) != want:
            raise ValueError(f"means has shape {tuple(means.shape)}, expected {want} (n_layers, n_heads, head_dim).")
        return means
    return None


def prepare_inputs(input_ids: torch.Tensor, targets: Sequence[int] | torch.Tensor, attention_mask=None):
    """``input_ids`` as ``[1, T]`` and targets as a LongTensor of positions with ``1 <= t < T``."""
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 2:
        if ids.shape[0] != 1:
            raise ValueError(f"one sequence at a time: input_ids has batch {ids.shape[0]}; call once per caption.")
    elif ids.dim() == 1:
        ids = ids[None]
    else:
        raise ValueError(f"input_ids must be [T] or [1, T], got shape {tuple(ids.shape)}.")
    if attention_mask is not None and not bool(torch.as_tensor(attention_mask).bool().all()):
        raise ValueError("the sequence is padded (attention_mask has zeros); pass the unpadded sequence "
                         "(enc['input_ids'][:, mask.bool()[0]]) and target positions in it.")
    T = ids.shape[1]
    t = targets if isinstance(targets, torch.Tensor) else torch.as_tensor(list(targets))
    t = t.long().flatten()
    if t.numel() == 0:
        raise ValueError("no targets given.")
    if bool((t < 1).any()) or bool((t >= T).any()):
        raise ValueError(f"target positions must lie in 1..{T - 1} (position 0 has no predicting position); "
                         f"got {t.tolist()}.")
    return ids, t


def forward_inputs(input_ids: torch.Tensor, pixel_values, model_kwargs) -> dict:
    """The keyword arguments of one plain forward: ``input_ids``, ``pixel_values`` when given, and every other
    model input (``image_sizes``, ``image_grid_thw``, ``token_type_ids`` ...: per-token ones already of length
    ``T``). ``pixel_values`` may be None (a family that takes none, or one passing it in ``model_kwargs``).

    Example
    -------
    >>> sorted(forward_inputs(torch.ones(1, 3, dtype=torch.long), None, {"image_sizes": torch.tensor([[32, 32]])}))
    ['image_sizes', 'input_ids']
    """
    out = {"input_ids": input_ids}
    if pixel_values is not None:
        if model_kwargs.get("pixel_values") is not None:
            raise ValueError("pixel_values given twice (as an argument and in the model inputs); pass it once.")
        out["pixel_values"] = pixel_values
    out.update({k: v for k, v in model_kwargs.items() if k not in out and v is not None})
    return out


def target_logprobs(logits: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """``log p(y)`` in float32 for logits ``[..., V]`` and ids broadcastable to ``logits[..., 0]``."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, target_ids.expand(logp.shape[:-1]).unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def naive_influences(
    vlm,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None,
    targets: Sequence[int] | torch.Tensor,
    scope: str = "local",
    ablation: str = "zero",
    metric: str = "prob_diff",
    means: torch.Tensor | None = None,
    **model_kwargs,
) -> InfluenceResult:
    """Influences by brute force: one forward per head (local: per target and head).

    Uses :func:`lens_halluc.hooks.ablate_heads` with a position mask (local: only ``q = t - 1``;
    global: every position). Cost: ``1 + n_targets * n_layers * n_heads`` forwards (local) or
    ``1 + n_layers * n_heads`` (global). ``model_kwargs`` go to every forward: every model input besides
    ``input_ids``/``pixel_values`` (``image_sizes``, ``image_grid_thw``, ``token_type_ids`` ...; per-token ones of
    length ``T``); ``pixel_values`` may be None when the family takes none or it is in ``model_kwargs``.
    """
    model, spec = vlm.model, vlm.spec
    means = check_options(scope, ablation, metric, means, spec)
    ids, t = prepare_inputs(input_ids, targets, model_kwargs.pop("attention_mask", None))
    dev = vlm.device
    ids, t = ids.to(dev), t.to(dev)
    q = t - 1
    y = ids[0, t]
    T = ids.shape[1]
    metric_fn(metric)
    inputs = forward_inputs(ids, pixel_values, model_kwargs)

    def forward():
        return model(**inputs, use_cache=False).logits[0]

    clean_lp = target_logprobs(forward()[q], y)  # [n_targets]
    n, L, H = len(t), spec.n_layers, spec.n_heads
    abl_lp = torch.empty(n, L, H, device=dev)
    for layer in range(L):
        for head in range(H):
            values = {(layer, head): means[layer, head]} if means is not None else None
            if scope == "global":
                with ablate_heads(model, spec, [(layer, head)], values=values):
                    abl_lp[:, layer, head] = target_logprobs(forward()[q], y)
                continue
            for i in range(n):
                mask = torch.zeros(T, dtype=torch.bool, device=dev)
                mask[q[i]] = True
                with ablate_heads(model, spec, [(layer, head)], values=values, positions=mask):
                    abl_lp[i, layer, head] = target_logprobs(forward()[q[i]], y[i])
    influence = metric_diff(metric, clean_lp[:, None, None], abl_lp)
    return InfluenceResult(
        influence=influence.cpu(), clean=clean_lp.exp().cpu(), ablated=abl_lp.exp().cpu(), targets=t.cpu(),
        target_ids=y.cpu(), scope=scope, ablation=ablation, metric=metric, method="naive",
        baseline=clean_lp.exp().cpu(),
    )
