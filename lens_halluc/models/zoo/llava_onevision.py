"""Tiny random LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``).

SigLIP vision tower at 32 px (8 px patches: 16 features per crop, no CLS), anyres with grid
pinpoints ``[[32, 32], [32, 64], [64, 32], [64, 64]]`` (``anyres_max_9``): the base crop's 16
features, then the unpadded grid of the best pinpoint's crops with one ``image_newline`` feature per
row; all ``<image>`` tokens. 2-layer Qwen2 decoder, 4 heads / 2 kv heads. Inputs: ``pixel_values``
``[B, n_crops, 3, 32, 32]``, ``image_sizes`` ``[B, 2]`` (and ``batch_num_images`` ``[B]``).

The processor is :class:`~lens_halluc.models.adapters.llava_onevision.LlavaOnevisionImageOnlyProcessor`
(``LlavaOnevisionProcessor`` without its video processor, which needs torchvision); it is registered
with ``AutoProcessor`` when ``lens_halluc.models.adapters`` is imported. Chat template: Qwen's
``<|im_start|>user <image>\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n``.

Example
-------
>>> model, processor = make(seed=0)                                            # doctest: +SKIP
"""
from __future__ import annotations

from .llava import chat_template, finish, seeded, word_tokenizer

__all__ = ["make", "processor", "TEMPLATE"]

IMAGE_SIZE, PATCH_SIZE = 32, 8
PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]
TEMPLATE = chat_template("<image>\n", "<|im_start|>user ", "<|im_end|>\n", "<|im_start|>assistant\n",
                         "<|im_end|>\n", system_start="<|im_start|>system\n")


def processor():
    """The tiny OneVision processor (image-only: no torchvision needed)."""
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    from ..adapters.llava_onevision import LlavaOnevisionImageOnlyProcessor

    tok = word_tokenizer(["<image>", "<video>", "<|im_start|>", "<|im_end|>"])
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_grid_pinpoints=PINPOINTS,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return LlavaOnevisionImageOnlyProcessor(
        image_processor=image_processor, tokenizer=tok, num_image_tokens=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        vision_feature_select_strategy="full", image_token="<image>", video_token="<video>",
        vision_aspect_ratio="anyres_max_9", chat_template=TEMPLATE)


def make(seed: int = 0):
    """Tiny LLaVA-OneVision and its processor: ``(model, processor)``."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig

    proc = processor()
    tok = proc.tokenizer
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    text = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512,
                       pad_token_id=tok.pad_token_id, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"), image_grid_pinpoints=PINPOINTS,
        vision_feature_select_strategy="full", vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=False)
    model = seeded(seed, lambda: LlavaOnevisionForConditionalGeneration(config))
    return finish(model, tok), proc
