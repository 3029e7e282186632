"""Greedy generation with decoding strategies (own KV cache per branch), and resumable runners."""
from .decoding import Branch, DecodeOutput, DecodingStrategy, greedy_decode, resolve_strategy
from .jsonl import ResumableJsonl, read_jsonl
from .runner import answer_questions, caption_dataset, generate, load_image

__all__ = ["Branch", "DecodeOutput", "DecodingStrategy", "ResumableJsonl", "answer_questions", "caption_dataset",
           "generate", "greedy_decode", "load_image", "read_jsonl", "resolve_strategy"]
