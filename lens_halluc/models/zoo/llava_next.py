"""Tiny random LLaVA-NeXT / LLaVA-1.6 (``LlavaNextForConditionalGeneration``).

CLIP vision tower at 32 px (8 px patches: 16 features per crop, CLS dropped), anyres with grid
pinpoints ``[[32, 32], [32, 64], [64, 32], [64, 64]]``: an image becomes the base crop's 16
features, then the unpadded high-resolution grid of the best pinpoint with one ``image_newline``
feature per grid row. All of them are ``<image>`` tokens (one id); the newline features are image
tokens too. 2-layer Llama decoder, 4 heads / 2 kv heads. Inputs: ``pixel_values``
``[B, n_crops, 3, 32, 32]`` and ``image_sizes`` ``[B, 2]``. Chat template: LLaVA-1.6-vicuna's
``USER: <image>\\n{prompt} ASSISTANT:``.

Example
-------
>>> model, processor = make(seed=0)                                            # doctest: +SKIP
>>> enc = processor(images=[img], text=[prompt], return_tensors="pt")          # doctest: +SKIP
>>> sorted(enc)                                                                 # doctest: +SKIP
['attention_mask', 'image_sizes', 'input_ids', 'pixel_values']
"""
from __future__ import annotations

from .llava import LLAVA_TEMPLATE, finish, seeded, word_tokenizer

__all__ = ["make", "full_config", "IMAGE_SIZE", "PATCH_SIZE", "PINPOINTS"]

IMAGE_SIZE, PATCH_SIZE = 32, 8
PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]


def _config(vocab_size: int, image_token_id: int, pad_token_id: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=512,
                       pad_token_id=pad_token_id, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    return LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                           image_grid_pinpoints=PINPOINTS, vision_feature_layer=-2,
                           vision_feature_select_strategy="default", image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
                           projector_hidden_act="gelu", tie_word_embeddings=False)


def processor():
    """The tiny LLaVA-NeXT processor (PIL image processor: no torchvision needed)."""
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tok = word_tokenizer(["<image>"])
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_grid_pinpoints=PINPOINTS, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=PATCH_SIZE,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              image_token="<image>", chat_template=LLAVA_TEMPLATE)


def make(seed: int = 0):
    """Tiny LLaVA-NeXT and its processor: ``(model, processor)``."""
    from transformers import LlavaNextForConditionalGeneration

    proc = processor()
    tok = proc.tokenizer
    config = _config(len(tok), tok.convert_tokens_to_ids("<image>"), tok.pad_token_id)
    model = seeded(seed, lambda: LlavaNextForConditionalGeneration(config))
    return finish(model, tok), proc


def full_config(smoke: bool = False):
    """``LlavaNextConfig`` at llava-hf/llava-v1.6-vicuna-7b-hf's size (CLIP ViT-L/14-336, Vicuna-7B): bench shapes.

    ``smoke``: the same image geometry (336 px, 14 px patches, the 7B's pinpoints) and vocabulary with tiny
    widths and depths, to check a benchmark's code path on a CPU."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig

    v = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2) if smoke else \
        dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)
    t = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4) if smoke else \
        dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)
    vision = CLIPVisionConfig(**v, image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(**t, num_key_value_heads=t["num_attention_heads"], vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       pad_token_id=0)
    return LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=32000,
                           image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
                           vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=576,
                           tie_word_embeddings=False)


def full_processor():
    """A LLaVA-NeXT processor with the 7B's image geometry (336 px crops, 14 px patches, its pinpoints) and the
    tiny tokenizer, for :func:`full_config` benches (map its image token id to the config's before a forward)."""
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    config = full_config()
    tok = word_tokenizer(["<image>"])
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
        image_grid_pinpoints=config.image_grid_pinpoints, image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711])
    return LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=14,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              image_token="<image>", chat_template=LLAVA_TEMPLATE)
