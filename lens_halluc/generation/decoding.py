"""The one decoding loop: pluggable strategies × token choices (argmax, sampling, beam search).

Contrastive methods (VCD, CausalMM, SEED, DoLa...) need the logits of extra forward passes on
modified inputs or under modified attention. A :class:`DecodingStrategy` declares those as
:class:`Branch` es; :func:`decode` prefills each branch separately, steps each with its own
cache (the reference CausalMM shared one cache, so its contrast acted on the first token only)
and lets the strategy combine the next-token logits. Every branch steps its model the way
``model.generate`` does, through the model's adapter (``Adapter.generation_*`` hooks, which default to
the model's own ``prepare_inputs_for_generation`` / ``_update_model_kwargs_for_generation``): positions
are the model's (M-RoPE for Qwen-VL, computed once per branch from its prompt and stepped on all
axes), image inputs go in at prefill only, per-token inputs (``token_type_ids``,
``mm_token_type_ids``, Mllama's ``cross_attention_mask``) extend per step. The token is then chosen
from the combined scores by the *token choice* (``sampling=``, see :mod:`lens_halluc.generation.sampling`):

* ``"strategy"`` (default): the strategy's ``sampling`` attribute (``None`` = argmax);
* ``None``: argmax (greedy), token for token what ``model.generate(do_sample=False)`` gives;
* :class:`~lens_halluc.generation.sampling.Sampling`: seeded multinomial after temperature /
  top-k / top-p (one CPU generator for the batch, or one per row with ``generators=``);
* :class:`~lens_halluc.generation.sampling.Beams`: beam search; the batch is expanded to
  ``batch × num_beams`` rows (row ``b·k + j`` is beam ``j`` of item ``b``) in every branch, each
  branch's cache is reordered by the chosen parent beams after every step, and ``combine()``
  receives ``[batch·num_beams, vocab]`` logits. The selection and stopping rules are those of
  ``model.generate(num_beams=k, do_sample=False)`` (transformers 5), token for token.

Beam-search extension point (OPERA, HALC's visual-matching beam search): a strategy may return a
:class:`BeamHook` from :meth:`DecodingStrategy.beam_hook`. At every step the loop

1. runs the forwards (with ``output_attentions=True`` on the main branch when
   ``hook.output_attentions``; the strategy's :meth:`~DecodingStrategy.session` must then select an
   attention implementation that returns weights, e.g. ``eager``),
2. calls ``hook.adjust(scores, state)`` on the combined scores ``[rows, vocab]`` *before*
   ``log_softmax`` (return the adjusted scores: a per-beam penalty on candidate tokens, ``-inf`` on
   rejected ones); ``state`` is a :class:`BeamState` with the running sequences, beam scores,
   the main branch's attentions of the newest token of every beam, and :meth:`BeamState.probe`
   to run one look-ahead forward per candidate token without changing the caches,
3. selects the beams, reorders the caches, and calls ``hook.rollback(state)``: returning a step
   ``s`` (``0 <= s <= state.step``) restores the beams as they were before token ``s`` was chosen
   and rebuilds every branch's cache from the prompt and those beams' tokens; the hook keeps its
   own memory (e.g. which tokens to reject at ``s``) and applies it in its next ``adjust``.

Example
-------
>>> enc = vlm.encode(images, prompts)                                          # doctest: +SKIP
>>> out = decode(vlm.model, enc, max_new_tokens=32, eos_token_ids=vlm.spec.eos_token_ids)  # doctest: +SKIP
>>> out.sequences.shape   # [batch, n_new]                                    # doctest: +SKIP
>>> out = decode(vlm.model, enc, 32, sampling=Sampling(temperature=1.0, seed=0))  # doctest: +SKIP
>>> out = decode(vlm.model, enc, 32, sampling=Beams(num_beams=5))              # doctest: +SKIP
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ..models.adapters import Adapter, adapter_for
from ..models.compat import cache_from_output, cache_keyword, cache_kwargs
from .sampling import STRATEGY_CHOICE, Beams, Sampling, resolve_choice, row_generators

__all__ = ["BeamHook", "BeamState", "Branch", "DecodeOutput", "DecodingStrategy", "decode", "greedy_decode",
           "resolve_strategy"]


def _identity(inputs: dict) -> dict:
    return inputs


@dataclass
class Branch:
    """An extra forward branch: a transform of the prefill inputs and a context active during its forwards.

    ``inputs`` maps the prefill model inputs (``input_ids``, ``attention_mask``, ``pixel_values``...)
    to this branch's (e.g. diffusion-noised ``pixel_values``). ``context`` returns a context manager
    entered around each of this branch's forwards (e.g. counterfactual attention hooks).
    Under beam search ``inputs`` still sees the ``[batch]`` inputs; the loop expands its result.
    """

    name: str
    inputs: Callable[[dict], dict] = _identity
    context: Callable[[], AbstractContextManager] = nullcontext


class DecodingStrategy:
    """Plain greedy decoding; subclasses add branches and a logit combination.

    Override :meth:`branches`, :meth:`combine` and optionally :meth:`context` (active during the
    main branch's forwards, for static interventions such as head ablation).

    Rows: :meth:`begin` and each :class:`Branch`'s ``inputs`` see the ``[batch]`` prefill inputs;
    under beam search the forwards, contexts and :meth:`combine` see ``batch × num_beams`` rows,
    the beams of an item contiguous (row ``b·k + j``).
    """

    name = "greedy"
    sampling = None
    """The token choice this strategy's reference uses when the caller chooses none (``sampling="strategy"``):
    ``None`` (argmax), a :class:`~lens_halluc.generation.sampling.Sampling` (VCD and CausalMM sample in their
    reference code) or a :class:`~lens_halluc.generation.sampling.Beams` (OPERA)."""
    row_keys = None
    """The items' keys (image ids / question ids, one per ``[batch]`` row) during a ``decode(..., keys=)``
    call, else ``None``. Set by :func:`decode` before :meth:`begin` and reset after the call; a strategy
    that draws random numbers per batch (VCD / SEED noise, CausalMM's random maps) seeds each row's from
    ``row_seed(seed, key)`` with them, so a row's draw does not depend on its batch (the runners pass
    them), and draws as before from one generator when they are ``None`` (a direct ``decode``)."""

    def branches(self) -> Sequence[Branch]:
        """Extra branches to run beside the main one (none for greedy)."""
        return ()

    def context(self) -> AbstractContextManager:
        """Context entered around every main-branch forward."""
        return nullcontext()

    def combine(self, logits: torch.Tensor, branch_logits: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Next-token scores ``[rows, vocab]`` from the main logits and each branch's ``[rows, vocab]``."""
        return logits

    def begin(self, inputs: dict) -> None:
        """Called once per batch before prefill (e.g. to sample noise with a seed; per row with :attr:`row_keys`)."""

    def session(self) -> AbstractContextManager:
        """Context entered once around a whole decoding call (e.g. switching to the editable attention)."""
        return nullcontext()

    def beam_hook(self) -> "BeamHook | None":
        """The :class:`BeamHook` beam search consults (``None``: plain beam search). Ignored by argmax/sampling."""
        return None


class BeamHook:
    """Extension point of beam search: see the module docstring. Every method's default does nothing.

    ``output_attentions``: ask the main branch's forwards for attention weights; they reach
    :meth:`adjust` as ``state.attentions`` (one ``[rows, heads, q, keys]`` tensor per layer, ``q = 1``
    after the prefill), the rows already in the current beams' order.
    """

    output_attentions: bool = False

    def start(self, state: "BeamState") -> None:
        """Called once after the prefill (``state.step == 0``)."""

    def adjust(self, scores: torch.Tensor, state: "BeamState") -> torch.Tensor:
        """Scores ``[rows, vocab]`` (the strategy's combined scores, before ``log_softmax``), adjusted per beam."""
        return scores

    def rollback(self, state: "BeamState") -> int | None:
        """After step ``state.step`` chose its tokens: a step ``s`` to go back to (redo from token ``s``), or None."""
        return None


@dataclass
class BeamState:
    """What a :class:`BeamHook` sees at one beam-search step.

    ``step``: index of the token being chosen (0 = first generated token). ``sequences``: the
    running beams' generated tokens ``[rows, step]``. ``beam_scores``: their summed log-probabilities
    ``[rows]``. ``logits``: each branch's next-token logits ``[rows, vocab]``. ``attentions``: the
    main branch's attention weights of the last forward (or None). ``prompt_length``: the padded
    prompt length (key positions ``< prompt_length`` are the prompt, image included).
    """

    step: int
    batch_size: int
    num_beams: int
    sequences: torch.Tensor
    beam_scores: torch.Tensor
    logits: dict
    attentions: tuple | None
    prompt_length: int
    _probe: Callable[[torch.Tensor], list] | None = None

    def probe(self, tokens: torch.Tensor) -> list:
        """Look-ahead forwards of the main branch: ``tokens`` ``[rows, n]`` → ``n`` model outputs.

        Output ``i`` is the main branch's forward (``logits``; ``attentions`` when the hook asked for
        them) on candidate ``tokens[:, i]`` appended to every beam; the caches are left as they were.
        """
        if self._probe is None:
            raise RuntimeError("BeamState.probe is only available inside a beam-search step.")
        return self._probe(tokens)


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
    """Generated tokens. ``sequences`` is ``[batch, n_new]`` (pad after EOS); ``lengths`` excludes EOS.

    ``scores``: under beam search, each returned hypothesis' length-normalised score (else None).
    """

    sequences: torch.Tensor
    lengths: list[int]
    finished: list[bool] = field(default_factory=list)
    scores: list[float] | None = None

    def tokens(self, row: int) -> list[int]:
        """Generated ids of ``row`` without EOS and padding."""
        return self.sequences[row, : self.lengths[row]].tolist()


@torch.no_grad()
def decode(
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    max_new_tokens: int = 128,
    strategy: DecodingStrategy | None = None,
    eos_token_ids: Sequence[int] = (),
    pad_token_id: int = 0,
    sampling: Any = STRATEGY_CHOICE,
    generators: torch.Generator | Sequence[torch.Generator] | None = None,
    keys: Sequence[Any] | None = None,
) -> DecodeOutput:
    """Decode a left-padded batch with an optional strategy and a token choice.

    Parameters
    ----------
    model : a VLM of any family with an adapter (:mod:`lens_halluc.models.adapters`) or a causal LM.
    inputs : the whole processor output (``vlm.encode``): ``input_ids`` and ``attention_mask``
        ``[B, T]`` (left-padded) and every image / per-token input (``pixel_values``, ``image_sizes``,
        ``image_grid_thw``, ``mm_token_type_ids``, ``token_type_ids``, ``cross_attention_mask`` ...);
        the model's adapter keeps what its forward takes (``Adapter.model_inputs``). Positions and
        per-step inputs are left to the model as ``model.generate`` leaves them (M-RoPE positions
        computed once from the prompt and stepped on every axis, per branch; image inputs at prefill
        only; per-token inputs extended per step): see ``Adapter.generation_inputs``.
    max_new_tokens : maximum number of generated tokens per row.
    strategy : a :class:`DecodingStrategy`; None means plain decoding of the model's logits.
    eos_token_ids : ids that finish a row (EOS is not counted in ``lengths``).
    pad_token_id : written after a row's EOS.
    sampling : ``"strategy"`` (default: ``strategy.sampling``; argmax without a strategy), ``None``
        (argmax), a :class:`~lens_halluc.generation.sampling.Sampling` or a
        :class:`~lens_halluc.generation.sampling.Beams`.
    generators : for sampling, one CPU ``torch.Generator`` for the whole batch or one per row.
        Default: one generator seeded with ``sampling.seed`` (so a batch of one draws like
        ``torch.manual_seed(seed); model.generate(do_sample=True, ...)`` on CPU).
    keys : one key per row (image id, question id), as the runners pass them: the strategy sees them
        as ``strategy.row_keys`` during the call (VCD / SEED / CausalMM then draw each row's noise or
        random map from ``row_seed(seed, key)``), and, when sampling without ``generators``, row ``i``
        draws its tokens from a generator seeded with ``row_seed(sampling.seed, keys[i])``. A row's
        output then does not depend on the rest of its batch. Default None: one draw for the batch.

    Example
    -------
    >>> enc = vlm.encode(images, prompts)                                                # doctest: +SKIP
    >>> out = decode(vlm.model, enc, 32, strategy=lh.VCD().bind(vlm), sampling=None)     # doctest: +SKIP
    >>> out.sequences.shape   # [batch, n_new]                                          # doctest: +SKIP
    """
    strategy = strategy or DecodingStrategy()
    if not isinstance(strategy, DecodingStrategy):
        raise TypeError(f"decode needs a bound DecodingStrategy, got {type(strategy).__name__}: pass "
                        "strategy.bind(vlm), or give the intervention to caption()/answer(), which bind it.")
    choice = resolve_choice(sampling, strategy)
    inputs = _model_inputs(model, inputs)  # the whole processor output in; what the forward takes out
    batch = int(inputs["attention_mask"].shape[0])
    if keys is not None:
        keys = list(keys)
        if len(keys) != batch:
            raise ValueError(f"decode: {len(keys)} keys for a batch of {batch} rows.")
    if isinstance(choice, Sampling):
        if generators is None and keys is not None:
            generators = row_generators(choice, keys)
        elif generators is None:
            generators = torch.Generator(device="cpu").manual_seed(choice.seed)
        elif not isinstance(generators, torch.Generator):
            generators = list(generators)
            if len(generators) != batch:
                raise ValueError(f"decode: {len(generators)} generators for a batch of {batch} rows.")
    previous_keys = strategy.row_keys
    strategy.row_keys = keys
    try:
        with strategy.session():
            if isinstance(choice, Beams):
                return _beam_decode(model, inputs, max_new_tokens, strategy, eos_token_ids, pad_token_id, choice)
            return _decode(model, inputs, max_new_tokens, strategy, eos_token_ids, pad_token_id, choice, generators)
    finally:
        strategy.row_keys = previous_keys


greedy_decode = decode
"""The former name of :func:`decode` (same function); with the default ``sampling="strategy"`` it is greedy
unless the strategy samples."""


def _branches(strategy: DecodingStrategy) -> list[Branch]:
    branches = [Branch("main", _identity, strategy.context)] + list(strategy.branches())
    if len({b.name for b in branches}) != len(branches):
        raise ValueError(f"branch names must be unique, got {[b.name for b in branches]}.")
    return branches


class _Stream:
    """One branch's decoding state, kept as ``model.generate`` keeps its ``model_kwargs``.

    The branch's prefill inputs go through its adapter's generation hooks once
    (:meth:`~lens_halluc.models.adapters.Adapter.generation_inputs`: positions computed from the
    whole prompt — M-RoPE's three axes for Qwen-VL —, images pre-encoded, rows expanded for beams),
    inside the branch's context. Each forward's inputs then come from
    :meth:`~lens_halluc.models.adapters.Adapter.generation_step_inputs` (the model's
    ``prepare_inputs_for_generation``: image inputs at prefill only, the new token's slice of every
    per-token input) and, before each new token, the kwargs are extended by
    :meth:`~lens_halluc.models.adapters.Adapter.generation_update` (``_update_model_kwargs_for_generation``:
    attention mask, every position axis + 1, ``token_type_ids``, ``mm_token_type_ids``, Mllama's
    ``cross_attention_mask``). Every stream has its own cache, never shared between branches.

    ``ids`` ``[rows, T + n]``: prompt and the tokens fed so far (row order follows :meth:`reorder`).
    """

    def __init__(self, model: nn.Module, adapter: Adapter, branch: Branch, inputs: Mapping[str, Any],
                 expand: int = 1, record_past: bool = False):
        self.model, self.adapter, self.branch, self.record_past = model, adapter, branch, record_past
        kw = dict(inputs)
        ids = kw.pop("input_ids")
        with branch.context():  # the images may be encoded here: the branch's vision hooks must see it
            self.prompt_ids, self.prompt_kwargs = adapter.generation_inputs(model, ids, kw, expand)
        self._mixin = adapter._has_generation_mixin(model)
        self.restart()

    @property
    def rows(self) -> int:
        return int(self.prompt_ids.shape[0])

    def restart(self) -> None:
        """Back to before the prefill, with a fresh cache."""
        self.ids = self.prompt_ids
        self.cache = self.adapter.generation_cache(self.model)
        if self.record_past and hasattr(self.cache, "activate_past_recording"):
            # look-ahead probes crop the cache; sliding-window layers must keep their past for that
            self.cache.activate_past_recording()
        self.kwargs = {**self.prompt_kwargs, **cache_kwargs(self.model, self.cache)}
        self._last = None

    def _forward(self, inputs: dict, extra: Mapping[str, Any]):
        if self._mixin:
            inputs = {**inputs, "return_dict": True}
        with self.branch.context():
            out = self.model(**inputs, **extra)
        # only the cache travels to the next update (not the logits / attentions of this forward)
        cache = cache_from_output(out)
        self._last = {cache_keyword(self.model): cache if cache is not None else self.cache}
        return out

    def prefill(self, **extra):
        """The prompt's forward (image inputs included); returns the model output."""
        inputs = self.adapter.generation_step_inputs(self.model, self.ids, self.kwargs, None, True)
        return self._forward(inputs, extra)

    def step(self, tokens: torch.Tensor, **extra):
        """Feed ``tokens`` ``[rows, n]`` (one forward); returns the model output."""
        n = int(tokens.shape[1])
        self.kwargs = self.adapter.generation_update(self.model, self._last, self.kwargs, n)
        self.ids = torch.cat([self.ids, tokens.to(self.ids.device, self.ids.dtype)], dim=1)
        inputs = self.adapter.generation_step_inputs(self.model, self.ids, self.kwargs, n, False)
        return self._forward(inputs, extra)

    def probe(self, tokens: torch.Tensor, **extra):
        """The output of feeding ``tokens`` ``[rows, 1]`` next, leaving the stream (cache included) as it was."""
        n0 = _lengths(self.cache)
        last = self._last
        kwargs = self.adapter.generation_update(self.model, last, self.kwargs, 1)
        ids = torch.cat([self.ids, tokens.to(self.ids.device, self.ids.dtype)], dim=1)
        inputs = self.adapter.generation_step_inputs(self.model, ids, kwargs, 1, False)
        try:
            return self._forward(inputs, extra)
        finally:
            self._last = last
            _crop(self.cache, n0)

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Rows follow their parent beams (``beam_idx`` ``[rows]``): cache and ids. The other per-row inputs
        are equal within an item's beams (same prompt; generated tokens all alike), as in ``generate``."""
        self.cache.reorder_cache(beam_idx)
        self.ids = self.ids[beam_idx.to(self.ids.device)]

    def rebuild(self, tokens: torch.Tensor | None, **extra):
        """A fresh cache from one prefill over the prompt and ``tokens`` ``[rows, n]`` (the beams so far):
        the kwargs are extended over the tokens first (positions on every axis, mask, per-token inputs), so
        the output (attentions included) covers prompt and tokens as queries."""
        self.restart()
        if tokens is not None and tokens.shape[1]:
            self.kwargs = self.adapter.generation_update(self.model, None, self.kwargs, int(tokens.shape[1]))
            self.ids = torch.cat([self.ids, tokens.to(self.ids.device, self.ids.dtype)], dim=1)
        return self.prefill(**extra)


def _streams(model: nn.Module, strategy: DecodingStrategy, inputs: dict, expand: int = 1,
             record_past: bool = False) -> list[_Stream]:
    """One :class:`_Stream` per branch (main first), each from the branch's transform of the ``[batch]`` inputs."""
    adapter = adapter_for(model)
    return [_Stream(model, adapter, br, br.inputs(dict(inputs)), expand=expand, record_past=record_past)
            for br in _branches(strategy)]


def _model_inputs(model: nn.Module, inputs: Mapping[str, Any]) -> dict:
    """The forward inputs among ``inputs`` (the whole processor output): the adapter's ``model_inputs``."""
    inputs = dict(inputs)
    if "input_ids" not in inputs:
        raise ValueError("decode needs input_ids in the inputs (the processor output of vlm.encode).")
    if "attention_mask" not in inputs or inputs["attention_mask"] is None:
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    return adapter_for(model).model_inputs(inputs)


def _decode(model: nn.Module, inputs: Mapping[str, torch.Tensor], max_new_tokens: int, strategy: DecodingStrategy,
            eos_token_ids: Sequence[int], pad_token_id: int, choice: Sampling | None = None,
            generators=None) -> DecodeOutput:
    inputs = dict(inputs)
    strategy.begin(inputs)
    attention_mask = inputs["attention_mask"]
    batch = attention_mask.shape[0]
    device = attention_mask.device
    streams = _streams(model, strategy, inputs)

    logits: dict[str, torch.Tensor] = {}
    for st in streams:
        logits[st.branch.name] = st.prefill().logits[:, -1].float()

    eos = torch.tensor(list(eos_token_ids) or [-1], device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch, dtype=torch.long, device=device)
    generated: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        scores = strategy.combine(logits["main"], {k: v for k, v in logits.items() if k != "main"})
        if choice is None:
            next_token = scores.argmax(-1)
        else:  # every row draws, finished or not (as model.generate does), so a row's stream is fixed
            next_token = choice.choose(scores, generators)
        next_token = torch.where(finished, torch.full_like(next_token, pad_token_id), next_token)
        generated.append(next_token)
        is_eos = torch.isin(next_token, eos) & ~finished
        lengths += (~finished & ~is_eos).long()
        finished |= is_eos
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        for st in streams:
            logits[st.branch.name] = st.step(next_token[:, None]).logits[:, -1].float()
    sequences = torch.stack(generated, dim=1) if generated else torch.empty(batch, 0, dtype=torch.long, device=device)
    return DecodeOutput(sequences=sequences.cpu(), lengths=lengths.tolist(), finished=finished.tolist())


# ---------------------------------------------------------------------------------- beam search
def _gather(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tensor[b, index[b, j], ...]`` for ``tensor`` ``[B, n, ...]`` and ``index`` ``[B, m]``."""
    while index.dim() < tensor.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(tensor, index, dim=1)


def _beam_decode(model: nn.Module, inputs: Mapping[str, torch.Tensor], max_new_tokens: int,
                 strategy: DecodingStrategy, eos_token_ids: Sequence[int], pad_token_id: int,
                 beams: Beams) -> DecodeOutput:
    """Beam search with the selection and stopping rules of transformers 5's ``_beam_search``.

    Per item: ``K = max(2, 1 + n_eos) · k`` best continuations of all beams by summed log-prob;
    those ending in EOS (or reaching the budget) among the first ``k`` become finished hypotheses
    (score / length ** length_penalty, kept if among the item's ``k`` best); the ``k`` best others
    continue. An item stops improving once the early-stopping heuristic says its best running beam
    cannot beat its worst finished hypothesis; the loop stops when no item can improve.
    """
    inputs = dict(inputs)
    strategy.begin(inputs)
    k, lp, es = beams.num_beams, float(beams.length_penalty), beams.early_stopping
    batch, prompt_length = inputs["attention_mask"].shape
    device = inputs["attention_mask"].device
    rows = batch * k
    hook = strategy.beam_hook()
    want_attn = bool(hook is not None and hook.output_attentions)
    # each branch's prefill inputs, transformed on the [batch] inputs and then expanded to [batch*k]
    streams = _streams(model, strategy, inputs, expand=k, record_past=hook is not None)
    main = streams[0]

    logits: dict[str, torch.Tensor] = {}
    attentions = None

    def extra(st: _Stream) -> dict:
        return {"output_attentions": True} if (want_attn and st is main) else {}

    def take(st: _Stream, out) -> None:
        nonlocal attentions
        logits[st.branch.name] = out.logits[:, -1].float()
        if st is main and want_attn:
            attentions = out.attentions

    def build_caches(tokens: torch.Tensor | None) -> None:
        """Fresh caches for every branch from the prompt (and ``tokens`` ``[rows, n]`` generated so far)."""
        for st in streams:  # one cache per branch, never shared; rows = beams
            take(st, st.rebuild(tokens, **extra(st)))

    build_caches(None)
    eos_list = list(eos_token_ids)
    eos = torch.tensor(eos_list or [-1], device=device)
    keep = max(2, 1 + len(eos_list)) * k
    top_mask = torch.cat([torch.ones(k, dtype=torch.bool), torch.zeros(keep - k, dtype=torch.bool)]).to(device)
    fill = pad_token_id
    running = torch.full((batch, k, max_new_tokens), fill, dtype=torch.long, device=device)
    running_scores = torch.zeros((batch, k), dtype=torch.float, device=device)
    running_scores[:, 1:] = -1e9  # only the first beam's continuations count at the first step
    done_seq = running.clone()
    done_scores = torch.full((batch, k), -1e9, dtype=torch.float, device=device)
    done_len = torch.zeros((batch, k), dtype=torch.long, device=device)
    is_done = torch.zeros((batch, k), dtype=torch.bool, device=device)
    improvable = torch.ones((batch, 1), dtype=torch.bool, device=device)
    offset = (torch.arange(batch, device=device) * k)[:, None]
    history: list[tuple] = []
    budget = 8 * max_new_tokens  # steps, rollbacks included: a hook cannot loop forever (then the best
    # finished hypothesis so far is returned, or the best running beam where none finished)

    def probe(tokens: torch.Tensor) -> list:
        return [main.probe(tokens[:, i: i + 1].to(device), **extra(main)) for i in range(tokens.shape[1])]

    def state(step: int) -> BeamState:
        return BeamState(step=step, batch_size=batch, num_beams=k, sequences=running[:, :, :step].reshape(rows, step),
                         beam_scores=running_scores.reshape(rows), logits=dict(logits), attentions=attentions,
                         prompt_length=int(prompt_length), _probe=probe)

    if hook is not None:
        hook.start(state(0))
    step = 0
    while step < max_new_tokens and budget > 0:
        budget -= 1
        if hook is not None:  # the beams before token `step` is chosen, for a rollback to it
            history[step:] = [(running.clone(), running_scores.clone(), done_seq.clone(), done_scores.clone(),
                               done_len.clone(), is_done.clone(), improvable.clone())]
        scores = strategy.combine(logits["main"], {n: v for n, v in logits.items() if n != "main"})
        if hook is not None:
            scores = hook.adjust(scores, state(step))
        log_probs = torch.log_softmax(scores.float(), dim=-1)
        vocab = log_probs.shape[-1]
        acc = (log_probs.view(batch, k, vocab) + running_scores[:, :, None]).reshape(batch, k * vocab)
        top_scores, top_index = torch.topk(acc, k=keep)
        parent = top_index // vocab
        token = top_index % vocab
        cand = _gather(running, parent)
        cand[:, :, step] = token
        hits = torch.isin(token, eos) | (step + 1 >= max_new_tokens)
        # the k best unfinished continuations run on
        run_scores = top_scores + hits.to(torch.float32) * -1.0e9
        nxt = torch.topk(run_scores, k=k)[1]
        running = _gather(cand, nxt)
        running_scores = _gather(run_scores, nxt)
        running_parent = _gather(parent, nxt)
        # finished hypotheses among the first k continuations replace worse ones
        just = hits & top_mask[None, :]
        fin_scores = top_scores / ((step + 1) ** lp)
        full = torch.all(is_done, dim=-1, keepdim=True) & (es is True)
        fin_scores += full.to(torch.float32) * -1.0e9
        fin_scores += (~improvable).to(torch.float32) * -1.0e9
        fin_scores += (~just) * -1.0e9
        merged_scores = torch.cat([done_scores, fin_scores], dim=1)
        best = torch.topk(merged_scores, k=k)[1]
        done_seq = _gather(torch.cat([done_seq, cand], dim=1), best)
        done_scores = _gather(merged_scores, best)
        done_len = _gather(torch.cat([done_len, torch.full_like(token, step + 1)], dim=1), best)
        is_done = _gather(torch.cat([is_done, just], dim=1), best)
        # every branch's cache (and token history) follows its beams' parents
        beam_idx = (running_parent + offset).reshape(rows)
        for st in streams:
            st.reorder(beam_idx)
        # can an item still improve? (transformers' heuristic, per early_stopping)
        length = (max_new_tokens if (es == "never" and lp > 0.0) else step + 1)
        best_running = running_scores[:, :1] / (length ** lp)
        worst_done = torch.where(is_done, torch.min(done_scores, dim=1, keepdim=True)[0], -1.0e9)
        improvable = improvable & torch.any(best_running > worst_done, dim=-1, keepdim=True)
        go_on = bool(torch.any(improvable)) and not (bool(torch.all(is_done)) and es is True) \
            and not bool(torch.all(hits))
        back = hook.rollback(state(step + 1)) if hook is not None else None
        if back is not None:
            back = int(back)
            if not 0 <= back <= step:
                raise ValueError(f"BeamHook.rollback returned {back}; it must be a step in [0, {step}].")
            running, running_scores, done_seq, done_scores, done_len, is_done, improvable = history[back]
            build_caches(running[:, :, :back].reshape(rows, back))
            step = back
            continue
        if not go_on:
            break
        last = running[:, :, step].reshape(rows, 1)
        for st in streams:
            take(st, st.step(last, **extra(st)))
        step += 1

    empty = done_scores[:, 0] < -5e8  # only when a hook's rollbacks used up the budget: keep the best running beam
    if bool(empty.any()):
        done_seq[empty, 0], done_len[empty, 0] = running[empty, 0], step
        done_scores[empty, 0] = running_scores[empty, 0] / (max(step, 1) ** lp)
    best_seq, best_len, best_score = done_seq[:, 0], done_len[:, 0], done_scores[:, 0]
    n_out = int(best_len.max()) if batch else 0
    sequences = best_seq[:, :n_out].clone()
    lengths, finished = [], []
    for b in range(batch):
        n = int(best_len[b])
        ended = n > 0 and bool(torch.isin(sequences[b, n - 1], eos))
        sequences[b, n:] = pad_token_id
        lengths.append(n - 1 if ended else n)
        finished.append(ended)
    return DecodeOutput(sequences=sequences.cpu(), lengths=lengths, finished=finished,
                        scores=[float(s) for s in best_score])

def _lengths(cache) -> list[int] | int:
    """Each cache layer's length (one int for a cache without ``layers``): what :func:`_crop` restores."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        return int(cache.get_seq_length())
    return [int(layer.get_seq_length()) if getattr(layer, "is_initialized", True) else 0 for layer in layers]


def _crop(cache, length: list[int] | int) -> None:
    """Cut ``cache`` back to ``length`` (from :func:`_lengths`): every layer back to its own length.

    Per layer, because not every layer grows with the text: Mllama's cross-attention layers hold the
    image's keys, which a look-ahead must not shorten. (transformers 5.24 crops by a negative count,
    older 5.x to a length.)"""
    if isinstance(length, int):
        extra = cache.get_seq_length() - length
        if extra <= 0:
            return
        try:
            cache.crop(-extra)
        except ValueError:
            cache.crop(length)
        return
    for layer, n in zip(cache.layers, length):
        if not getattr(layer, "is_initialized", True):
            continue
        extra = int(layer.get_seq_length()) - n
        if extra > 0:
            try:
                layer.crop(-extra)
            except ValueError:
                layer.crop(n)
