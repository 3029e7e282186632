"""PaliGemma 1 and 2 (``PaliGemmaForConditionalGeneration``, ``model_type`` ``paligemma``).

Both share the model class, processor and prompt format; the text tower tells them apart:
``config.text_config.model_type`` is ``"gemma"`` (PaliGemma 1) or ``"gemma2"`` (PaliGemma 2:
attention soft-capping inside every attention, final logit soft-capping, alternating sliding-window /
full layers, eager attention only).

* SigLIP tower (``model.model.vision_tower.vision_model.encoder.layers[i].self_attn``), a linear
  projector, no pooling: ``(image_size / patch_size)**2`` image tokens (256 at 224 px), row-major.
* **Prompt format** (no chat template): ``"<image>" + prompt`` (model-card prompts: ``"caption en"``,
  ``"describe en"``, ``"answer en <question>"``). The processor expands ``<image>`` into
  ``image_seq_length`` image tokens, inserts ``<bos>`` after them and appends ``"\\n"``:
  ``<image>*N <bos> prompt \\n``. It also returns ``labels`` (training only; dropped here).
* **Prefix-LM**: ``token_type_ids`` 0 marks the prefix (image, ``<bos>``, prompt, ``\\n``), attended
  bidirectionally (one block of ``block_sequence_ids``); 1 marks the suffix (the answer), causal. The
  processor returns all 0 without ``suffix=``; ``model.generate`` appends 1 per generated token, so a
  caption appended to the prompt gets 1 (:attr:`PaliGemmaAdapter.per_token_inputs`). Without
  ``token_type_ids`` the model runs a plain causal mask (wrong for the prefix).
* Positions start at 1 (the forward adds 1 to ``arange``; ``generate`` adds 1 to its
  ``attention_mask.cumsum - 1`` positions). RoPE is relative, so a common shift only changes rounding.
* Logits: ``lm_head(norm(h))``, then for PaliGemma 2 ``tanh(logits / c) * c`` with
  ``c = text_config.final_logit_softcapping`` (:meth:`PaliGemmaAdapter.postprocess_logits`).

Example
-------
>>> from lens_halluc.models.adapters import ADAPTERS
>>> ADAPTERS["paligemma"].per_token_inputs["token_type_ids"]
1
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from . import register_adapter
from .base import Adapter, AdapterError, NotDefinedForArchitecture
from .common import count_tokens, vision_encoder_attention

__all__ = ["PaliGemmaAdapter", "paligemma_version"]


def paligemma_version(model_or_config) -> int:
    """1 for a Gemma text tower (PaliGemma), 2 for Gemma 2 (PaliGemma 2)."""
    config = getattr(model_or_config, "config", model_or_config)
    text_type = getattr(config.get_text_config(), "model_type", None)
    if text_type == "gemma":
        return 1
    if text_type == "gemma2":
        return 2
    raise AdapterError(f"PaliGemma with a {text_type!r} text tower is not described by the paligemma adapter "
                       "(known: gemma -> PaliGemma 1, gemma2 -> PaliGemma 2).")


class PaliGemmaAdapter(Adapter):
    name = "paligemma"
    model_types = ("paligemma",)
    image_input_keys = ("pixel_values",)
    # Prefix (image + prompt) 0, suffix (the answer) 1: model.generate appends 1 per generated token.
    per_token_inputs = {"token_type_ids": 1}

    def family(self, model) -> str:
        """``"paligemma"`` or ``"paligemma2"`` (from the text tower's ``model_type``)."""
        return "paligemma2" if paligemma_version(model) == 2 else "paligemma"

    def postprocess_logits(self, model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
        # Exactly PaliGemmaForConditionalGeneration.forward: divide, tanh, multiply (Gemma 2 text: 30.0).
        cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
        if cap is None:
            return logits
        return torch.tanh(logits / cap) * cap

    def format_prompt(self, processor, prompt: str) -> str:
        """``"<image>" + prompt``: PaliGemma has no chat template; the processor adds the image tokens'
        expansion, ``<bos>`` and the closing ``"\\n"`` itself."""
        return self.image_placeholder(processor) + prompt.strip()

    def format_text_only(self, tokenizer, prompt: str) -> str:
        """The prompt and the ``"\\n"`` the processor closes it with (the tokenizer adds ``<bos>``, as the processor does)."""
        return prompt.strip() + "\n"

    def vision_attention(self, model: nn.Module) -> list[nn.Module]:
        return vision_encoder_attention(model)

    def patch_grid(self, model: nn.Module, encoding: Mapping[str, Any], row: int = 0) -> tuple[int, int]:
        vision = model.config.vision_config
        side = int(vision.image_size) // int(vision.patch_size)
        n = count_tokens(encoding["input_ids"][row], self.image_token_ids(model))
        if n != side * side:
            raise NotDefinedForArchitecture(
                f"{self.family(model)}: row {row} holds {n} image tokens, not one {side}x{side} SigLIP grid "
                "(several images per prompt); pass one image per prompt.")
        return side, side


register_adapter(PaliGemmaAdapter)
