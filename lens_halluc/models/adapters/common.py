"""Helpers the family adapters share: image-only processors, special-token ids, vision-encoder attention.

Example
-------
>>> from lens_halluc.models.adapters.common import tokens_to_ids
>>> tokens_to_ids("llava", processor, ["<image>"])                          # doctest: +SKIP
(32000,)
"""
from __future__ import annotations

import torch
from torch import nn

from .base import AdapterError, NotDefinedForArchitecture

__all__ = ["anyres_not_a_grid", "count_tokens", "ids_from_config", "register_image_only", "tokens_to_ids", "vision_encoder_attention"]


def register_image_only(cls: type) -> type:
    """Register the image-only processor class ``cls`` with ``AutoProcessor``, so a directory saved from
    it (``"processor_class": cls.__name__``) reloads with ``AutoProcessor.from_pretrained``.

    A string key, not the config class: real checkpoints keep resolving to the stock processor."""
    from transformers import AutoProcessor

    AutoProcessor.register(f"lens_halluc:{cls.__name__}", cls, exist_ok=True)
    return cls


def tokens_to_ids(family: str, processor, names) -> tuple[int, ...]:
    """Ids of the special tokens ``names`` in ``processor``'s tokenizer; raises :class:`AdapterError` for a
    token the tokenizer lacks (it would encode as ``<unk>``)."""
    tok = getattr(processor, "tokenizer", processor)
    vocab = tok.get_vocab()
    missing = [n for n in names if n not in vocab]
    if missing:
        raise AdapterError(f"{family}: the tokenizer lacks the image marker(s) {missing}.")
    return tuple(int(vocab[n]) for n in names)


def ids_from_config(family: str, model: nn.Module, attrs) -> tuple[int, ...]:
    """Structure-token ids stored on ``model.config`` under ``attrs`` (ints or lists of ints), for a model
    described without its processor; raises :class:`AdapterError` naming the fix when one is missing."""
    ids: list[int] = []
    for attr in attrs:
        value = getattr(model.config, attr, None)
        if value is None:
            raise AdapterError(
                f"{family}: the image-structure token ids are not in the model's config ({attr}); pass the "
                "processor (ModelSpec.from_model(model, processor), load_vlm does) so they are read from its tokenizer.")
        ids.extend(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    return tuple(ids)


def vision_encoder_attention(model: nn.Module) -> list[nn.Module]:
    """The ``self_attn`` of each layer of a CLIP/SigLIP vision tower at ``model.model.vision_tower``."""
    tower = getattr(getattr(model, "model", model), "vision_tower", None)
    encoder = getattr(getattr(tower, "vision_model", tower), "encoder", None)
    layers = getattr(encoder, "layers", None)
    if layers is None:
        raise AdapterError(f"{type(model).__name__}: no CLIP/SigLIP-style vision encoder layers at "
                           "model.vision_tower(.vision_model).encoder.layers.")
    return [layer.self_attn for layer in layers]


def count_tokens(ids: torch.Tensor, token_ids) -> int:
    """How many positions of ``ids`` hold one of ``token_ids``."""
    return int(torch.isin(ids, torch.as_tensor(list(token_ids), device=ids.device)).sum())


def anyres_not_a_grid(name: str) -> NotDefinedForArchitecture:
    return NotDefinedForArchitecture(
        f"{name}: anyres images are a base crop followed by an unpadded multi-crop grid with image_newline "
        "features at the end of each row (sizes depend on the image's aspect ratio), not one row-major patch "
        "grid; the confounder patch map is not defined for them.")
