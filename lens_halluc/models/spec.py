"""Model spec: where the heads live in a VLM, and what each token position is.

A :class:`ModelSpec` is derived from a loaded model (never from hard-coded offsets) through its
family's adapter (:mod:`lens_halluc.models.adapters`). It knows the text decoder's layers, each
layer's attention module (self- or cross-attention) and ``o_proj`` (whose *input* is the
concatenation of the heads' outputs, head ``h`` at columns ``h*head_dim:(h+1)*head_dim``), and
labels every position of a batch as system / image / image structure / text / padding from the
adapter's image and structure token ids.

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

from dataclasses import dataclass, field, fields
from enum import IntEnum
from typing import Any, Iterable

import torch
from torch import nn


class TokenRole(IntEnum):
    """Role of a token position. SYSTEM = before the first image token; TEXT = after it;
    IMAGE_STRUCTURE = separators and markers inside or around the image (``[IMG_BREAK]``,
    ``<fake_token_around_image>``, ``<row_1_col_1>``, ``<|vision_start|>``...), neither image nor text.

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
    IMAGE_STRUCTURE = 4


class SpecError(ValueError):
    """A model or input that the spec cannot describe; the message says what to do."""


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
    image_token_ids : ids of every token that holds image features (the adapter's).
    structure_token_ids : ids of the image-structure tokens (separators, markers).
    attention_kinds : ``"self"`` or ``"cross"`` per layer.
    adapter : the family's :class:`~lens_halluc.models.adapters.Adapter`.
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
    image_token_ids: tuple[int, ...] = ()
    structure_token_ids: tuple[int, ...] = ()
    attention_kinds: tuple[str, ...] = ()
    adapter: Any = field(default=None, compare=False, repr=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(cls, model: nn.Module, processor=None) -> "ModelSpec":
        """Read the spec off a loaded model (VLM or causal LM) through its family's adapter.

        ``processor`` (optional) lets the adapter read structure-token ids from the tokenizer."""
        from .adapters import AdapterError, adapter_for

        try:
            adapter = adapter_for(model)
        except AdapterError as e:
            raise SpecError(str(e)) from None
        cfg = model.config
        text = adapter.text_config(cfg)
        try:
            layers = adapter.layers(model)
        except AdapterError as e:
            raise SpecError(str(e)) from None
        n_heads = int(text.num_attention_heads)
        hidden = int(text.hidden_size)
        head_dim = int(getattr(text, "head_dim", None) or hidden // n_heads)
        kinds = []
        for layer in range(len(layers)):
            try:
                proj = adapter.o_proj(model, layer)
            except AdapterError as e:
                raise SpecError(str(e)) from None
            if proj.in_features != n_heads * head_dim:
                raise SpecError(f"layer {layer}: o_proj takes {proj.in_features} inputs, not heads × head_dim = "
                                f"{n_heads * head_dim}; the {adapter.name!r} adapter must give this layer's sizes.")
            kinds.append(adapter.attention_kind(model, layer))
        gen = getattr(model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        if eos is None:
            eos = getattr(text, "eos_token_id", None)
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        pad = getattr(text, "pad_token_id", None)
        if pad is None:
            pad = getattr(cfg, "pad_token_id", None)
        if adapter.name == "causal_lm":
            image_ids, structure = (), ()
        else:
            try:
                image_ids = tuple(int(i) for i in adapter.image_token_ids(model, processor))
                structure = tuple(int(i) for i in adapter.structure_token_ids(model, processor))
            except AdapterError as e:
                raise SpecError(str(e)) from None
        return cls(
            architecture=type(model).__name__,
            n_layers=len(layers),
            n_heads=n_heads,
            n_kv_heads=int(getattr(text, "num_key_value_heads", None) or n_heads),
            head_dim=head_dim,
            hidden_size=hidden,
            vocab_size=int(text.vocab_size),
            image_token_id=image_ids[0] if image_ids else None,
            pad_token_id=pad,
            eos_token_ids=tuple(int(e) for e in eos_ids),
            image_token_ids=image_ids,
            structure_token_ids=structure,
            attention_kinds=tuple(kinds),
            adapter=adapter,
        )

    def to_dict(self) -> dict:
        """JSON-ready fields (the adapter by its name).

        Example
        -------
        >>> vlm.spec.to_dict()["adapter"]                           # doctest: +SKIP
        'llava'
        """
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "adapter"}
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}
        out["adapter"] = getattr(self.adapter, "name", None)
        return out

    # ------------------------------------------------------------------ modules
    def language_model(self, model: nn.Module) -> nn.Module:
        """The decoder stack (``.layers``, ``.norm``) of ``model``."""
        return self.adapter.language_model(model)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return self.adapter.layers(model)

    def attention(self, model: nn.Module, layer: int) -> nn.Module:
        """Decoder layer ``layer``'s attention module (``self_attn``, or ``cross_attn`` on a cross-attention layer)."""
        self.check_layer(layer)
        return self.adapter.attention(model, layer)

    def o_proj(self, model: nn.Module, layer: int) -> nn.Linear:
        """The output projection whose input holds the heads' outputs side by side."""
        self.check_layer(layer)
        return self.adapter.o_proj(model, layer)

    def logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from the last decoder layer's output, as the model computes them (final norm, LM head,
        soft-capping or token suppression: :meth:`Adapter.logits`)."""
        return self.adapter.logits(model, hidden)

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

        SYSTEM: non-padding positions before the row's first image (or image-structure) token; IMAGE:
        image tokens; IMAGE_STRUCTURE: separators and markers of the image; TEXT: the other positions
        after the first image token (instruction, "ASSISTANT:", generated caption); PAD:
        ``attention_mask == 0``. Works with left or right padding.
        Raises :class:`SpecError` for a row without an image token.
        """
        if not self.image_token_ids:
            raise SpecError("this model has no image token id (a text-only LM); token roles need a VLM.")
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
            attention_mask = attention_mask[None] if attention_mask is not None else None
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        image_ids = torch.tensor(self.image_token_ids, device=input_ids.device)
        is_image = torch.isin(input_ids, image_ids)
        is_structure = (torch.isin(input_ids, torch.tensor(self.structure_token_ids, device=input_ids.device))
                        if self.structure_token_ids else torch.zeros_like(is_image))
        has_image = is_image.any(-1)
        if not bool(has_image.all()):
            rows = torch.nonzero(~has_image).flatten().tolist()
            raise SpecError(
                f"input row(s) {rows} contain no image token (ids {list(self.image_token_ids)}). Format prompts with the "
                "model's template (its image placeholder) and pass them through the processor."
            )
        after_first = (is_image | is_structure).long().cumsum(-1) > 0
        roles = torch.full_like(input_ids, int(TokenRole.SYSTEM))
        roles[after_first] = int(TokenRole.TEXT)
        roles[is_image] = int(TokenRole.IMAGE)
        roles[is_structure] = int(TokenRole.IMAGE_STRUCTURE)
        roles[attention_mask == 0] = int(TokenRole.PAD)
        return roles
