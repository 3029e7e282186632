"""Greedy decoding with pluggable strategies; every forward branch keeps its own KV cache.

Contrastive methods (VCD, CausalMM, SEED, DoLa...) need the logits of extra forward passes on
modified inputs or under modified attention. A :class:`DecodingStrategy` declares those as
:class:`Branch` es; :func:`greedy_decode` prefills each branch separately, steps each with its own
cache (the reference CausalMM shared one cache, so its contrast acted on the first token only)
and lets the strategy combine the next-token logits.

Example
-------
>>> enc = vlm.encode(images, prompts)                                          # doctest: +SKIP
>>> out = greedy_decode(vlm.model, enc, max_new_tokens=32, eos_token_ids=vlm.spec.eos_token_ids)  # doctest: +SKIP
>>> out.sequences.shape   # [batch, n_new]                                    # doctest: +SKIP
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from ..models.compat import cache_kwargs


def _identity(inputs: dict) -> dict:
    return inputs


@dataclass
class Branch:
    """An extra forward branch: a transform of the prefill inputs and a context active during its forwards.

    ``inputs`` maps the prefill model inputs (``input_ids``, ``attention_mask``, ``pixel_values``...)
    to this branch's (e.g. diffusion-noised ``pixel_values``). ``context`` returns a context manager
    entered around each of this branch's forwards (e.g. counterfactual attention hooks).
    """

    name: str
    inputs: Callable[[dict], dict] = _identity
    context: Callable[[], AbstractContextManager] = nullcontext


class DecodingStrategy:
    """Plain greedy decoding; subclasses add branches and a logit combination.

    Override :meth:`branches`, :meth:`combine` and optionally :meth:`context` (active during the
    main branch's forwards, for static interventions such as head ablation).
    """

    name = "greedy"
    sampling = None
    """The token choice this strategy's reference uses when the caller chooses none: ``None`` (argmax) or a
    :class:`~lens_halluc.generation.sampling.Sampling` (VCD and CausalMM sample in their reference code)."""

    def branches(self) -> Sequence[Branch]:
        """Extra branches to run beside the main one (none for greedy)."""
        return ()

    def context(self) -> AbstractContextManager:
        """Context entered around every main-branch forward."""
        return nullcontext()

    def combine(self, logits: torch.Tensor, branch_logits: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Next-token scores ``[batch, vocab]`` from the main logits and each branch's ``[batch, vocab]``."""
        return logits

    def begin(self, inputs: dict) -> None:
        """Called once per batch before prefill (e.g. to sample noise with a seed)."""

    def session(self) -> AbstractContextManager:
        """Context entered once around a whole decoding call (e.g. switching to the editable attention)."""
        return nullcontext()


def resolve_strategy(strategy, vlm) -> DecodingStrategy | None:
    """The :class:`DecodingStrategy` that ``strategy`` stands for on ``vlm``.

    ``None`` → ``None`` (plain greedy); a :class:`DecodingStrategy` → itself; an intervention (any
    object with ``bind(vlm)``, e.g. ``lens_halluc.ADHH(heads)``) → ``strategy.bind(vlm)``. Anything
    else raises ``TypeError``.

    Example
    -------
    >>> resolve_strategy(None, vlm=None) is None
    True
    """
    if strategy is None or isinstance(strategy, DecodingStrategy):
        return strategy
    bind = getattr(strategy, "bind", None)
    if callable(bind):
        bound = bind(vlm)
        if bound is not None and not isinstance(bound, DecodingStrategy):
            raise TypeError(f"{type(strategy).__name__}.bind() returned {type(bound).__name__}, not a DecodingStrategy.")
        return bound
    raise TypeError(f"strategy must be None, a DecodingStrategy or an intervention with bind(vlm) "
                    f"(e.g. lens_halluc.ADHH(heads)), got {type(strategy).__name__}.")


@dataclass
class DecodeOutput:
    """Generated tokens. ``sequences`` is ``[batch, n_new]`` (pad after EOS); ``lengths`` excludes EOS."""

    sequences: torch.Tensor
    lengths: list[int]
    finished: list[bool] = field(default_factory=list)

    def tokens(self, row: int) -> list[int]:
        """Generated ids of ``row`` without EOS and padding."""
        return self.sequences[row, : self.lengths[row]].tolist()


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    # Left padding: positions count only real tokens, so a padded row sees the same positions as unpadded.
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def greedy_decode(
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    max_new_tokens: int = 128,
    strategy: DecodingStrategy | None = None,
    eos_token_ids: Sequence[int] = (),
    pad_token_id: int = 0,
) -> DecodeOutput:
    """Greedy decoding of a left-padded batch, with an optional decoding strategy.

    Parameters
    ----------
    model : a VLM (``LlavaForConditionalGeneration``-like) or causal LM.
    inputs : processor output with ``input_ids`` and ``attention_mask`` ``[B, T]`` (left-padded)
        and, for a VLM, ``pixel_values``.
    max_new_tokens : maximum number of generated tokens per row.
    strategy : a :class:`DecodingStrategy`; None means plain greedy.
    eos_token_ids : ids that finish a row (EOS is not counted in ``lengths``).
    """
    strategy = strategy or DecodingStrategy()
    if not isinstance(strategy, DecodingStrategy):
        raise TypeError(f"greedy_decode needs a bound DecodingStrategy, got {type(strategy).__name__}: pass "
                        "strategy.bind(vlm), or give the intervention to caption()/answer(), which bind it.")
    with strategy.session():
        return _decode(model, inputs, max_new_tokens, strategy, eos_token_ids, pad_token_id)


def _decode(model: nn.Module, inputs: Mapping[str, torch.Tensor], max_new_tokens: int, strategy: DecodingStrategy,
            eos_token_ids: Sequence[int], pad_token_id: int) -> DecodeOutput:
    from transformers import DynamicCache

    inputs = dict(inputs)
    strategy.begin(inputs)
    attention_mask = inputs["attention_mask"]
    batch = attention_mask.shape[0]
    device = attention_mask.device
    positions = _position_ids(attention_mask)
    branches = [Branch("main", _identity, strategy.context)] + list(strategy.branches())
    if len({b.name for b in branches}) != len(branches):
        raise ValueError(f"branch names must be unique, got {[b.name for b in branches]}.")

    caches: dict[str, object] = {}
    logits: dict[str, torch.Tensor] = {}
    for br in branches:
        caches[br.name] = DynamicCache()  # one cache per branch, never shared
        with br.context():
            out = model(**br.inputs(dict(inputs)), position_ids=positions, **cache_kwargs(model, caches[br.name]),
                        use_cache=True)
        logits[br.name] = out.logits[:, -1].float()

    eos = torch.tensor(list(eos_token_ids) or [-1], device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch, dtype=torch.long, device=device)
    generated: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        scores = strategy.combine(logits["main"], {k: v for k, v in logits.items() if k != "main"})
        next_token = scores.argmax(-1)
        next_token = torch.where(finished, torch.full_like(next_token, pad_token_id), next_token)
        generated.append(next_token)
        is_eos = torch.isin(next_token, eos) & ~finished
        lengths += (~finished & ~is_eos).long()
        finished |= is_eos
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
        for br in branches:
            with br.context():
                out = model(input_ids=next_token[:, None], attention_mask=attention_mask, position_ids=positions,
                            **cache_kwargs(model, caches[br.name]), use_cache=True)
            logits[br.name] = out.logits[:, -1].float()
    sequences = torch.stack(generated, dim=1) if generated else torch.empty(batch, 0, dtype=torch.long, device=device)
    return DecodeOutput(sequences=sequences.cpu(), lengths=lengths.tolist(), finished=finished.tolist())
