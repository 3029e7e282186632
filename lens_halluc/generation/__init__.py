"""Greedy generation with decoding strategies (own KV cache per branch), and the captioning / answering runners.

Example
-------
>>> from lens_halluc.generation import caption                     # doctest: +SKIP
>>> caps = caption(vlm, ds, max_new_tokens=40)                      # doctest: +SKIP
"""
from .decoding import Branch, DecodeOutput, DecodingStrategy, greedy_decode, resolve_strategy
from .jsonl import ResumableJsonl, read_jsonl
from .results import Answers, Captions
from .runner import answer, answer_questions, caption, caption_dataset, generate, load_image

__all__ = ["Answers", "Branch", "Captions", "DecodeOutput", "DecodingStrategy", "ResumableJsonl", "answer",
           "answer_questions", "caption", "caption_dataset", "generate", "greedy_decode", "load_image", "read_jsonl",
           "resolve_strategy"]
