"""Shared pieces of contrastive decoding: the adaptive plausibility cut-off and the logit contrast.

Every contrastive strategy (VCD, SEED's :class:`~lens_halluc.interventions.seed.SEEDContrast`,
CausalMM, DoLa) scores the next token with :func:`contrast` and then masks implausible tokens
with :func:`plausibility_mask` computed on the *unmodified* (clean / final-layer) branch.

* ``contrast(l, others, w) = (1 + w·n)·l − w·Σ_k others_k`` (n = number of contrast branches):
  VCD / SEED / single-counterfactual CausalMM use n = 1, ``(1+w)·l − w·l'``; CausalMM with both
  counterfactuals uses n = 2, ``(1+2γ)·l − γ·l_v − γ·l_l``. ``w = 0`` returns ``l`` exactly.
* ``plausibility_mask(l, β)`` is True where ``p(y) < β · max_y p`` — equivalently
  ``log_softmax(l) < max log_softmax(l) + log β`` or, since the log-normaliser cancels,
  ``l < max l + log β`` on raw logits. Those tokens get −inf.

Example
-------
>>> import torch
>>> l = torch.log(torch.tensor([[0.5, 0.3, 0.04, 0.16]]))
>>> plausibility_mask(l, 0.1).tolist()         # 0.04 < 0.1 · 0.5
[[False, False, True, False]]
>>> contrast(torch.tensor([[2.0, 1.0]]), torch.tensor([[1.0, 1.0]]), 1.0).tolist()
[[3.0, 1.0]]
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["apply_plausibility", "check_cutoff", "contrast", "plausibility_mask"]


def check_cutoff(beta: float | None, name: str = "beta") -> float | None:
    """Validate a plausibility cut-off: None (disabled) or a number in [0, 1]."""
    if beta is None:
        return None
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"the plausibility cut-off {name} must be in [0, 1] (or None to disable), got {beta}.")
    return beta


def plausibility_mask(logits: torch.Tensor, beta: float | None) -> torch.Tensor:
    """BoolTensor like ``logits`` (``[..., V]``): True where ``p < β · max p`` (token is implausible).

    ``logits`` may be raw logits or log-probabilities (same result). ``beta`` None or 0 masks nothing;
    ``beta = 1`` keeps only the argmax (and its ties).
    """
    beta = check_cutoff(beta)
    if beta is None or beta == 0.0:
        return torch.zeros_like(logits, dtype=torch.bool)
    logp = torch.log_softmax(logits.float(), dim=-1)
    cutoff = logp.max(dim=-1, keepdim=True).values + math.log(beta)
    return logp < cutoff


def apply_plausibility(scores: torch.Tensor, reference: torch.Tensor, beta: float | None) -> torch.Tensor:
    """``scores`` with −inf where ``reference`` (the clean branch) is implausible (:func:`plausibility_mask`)."""
    return scores.masked_fill(plausibility_mask(reference, beta), float("-inf"))


def contrast(logits: torch.Tensor, other: torch.Tensor | Sequence[torch.Tensor], weight: float) -> torch.Tensor:
    """``(1 + weight·n)·logits − weight·Σ other_k`` for ``n`` contrast tensors (one tensor: n = 1).

    ``weight = 0`` returns ``logits`` unchanged (bit-identical), whatever ``other`` holds.
    """
    others = [other] if isinstance(other, torch.Tensor) else list(other)
    if not others:
        raise ValueError("contrast needs at least one tensor to contrast against.")
    weight = float(weight)
    if weight == 0.0:
        return logits
    for o in others:
        if o.shape != logits.shape:
            raise ValueError(f"contrast: shapes differ, {tuple(logits.shape)} vs {tuple(o.shape)}.")
    total = others[0]
    for o in others[1:]:
        total = total + o
    return (1.0 + weight * len(others)) * logits - weight * total.to(logits.dtype)
