"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``, ``model_type`` ``llava_onevision``).

SigLIP vision tower (no CLS), a projector and a Qwen2 decoder at ``model.model.language_model``.
Images are *anyres*: the base crop's features, then the high-resolution crops of the best grid
pinpoint, unpadded, with one ``image_newline`` feature per grid row (bilinearly downsampled when
the grid exceeds ``anyres_max_9``). Every one of these positions, newlines included, is an
``<image>`` token. Inputs that go with the image: ``pixel_values`` ``[B, n_crops, 3, H, W]`` and
``image_sizes`` ``[B, 2]`` (the original sizes the unpadding depends on) and ``batch_num_images``
``[B]`` (images per sample: with more than one, each image is its base crop only).

This module also holds :class:`LlavaOnevisionImageOnlyProcessor`: ``LlavaOnevisionProcessor`` lists a
video processor, and without torchvision the video processor (and with it the processor) cannot
be constructed. :class:`LlavaOnevisionImageOnlyProcessor` is the same processor without the video
processor; it saves as ``"processor_class": "LlavaOnevisionImageOnlyProcessor"`` and is
registered with ``AutoProcessor``, so ``AutoProcessor.from_pretrained(dir)`` loads such a
directory once ``lens_halluc.models.adapters`` is imported (videos are then unsupported; a user
with torchvision can load the stock ``LlavaOnevisionProcessor`` as usual).

Example
-------
>>> from lens_halluc.models.adapters import ADAPTERS
>>> ADAPTERS["llava_onevision"].image_input_keys
('pixel_values', 'image_sizes', 'batch_num_images')
>>> proc = LlavaOnevisionImageOnlyProcessor.from_pretrained(path)          # doctest: +SKIP
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from . import register_adapter
from .base import Adapter
from .common import anyres_not_a_grid, register_image_only, vision_encoder_attention

__all__ = ["LlavaOnevisionAdapter", "LlavaOnevisionImageOnlyProcessor"]


def _onevision_image_only():
    from transformers import LlavaOnevisionProcessor

    class LlavaOnevisionImageOnlyProcessor(LlavaOnevisionProcessor):
        """``LlavaOnevisionProcessor`` for images only: constructible without torchvision.

        ``ProcessorMixin`` reads the sub-processors off the ``__init__`` signature (construction,
        saving, ``from_pretrained``), so this signature omits ``video_processor`` and passes ``None``
        on. The other arguments are saved and reloaded as the stock processor's are.
        """

        def __init__(self, image_processor=None, tokenizer=None, num_image_tokens=None,
                     vision_feature_select_strategy=None, chat_template=None, image_token="<image>",
                     video_token="<video>", vision_aspect_ratio="anyres_max_9", **kwargs):
            super().__init__(image_processor, tokenizer, None, num_image_tokens=num_image_tokens,
                             vision_feature_select_strategy=vision_feature_select_strategy,
                             chat_template=chat_template, image_token=image_token, video_token=video_token,
                             vision_aspect_ratio=vision_aspect_ratio, **kwargs)

    LlavaOnevisionImageOnlyProcessor.__module__ = __name__
    return register_image_only(LlavaOnevisionImageOnlyProcessor)


LlavaOnevisionImageOnlyProcessor = _onevision_image_only()


class LlavaOnevisionAdapter(Adapter):
    name = "llava_onevision"
    model_types = ("llava_onevision",)
    #: ``batch_num_images`` ``[B]`` (images per sample) decides whether each image is unpadded anyres (one image
    #: per sample) or a plain base crop (several): a forward input, batch-shaped.
    image_input_keys = ("pixel_values", "image_sizes", "batch_num_images")
    #: The processor class that loads this family without torchvision (a loader's fallback when the stock one
    #: cannot be constructed: ``LlavaOnevisionImageOnlyProcessor.from_pretrained(path)``).
    image_only_processor_class = LlavaOnevisionImageOnlyProcessor

    def vision_attention(self, model: nn.Module) -> list[nn.Module]:
        return vision_encoder_attention(model)

    def patch_grid(self, model: nn.Module, encoding: Mapping[str, Any], row: int = 0) -> tuple[int, int]:
        raise anyres_not_a_grid(self.name)


register_adapter(LlavaOnevisionAdapter)
