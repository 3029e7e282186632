"""Tiny random SmolVLM (``SmolVLMForConditionalGeneration``): Idefics3's layout, SmolVLM's classes.

The same sizes and image layout as :mod:`lens_halluc.models.zoo.idefics3` (32 px crops, 4 ``<image>``
tokens per crop, a 2 x 2 split with ``<row_i_col_j>`` plus ``<global-img>``, ``<fake_token_around_image>``
around crops; decoder at ``model.model.text_model``). Inputs: ``pixel_values`` and
``pixel_attention_mask``; images one list per sample. Chat template:
``User:<image>{prompt}<end_of_utterance>\\nAssistant:``.

The processor is :class:`~lens_halluc.models.adapters.idefics3.SmolVLMImageOnlyProcessor`
(``SmolVLMProcessor`` without its video processor, which needs torchvision, and without the
``num2words`` requirement, which only video prompts use), registered with ``AutoProcessor`` when
``lens_halluc.models.adapters`` is imported.

Example
-------
>>> model, processor = make(seed=0)                                            # doctest: +SKIP
"""
from __future__ import annotations

from .idefics3 import SEQ_LEN, SPECIAL, TEMPLATE, build, image_processor_kwargs
from .llava import word_tokenizer

__all__ = ["make", "processor"]


def processor(splitting: bool = True):
    """The tiny SmolVLM processor (image-only, PIL image processor)."""
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    from ..adapters.idefics3 import SmolVLMImageOnlyProcessor

    tok = word_tokenizer((*SPECIAL, "<video>"))
    return SmolVLMImageOnlyProcessor(image_processor=SmolVLMImageProcessorPil(**image_processor_kwargs(splitting)),
                                     tokenizer=tok, image_seq_len=SEQ_LEN, chat_template=TEMPLATE)


def make(seed: int = 0, splitting: bool = True):
    """Tiny SmolVLM and its processor: ``(model, processor)``."""
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMVisionConfig

    proc = processor(splitting)
    return build(SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMVisionConfig, proc, seed), proc
