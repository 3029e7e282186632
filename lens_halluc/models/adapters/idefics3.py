"""Idefics3 and SmolVLM (``Idefics3ForConditionalGeneration``/``SmolVLMForConditionalGeneration``,
``model_type`` ``idefics3`` and ``smolvlm``).

SigLIP-style vision tower, pixel-shuffle connector (``scale_factor``) and a Llama decoder at
``model.model.text_model`` (not ``language_model``). With image splitting an image becomes a grid of
crops plus a global view, written as ``<fake_token_around_image><row_1_col_1><image>*n ... \\n`` per
grid row, then ``\\n<fake_token_around_image><global-img><image>*n<fake_token_around_image>``; without
splitting only the global part. ``<image>`` positions hold the features; ``<fake_token_around_image>``,
``<global-img>`` and ``<row_i_col_j>`` are image structure (the newlines between grid rows are text
tokens of the tokenizer, so they are labelled TEXT). Inputs that go with the image: ``pixel_values``
``[B, n_crops, 3, H, W]`` and ``pixel_attention_mask`` ``[B, n_crops, H, W]`` (which pixels are real;
crops that are all padding are dropped). The processor wants one list of images per sample.

:class:`SmolVLMImageOnlyProcessor`: ``SmolVLMProcessor`` lists a video processor (torchvision) and
refuses to construct without ``num2words`` (used only to phrase video frame counts). This subclass
takes no video processor and needs neither; it is registered with ``AutoProcessor``.

Example
-------
>>> from lens_halluc.models.adapters import ADAPTERS
>>> ADAPTERS["smolvlm"].language_model_paths, ADAPTERS["idefics3"].image_input_keys
(('model.text_model',), ('pixel_values', 'pixel_attention_mask'))
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from . import register_adapter
from .base import Adapter, AdapterError, NotDefinedForArchitecture
from .common import ids_from_config, register_image_only, tokens_to_ids

__all__ = ["Idefics3Adapter", "SmolVLMAdapter", "SmolVLMImageOnlyProcessor", "GRID_TOKENS"]

#: The row/column markers both processors may write (grids up to 6 x 6).
GRID_TOKENS = tuple(f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6))


def _smolvlm_image_only():
    from transformers import SmolVLMProcessor
    from transformers.processing_utils import ProcessorMixin

    class SmolVLMImageOnlyProcessor(SmolVLMProcessor):
        """``SmolVLMProcessor`` for images only: no video processor (torchvision) and no ``num2words``
        (SmolVLM's ``__init__`` checks for it only to phrase video prompts). ``ProcessorMixin`` reads the
        sub-processors off this signature, which omits ``video_processor``."""

        def __init__(self, image_processor, tokenizer, image_seq_len: int = 169, chat_template: str | None = None,
                     **kwargs):
            # SmolVLMProcessor.__init__'s attributes, without its num2words check (videos only).
            self.fake_image_token = getattr(tokenizer, "fake_image_token", "<fake_token_around_image>")
            self.image_token = getattr(tokenizer, "image_token", "<image>")
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.end_of_utterance_token = getattr(tokenizer, "end_of_utterance_token", "<end_of_utterance>")
            self.global_image_token = getattr(tokenizer, "global_image_token", "<global-img>")
            self.image_seq_len = image_seq_len
            self.video_token = getattr(tokenizer, "video_token", "<video>")
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

        def apply_chat_template(self, conversation, chat_template=None, **kwargs):
            """The mixin's ``apply_chat_template`` (SmolVLM's own one reads the video processor's frame
            settings even for images); a conversation with a video raises."""
            conversations = conversation if conversation and isinstance(conversation[0], (list, tuple)) \
                else [conversation]
            if any(isinstance(c, dict) and c.get("type") == "video" for conv in conversations for m in conv
                   for c in (m.get("content") or []) if not isinstance(m.get("content"), str)):
                raise ValueError("SmolVLMImageOnlyProcessor has no video processor (it needs torchvision); "
                                 "install torchvision and use SmolVLMProcessor for videos.")
            return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)

    SmolVLMImageOnlyProcessor.__module__ = __name__
    return register_image_only(SmolVLMImageOnlyProcessor)


SmolVLMImageOnlyProcessor = _smolvlm_image_only()


class Idefics3Adapter(Adapter):
    name = "idefics3"
    model_types = ("idefics3",)
    language_model_paths = ("model.text_model",)
    image_input_keys = ("pixel_values", "pixel_attention_mask")
    nested_images = True

    #: Config attributes holding the structure ids when no processor is given (set by lens_halluc's zoo).
    structure_config_attrs = ("fake_image_token_id", "global_image_token_id", "row_col_token_ids")

    def structure_token_ids(self, model: nn.Module, processor=None) -> tuple[int, ...]:
        """``<fake_token_around_image>``, ``<global-img>`` and every ``<row_i_col_j>`` the tokenizer has: from
        the processor's tokenizer, else from the config attributes :attr:`structure_config_attrs`."""
        if processor is None:
            return ids_from_config(self.name, model, self.structure_config_attrs)
        tok = getattr(processor, "tokenizer", processor)
        vocab = tok.get_vocab()
        fake = getattr(processor, "fake_image_token", "<fake_token_around_image>")
        glob = getattr(processor, "global_image_token", None) or getattr(processor, "global_image_tag", "<global-img>")
        return (*tokens_to_ids(self.name, processor, (fake, glob)), *(int(vocab[t]) for t in GRID_TOKENS if t in vocab))

    def vision_attention(self, model: nn.Module) -> list[nn.Module]:
        tower = getattr(getattr(model, "model", model), "vision_model", None)
        layers = getattr(getattr(tower, "encoder", None), "layers", None)
        if layers is None:
            raise AdapterError(f"{type(model).__name__}: no vision layers at model.vision_model.encoder.layers.")
        return [layer.self_attn for layer in layers]

    def patch_grid(self, model: nn.Module, encoding: Mapping[str, Any], row: int = 0) -> tuple[int, int]:
        """The pixel-shuffled grid of an unsplit image (its ``<image>`` tokens row-major).

        Raises :class:`NotDefinedForArchitecture` for a split image (crops + global view: several grids)."""
        cfg = model.config
        n = int((encoding["input_ids"][row] == self.image_token_ids(model)[0]).sum())
        side = int(cfg.vision_config.image_size) // int(cfg.vision_config.patch_size) // int(cfg.scale_factor)
        if n != side * side:
            raise NotDefinedForArchitecture(
                f"{self.name} row {row}: {n} image tokens = {n / (side * side):g} crops of {side}x{side}; a split "
                "image (a grid of crops plus a global view) is several patch grids, not one row-major grid. Use "
                "do_image_splitting=False for the confounder patch map.")
        return side, side


class SmolVLMAdapter(Idefics3Adapter):
    """SmolVLM: Idefics3's layout and module paths (``model.model.text_model``, ``model.model.vision_model``)."""

    name = "smolvlm"
    model_types = ("smolvlm",)
    #: The processor class that loads this family without torchvision (a loader's fallback when the stock one
    #: cannot be constructed: ``SmolVLMImageOnlyProcessor.from_pretrained(path)``).
    image_only_processor_class = SmolVLMImageOnlyProcessor


register_adapter(Idefics3Adapter)
register_adapter(SmolVLMAdapter)
