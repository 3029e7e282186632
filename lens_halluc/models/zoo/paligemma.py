"""Tiny random PaliGemma (``PaliGemmaForConditionalGeneration``, ``model_type`` ``paligemma``, Gemma text).

PaliGemma is a prefix-LM: the image tokens, ``<bos>``, the prompt and its closing ``"\\n"`` form the
*prefix* (``token_type_ids`` 0), attended bidirectionally; the answer (*suffix*, ``token_type_ids`` 1)
is causal. There is no chat template: the prompt format is ``"<image>" + prompt`` (e.g.
``"<image>caption en"``); the processor itself expands ``<image>`` into ``image_seq_length`` image
tokens, inserts ``<bos>`` after the last one and appends ``"\\n"``, so the model sees
``<image>*N <bos> caption en \\n``. Without ``suffix=`` the processor returns ``token_type_ids`` all 0
(the whole prompt is prefix); ``model.generate`` appends 1 for every generated token.

The tiny model: SigLIP (2 layers, 32 px images, 8 px patches -> 16 image tokens, a 4x4 row-major grid),
a linear projector, a Gemma decoder (2 layers, 4 heads, 1 kv head as PaliGemma-1's multi-query attention,
head_dim 16, RMSNorm ``(1 + w)``, embeddings scaled by ``sqrt(hidden)``, positions starting at 1). The
processor adds PaliGemma's 1024 ``<locXXXX>`` and 128 ``<segXXX>`` tokens, so the vocabulary has ~1.2k
entries (their LM-head rows are left unscaled, so greedy captions are words). :func:`build` also makes PaliGemma 2 (``text="gemma2"``, :mod:`.paligemma2`).

Example
-------
>>> model, processor = make(seed=0)                                      # doctest: +SKIP
>>> enc = processor(images=[img], text=["<image>caption en"], return_tensors="pt")   # doctest: +SKIP
>>> enc["token_type_ids"].unique().tolist()                              # doctest: +SKIP
[0]
"""
from __future__ import annotations

import torch

from .gemma3 import WORDS, _scale_head, build_gemma_tokenizer

__all__ = ["make", "build"]


def build(seed: int = 0, text: str = "gemma", image_size: int = 32, patch_size: int = 8, sliding_window: int = 6,
          attn_logit_softcapping: float = 5.0, final_logit_softcapping: float = 30.0, qk_scale: float = 12.0):
    """``(model, processor)`` of a tiny PaliGemma with a ``"gemma"`` (PaliGemma 1) or ``"gemma2"`` (PaliGemma 2)
    text decoder. Gemma 2's soft-caps and sliding window (``sliding_window`` < prompt length) apply only
    to ``"gemma2"``; ``attn_logit_softcapping`` defaults small (real: 50) and Gemma 2's ``q_proj`` /
    ``k_proj`` weights are multiplied by ``qk_scale`` (its attention has no QK-norm, and random init gives
    scores near 0) so that capping changes the tiny model's attention, not only its logits."""
    from transformers import (GemmaConfig, Gemma2Config, PaliGemmaConfig, PaliGemmaForConditionalGeneration,
                              PaliGemmaProcessor, SiglipVisionConfig)
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    if text not in ("gemma", "gemma2"):
        raise ValueError(f"text must be 'gemma' (PaliGemma 1) or 'gemma2' (PaliGemma 2), got {text!r}.")
    n_image_tokens = (image_size // patch_size) ** 2
    # The processor inserts <bos> and "\n" itself (and sets add_bos_token=False), so the tokenizer adds nothing.
    tokenizer = build_gemma_tokenizer(WORDS, ["<image>"], add_bos=False, named={"image_token": "<image>"})
    image_processor = SiglipImageProcessorPil(
        size={"height": image_size, "width": image_size}, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    n_words = len(tokenizer)  # before the processor adds PaliGemma's <loc>/<seg> tokens
    image_processor.image_seq_length = n_image_tokens  # PaliGemmaProcessor reads it (saved in preprocessor_config)
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, head_dim=16,
                  num_attention_heads=4, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    if text == "gemma":
        text_config = GemmaConfig(num_hidden_layers=2, num_key_value_heads=1, **common)
    else:
        text_config = Gemma2Config(
            num_hidden_layers=3, num_key_value_heads=2, query_pre_attn_scalar=24, sliding_window=sliding_window,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            attn_logit_softcapping=attn_logit_softcapping, final_logit_softcapping=final_logit_softcapping, **common)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=image_size, patch_size=patch_size, vision_use_head=False)
    config = PaliGemmaConfig(
        vision_config=vision, text_config=text_config, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vocab_size=len(tokenizer), projection_dim=64, hidden_size=64, tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = PaliGemmaForConditionalGeneration(config)
        with torch.no_grad():
            # HF initialises Gemma's (1 + w) norms to w = 0: random values make them non-trivial.
            for name, p in model.named_parameters():
                if "norm" in name and p.dim() == 1 and "vision_tower" not in name:
                    p.normal_(0.0, 0.1)
            if text == "gemma2":
                for layer in model.model.language_model.layers:
                    layer.self_attn.q_proj.weight.mul_(qk_scale)
                    layer.self_attn.k_proj.weight.mul_(qk_scale)
    _scale_head(model, tokenizer)
    with torch.no_grad():
        # keep the <loc>/<seg> rows unscaled so greedy captions are words (CHAIR-able), not detection tokens
        model.lm_head.weight[n_words:].div_(20.0)
    return model.float().eval(), processor


def make(seed: int = 0, **kwargs):
    """A randomly initialised tiny PaliGemma (1: Gemma text) and its processor (deterministic given ``seed``)."""
    return build(seed=seed, text="gemma", **kwargs)
