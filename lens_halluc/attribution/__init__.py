"""Head attribution: how much each attention head raises the probability of a target token.

``I_{l,h}(t) = m(p(y_t | x)) - m(p_{-(l,h)}(y_t | x))`` (or ``|p − p_{-(l,h)}|``) for every head at
once (Yang et al., ICLR 2025), by three methods with one signature and one result type:

- ``"exact"`` (default, :mod:`.exact`): batched copies against a cached prefix (local scope) or a
  batched replay of the upper layers (global scope); equal to the naive loop within float error.
- ``"naive"`` (:mod:`.naive`): one plain forward per head; the reference.
- ``"atp"`` (:mod:`.atp`): attribution patching, a gradient estimate.

The job over many captions is :class:`Attribution` (:mod:`.result`): ``Attribution().fit(vlm,
captions, dataset)`` → ``scores_``, ``tokens_``, ``influence_``, ``top_heads(k)``, ``save(dir)``.

Example
-------
>>> from lens_halluc.attribution import influences, head_means                    # doctest: +SKIP
>>> enc = vlm.encode([image], ["Please describe this image in detail."])         # doctest: +SKIP
>>> ids = torch.cat([enc["input_ids"][0], caption_ids])  # prompt + teacher-forced caption  # doctest: +SKIP
>>> res = influences(vlm, ids, enc["pixel_values"], targets=[120, 131])          # doctest: +SKIP
>>> res.influence.shape        # [n_targets, n_layers, n_heads]                  # doctest: +SKIP
torch.Size([2, 32, 32])
>>> res.influence[0].flatten().topk(5)                                           # doctest: +SKIP
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..models.adapt import as_loaded_vlm
from .atp import atp_influences
from .exact import MaskNotHonouredError, attention_mask_4d, copy_attention_mask, exact_influences, head_means
from .naive import ABLATIONS, METHODS, METRICS, SCOPES, InfluenceResult, metric_diff, naive_influences


def influences(
    vlm,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None,
    targets: Sequence[int] | torch.Tensor,
    scope: str = "local",
    ablation: str = "zero",
    metric: str = "prob_diff",
    means: torch.Tensor | None = None,
    chunk_size: int = 1024,
    method: str = "exact",
    processor=None,
    **kwargs,
) -> InfluenceResult:
    """Influence of every head on each target token of one teacher-forced sequence.

    Parameters
    ----------
    vlm : a :class:`lens_halluc.models.LoadedVLM` (text tower on ``eager`` or ``sdpa``), or a
        transformers model / an nnsight-wrapped model (``NNsight``, ``TransformersModel``) with ``processor``.
    input_ids : ``[T]`` or ``[1, T]``, one unpadded sequence: prompt with image + caption.
    pixel_values : the processor's ``pixel_values`` (``[1, 3, H, W]`` for LLaVA), or None when the family takes
        none or it travels in ``kwargs``.
    targets : positions ``t`` in the sequence (``1 <= t < T``); target token ``input_ids[t]``,
        predicted by position ``t - 1``.
    scope : ``"local"`` (ablate at ``t - 1`` only; the reference) or ``"global"`` (all positions).
    ablation : ``"zero"`` or ``"mean"`` (``means`` ``[n_layers, n_heads, head_dim]`` from :func:`head_means`).
    metric : ``"prob_diff"`` (the reference's default), ``"abs_prob_diff"`` (``|p - p_ablated|``) or
        ``"log_prob_diff"``: the reference's three ``influence_score`` choices.
    chunk_size : exact/local: most copy rows in one decoder-layer call (memory bound).
    method : ``"exact"``, ``"naive"`` or ``"atp"``.
    kwargs : method options (``row_chunk`` for exact, ``target_chunk``/``batched`` for AtP) and every other
        model input the processor returned (``image_sizes``, ``image_grid_thw``, ``mm_token_type_ids``,
        ``token_type_ids``, ``aspect_ratio_ids``, ``aspect_ratio_mask``, ``cross_attention_mask`` ...;
        per-token ones extended to the length ``T`` of ``input_ids`` with ``Adapter.extend_inputs``).

    Returns :class:`InfluenceResult`: ``.influence`` float32 ``[n_targets, n_layers, n_heads]``,
    ``.clean`` ``[n_targets]`` = ``p(y_t | x)``.
    """
    vlm = as_loaded_vlm(vlm, processor)
    common = dict(scope=scope, ablation=ablation, metric=metric, means=means)
    if method == "exact":
        return exact_influences(vlm, input_ids, pixel_values, targets, chunk_size=chunk_size, **common, **kwargs)
    if method == "naive":
        return naive_influences(vlm, input_ids, pixel_values, targets, **common, **kwargs)
    if method == "atp":
        return atp_influences(vlm, input_ids, pixel_values, targets, **common, **kwargs)
    raise ValueError(f"unknown method {method!r}; choose one of {METHODS}.")


from .result import Attribution  # noqa: E402  (after influences: the job calls it)

__all__ = [
    "ABLATIONS", "Attribution", "METHODS", "METRICS", "SCOPES", "InfluenceResult", "MaskNotHonouredError", "atp_influences",
    "attention_mask_4d", "copy_attention_mask", "exact_influences", "head_means", "influences", "metric_diff",
    "naive_influences",
]
