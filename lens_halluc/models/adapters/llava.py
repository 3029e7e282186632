"""LLaVA-1.5 (``LlavaForConditionalGeneration``, ``model_type`` ``llava``): the reference architecture.

CLIP vision tower, a projector, and a Llama/Vicuna decoder at ``model.model.language_model``; one
``<image>`` token per patch feature (576 for 336 px / 14 px patches, CLS dropped), in row-major
patch order; ``pixel_values`` is the only image input. The default prompt is HA's (``vicuna-v1``,
:mod:`lens_halluc.models.prompts`), not the processor's chat template.

Example
-------
>>> from lens_halluc.models.adapters import ADAPTERS
>>> ADAPTERS["llava"].name
'llava'
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from . import register_adapter
from .base import Adapter, AdapterError
from .common import vision_encoder_attention


class LlavaAdapter(Adapter):
    name = "llava"
    model_types = ("llava",)

    def vision_attention(self, model: nn.Module) -> list[nn.Module]:
        """The ``self_attn`` of each CLIP (or SigLIP) vision encoder layer."""
        return vision_encoder_attention(model)

    def patch_grid(self, model: nn.Module, encoding: Mapping[str, Any], row: int = 0) -> tuple[int, int]:
        """``(side, side)`` with ``side = image_size // patch_size`` of the vision tower; checks that row ``row``
        has exactly ``side**2`` image tokens (one image, CLS dropped: ``vision_feature_select_strategy="default"``)."""
        ids = encoding["input_ids"][row]
        n = int(sum(int((ids == i).sum()) for i in self.image_token_ids(model)))
        vcfg = model.config.vision_config
        side = int(vcfg.image_size) // int(vcfg.patch_size)
        if n != side * side:
            raise AdapterError(f"llava row {row}: {n} image tokens, not one {side}x{side} patch grid (one image per "
                               "sample with the CLS feature dropped is supported).")
        return side, side


register_adapter(LlavaAdapter)
