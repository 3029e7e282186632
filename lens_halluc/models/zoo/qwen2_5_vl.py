"""Tiny random Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``, ``model_type`` ``qwen2_5_vl``) and its processor.

As :mod:`lens_halluc.models.zoo.qwen2_vl` (same processor layout, chat template, M-RoPE text decoder of
3 layers), with Qwen2.5-VL's ViT: RMSNorm + SwiGLU blocks, **window attention** in block 0 (``window_size``
28 px = one merged cell per window) and full attention in block 1 (``fullatt_block_indexes = [1]``); the
merged features are reordered into windows and back, so image token order is still row-major.

Example
-------
>>> model, processor = make(seed=0)                                        # doctest: +SKIP
"""
from __future__ import annotations

from .qwen2_vl import build

__all__ = ["make"]


def make(seed: int = 0):
    """Tiny Qwen2.5-VL and its processor: ``(model, processor)``."""
    return build("qwen2_5_vl", seed)
