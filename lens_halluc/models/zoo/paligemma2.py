"""Tiny random PaliGemma 2 (``PaliGemmaForConditionalGeneration`` with a Gemma 2 text decoder).

Same ``model_type`` (``paligemma``), processor and prompt format as PaliGemma 1 (:mod:`.paligemma`);
the text tower is Gemma 2: attention logits soft-capped (``tanh(s / c) * c`` before the mask, in every
layer), final logits soft-capped (``config.text_config.final_logit_softcapping``), alternating
``sliding_attention`` / ``full_attention`` layers (3 layers, window 6 < prompt length ~20), scaling
``query_pre_attn_scalar ** -0.5`` (24, not head_dim 16), and post-attention / post-feed-forward norms.
Gemma 2 does not support SDPA, so the text tower runs eager attention.

Example
-------
>>> model, processor = make(seed=0)                                      # doctest: +SKIP
>>> model.config.text_config.model_type, model.config.text_config.final_logit_softcapping   # doctest: +SKIP
('gemma2', 30.0)
"""
from __future__ import annotations

from .paligemma import build

__all__ = ["make"]


def make(seed: int = 0, **kwargs):
    """A randomly initialised tiny PaliGemma 2 and its processor (deterministic given ``seed``);
    ``kwargs`` go to :func:`lens_halluc.models.zoo.paligemma.build` (``sliding_window``, soft-caps...)."""
    return build(seed=seed, text="gemma2", **kwargs)
