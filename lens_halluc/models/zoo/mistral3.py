"""Tiny random Mistral3 (``Mistral3ForConditionalGeneration``: Pixtral vision tower, Mistral decoder).

Pixtral vision tower (8 px patches, 2D rotary, images up to 64 px on the longest edge) and a
``spatial_merge_size=2`` patch merger: one ``[IMG]`` token per 16 x 16 px, laid out row by row with an
``[IMG_BREAK]`` after each row but the last and ``[IMG_END]`` after it (a 64 x 48 image: 3 rows of
4 ``[IMG]``). 2-layer Mistral decoder, 4 heads / 2 kv heads. Inputs: ``pixel_values``
``[B, 3, H, W]`` (padded to the largest image) and ``image_sizes`` ``[B, 2]``. Processor:
``Mistral3ImageOnlyProcessor`` (PixtralProcessor's layout, no torchvision); chat template ``[INST][IMG]{prompt}[/INST]``.

Example
-------
>>> model, processor = make(seed=0)                                            # doctest: +SKIP
"""
from __future__ import annotations

from .llava import chat_template, finish, seeded, word_tokenizer

__all__ = ["make", "processor", "TEMPLATE", "SPECIAL"]

PATCH_SIZE, MERGE, LONGEST_EDGE = 8, 2, 64
SPECIAL = ("[IMG]", "[IMG_BREAK]", "[IMG_END]", "[INST]", "[/INST]")
TEMPLATE = chat_template("[IMG]", "[INST]", "[/INST]", "", "</s>")


def processor():
    """The tiny Mistral3 processor (PixtralProcessor's layout on the PIL image processor:
    :class:`~lens_halluc.models.adapters.mistral3.Mistral3ImageOnlyProcessor`, as ``PixtralProcessor``'s
    module cannot be imported without torchvision)."""
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    tok = word_tokenizer(SPECIAL)
    image_processor = PixtralImageProcessorPil(
        size={"longest_edge": LONGEST_EDGE}, patch_size={"height": PATCH_SIZE, "width": PATCH_SIZE},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    from ..adapters.mistral3 import Mistral3ImageOnlyProcessor

    return Mistral3ImageOnlyProcessor(image_processor=image_processor, tokenizer=tok, patch_size=PATCH_SIZE,
                            spatial_merge_size=MERGE, image_token="[IMG]", image_break_token="[IMG_BREAK]",
                            image_end_token="[IMG_END]", chat_template=TEMPLATE)


def make(seed: int = 0):
    """Tiny Mistral3 and its processor: ``(model, processor)``."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    proc = processor()
    tok = proc.tokenizer
    vision = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 image_size=LONGEST_EDGE, patch_size=PATCH_SIZE, head_dim=16)
    text = MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=len(tok), max_position_embeddings=512,
                         sliding_window=None, pad_token_id=tok.pad_token_id, bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=False)
    config = Mistral3Config(vision_config=vision, text_config=text,
                            image_token_index=tok.convert_tokens_to_ids("[IMG]"), spatial_merge_size=MERGE,
                            vision_feature_layer=-1, tie_word_embeddings=False)
    # Saved with the config so the adapter knows the structure ids without the processor (real checkpoints
    # do not store them: pass their processor).
    config.image_break_token_id = proc.image_break_token_id
    config.image_end_token_id = proc.image_end_token_id
    model = seeded(seed, lambda: Mistral3ForConditionalGeneration(config))
    return finish(model, tok), proc
