"""Tiny random Mllama (Llama-3.2-Vision, ``MllamaForConditionalGeneration``, ``model_type`` ``mllama``) and its processor.

What makes it Mllama and what the tiny model keeps:

* the image never enters the text stream as features: the text holds one ``<|image|>`` token per image,
  and the vision states reach the text tower only through **cross-attention decoder layers**
  (``config.text_config.cross_attention_layers``; here layers 1 and 3 of 4, layer 0 stays a self-attention
  layer because the text model reads the cache length from layer 0); their output is tanh-gated
  (``cross_attn_attn_gate``, ``cross_attn_mlp_gate``; HF initialises both gates to 0, which would make the
  image invisible, so they are set to random non-zero values here);
* images are split into tiles (``max_image_tiles=2``: aspect ratios ``(1,1), (1,2), (2,1)``) of
  ``image_size`` px; each tile gives ``(image_size/patch_size)**2 + 1`` vision tokens (patches + CLS,
  here 17), so one image is ``n_tiles * 17`` vision tokens (padding tiles included);
* the processor returns ``pixel_values [B, n_images, n_tiles, 3, H, W]``, ``aspect_ratio_ids [B, n_images]``,
  ``aspect_ratio_mask [B, n_images, n_tiles]`` and ``cross_attention_mask [B, T, n_images, n_tiles]``
  (1 from the ``<|image|>`` token to the end of the text, 0 before it); images are passed one list per
  sample (``[[im0], [im1]]``) for a batch;
* like the real checkpoint, the ``<|image|>`` id is ``text_config.vocab_size`` (one past the LM head: the
  image token can never be generated; the embedding table has ``vocab_size + 8`` rows);
* the Llama-3 chat format (``<|start_header_id|>user<|end_header_id|>`` ... ``<|eot_id|>``), starting with
  ``<|begin_of_text|>``. The tokenizer adds no BOS itself: ``MllamaProcessor`` prepends ``<|begin_of_text|>``
  to any text that lacks it, so a rendered chat template and a bare prompt both get exactly one BOS.

Example
-------
>>> model, processor = make(seed=0)                                       # doctest: +SKIP
>>> model.config.text_config.cross_attention_layers                       # doctest: +SKIP
[1, 3]
>>> enc = processor(images=[[im0], [im1]], text=[p0, p1], padding=True, return_tensors="pt")   # doctest: +SKIP
>>> model(**enc).logits.shape                                             # doctest: +SKIP
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

__all__ = ["make", "WORDS", "SPECIALS", "IMAGE_TOKEN", "CHAT_TEMPLATE", "build_llama3_tokenizer"]

#: The words of the tiny vocabulary (CHAIR-able captions, prompt words, Llama-3's roles).
WORDS: tuple[str, ...] = (
    "user", "assistant", "system", ":", "please", "describe", "this", "image", "in", "detail", ".", "there",
    "is", "a", "an", ",", "and", "yes", "no", "?", "the", "fork", "knife", "cup", "spoon", "dog", "cat",
    "person", "car", "bicycle", "umbrella", "chair", "table", "bowl", "bottle", "men", "knives", "what",
)

#: Llama-3 special tokens the processor and the chat template use (``<|image|>`` comes last, see below).
SPECIALS: tuple[str, ...] = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
    "<|end_header_id|>", "<|eot_id|>", "<|python_tag|>", "<unk>",
)
IMAGE_TOKEN = "<|image|>"

#: Llama-3.2-Vision's chat format (a simplified copy of the real template: same tokens, same layout; an
#: image item renders as ``<|image|>``, which the processor keeps as one token).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|image|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def build_llama3_tokenizer(words: Iterable[str], specials: Sequence[str] = SPECIALS,
                           image_token: str = IMAGE_TOKEN):
    """A lower-casing, punctuation-splitting word-level tokenizer with Llama-3's special tokens.

    Ids: the ``specials`` first (``<|begin_of_text|>``=0 ...), then ``words``, then ``image_token``
    **last** (so a model with ``vocab_size = len(tokenizer) - 1`` has the image token one past its LM
    head, as Llama-3.2-Vision does). No BOS is added by the tokenizer (MllamaProcessor adds it);
    whitespace, newlines included, only separates words.

    Example
    -------
    >>> tok = build_llama3_tokenizer(["a", "cat"])
    >>> tok.convert_ids_to_tokens(tok("<|begin_of_text|>a cat<|image|>").input_ids)
    ['<|begin_of_text|>', 'a', 'cat', '<|image|>']
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for w in [*specials, *(w.lower() for w in words), image_token]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>", unk_token="<unk>",
    )
    fast.add_special_tokens({"additional_special_tokens": [t for t in specials if t not in
                                                           ("<|begin_of_text|>", "<|eot_id|>", "<unk>",
                                                            "<|finetune_right_pad_id|>")] + [image_token]})
    return fast


def make(seed: int = 0, image_size: int = 16, patch_size: int = 4, max_num_tiles: int = 2,
         n_layers: int = 4, cross_attention_layers: Sequence[int] = (1, 3)):
    """A randomly initialised tiny Mllama and its processor (deterministic given ``seed``).

    Returns ``(model, processor)``: float32, eval mode, CPU; ``n_layers`` text layers (hidden 64, 4 heads /
    2 kv heads, head_dim 16) of which ``cross_attention_layers`` are cross-attention layers; a vision tower
    of 2 local + 1 global layers (hidden 32) on ``image_size`` px tiles in ``patch_size`` patches, at most
    ``max_num_tiles`` tiles per image.
    """
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaProcessor
    from transformers.models.mllama.configuration_mllama import MllamaTextConfig, MllamaVisionConfig
    from transformers.models.mllama.image_processing_pil_mllama import (MllamaImageProcessorPil,
                                                                        get_all_supported_aspect_ratios)

    if 0 in cross_attention_layers:
        # MllamaTextModel takes the cache length (positions, masks while decoding) from layer 0.
        raise ValueError("layer 0 must be a self-attention layer (as in Llama-3.2-Vision: 3, 8, 13, ...).")
    tokenizer = build_llama3_tokenizer(WORDS)
    image_processor = MllamaImageProcessorPil(
        size={"height": image_size, "width": image_size}, max_image_tiles=max_num_tiles,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    processor = MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert image_token_id == len(tokenizer) - 1
    vision = MllamaVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1, attention_heads=2,
        image_size=image_size, patch_size=patch_size, max_num_tiles=max_num_tiles,
        intermediate_layers_indices=[0], vision_output_dim=64,   # hidden * (1 + len(intermediate_layers_indices))
        supported_aspect_ratios=[list(r) for r in get_all_supported_aspect_ratios(max_num_tiles)],
    )
    text = MllamaTextConfig(
        vocab_size=image_token_id, hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2, cross_attention_layers=list(cross_attention_layers),
        max_position_embeddings=512, rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    config = MllamaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MllamaForConditionalGeneration(config)
        with torch.no_grad():
            # HF initialises every gate to 0 (cross-attention gates: the image would not reach the text;
            # vision gates: tile/position embeddings unused): random non-zero gates make all paths count.
            for name, p in model.named_parameters():
                if name.endswith("gate") or name.endswith("_gate"):
                    p.uniform_(0.5, 1.0)
            model.lm_head.weight.mul_(20.0)   # decisive greedy decoding (fewer near-ties)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model.float().eval(), processor
