"""Shared pieces of contrastive decoding: the adaptive plausibility cut-off and the logit contrast.

Every contrastive strategy (VCD, SEED's :class:`~lens_halluc.interventions.seed.SEEDContrast`,
CausalMM, DoLa) scores the next token with :func:`contrast` and then masks implausible tokens
with :func:`plausibility_mask` computed on the *unmodified* (clean / final-layer) branch.

* ``contrast(l, others, w) = (1 + w·n)·l − w·Σ_k others_k`` (n = number of contrast branches):
  VCD / SEED / single-counterfactual CausalMM use n = 1, ``(1+w)·l − w·l'``; CausalMM with both
  counterfactuals uses n = 2, ``(1+2γ)·l − γ·l_v − γ·l_l``. ``w = 0`` returns ``l`` exactly.
* ``plausibility_mask(l, β)`` is True where ``l < log β + max_y l`` on the scores it is given, exactly
  as VCD's ``vcd_sample.py`` ("version 2") and CausalMM's ``causalmm_sm.py`` compute it on the raw
  logits of the clean branch (``log β`` is ``torch.log(torch.tensor(β))``, float32). On raw logits or on
  log-probabilities this is ``p(y) < β · max_y p`` (the log-normaliser cancels); DoLa passes its
  final layer's log-probabilities, as DoLa's code does. Those tokens get −inf.

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

    Computed on ``logits`` as given (raw logits or log-probabilities: the same tokens up to rounding)
    as ``logits < log β + max logits``, the reference's formula. ``beta`` None or 0 masks nothing
    (``log 0 = −inf``); ``beta = 1`` keeps only the argmax (and its ties).
    """
    beta = check_cutoff(beta)
    if beta is None or beta == 0.0:
        return torch.zeros_like(logits, dtype=torch.bool)
    cutoff = torch.log(torch.tensor(beta)).to(logits.device) + logits.max(dim=-1, keepdim=True).values
    return logits < cutoff


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
    out = (1.0 + weight * len(others)) * logits  # (1+α)·l, or (1+2γ)·l for two counterfactuals
    for o in others:
        out = out - weight * o.to(logits.dtype)  # − α·l' (− γ·l_v − γ·l_l), term by term as the references
    return out
