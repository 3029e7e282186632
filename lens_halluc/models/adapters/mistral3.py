"""Mistral3 / Pixtral (``Mistral3ForConditionalGeneration``, ``model_type`` ``mistral3``).

Pixtral vision tower (2D rotary over the patch grid, any aspect ratio), a patch merger
(``spatial_merge_size``) and a Mistral decoder at ``model.model.language_model``. An image of
``rows x cols`` merged patches becomes, row by row, ``cols`` ``[IMG]`` tokens followed by
``[IMG_BREAK]``, the last row ending in ``[IMG_END]`` instead. Only ``[IMG]`` positions hold image
features; ``[IMG_BREAK]``/``[IMG_END]`` are ordinary embedded tokens: image *structure*. Inputs that go
with the image: ``pixel_values`` ``[B, 3, H, W]`` (padded to the batch's largest image) and
``image_sizes`` ``[B, 2]`` (each image's own size: the tower crops the padding away with it).

:class:`Mistral3ImageOnlyProcessor`: ``transformers``' ``PixtralProcessor`` module imports a
torchvision image processor at import time, so without torchvision it cannot be imported at all.
This is the same processor (same arguments, same token layout) on the PIL image processor,
registered with ``AutoProcessor`` under its own name; tiny Mistral3 models are saved with it.

Example
-------
>>> from lens_halluc.models.adapters import ADAPTERS
>>> ADAPTERS["mistral3"].image_input_keys
('pixel_values', 'image_sizes')
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn
from transformers.processing_utils import ProcessorMixin

from . import register_adapter
from .base import Adapter, AdapterError
from .common import ids_from_config, register_image_only, tokens_to_ids

__all__ = ["Mistral3Adapter", "Mistral3ImageOnlyProcessor"]


class Mistral3ImageOnlyProcessor(ProcessorMixin):
    """``PixtralProcessor``'s behaviour without its torchvision import: each image placeholder ``[IMG]`` in
    the text becomes ``rows`` rows of ``cols`` ``[IMG]`` + ``[IMG_BREAK]``, the last token ``[IMG_END]``,
    where ``rows, cols`` = the processed image's size // (``patch_size * spatial_merge_size``).

    Example
    -------
    >>> proc = Mistral3ImageOnlyProcessor(image_processor=PixtralImageProcessorPil(), tokenizer=tok)  # doctest: +SKIP
    >>> enc = proc(images=[img], text=["[INST][IMG]describe this image .[/INST]"])                 # doctest: +SKIP
    """

    text_kwargs = {"return_tensors": "pt"}
    images_kwargs = {"return_tensors": "pt"}

    def __init__(self, image_processor=None, tokenizer=None, patch_size: int = 16, spatial_merge_size: int = 1,
                 chat_template=None, image_token="[IMG]", image_break_token="[IMG_BREAK]",
                 image_end_token="[IMG_END]", **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.patch_size = patch_size
        self.spatial_merge_size = spatial_merge_size
        self.image_token = image_token
        self.image_break_token = image_break_token
        self.image_end_token = image_end_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.image_break_token_id = tokenizer.convert_tokens_to_ids(image_break_token)
        self.image_end_token_id = tokenizer.convert_tokens_to_ids(image_end_token)

    @property
    def image_token_ids(self) -> list[int]:
        return [self.image_token_id, self.image_break_token_id, self.image_end_token_id]

    def _process_images(self, images, **images_kwargs):
        # The image processor pads/resizes to multiples of the merged patch (as PixtralProcessor asks it to).
        images_kwargs["patch_size"] = self.patch_size * self.spatial_merge_size
        return super()._process_images(images, **images_kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        patch = self.patch_size * self.spatial_merge_size
        height, width = (int(v) for v in image_inputs["image_sizes"][image_idx])
        rows, cols = height // patch, width // patch
        tokens = ([self.image_token] * cols + [self.image_break_token]) * rows
        tokens[-1] = self.image_end_token
        return "".join(tokens)

    @property
    def model_input_names(self):
        return self.tokenizer.model_input_names + self.image_processor.model_input_names + ["image_sizes"]


register_image_only(Mistral3ImageOnlyProcessor)


class Mistral3Adapter(Adapter):
    name = "mistral3"
    model_types = ("mistral3",)
    #: The processor class that loads this family without torchvision (a loader's fallback when the stock one
    #: cannot be constructed: ``Mistral3ImageOnlyProcessor.from_pretrained(path)``).
    image_only_processor_class = Mistral3ImageOnlyProcessor
    image_input_keys = ("pixel_values", "image_sizes")

    #: Config attributes holding the structure ids when no processor is given (lens_halluc's zoo sets them;
    #: real checkpoints do not store them, so pass the processor there).
    structure_config_attrs = ("image_break_token_id", "image_end_token_id")

    def structure_token_ids(self, model: nn.Module, processor=None) -> tuple[int, ...]:
        """``[IMG_BREAK]`` and ``[IMG_END]``: from the processor's tokenizer, else from the config attributes
        :attr:`structure_config_attrs`; raises :class:`AdapterError` when neither has them."""
        if processor is not None:
            names = (getattr(processor, "image_break_token", "[IMG_BREAK]"),
                     getattr(processor, "image_end_token", "[IMG_END]"))
            return tokens_to_ids(self.name, processor, names)
        return ids_from_config(self.name, model, self.structure_config_attrs)

    def vision_attention(self, model: nn.Module) -> list[nn.Module]:
        tower = getattr(getattr(model, "model", model), "vision_tower", None)
        layers = getattr(getattr(tower, "transformer", None), "layers", None)
        if layers is None:
            raise AdapterError(f"{type(model).__name__}: no Pixtral vision layers at model.vision_tower.transformer.layers.")
        return [layer.attention for layer in layers]

    def patch_grid(self, model: nn.Module, encoding: Mapping[str, Any], row: int = 0) -> tuple[int, int]:
        """``(rows, cols)`` of merged patches of sample ``row``'s image, from ``image_sizes``: its ``[IMG]``
        tokens are this grid in row-major order (the ``[IMG_BREAK]``/``[IMG_END]`` between rows are structure)."""
        sizes = encoding.get("image_sizes")
        if sizes is None:
            raise AdapterError("mistral3: patch_grid needs the processor's `image_sizes`.")
        cfg = model.config
        patch = int(cfg.vision_config.patch_size) * int(getattr(cfg, "spatial_merge_size", 1))
        height, width = (int(v) for v in sizes[row])
        rows, cols = height // patch, width // patch
        ids = encoding["input_ids"][row]
        n = int((ids == self.image_token_ids(model)[0]).sum())
        if n != rows * cols:
            raise AdapterError(f"mistral3 row {row}: {n} [IMG] tokens, but image_sizes {height}x{width} give a "
                               f"{rows}x{cols} grid (one image per sample is supported).")
        return rows, cols


register_adapter(Mistral3Adapter)
