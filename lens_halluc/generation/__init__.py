"""Decoding with strategies (own KV cache per branch) and token choices (argmax, sampling, beam search),
and the captioning / answering runners.

Example
-------
>>> from lens_halluc.generation import caption, Sampling, Beams      # doctest: +SKIP
>>> caps = caption(vlm, ds, max_new_tokens=40)                      # doctest: +SKIP
>>> caps = caption(vlm, ds, max_new_tokens=40, sampling=Sampling(seed=1))   # doctest: +SKIP
>>> caps = caption(vlm, ds, max_new_tokens=40, sampling=Beams(num_beams=5))  # doctest: +SKIP
"""
from .decoding import (BeamHook, BeamState, Branch, DecodeOutput, DecodingStrategy, decode, greedy_decode,
                       resolve_strategy)
from .jsonl import ResumableJsonl, read_jsonl
from .results import Answers, Captions
from .runner import answer, answer_questions, caption, caption_dataset, generate, load_image
from .sampling import Beams, Sampling, choice_label, resolve_choice, row_seed

__all__ = ["Answers", "BeamHook", "BeamState", "Beams", "Branch", "Captions", "DecodeOutput", "DecodingStrategy",
           "ResumableJsonl", "Sampling", "answer", "answer_questions", "caption", "caption_dataset", "choice_label",
           "decode", "generate", "greedy_decode", "load_image", "read_jsonl", "resolve_choice", "resolve_strategy",
           "row_seed"]
