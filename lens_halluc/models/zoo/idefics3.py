"""Tiny random Idefics3 (``Idefics3ForConditionalGeneration``: SigLIP-style tower, pixel shuffle, Llama).

Vision tower on 32 px crops (8 px patches: 4 x 4), ``scale_factor=2`` pixel shuffle: 4 ``<image>``
tokens per crop. Image splitting on: the image is resized to at most 64 px on its longest edge and
split into 32 px crops (a 2 x 2 grid for most shapes, written with ``<row_i_col_j>`` markers) plus a
global 32 px view (``<global-img>``), each crop framed by ``<fake_token_around_image>``. 2-layer Llama
decoder at ``model.model.text_model``, 4 heads / 2 kv heads. Inputs: ``pixel_values``
``[B, n_crops, 3, 32, 32]`` and ``pixel_attention_mask`` ``[B, n_crops, 32, 32]``; images one list per
sample. Chat template: Idefics3's ``User:<image>{prompt}<end_of_utterance>\\nAssistant:``.

Example
-------
>>> model, processor = make(seed=0)                                            # doctest: +SKIP
"""
from __future__ import annotations

from .llava import chat_template, finish, seeded, word_tokenizer

__all__ = ["make", "processor", "TEMPLATE", "SPECIAL", "build"]

CROP, PATCH_SIZE, SCALE, LONGEST = 32, 8, 2, 64
SEQ_LEN = (CROP // PATCH_SIZE) ** 2 // SCALE ** 2


def _special():
    from ..adapters.idefics3 import GRID_TOKENS

    return ("<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>", *GRID_TOKENS)


SPECIAL = _special()
TEMPLATE = chat_template("<image>", "User:", "<end_of_utterance>\n", "Assistant:", "<end_of_utterance>\n",
                         system_start="System:")


def image_processor_kwargs(splitting: bool = True) -> dict:
    return dict(size={"longest_edge": LONGEST if splitting else CROP}, max_image_size={"longest_edge": CROP},
                do_image_splitting=splitting, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def processor(splitting: bool = True):
    """The tiny Idefics3 processor (PIL image processor); ``splitting=False``: the global view only."""
    from transformers import Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tok = word_tokenizer(SPECIAL)
    return Idefics3Processor(image_processor=Idefics3ImageProcessorPil(**image_processor_kwargs(splitting)),
                             tokenizer=tok, image_seq_len=SEQ_LEN, chat_template=TEMPLATE)


def build(config_cls, model_cls, vision_cls, proc, seed: int):
    """The tiny model of the Idefics3 layout (shared with SmolVLM) for processor ``proc``."""
    from transformers import LlamaConfig

    tok = proc.tokenizer
    vision = vision_cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        image_size=CROP, patch_size=PATCH_SIZE)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512,
                       pad_token_id=tok.pad_token_id, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    config = config_cls(vision_config=vision, text_config=text, image_token_id=proc.image_token_id,
                        scale_factor=SCALE, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    # Saved with the config so the adapter knows the image markers without the processor.
    config.fake_image_token_id = tok.convert_tokens_to_ids("<fake_token_around_image>")
    config.global_image_token_id = tok.convert_tokens_to_ids("<global-img>")
    config.row_col_token_ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL if t.startswith("<row_")]
    model = seeded(seed, lambda: model_cls(config))
    return finish(model, tok)


def make(seed: int = 0, splitting: bool = True):
    """Tiny Idefics3 and its processor: ``(model, processor)``."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3VisionConfig

    proc = processor(splitting)
    return build(Idefics3Config, Idefics3ForConditionalGeneration, Idefics3VisionConfig, proc, seed), proc
