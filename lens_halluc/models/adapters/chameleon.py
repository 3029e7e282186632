"""Chameleon (``ChameleonForConditionalGeneration``, ``model_type`` ``chameleon``): early fusion through a VQ-VAE.

Layout: ``model.model`` is the decoder itself (``.layers``, ``.norm``, ``.embed_tokens``) and also holds
the image tokenizer ``model.model.vqmodel`` (a convolutional VQ-VAE encoder + quantiser). There is no vision
transformer and no projector: an image is encoded into a ``h x w`` grid of codebook indices (row-major,
``h = w = resolution / 2**(len(channel_multiplier) - 1)``), each index is mapped to a *text vocabulary* id
(the tokens named ``IMGIMG...Z`` in ``config.vocabulary_map``), and those ids are embedded with the text
embedding matrix.

Tokens
------
* **Image tokens** (:meth:`ChameleonAdapter.image_token_ids`): the ``<image>`` placeholder,
  ``config.vocabulary_map["<image>"]`` (= ``processor.image_token_id``). The processor writes
  ``image_seq_length`` of them per image; *inside the forward* their embeddings are replaced by the VQ codes'
  embeddings (``masked_scatter`` in ``ChameleonModel.forward``), while ``input_ids`` keep the placeholder id.
  So the positions holding image content are exactly the ``<image>`` positions of ``input_ids``; the
  ``IMGIMG`` code ids never appear in ``input_ids`` (checked in tests/test_family_qwen_chameleon.py).
* **Image structure**: ``<racm3:break>`` (begin of image) and ``<eoss>`` (end of image), the tokens the
  processor wraps each image in (``processor.image_start_token`` / ``image_end_token``; their ids are read
  from ``config.vocabulary_map``, which is the tokenizer's vocabulary).
* The chat-mode separator ``<reserved08706>`` (``tokenizer.sep_token``, appended by the processor to each
  prompt) is an ordinary text token.

Logits
------
``ChameleonForConditionalGeneration.forward`` sets the logits of every image-code id
(``model.model.vocabulary_mapping.image_tokens``: the ids whose name starts with ``IMGIMG``) to
``torch.finfo(logits.dtype).min`` after ``lm_head``; :meth:`ChameleonAdapter.postprocess_logits` does the
same (out of place, with ``masked_fill``, so it is differentiable for attribution). The ``<image>``,
``<racm3:break>`` and ``<eoss>`` ids are *not* suppressed (the model's own rule).

Config
------
``ChameleonConfig`` is **flat**: the text tower reads the top-level config (no ``text_config``), so
``attn_implementation={"text_config": "eager"}`` does not reach the decoder -- pass a string
(``attn_implementation="eager"``; the VQ-VAE has no attention-interface modules, so nothing else changes).

Positions
---------
``ChameleonModel.forward`` without ``position_ids`` uses ``arange(T) + past_length`` -- it ignores the
attention mask, so a left-padded row gets shifted positions in a plain ``model(**enc)`` while ``generate``
passes mask-derived positions (``cumsum(mask) - 1``). RoPE is relative, so the shift changes logits only
by float rounding (~3e-6 on the tiny model), but exact comparisons should pass the same explicit
``position_ids`` to both sides; the replay must take the positions of the forward it replays.

Chat template
-------------
The stock ``ChameleonProcessor.__init__`` takes no ``chat_template`` (a saved template is dropped on reload),
and the real checkpoints ship none; the family's usage is ``"<image>" + prompt`` (the processor appends the
separator). :class:`ChameleonChatProcessor` is the stock processor plus a ``chat_template`` argument (saved
as ``"processor_class": "ChameleonChatProcessor"``, registered with ``AutoProcessor`` on import);
:meth:`ChameleonAdapter.format_prompt` renders ``"<image>" + prompt`` itself for a processor without a
template (the stock one of a real checkpoint).

Example
-------
>>> from lens_halluc.models.adapters import ADAPTERS
>>> ADAPTERS["chameleon"].name
'chameleon'
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from . import register_adapter
from .base import Adapter, AdapterError, NotDefinedForArchitecture

__all__ = ["ChameleonAdapter", "ChameleonChatProcessor", "BEGIN_IMAGE", "END_IMAGE", "IMAGE"]

IMAGE, BEGIN_IMAGE, END_IMAGE = "<image>", "<racm3:break>", "<eoss>"


def _chat_processor():
    from transformers import ChameleonProcessor

    from .common import register_image_only

    class ChameleonChatProcessor(ChameleonProcessor):
        """``ChameleonProcessor`` that keeps a ``chat_template`` (the stock ``__init__`` drops it on reload)."""

        def __init__(self, image_processor, tokenizer, image_seq_length: int = 1024, image_token: str = "<image>",
                     chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, image_seq_length=image_seq_length, image_token=image_token)
            self.chat_template = chat_template

    ChameleonChatProcessor.__module__ = __name__
    return register_image_only(ChameleonChatProcessor)


ChameleonChatProcessor = _chat_processor()


class ChameleonAdapter(Adapter):
    """Chameleon (see the module doc)."""

    name = "chameleon"
    model_types = ("chameleon",)
    not_defined = {
        "inheritance": "Chameleon is trained on interleaved text and image tokens from scratch: there is no "
                       "text-only base language model whose attention it could inherit.",
    }
    language_model_paths = ("model",)
    image_input_keys = ("pixel_values",)

    # ------------------------------------------------------------------ tokens
    @staticmethod
    def _vocab_id(model: nn.Module, token: str) -> int:
        vocab = getattr(model.config, "vocabulary_map", None) or {}
        if token not in vocab:
            raise AdapterError(f"chameleon: {token!r} is not in config.vocabulary_map; the checkpoint's vocabulary "
                               "map must hold the image placeholder and the begin/end-of-image tokens.")
        return int(vocab[token])

    def image_token_ids(self, model: nn.Module, processor=None) -> tuple[int, ...]:
        """``(<image>,)``: the placeholder positions whose embeddings the forward replaces by the VQ codes'."""
        image = int(model.model.vocabulary_mapping.image_token_id)
        if processor is not None and getattr(processor, "image_token_id", image) != image:
            raise AdapterError(f"chameleon: the processor's image token id {processor.image_token_id} is not the "
                               f"model's ({image}); processor and model come from different vocabularies.")
        return (image,)

    def structure_token_ids(self, model: nn.Module, processor=None) -> tuple[int, ...]:
        start = getattr(processor, "image_start_token", BEGIN_IMAGE) if processor is not None else BEGIN_IMAGE
        end = getattr(processor, "image_end_token", END_IMAGE) if processor is not None else END_IMAGE
        return (self._vocab_id(model, start), self._vocab_id(model, end))

    def image_code_ids(self, model: nn.Module) -> list[int]:
        """The vocabulary ids of the VQ codes (never in ``input_ids``; their logits are suppressed)."""
        return list(model.model.vocabulary_mapping.image_tokens)

    # ------------------------------------------------------------------ logits
    def postprocess_logits(self, model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` with every image-code id at ``finfo(dtype).min``, as ``ChameleonForConditionalGeneration`` does."""
        mask = getattr(model, "_lens_halluc_code_mask", None)
        vocab = logits.shape[-1]
        if mask is None or mask.numel() != vocab:
            mask = torch.zeros(vocab, dtype=torch.bool)
            mask[self.image_code_ids(model)] = True
            model._lens_halluc_code_mask = mask  # cached: the mapping walks the whole vocabulary
        return logits.masked_fill(mask.to(logits.device), torch.finfo(logits.dtype).min)

    # ------------------------------------------------------------------ prompts
    def format_prompt(self, processor, prompt: str) -> str:
        """The processor's chat template when it has one; else Chameleon's usage ``"<image>" + prompt``."""
        if getattr(processor, "chat_template", None):
            return super().format_prompt(processor, prompt)
        return self.image_placeholder(processor) + prompt

    # ------------------------------------------------------------------ vision side
    def vision_attention(self, model: nn.Module) -> list[nn.Module]:
        raise NotDefinedForArchitecture(
            "chameleon has no vision transformer: images are tokenised by a convolutional VQ-VAE into discrete "
            "codebook indices (argmin over the codebook), embedded as text tokens; its few attention blocks are "
            "convolutional 1x1 attention over the latent map, and any edit there only flips codes discretely. "
            "CausalMM's vision-attention counterfactual has no meaning for it (use the text-side counterfactual).")

    def patch_grid(self, model: nn.Module, encoding: Mapping[str, Any], row: int = 0) -> tuple[int, int]:
        """``(h, w)`` of the VQ latent grid: image token ``k`` is latent cell ``(k // w, k % w)`` (the quantiser
        flattens ``[B, h, w]`` row-major), each cell covering ``2**(levels - 1)`` px square of the input."""
        vq = model.config.vq_config
        factor = 2 ** (len(vq.channel_multiplier) - 1)
        pv = encoding.get("pixel_values")
        height, width = (tuple(pv.shape[-2:]) if torch.is_tensor(pv) else (vq.resolution, vq.resolution))
        h, w = height // factor, width // factor
        count = int((torch.as_tensor(encoding["input_ids"])[row] == self.image_token_ids(model)[0]).sum())
        if count != h * w:
            raise NotDefinedForArchitecture(f"chameleon: sample {row} has {count} image tokens, not one {h}x{w} "
                                            "grid (several images, or none): the patch grid is defined for one image.")
        return h, w


register_adapter(ChameleonAdapter)
