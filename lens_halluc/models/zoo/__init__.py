"""Tiny random models of every supported VLM family, built from configs, with a processor that works offline.

One module per family (``lens_halluc/models/zoo/<family>.py``) defines ``make(seed=0) -> (model,
processor)``: a genuine transformers model of the family (float32, eval mode, a few layers, small
images, random weights with a scaled LM head so greedy decoding is decisive) and its processor
(word-level tokenizer, the family's special tokens, a chat template; constructible without
torchvision). Tests and ``bench/`` build them; nothing is downloaded.

Example
-------
>>> from lens_halluc.models.zoo import FAMILIES, make_tiny, save_tiny
>>> "qwen2_vl" in FAMILIES
True
>>> model, processor = make_tiny("llava")                             # doctest: +SKIP
>>> path = save_tiny("qwen2_vl", "/tmp/tiny-qwen2-vl")                 # doctest: +SKIP
"""
from __future__ import annotations

import importlib
from pathlib import Path

__all__ = ["FAMILIES", "make_tiny", "save_tiny", "family_module"]

#: The families lens_halluc supports, in the README's order (each has a module here and an adapter).
FAMILIES: tuple[str, ...] = (
    "llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3", "paligemma",
    "paligemma2", "idefics3", "smolvlm", "internvl", "mistral3", "chameleon", "mllama",
)


def family_module(family: str):
    """The zoo module of ``family`` (raises ``KeyError`` listing the known families)."""
    if family not in FAMILIES:
        raise KeyError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}.")
    return importlib.import_module(f"{__name__}.{family}")


def make_tiny(family: str, seed: int = 0, **kwargs):
    """``(model, processor)``: a tiny random model of ``family`` (deterministic given ``seed``)."""
    return family_module(family).make(seed=seed, **kwargs)


def save_tiny(family: str, out_dir: str | Path, seed: int = 0, **kwargs) -> Path:
    """Build :func:`make_tiny` and save model (safetensors) and processor to ``out_dir``; returns the path."""
    out = Path(out_dir)
    model, processor = make_tiny(family, seed=seed, **kwargs)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
