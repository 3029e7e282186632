"""Tiny random LLaVA-1.5 (``LlavaForConditionalGeneration``), and the helpers the LLaVA-like zoo modules share.

The model is :func:`lens_halluc.models.tiny.make_tiny_llava` (CLIP vision tower, 48 px images, 8 px
patches: 36 ``<image>`` tokens in row-major order; 2-layer Llama decoder with 4 heads / 2 kv heads)
with a chat template added to its processor, in LLaVA-1.5's format
(``USER: <image>\\n{prompt} ASSISTANT:``).

The helpers (:func:`word_tokenizer`, :func:`chat_template`, :func:`seeded`, :func:`finish`) build
the other LLaVA-like families' tiny models (``llava_next``, ``llava_onevision``, ``mistral3``,
``internvl``, ``idefics3``, ``smolvlm``).

Example
-------
>>> from lens_halluc.models.zoo import make_tiny
>>> model, processor = make_tiny("llava")                                    # doctest: +SKIP
>>> processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
...     {"type": "text", "text": "describe this image ."}]}], add_generation_prompt=True)  # doctest: +SKIP
'USER: <image>\\ndescribe this image . ASSISTANT:'
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch

from ..tiny import DEFAULT_WORDS, make_tiny_llava
from ..wordlevel import build_word_tokenizer

__all__ = ["make", "WORDS", "word_tokenizer", "chat_template", "seeded", "finish"]

#: The vocabulary of every LLaVA-like tiny model (CHAIR-able captions plus chat-template words).
WORDS: tuple[str, ...] = tuple(dict.fromkeys((*DEFAULT_WORDS, "system", "you", "are", "helpful", "<", ">")))


def word_tokenizer(special: Sequence[str] = (), words: Iterable[str] = WORDS, named: dict[str, str] | None = None):
    """The word-level tokenizer of :mod:`lens_halluc.models.wordlevel` plus the family's ``special`` tokens
    (added as special tokens, so ``<row_1_col_1>`` or ``[IMG_BREAK]`` stay one token each).

    ``named``: model-specific special tokens the processor reads as tokenizer attributes
    (InternVL: ``{"start_image_token": "<img>", ...}`` gives ``tok.start_image_token(_id)``); saved with it."""
    from transformers import PreTrainedTokenizerFast

    tok = build_word_tokenizer(words)
    extra = [t for t in (*special, *(named or {}).values()) if t not in tok.get_vocab()]
    if extra:
        tok.add_special_tokens({"additional_special_tokens": list(dict.fromkeys(extra))},
                               replace_extra_special_tokens=False)
    if named:
        tok = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, pad_token="<pad>", bos_token="<s>",
                                      eos_token="</s>", unk_token="<unk>", extra_special_tokens=dict(named))
    return tok


def chat_template(image: str, user_start: str, user_end: str, assistant_start: str, assistant_end: str,
                  system_start: str | None = None, system_end: str = "") -> str:
    """A jinja chat template: each turn ``{start}{content}{end}``, image items written as ``image`` (the
    family's placeholder the processor expands), text items verbatim; ``add_generation_prompt`` appends
    ``assistant_start``. A system turn uses ``system_start``/``system_end`` (user's when not given)."""
    system_start = user_start if system_start is None else system_start
    system_end = system_end or user_end

    def lit(s: str) -> str:  # a jinja string literal
        return "'" + s.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"

    return (
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}{{ " + lit(user_start) + " }}"
        "{% elif message['role'] == 'system' %}{{ " + lit(system_start) + " }}"
        "{% else %}{{ " + lit(assistant_start) + " }}{% endif %}"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for item in message['content'] %}"
        "{% if item['type'] == 'image' %}{{ " + lit(image) + " }}"
        "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
        "{% endfor %}{% endif %}"
        "{% if message['role'] == 'user' %}{{ " + lit(user_end) + " }}"
        "{% elif message['role'] == 'system' %}{{ " + lit(system_end) + " }}"
        "{% else %}{{ " + lit(assistant_end) + " }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ " + lit(assistant_start) + " }}{% endif %}"
    )


def seeded(seed: int, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """``build()`` under ``torch.manual_seed(seed)`` without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def finish(model: torch.nn.Module, tokenizer) -> torch.nn.Module:
    """Scale the LM head by 20 (decisive greedy decoding: random init gives near-uniform logits), zero its
    rows of special tokens but EOS (image, structure, pad), set generation eos/pad from ``tokenizer``;
    float32, eval mode."""
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head.mul_(20.0)
        # A trained VLM does not write image or structure tokens into a caption; a random one would, and such a
        # caption cannot be teacher-forced (the model counts image tokens). Their rows get logit 0.
        special = {int(i) for i in tokenizer.all_special_ids} | {int(i) for i in tokenizer.added_tokens_decoder}
        special -= {tokenizer.eos_token_id}
        rows = [i for i in sorted(special) if i < head.shape[0]]
        head[rows] = 0.0
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.float().eval()


#: LLaVA-1.5's conversation format (llava-hf's ``USER: <image>\n... ASSISTANT:``).
LLAVA_TEMPLATE = chat_template("<image>\n", "USER: ", " ", "ASSISTANT:", "</s> ")


def make(seed: int = 0):
    """Tiny LLaVA-1.5 and its processor (with LLaVA-1.5's chat template). Returns ``(model, processor)``.

    36 image tokens (48 px image, 8 px patches, CLS dropped), one row-major 6 x 6 grid."""
    model, processor = make_tiny_llava(seed=seed, words=WORDS)
    processor.chat_template = LLAVA_TEMPLATE
    return model, processor
