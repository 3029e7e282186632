"""InternVL (``InternVLForConditionalGeneration``, ``model_type`` ``internvl``; InternVL2.5/3 in transformers).

InternViT vision tower, pixel-shuffle projector and a Qwen2 (or Llama) decoder at
``model.model.language_model``. An image is cut into dynamic tiles (plus a thumbnail tile when
there is more than one); in the text it is ``<img>`` + ``image_seq_length`` ``<IMG_CONTEXT>`` per tile +
``</img>``. ``<IMG_CONTEXT>`` (``config.image_token_id``) holds the image features; ``<img>`` and
``</img>`` are image structure. ``pixel_values`` ``[n_tiles_total, 3, H, W]`` is the only image input
(the tiles of every image of the batch, concatenated in order).

The image placeholder the processor expands is ``<IMG_CONTEXT>`` (``processor.image_token``), not
``<image>``. :class:`InternVLImageOnlyProcessor` is ``InternVLProcessor`` without the video
processor (which needs torchvision), registered with ``AutoProcessor``.

Example
-------
>>> from lens_halluc.models.adapters import ADAPTERS
>>> ADAPTERS["internvl"].image_input_keys
('pixel_values',)
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from . import register_adapter
from .base import Adapter, AdapterError, NotDefinedForArchitecture
from .common import ids_from_config, register_image_only, tokens_to_ids

__all__ = ["InternVLAdapter", "InternVLImageOnlyProcessor"]


def _internvl_image_only():
    from transformers import InternVLProcessor

    class InternVLImageOnlyProcessor(InternVLProcessor):
        """``InternVLProcessor`` for images only: constructible without torchvision (``ProcessorMixin``
        reads the sub-processors off this signature, which omits ``video_processor``)."""

        def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256, chat_template=None,
                     **kwargs):
            super().__init__(image_processor, tokenizer, None, image_seq_length=image_seq_length,
                             chat_template=chat_template, **kwargs)

    InternVLImageOnlyProcessor.__module__ = __name__
    return register_image_only(InternVLImageOnlyProcessor)


InternVLImageOnlyProcessor = _internvl_image_only()


class InternVLAdapter(Adapter):
    name = "internvl"
    model_types = ("internvl",)
    #: The processor class that loads this family without torchvision (a loader's fallback when the stock one
    #: cannot be constructed: ``InternVLImageOnlyProcessor.from_pretrained(path)``).
    image_only_processor_class = InternVLImageOnlyProcessor

    #: Config attributes holding the structure ids when no processor is given (set by lens_halluc's zoo).
    structure_config_attrs = ("start_image_token_id", "end_image_token_id")

    def structure_token_ids(self, model: nn.Module, processor=None) -> tuple[int, ...]:
        """``<img>`` and ``</img>``: from the processor's tokenizer, else from the config attributes
        :attr:`structure_config_attrs`; raises :class:`AdapterError` when neither has them."""
        if processor is not None:
            tok = getattr(processor, "tokenizer", processor)
            names = tuple(getattr(processor, attr, None) or getattr(tok, attr, None) or default
                          for attr, default in (("start_image_token", "<img>"), ("end_image_token", "</img>")))
            return tokens_to_ids(self.name, processor, names)
        return ids_from_config(self.name, model, self.structure_config_attrs)

    def vision_attention(self, model: nn.Module) -> list[nn.Module]:
        tower = getattr(getattr(model, "model", model), "vision_tower", None)
        layers = getattr(getattr(tower, "encoder", None), "layer", None)
        if layers is None:
            raise AdapterError(f"{type(model).__name__}: no InternViT layers at model.vision_tower.encoder.layer.")
        return [layer.attention for layer in layers]

    def patch_grid(self, model: nn.Module, encoding: Mapping[str, Any], row: int = 0) -> tuple[int, int]:
        """The pixel-shuffled patch grid of a single-tile image (``<IMG_CONTEXT>`` tokens row-major).

        Raises :class:`NotDefinedForArchitecture` for a multi-tile image (tiles + thumbnail: several grids)."""
        cfg = model.config
        n = int((encoding["input_ids"][row] == self.image_token_ids(model)[0]).sum())
        per_tile = int(cfg.image_seq_length)
        if n != per_tile:
            raise NotDefinedForArchitecture(
                f"internvl row {row}: {n} image tokens = {n / per_tile:g} tiles of {per_tile}; a dynamically tiled "
                "image (tiles plus a thumbnail) is several patch grids, not one row-major grid. Use single-tile "
                "images (image processor crop_to_patches=False) for the confounder patch map.")
        size = cfg.vision_config.image_size
        patch = cfg.vision_config.patch_size
        size = size[0] if isinstance(size, (list, tuple)) else size
        patch = patch[0] if isinstance(patch, (list, tuple)) else patch
        side = int(size // patch * cfg.downsample_ratio)
        if side * side != n:
            raise AdapterError(f"internvl: {n} image tokens per tile, but the tile grid is {side}x{side}.")
        return side, side


register_adapter(InternVLAdapter)
