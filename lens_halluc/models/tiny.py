"""Small LLaVA models built in code: the organism's architecture and random models for tests.

They are genuine ``LlavaForConditionalGeneration`` instances (CLIP vision tower, Llama decoder),
so module names match ``llava-hf/llava-1.5-7b-hf`` (``model.language_model.layers.{i}.self_attn.o_proj``)
and everything that runs on them runs on the real model.

Example
-------
>>> model, processor = make_tiny_llava(seed=0)
>>> model.config.text_config.num_hidden_layers
2
>>> save_dir = save_tiny_llava("/tmp/tiny-llava")                           # doctest: +SKIP
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from .wordlevel import IMAGE_TOKEN, build_word_tokenizer

DEFAULT_WORDS: tuple[str, ...] = (
    "user", ":", "assistant", "please", "describe", "this", "image", "in", "detail", ".", "there", "is",
    "a", "an", ",", "and", "yes", "no", "?", "the", "fork", "knife", "cup", "spoon", "dog", "cat",
    "person", "car", "bicycle", "umbrella", "chair", "table", "bowl", "bottle", "men", "knives",
)


def build_processor(tokenizer, image_size: int, patch_size: int):
    """A ``LlavaProcessor`` for square images of ``image_size`` split in ``patch_size`` patches.

    The CLS token is dropped (``vision_feature_select_strategy="default"``), so an image becomes
    ``(image_size // patch_size) ** 2`` image tokens in row-major patch order.
    """
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, image_token=IMAGE_TOKEN,
    )


def tiny_llava_config(
    vocab_size: int, image_token_id: int, n_layers: int = 2, n_heads: int = 4, n_kv_heads: int = 2,
    hidden_size: int = 64, intermediate_size: int = 128, vision_hidden: int = 32, vision_layers: int = 2,
    vision_heads: int = 2, image_size: int = 48, patch_size: int = 8, max_positions: int = 512,
    pad_token_id: int = 0, bos_token_id: int = 1, eos_token_id: int = 2,
):
    """A ``LlavaConfig`` with a CLIP vision tower and a Llama text tower of the given sizes."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads, image_size=image_size, patch_size=patch_size,
    )
    text = LlamaConfig(
        hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, vocab_size=vocab_size,
        max_position_embeddings=max_positions, pad_token_id=pad_token_id, bos_token_id=bos_token_id,
        eos_token_id=eos_token_id, tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=image_token_id, projector_hidden_act="gelu",
        vision_feature_layer=-1 if vision_layers == 1 else -2, vision_feature_select_strategy="default",
        pad_token_id=pad_token_id,
    )


def make_tiny_llava(seed: int = 0, words: Sequence[str] = DEFAULT_WORDS, image_size: int = 48,
                    patch_size: int = 8, **config_kwargs):
    """A randomly initialised tiny LLaVA and its processor (deterministic given ``seed``).

    ``config_kwargs`` go to :func:`tiny_llava_config` (``n_layers``, ``n_heads``, ``n_kv_heads``...).
    Returns ``(model, processor)`` with the model in eval mode, float32, on CPU.
    """
    from transformers import LlavaForConditionalGeneration

    tokenizer = build_word_tokenizer(words)
    processor = build_processor(tokenizer, image_size, patch_size)
    config = tiny_llava_config(
        vocab_size=len(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_size=image_size, patch_size=patch_size, **config_kwargs,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    # Random init gives near-uniform logits; a larger output scale makes greedy decoding decisive
    # (fewer near-ties), which keeps token-level comparisons in tests meaningful.
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), processor


def save_tiny_llava(out_dir: str | Path, seed: int = 0, **kwargs) -> Path:
    """Build :func:`make_tiny_llava` and save model + processor (safetensors) to ``out_dir``."""
    out = Path(out_dir)
    model, processor = make_tiny_llava(seed=seed, **kwargs)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
