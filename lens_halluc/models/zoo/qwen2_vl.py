"""Tiny random Qwen2-VL (``Qwen2VLForConditionalGeneration``, ``model_type`` ``qwen2_vl``) and its processor.

The shared builder of the three Qwen-VL families (:func:`build`; ``zoo/qwen2_5_vl.py`` and
``zoo/qwen3_vl.py`` call it):

* images are resized by the processor to multiples of ``patch * merge`` (28 px for Qwen2/2.5-VL, 32 px for
  Qwen3-VL) within ``[min_pixels, max_pixels]`` = ``[1, 6]`` merged cells; a 56 x 56 image is a
  ``[1, 4, 4]`` patch grid, i.e. 2 x 2 = 4 ``<|image_pad|>`` tokens (84 x 56: 3 x 2 = 6);
* ViT of 2 blocks (embed 32, 2 heads), merger to the text width; Qwen2 decoder of 3 layers, hidden 64,
  4 heads / 2 kv heads, head_dim 16, M-RoPE ``mrope_section = [2, 3, 3]`` (sums to head_dim / 2);
* the processor is the image-only one of :mod:`lens_halluc.models.adapters.qwen2_vl` (the stock processor
  cannot be constructed without torchvision: it lists a video processor), with the PIL image processor
  ``Qwen2VLImageProcessorPil`` and Qwen's chat template (system turn, ``<|im_start|>``/``<|im_end|>``
  turns, images as ``<|vision_start|><|image_pad|><|vision_end|>``).

``full_config()``: the Qwen2-VL-7B-Instruct shapes (28 layers, hidden 3584, 28 heads / 4 kv heads,
mrope_section [16, 24, 24], ViT 32 blocks of 1280) for benchmarks with random weights.

Example
-------
>>> model, processor = make(seed=0)                                        # doctest: +SKIP
>>> enc = processor(images=[img], text=[processor.apply_chat_template(msgs, add_generation_prompt=True)],
...                 return_tensors="pt")                                   # doctest: +SKIP
>>> enc["image_grid_thw"]                                                  # doctest: +SKIP
tensor([[1, 4, 4]])
"""
from __future__ import annotations

from .llava import chat_template, finish, seeded, word_tokenizer

__all__ = ["make", "build", "full_config", "TEMPLATE", "SPECIAL", "processor"]

#: Qwen's special tokens (the tiny vocabulary keeps the real names; ids are the word-level tokenizer's).
SPECIAL = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")

#: Qwen2-VL's chat format: a default system turn, user turn with the image first.
TEMPLATE = chat_template("<|vision_start|><|image_pad|><|vision_end|>", "<|im_start|>user\n", "<|im_end|>\n",
                         "<|im_start|>assistant\n", "<|im_end|>\n", system_start="<|im_start|>system\n")
TEMPLATE = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            "{% endif %}" + TEMPLATE)


def processor(family: str = "qwen2_vl", patch_size: int = 14, merge_size: int = 2, max_cells: int = 6):
    """The tiny Qwen-VL processor of ``family`` (image-only: no torchvision needed)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from ..adapters import qwen2_vl as qa

    cls = {"qwen2_vl": qa.Qwen2VLImageOnlyProcessor, "qwen2_5_vl": qa.Qwen2_5_VLImageOnlyProcessor,
           "qwen3_vl": qa.Qwen3VLImageOnlyProcessor}[family]
    tok = word_tokenizer(SPECIAL)
    cell = (patch_size * merge_size) ** 2  # pixels of one merged token
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": cell, "longest_edge": max_cells * cell}, patch_size=patch_size,
        temporal_patch_size=2, merge_size=merge_size, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return cls(image_processor=image_processor, tokenizer=tok, chat_template=TEMPLATE)


def _text_kwargs(tok, n_layers: int = 3) -> dict:
    return dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                tie_word_embeddings=False)


def _special_ids(tok) -> dict:
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}
    return dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


def build(family: str, seed: int = 0):
    """``(model, processor)`` of a tiny ``family`` in ``("qwen2_vl", "qwen2_5_vl", "qwen3_vl")``."""
    import transformers as tf

    if family == "qwen3_vl":
        proc = processor(family, patch_size=16)
        tok = proc.tokenizer
        # deepstack: features of vision blocks 0 and 1 are added to the hidden states at the image positions
        # after decoder layers 0 and 1 (3 text layers, so the last layer gets none: both cases occur).
        vision = tf.Qwen3VLVisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16,
                                        spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64,
                                        num_position_embeddings=16, deepstack_visual_indexes=[0, 1])
        text = tf.Qwen3VLTextConfig(**_text_kwargs(tok), head_dim=16, rope_parameters={
            "rope_type": "default", "rope_theta": 5000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True})
        config = tf.Qwen3VLConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), **_special_ids(tok),
                                  tie_word_embeddings=False)
        cls = tf.Qwen3VLForConditionalGeneration
    elif family == "qwen2_5_vl":
        proc = processor(family)
        tok = proc.tokenizer
        # window_size 28 px = one merged cell per window: block 0 attends within windows, block 1 globally
        vision = tf.Qwen2_5_VLVisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                                           window_size=28, fullatt_block_indexes=[1], out_hidden_size=64)
        text = tf.Qwen2_5_VLTextConfig(**_text_kwargs(tok), rope_parameters={
            "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
        config = tf.Qwen2_5_VLConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                                     **_special_ids(tok), tie_word_embeddings=False)
        cls = tf.Qwen2_5_VLForConditionalGeneration
    elif family == "qwen2_vl":
        proc = processor(family)
        tok = proc.tokenizer
        vision = tf.Qwen2VLVisionConfig(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2,
                                        patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
        text = tf.Qwen2VLTextConfig(**_text_kwargs(tok), rope_parameters={
            "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
        config = tf.Qwen2VLConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), **_special_ids(tok),
                                  tie_word_embeddings=False)
        cls = tf.Qwen2VLForConditionalGeneration
    else:
        raise KeyError(f"not a Qwen-VL family: {family!r}")
    model = seeded(seed, lambda: cls(config))
    return finish(model, tok), proc


def make(seed: int = 0):
    """Tiny Qwen2-VL and its processor: ``(model, processor)``."""
    return build("qwen2_vl", seed)


def full_config(smoke: bool = False):
    """A ``Qwen2VLConfig`` with Qwen2-VL-7B-Instruct's shapes (vocab 152064; for random-weight benchmarks).

    ``smoke``: the same image geometry (14 px patches, 2×2 merge) and vocabulary with tiny widths and depths,
    to check a benchmark's code path on a CPU."""
    from transformers import Qwen2VLConfig

    text = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                bos_token_id=151643, eos_token_id=151645, tie_word_embeddings=False)
    vision = dict(depth=32, embed_dim=1280, hidden_size=3584, mlp_ratio=4, num_heads=16, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    if smoke:
        text.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, rope_parameters={**text["rope_parameters"], "mrope_section": [2, 3, 3]})
        vision.update(depth=2, embed_dim=32, hidden_size=64, num_heads=2)
    return Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=151655, video_token_id=151656,
                         vision_start_token_id=151652, vision_end_token_id=151653, tie_word_embeddings=False)


def full_processor():
    """The tiny processor with Qwen2-VL's own pixel limits (up to 16384 merged tokens), for :func:`full_config` benches.

    Its tokenizer is the tiny one: map its image token id to the config's before a forward."""
    return processor("qwen2_vl", max_cells=16384)
