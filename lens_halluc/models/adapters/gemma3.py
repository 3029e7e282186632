"""Gemma 3 (``Gemma3ForConditionalGeneration``, ``model_type`` ``gemma3``).

Architecture (transformers 5.x):

* SigLIP vision tower at ``model.model.vision_tower`` (``.vision_model.encoder.layers[i].self_attn``); its
  ``(image_size / patch_size)**2`` patch features (row-major) are average-pooled by the projector to a
  square ``sqrt(mm_tokens_per_image)`` grid, again row-major, then projected: one image = ``mm_tokens_per_image``
  ``<image_soft_token>`` tokens (``config.image_token_id``; 256 on the real models).
* The processor expands the text placeholder ``<start_of_image>`` (``processor.image_token``) into
  ``"\\n\\n<start_of_image>" + "<image_soft_token>" * N + "<end_of_image>\\n\\n"``; ``<start_of_image>`` /
  ``<end_of_image>`` (``config.boi_token_id`` / ``eoi_token_id``) are image *structure* tokens. It returns
  ``token_type_ids`` (1 on image soft tokens, 0 elsewhere); the model uses them only for the attention
  mask: the soft tokens of one image attend to each other bidirectionally (``block_sequence_ids``).
  Appended caption tokens are text: 0 (``model.generate`` repeats the last prompt value, 0, and passes
  ``token_type_ids=None`` after the first step anyway).
* Text decoder at ``model.model.language_model`` (Gemma 3: QK-norm, ``(1 + w)`` RMSNorms, per-layer
  types ``sliding_attention`` / ``full_attention`` with their own rotary tables and masks; scaling
  ``query_pre_attn_scalar ** -0.5``). Logits are ``lm_head(norm(h))``: the multimodal forward does **not**
  apply ``final_logit_softcapping`` (only the text-only ``Gemma3ForCausalLM`` does), so neither does
  :meth:`Gemma3Adapter.postprocess_logits`.
* Images go to the processor as one list per sample (``nested_images``); the chat template starts with
  ``{{ bos_token }}`` while the tokenizer adds ``<bos>`` too: :meth:`Gemma3Adapter.format_prompt` strips the
  template's so that ``processor(text=format_prompt(...))`` encodes one ``<bos>``, as
  ``processor.apply_chat_template(..., tokenize=True)`` does.

Example
-------
>>> from lens_halluc.models.adapters import ADAPTERS
>>> ADAPTERS["gemma3"].nested_images
True
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn

from . import register_adapter
from .base import Adapter, AdapterError, NotDefinedForArchitecture
from .common import count_tokens, vision_encoder_attention

__all__ = ["Gemma3Adapter", "strip_template_bos"]


def strip_template_bos(processor, text: str) -> str:
    """``text`` without its leading ``bos_token`` when the tokenizer adds one itself (no double ``<bos>``)."""
    tok = getattr(processor, "tokenizer", processor)
    bos = getattr(tok, "bos_token", None)
    if not bos or not text.startswith(bos):
        return text
    ids = tok("", add_special_tokens=True).input_ids
    return text[len(bos):] if ids and ids[0] == tok.bos_token_id else text


class Gemma3Adapter(Adapter):
    name = "gemma3"
    model_types = ("gemma3",)
    image_input_keys = ("pixel_values",)
    # token_type_ids: 1 on image soft tokens (bidirectional among one image's tokens), 0 on text; a caption is text.
    per_token_inputs = {"token_type_ids": 0}
    nested_images = True

    def structure_token_ids(self, model: nn.Module, processor=None) -> tuple[int, ...]:
        cfg = model.config
        ids = [getattr(cfg, key, None) for key in ("boi_token_id", "eoi_token_id")]
        if any(i is None for i in ids):
            raise AdapterError(f"{type(model).__name__}: config lacks boi_token_id / eoi_token_id (Gemma 3's "
                               "<start_of_image> / <end_of_image>).")
        return tuple(int(i) for i in ids)

    def postprocess_logits(self, model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
        # Gemma3ForConditionalGeneration.forward returns lm_head(norm(h)) as is: it ignores
        # text_config.final_logit_softcapping (None on the released checkpoints anyway).
        return logits

    def format_prompt(self, processor, prompt: str) -> str:
        return strip_template_bos(processor, super().format_prompt(processor, prompt))

    def vision_attention(self, model: nn.Module) -> list[nn.Module]:
        return vision_encoder_attention(model)

    def patch_grid(self, model: nn.Module, encoding: Mapping[str, Any], row: int = 0) -> tuple[int, int]:
        n = count_tokens(encoding["input_ids"][row], self.image_token_ids(model))
        per_image = int(model.config.mm_tokens_per_image)
        side = math.isqrt(per_image)
        if n != per_image:
            raise NotDefinedForArchitecture(
                f"gemma3: row {row} holds {n} image tokens, not one image of mm_tokens_per_image={per_image} "
                "(several images or pan-and-scan crops are several grids); pass one image per prompt with "
                "do_pan_and_scan=False.")
        if side * side != per_image:
            raise AdapterError(f"gemma3: mm_tokens_per_image={per_image} is not a square grid.")
        return side, side


register_adapter(Gemma3Adapter)
