"""Model spec: where the heads live in a LLaVA-family model, and what each token position is.

A :class:`ModelSpec` is derived from a loaded model (never from hard-coded offsets). It knows the
text decoder's layers, attention modules and ``o_proj`` (whose *input* is the concatenation of the
heads' outputs, head ``h`` at columns ``h*head_dim:(h+1)*head_dim``), and labels every position
of a batch as system / image / text / padding from ``input_ids == image_token_id``.

Example
-------
>>> spec = ModelSpec.from_model(model)                               # doctest: +SKIP
>>> spec.n_layers, spec.n_heads, spec.head_dim                       # doctest: +SKIP
(32, 32, 128)
>>> roles = spec.token_roles(enc["input_ids"], enc["attention_mask"])  # doctest: +SKIP
>>> (roles == TokenRole.IMAGE).sum(-1)                               # doctest: +SKIP
tensor([576, 576])
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Callable, Iterable

import torch
from torch import nn


class TokenRole(IntEnum):
    """Role of a token position. SYSTEM = before the first image token; TEXT = after it.

    Example
    -------
    >>> TokenRole.IMAGE, int(TokenRole.TEXT)
    (<TokenRole.IMAGE: 1>, 2)
    >>> roles = vlm.spec.token_roles(enc["input_ids"], enc["attention_mask"])   # doctest: +SKIP
    >>> (roles == TokenRole.IMAGE).sum(-1)                                       # doctest: +SKIP
    """

    SYSTEM = 0
    IMAGE = 1
    TEXT = 2
    PAD = 3


class SpecError(ValueError):
    """A model or input that the spec cannot describe; the message says what to do."""


def _language_model(model: nn.Module) -> nn.Module:
    """The text decoder stack (the module holding ``.layers``) of a VLM or a causal LM."""
    inner = getattr(model, "model", model)
    for candidate in (getattr(inner, "language_model", None), inner, getattr(model, "language_model", None)):
        if candidate is not None and isinstance(getattr(candidate, "layers", None), nn.ModuleList):
            return candidate
    raise SpecError(
        f"cannot find the text decoder layers of {type(model).__name__}: expected "
        "`model.model.language_model.layers` (LLaVA family in transformers v5) or `model.model.layers` "
        "(causal LM). Register a resolver with lens_halluc.models.spec.register_architecture()."
    )


# Architectures whose text decoder is not found by the default resolver map here.
_RESOLVERS: dict[str, Callable[[nn.Module], nn.Module]] = {}


def register_architecture(class_name: str, language_model: Callable[[nn.Module], nn.Module]) -> None:
    """Teach the spec where the text decoder (module with ``.layers``) of ``class_name`` is."""
    _RESOLVERS[class_name] = language_model


@dataclass(frozen=True)
class ModelSpec:
    """Sizes and module locations of a model's text decoder.

    Example
    -------
    >>> spec = ModelSpec.from_model(vlm.model)                 # doctest: +SKIP
    >>> spec.n_layers, spec.n_heads, spec.head_dim             # doctest: +SKIP
    (32, 32, 128)

    Attributes
    ----------
    architecture : model class name, e.g. ``"LlavaForConditionalGeneration"``.
    n_layers, n_heads, n_kv_heads, head_dim, hidden_size, vocab_size : text-tower sizes.
    image_token_id : id of the image token (None for a text-only causal LM).
    pad_token_id : padding id (may be None).
    eos_token_ids : ids that end generation.
    """

    architecture: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    image_token_id: int | None
    pad_token_id: int | None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(cls, model: nn.Module) -> "ModelSpec":
        """Read the spec off a loaded model (VLM or causal LM)."""
        cfg = model.config
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        lm = cls._resolve_lm(model)
        n_heads = int(text.num_attention_heads)
        hidden = int(text.hidden_size)
        head_dim = int(getattr(text, "head_dim", None) or hidden // n_heads)
        attn = lm.layers[0].self_attn
        if not isinstance(getattr(attn, "o_proj", None), nn.Linear):
            raise SpecError(f"{type(model).__name__}: attention has no `o_proj` Linear; head outputs cannot be located.")
        if attn.o_proj.in_features != n_heads * head_dim:
            raise SpecError(f"o_proj takes {attn.o_proj.in_features} inputs, not heads × head_dim = {n_heads * head_dim}.")
        gen = getattr(model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        if eos is None:
            eos = getattr(text, "eos_token_id", None)
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        pad = getattr(text, "pad_token_id", None)
        if pad is None:
            pad = getattr(cfg, "pad_token_id", None)
        return cls(
            architecture=type(model).__name__,
            n_layers=len(lm.layers),
            n_heads=n_heads,
            n_kv_heads=int(getattr(text, "num_key_value_heads", None) or n_heads),
            head_dim=head_dim,
            hidden_size=hidden,
            vocab_size=int(text.vocab_size),
            image_token_id=getattr(cfg, "image_token_id", None) or getattr(cfg, "image_token_index", None),
            pad_token_id=pad,
            eos_token_ids=tuple(int(e) for e in eos_ids),
        )

    @staticmethod
    def _resolve_lm(model: nn.Module) -> nn.Module:
        resolver = _RESOLVERS.get(type(model).__name__)
        return resolver(model) if resolver is not None else _language_model(model)

    # ------------------------------------------------------------------ modules
    def language_model(self, model: nn.Module) -> nn.Module:
        """The decoder stack (``.layers``, ``.norm``) of ``model``."""
        return self._resolve_lm(model)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return self._resolve_lm(model).layers

    def attention(self, model: nn.Module, layer: int) -> nn.Module:
        """``self_attn`` of decoder layer ``layer``."""
        self.check_layer(layer)
        return self.layers(model)[layer].self_attn

    def o_proj(self, model: nn.Module, layer: int) -> nn.Linear:
        """The output projection whose input holds the heads' outputs side by side."""
        return self.attention(model, layer).o_proj

    def head_slice(self, head: int) -> slice:
        """Columns of the ``o_proj`` input that carry head ``head``'s output."""
        self.check_head(0, head)
        return slice(head * self.head_dim, (head + 1) * self.head_dim)

    @property
    def n_total_heads(self) -> int:
        return self.n_layers * self.n_heads

    # ------------------------------------------------------------------ validation
    def check_layer(self, layer: int) -> None:
        if not 0 <= int(layer) < self.n_layers:
            raise SpecError(f"layer {layer} out of range: the model has layers 0..{self.n_layers - 1}.")

    def check_head(self, layer: int, head: int) -> None:
        self.check_layer(layer)
        if not 0 <= int(head) < self.n_heads:
            raise SpecError(f"head {head} out of range: layer {layer} has heads 0..{self.n_heads - 1}.")

    def check_heads(self, heads: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
        """Validate and normalise a list of (layer, head) pairs."""
        out = []
        for pair in heads:
            try:
                layer, head = (int(v) for v in pair)
            except (TypeError, ValueError) as e:
                raise SpecError(f"a head must be a (layer, head) pair of ints, got {pair!r}.") from e
            self.check_head(layer, head)
            out.append((layer, head))
        return out

    # ------------------------------------------------------------------ token roles
    def token_roles(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Role of every position: a LongTensor ``[batch, seq]`` of :class:`TokenRole` values.

        SYSTEM: non-padding positions before the row's first image token; IMAGE: image tokens;
        TEXT: non-image positions after the first image token (instruction, "ASSISTANT:",
        generated caption); PAD: ``attention_mask == 0``. Works with left or right padding.
        Raises :class:`SpecError` for a row without an image token.
        """
        if self.image_token_id is None:
            raise SpecError("this model has no image token id (a text-only LM); token roles need a VLM.")
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
            attention_mask = attention_mask[None] if attention_mask is not None else None
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        is_image = input_ids == self.image_token_id
        has_image = is_image.any(-1)
        if not bool(has_image.all()):
            rows = torch.nonzero(~has_image).flatten().tolist()
            raise SpecError(
                f"input row(s) {rows} contain no image token (id {self.image_token_id}). Format prompts with a "
                "template that includes '<image>' (lens_halluc.models.prompts) and pass them through the processor."
            )
        after_first = is_image.long().cumsum(-1) > 0
        roles = torch.full_like(input_ids, int(TokenRole.SYSTEM))
        roles[after_first] = int(TokenRole.TEXT)
        roles[is_image] = int(TokenRole.IMAGE)
        roles[attention_mask == 0] = int(TokenRole.PAD)
        return roles
