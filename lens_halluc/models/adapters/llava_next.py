"""LLaVA-NeXT / LLaVA-1.6 (``LlavaNextForConditionalGeneration``, ``model_type`` ``llava_next``).

CLIP vision tower, a projector and a Llama/Vicuna/Mistral decoder at ``model.model.language_model``.
Images are *anyres*: the base crop's features (CLS dropped), then the high-resolution crops of the
best grid pinpoint, unpadded to the image's aspect ratio, with one learned ``image_newline`` feature
at the end of each grid row. All of these positions, newlines included, are ``<image>`` tokens
(the newline features are inserted by the model in place of ``<image>`` tokens: image tokens, not
structure). Inputs that go with the image: ``pixel_values`` ``[B, n_crops, 3, H, W]`` and
``image_sizes`` ``[B, 2]`` (original sizes: the unpadding and the crop count depend on them).

Example
-------
>>> from lens_halluc.models.adapters import ADAPTERS
>>> ADAPTERS["llava_next"].image_input_keys
('pixel_values', 'image_sizes')
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from . import register_adapter
from .base import Adapter
from .common import anyres_not_a_grid, vision_encoder_attention

__all__ = ["LlavaNextAdapter"]


class LlavaNextAdapter(Adapter):
    name = "llava_next"
    model_types = ("llava_next",)
    image_input_keys = ("pixel_values", "image_sizes")

    def vision_attention(self, model: nn.Module) -> list[nn.Module]:
        return vision_encoder_attention(model)

    def patch_grid(self, model: nn.Module, encoding: Mapping[str, Any], row: int = 0) -> tuple[int, int]:
        raise anyres_not_a_grid(self.name)


register_adapter(LlavaNextAdapter)
