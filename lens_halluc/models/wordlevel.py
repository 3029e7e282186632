"""Word-level tokenizers for small models (the organism, tiny test models).

Built with the ``tokenizers`` library and wrapped in ``PreTrainedTokenizerFast`` so they save and
load with ``save_pretrained`` like any Hugging Face tokenizer. Lower-casing and punctuation
splitting let the LLaVA-1.5 template ("USER: <image>\\n... ASSISTANT:") be used verbatim.

Example
-------
>>> tok = build_word_tokenizer(["there", "is", "a", "fork", "."])
>>> tok.convert_ids_to_tokens(tok("There is a fork.").input_ids)
['<s>', 'there', 'is', 'a', 'fork', '.']
>>> tok.decode(tok("there is a fork .").input_ids, skip_special_tokens=True)
'there is a fork .'
"""
from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
IMAGE_TOKEN = "<image>"


def build_word_tokenizer(words: Iterable[str], add_bos: bool = True) -> PreTrainedTokenizerFast:
    """A lower-casing, punctuation-splitting word-level tokenizer over ``words``.

    Ids: ``<pad>``=0, ``<s>``=1, ``</s>``=2, ``<unk>``=3, then the words in first-seen order,
    then ``<image>`` last. ``<s>`` is prepended to every encoding when ``add_bos`` (as Llama's
    tokenizer does), so the system segment before the image is non-empty as in LLaVA.
    """
    vocab: dict[str, int] = {}
    for w in list(SPECIAL_TOKENS) + [w.lower() for w in words]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
    )
    fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return fast
