"""Tiny random Qwen3-VL (``Qwen3VLForConditionalGeneration``, ``model_type`` ``qwen3_vl``) and its processor.

As :mod:`lens_halluc.models.zoo.qwen2_vl` (Qwen's chat template, image-only processor), with Qwen3-VL's
pieces: 16 px patches (a 64 x 64 image is a ``[1, 4, 4]`` grid, 4 image tokens), learned vision position
embeddings (``num_position_embeddings = 16``, interpolated), a Qwen3 text decoder (QK-norm, head_dim 16) with
*interleaved* M-RoPE (``mrope_section = [2, 3, 3]``, ``mrope_interleaved``), and **deepstack** active:
``deepstack_visual_indexes = [0, 1]`` -- the merged features of vision blocks 0 and 1 are *added* to the
hidden states at the image-token positions after decoder layers 0 and 1 (of 3).

Example
-------
>>> model, processor = make(seed=0)                                        # doctest: +SKIP
>>> model.config.vision_config.deepstack_visual_indexes                   # doctest: +SKIP
[0, 1]
"""
from __future__ import annotations

from .qwen2_vl import build

__all__ = ["make"]


def make(seed: int = 0):
    """Tiny Qwen3-VL and its processor: ``(model, processor)``."""
    return build("qwen3_vl", seed)
