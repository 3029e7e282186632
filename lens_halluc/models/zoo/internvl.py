"""Tiny random InternVL (``InternVLForConditionalGeneration``: InternViT, pixel-shuffle projector, Qwen2).

InternViT vision tower at 32 px tiles (8 px patches: 4 x 4 patches, CLS dropped), pixel shuffle with
``downsample_ratio=0.5``: 4 image tokens per tile. Dynamic tiling (``crop_to_patches``, at most 2
tiles, plus a thumbnail tile when there is more than one): a square image is 1 tile, a wide or tall
one 2 tiles + thumbnail. In the text an image is ``<img>`` + 4 ``<IMG_CONTEXT>`` per tile + ``</img>``;
only ``<IMG_CONTEXT>`` positions hold image features, ``<img>``/``</img>`` are image structure.
2-layer Qwen2 decoder, 4 heads / 2 kv heads. Inputs: ``pixel_values`` ``[n_tiles_total, 3, 32, 32]``
(tiles of all images of the batch, concatenated). Chat template: InternVL's
``<|im_start|>user\\n<IMG_CONTEXT>\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n``.

The processor is :class:`~lens_halluc.models.adapters.internvl.InternVLImageOnlyProcessor`
(``InternVLProcessor`` without its video processor, which needs torchvision), registered with
``AutoProcessor`` when ``lens_halluc.models.adapters`` is imported.

Example
-------
>>> model, processor = make(seed=0)                                            # doctest: +SKIP
"""
from __future__ import annotations

from .llava import chat_template, finish, seeded, word_tokenizer

__all__ = ["make", "processor", "TEMPLATE", "NAMED_TOKENS"]

TILE, PATCH_SIZE, DOWNSAMPLE = 32, 8, 0.5
TOKENS_PER_TILE = int((TILE // PATCH_SIZE) ** 2 * DOWNSAMPLE ** 2)
NAMED_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                "video_token": "<video>"}
TEMPLATE = chat_template("<IMG_CONTEXT>\n", "<|im_start|>user\n", "<|im_end|>\n", "<|im_start|>assistant\n",
                         "<|im_end|>\n", system_start="<|im_start|>system\n")


def processor():
    """The tiny InternVL processor (image-only; GotOcr2's PIL image processor with dynamic tiling)."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    from ..adapters.internvl import InternVLImageOnlyProcessor

    tok = word_tokenizer(["<|im_start|>", "<|im_end|>"], named=NAMED_TOKENS)
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": TILE, "width": TILE}, crop_to_patches=True, min_patches=1, max_patches=2,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return InternVLImageOnlyProcessor(image_processor=image_processor, tokenizer=tok,
                                      image_seq_length=TOKENS_PER_TILE, chat_template=TEMPLATE)


def make(seed: int = 0):
    """Tiny InternVL and its processor: ``(model, processor)``."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, Qwen2Config

    proc = processor()
    tok = proc.tokenizer
    vision = InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=[TILE, TILE], patch_size=[PATCH_SIZE, PATCH_SIZE])
    text = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512,
                       pad_token_id=tok.pad_token_id, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=proc.image_token_id,
                            image_seq_length=TOKENS_PER_TILE, downsample_ratio=DOWNSAMPLE, vision_feature_layer=-1,
                            vision_feature_select_strategy="default", tie_word_embeddings=False)
    # Saved with the config so the adapter knows <img>/</img> without the processor.
    config.start_image_token_id = proc.start_image_token_id
    config.end_image_token_id = proc.end_image_token_id
    model = seeded(seed, lambda: InternVLForConditionalGeneration(config))
    return finish(model, tok), proc
