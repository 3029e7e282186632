"""The one decoding loop: pluggable strategies × token choices (argmax, sampling, beam search).

Contrastive methods (VCD, CausalMM, SEED, DoLa...) need the logits of extra forward passes on
modified inputs or under modified attention. A :class:`DecodingStrategy` declares those as
:class:`Branch` es; :func:`decode` prefills each branch separately, steps each with its own
cache (the reference CausalMM shared one cache, so its contrast acted on the first token only)
and lets the strategy combine the next-token logits. The token is then chosen from the combined
scores by the *token choice* (``sampling=``, see :mod:`lens_halluc.generation.sampling`):

* ``"strategy"`` (default): the strategy's ``sampling`` attribute (``None`` = argmax);
* ``None``: argmax (greedy), bit-identical to what this loop always did;
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

from ..models.compat import cache_kwargs
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


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    # Left padding: positions count only real tokens, so a padded row sees the same positions as unpadded.
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


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
    model : a VLM (``LlavaForConditionalGeneration``-like) or causal LM.
    inputs : processor output with ``input_ids`` and ``attention_mask`` ``[B, T]`` (left-padded)
        and, for a VLM, ``pixel_values``.
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


def _decode(model: nn.Module, inputs: Mapping[str, torch.Tensor], max_new_tokens: int, strategy: DecodingStrategy,
            eos_token_ids: Sequence[int], pad_token_id: int, choice: Sampling | None = None,
            generators=None) -> DecodeOutput:
    from transformers import DynamicCache

    inputs = dict(inputs)
    strategy.begin(inputs)
    attention_mask = inputs["attention_mask"]
    batch = attention_mask.shape[0]
    device = attention_mask.device
    positions = _position_ids(attention_mask)
    branches = _branches(strategy)

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
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
        for br in branches:
            with br.context():
                out = model(input_ids=next_token[:, None], attention_mask=attention_mask, position_ids=positions,
                            **cache_kwargs(model, caches[br.name]), use_cache=True)
            logits[br.name] = out.logits[:, -1].float()
    sequences = torch.stack(generated, dim=1) if generated else torch.empty(batch, 0, dtype=torch.long, device=device)
    return DecodeOutput(sequences=sequences.cpu(), lengths=lengths.tolist(), finished=finished.tolist())


# ---------------------------------------------------------------------------------- beam search
def _expand(model: nn.Module, inputs: dict, k: int) -> dict:
    """``inputs`` with every batch row repeated ``k`` times (row ``b·k + j``), the model's own way when it has one."""
    if k == 1:
        return dict(inputs)
    inputs = dict(inputs)
    expand = getattr(model, "_expand_inputs_for_generation", None)
    if callable(expand):  # e.g. Qwen2-VL expands its flattened visual inputs per image
        input_ids = inputs.pop("input_ids", None)
        input_ids, rest = expand(expand_size=k, is_encoder_decoder=False, input_ids=input_ids, **inputs)
        if input_ids is not None:
            rest["input_ids"] = input_ids
        return rest
    return {key: v.repeat_interleave(k, dim=0) if isinstance(v, torch.Tensor) else v for key, v in inputs.items()}


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
    from transformers import DynamicCache

    inputs = dict(inputs)
    strategy.begin(inputs)
    k, lp, es = beams.num_beams, float(beams.length_penalty), beams.early_stopping
    batch, prompt_length = inputs["attention_mask"].shape
    device = inputs["attention_mask"].device
    rows = batch * k
    branches = _branches(strategy)
    hook = strategy.beam_hook()
    want_attn = bool(hook is not None and hook.output_attentions)
    # each branch's prefill inputs, transformed on the [batch] inputs and then expanded to [batch*k]
    prefill = {br.name: _expand(model, br.inputs(dict(inputs)), k) for br in branches}
    base_mask = prefill["main"]["attention_mask"]

    caches: dict[str, object] = {}
    logits: dict[str, torch.Tensor] = {}
    attentions = None

    def forward(br: Branch, cache, **kw):
        extra = {"output_attentions": True} if (want_attn and br.name == "main") else {}
        with br.context():
            return model(**kw, **cache_kwargs(model, cache), use_cache=True, **extra)

    def build_caches(tokens: torch.Tensor | None) -> None:
        """Fresh caches for every branch from the prompt (and ``tokens`` ``[rows, n]`` generated so far)."""
        nonlocal attentions
        for br in branches:
            kw = dict(prefill[br.name])
            if tokens is not None and tokens.shape[1]:
                kw["input_ids"] = torch.cat([kw["input_ids"], tokens.to(kw["input_ids"].device)], dim=1)
                kw["attention_mask"] = torch.cat([kw["attention_mask"], torch.ones_like(tokens, dtype=kw[
                    "attention_mask"].dtype).to(kw["attention_mask"].device)], dim=1)
            caches[br.name] = DynamicCache()  # one cache per branch, never shared; rows = beams
            out = forward(br, caches[br.name], position_ids=_position_ids(kw["attention_mask"]), **kw)
            logits[br.name] = out.logits[:, -1].float()
            if br.name == "main" and want_attn:
                attentions = out.attentions
        return None

    build_caches(None)
    attention_mask = base_mask
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
        outs = []
        mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        pos = _position_ids(mask)[:, -1:]
        br = branches[0]
        for i in range(tokens.shape[1]):
            cache = caches["main"]
            n0 = cache.get_seq_length()
            outs.append(forward(br, cache, input_ids=tokens[:, i: i + 1].to(device), attention_mask=mask,
                                position_ids=pos))
            _crop(cache, n0)
        return outs

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
        # every branch's cache follows its beams' parents
        beam_idx = (running_parent + offset).reshape(rows)
        for br in branches:
            caches[br.name].reorder_cache(beam_idx)
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
            attention_mask = torch.cat([base_mask, torch.ones((rows, back), dtype=base_mask.dtype,
                                                              device=base_mask.device)], dim=1)
            build_caches(running[:, :, :back].reshape(rows, back))
            step = back
            continue
        if not go_on:
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        positions = _position_ids(attention_mask)[:, -1:]
        last = running[:, :, step].reshape(rows, 1)
        for br in branches:
            out = forward(br, caches[br.name], input_ids=last, attention_mask=attention_mask, position_ids=positions)
            logits[br.name] = out.logits[:, -1].float()
            if br.name == "main" and want_attn:
                attentions = out.attentions
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


def _crop(cache, length: int) -> None:
    """Cut ``cache`` back to ``length`` positions (transformers 5.24 counts from the end, older 5.x to a length)."""
    extra = cache.get_seq_length() - length
    if extra <= 0:
        return
    try:
        cache.crop(-extra)
    except ValueError:
        cache.crop(length)
