"""Tiny random Gemma 3 (``Gemma3ForConditionalGeneration``, ``model_type`` ``gemma3``) and its processor.

What makes it Gemma 3 and what the tiny model keeps:

* a SigLIP vision tower whose ``(image_size / patch_size)**2`` patch features are average-pooled to a
  square grid of ``mm_tokens_per_image`` soft tokens (here 8x8 patches -> 4x4 = 16 image tokens);
* the processor expands the text placeholder ``<start_of_image>`` into
  ``"\\n\\n<start_of_image>" + "<image_soft_token>" * 16 + "<end_of_image>\\n\\n"`` and returns
  ``token_type_ids`` (1 on ``<image_soft_token>``, 0 elsewhere; the model makes image tokens attend to
  each other bidirectionally through them);
* a Gemma 3 text decoder with *both* layer types (``sliding_attention``, ``full_attention``), a sliding
  window (6) smaller than the prompt (~40 tokens) so the window matters, a different rotary base per
  layer type, ``query_pre_attn_scalar`` different from ``head_dim`` (scaling is not ``head_dim**-0.5``),
  QK-norm, and the ``(1 + weight)`` RMSNorms;
* a chat template in Gemma's turn format (``<start_of_turn>user\\n...<end_of_turn>\\n<start_of_turn>model\\n``)
  that starts with ``{{ bos_token }}`` like the real one (the tokenizer adds ``<bos>`` too: encode a rendered
  template with ``add_special_tokens=False``, or use the adapter's ``format_prompt``, which strips it).

Example
-------
>>> model, processor = make(seed=0)                                       # doctest: +SKIP
>>> model.config.text_config.layer_types                                  # doctest: +SKIP
['sliding_attention', 'full_attention', 'sliding_attention']
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch

__all__ = ["make", "WORDS", "CHAT_TEMPLATE", "build_gemma_tokenizer"]

#: The words of the tiny vocabulary (CHAIR-able captions, prompt words, Gemma's roles).
WORDS: tuple[str, ...] = (
    "user", "model", ":", "please", "describe", "this", "image", "in", "detail", ".", "there", "is", "a", "an",
    ",", "and", "yes", "no", "?", "the", "fork", "knife", "cup", "spoon", "dog", "cat", "person", "car",
    "bicycle", "umbrella", "chair", "table", "bowl", "bottle", "men", "knives", "here", "original", "crops",
    "to", "help", "you", "see", "better", "caption", "en", "answer", "what",
)

#: Gemma's chat format (a simplified copy of the real template: same tokens, same layout, images as
#: ``<start_of_image>`` which the processor expands). Starts with ``{{ bos_token }}`` as the real one does.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<start_of_image>"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def build_gemma_tokenizer(words: Iterable[str], specials: Sequence[str], *, add_bos: bool,
                          named: Mapping[str, str] | None = None, extra: Sequence[str] = ()):
    """A word-level tokenizer with Gemma's special tokens (``<pad>``=0, ``<eos>``=1, ``<bos>``=2, ``<unk>``=3).

    Lower-cases, splits on spaces and punctuation and keeps ``"\\n"`` as a token of its own (Gemma's
    templates and PaliGemma's prefix/suffix separator are newlines). ``specials`` are further special
    tokens (never split); ``named`` maps tokenizer attributes (``image_token``, ``boi_token``...) to them,
    so ``tokenizer.image_token`` / ``tokenizer.image_token_id`` exist as on the real Gemma tokenizers;
    ``extra`` are added non-special tokens. ``add_bos``: prepend ``<bos>`` to every encoding.

    Example
    -------
    >>> tok = build_gemma_tokenizer(["a", "cat"], ["<image>"], add_bos=True)
    >>> tok.convert_ids_to_tokens(tok("a cat\\n").input_ids)
    ['<bos>', 'a', 'cat', '\\n']
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    base = ["<pad>", "<eos>", "<bos>", "<unk>"]
    vocab: dict[str, int] = {}
    for w in [*base, "\n", *(w.lower() for w in words), *specials]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),
        pre_tokenizers.Split(Regex(r"[ \t\r]+"), behavior="removed"),
        pre_tokenizers.Punctuation(),
    ])
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
        **dict(named or {}),
    )
    fast.add_special_tokens({"additional_special_tokens": list(specials)})
    if extra:
        fast.add_tokens(list(extra))
    return fast


def _scale_head(model, tokenizer) -> None:
    # Random init gives near-uniform logits; a larger output scale makes greedy decoding decisive.
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id


def make(seed: int = 0, image_size: int = 32, patch_size: int = 4, mm_tokens_per_image: int = 16,
         sliding_window: int = 6):
    """A randomly initialised tiny Gemma 3 and its processor (deterministic given ``seed``).

    Returns ``(model, processor)``: float32, eval mode, CPU; 3 text layers
    ``[sliding, full, sliding]``, 4 heads / 2 kv heads, head_dim 16, hidden 64; SigLIP 2 layers, images
    ``image_size`` px in ``patch_size`` patches pooled to ``mm_tokens_per_image`` tokens.
    """
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor, Gemma3TextConfig,
                              SiglipVisionConfig)
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    specials = ["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
    tokenizer = build_gemma_tokenizer(
        WORDS, specials, add_bos=True,
        named={"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"})
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in specials}
    image_processor = Gemma3ImageProcessorPil(
        size={"height": image_size, "width": image_size}, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
        do_pan_and_scan=False)
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
                                image_seq_length=mm_tokens_per_image)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=image_size, patch_size=patch_size, vision_use_head=False)
    text = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
        sliding_window=sliding_window, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0}},
        max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    config = Gemma3Config(
        vision_config=vision, text_config=text, mm_tokens_per_image=mm_tokens_per_image,
        boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"], tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Gemma3ForConditionalGeneration(config)
        with torch.no_grad():
            # HF initialises the projector to zeros and the (1 + w) norms to w = 0: random values make
            # the image actually reach the text tower and the norms non-trivial.
            proj = model.model.multi_modal_projector.mm_input_projection_weight
            proj.normal_(0.0, 0.2)
            for name, p in model.named_parameters():
                if "norm" in name and p.dim() == 1 and "vision_tower" not in name:
                    p.normal_(0.0, 0.1)
    _scale_head(model, tokenizer)
    return model.float().eval(), processor
