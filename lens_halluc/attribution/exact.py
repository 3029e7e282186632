"""Exact head influences for all heads at once (same numbers as :mod:`.naive`, far fewer passes).

Every decoder layer is replayed with what *that layer* received in one plain forward (a pre-hook
with kwargs on each layer captures them; every model input travels: ``image_sizes``,
``image_grid_thw``, ``mm_token_type_ids``, ``token_type_ids``, ``aspect_ratio_ids``,
``cross_attention_mask`` ...): its own position embeddings (Llama's ``(cos, sin)``, M-RoPE, Gemma 3's
per-layer-type rotary) and position ids, its own attention mask (sliding windows, Gemma 3's
bidirectional image block, PaliGemma's prefix-LM; when ``sdpa`` skipped the mask,
:meth:`Adapter.replay_default_mask`: causal within the attention module's ``sliding_window``; chunked
attention is refused), and any extra per-position keyword the family's adapter declares
(:meth:`Adapter.replay_kwarg_axes`, e.g. Mllama's cross-attention inputs; an undeclared tensor keyword
is refused, naming it). What the text model does *between* layers (Qwen3-VL adds deepstack visual
embeddings after its first layers) is detected in the clean forward (layer ``k + 1``'s input differs
from layer ``k``'s output) and reproduced through :meth:`Adapter.replay_between_layers` (an
``"additive"`` step adds the clean difference at the rows' positions), or refused. Logits are the
model's own (:meth:`ModelSpec.logits`: final norm, LM head, soft-capping, token suppression).

Local scope (ablation at the predicting position ``q = t - 1`` only)
    1. One forward over the sequence with a KV cache (one without a config, which keeps every
       position of sliding-window layers); it gives ``p(y_t | x)``, the keys/values of every
       original position at every self-attention layer, and what every decoder layer received.
    2. "Copies": for target ``i`` a row that recomputes position ``q_i`` alone: its input is the
       layer-0 input of position ``q_i`` (so image positions work too), its rotary embeddings and
       position id those of ``q_i``. The decoder layers are replayed by hand on a batch of such
       rows (laid out as one sequence of rows). In layer ``k`` the attention gets, through a
       stand-in for the cache (:class:`_PrefixKV`, whose ``update`` returns that layer's cached
       keys/values of the ``T`` original positions followed by the rows' own, storing nothing),
       and a 4-D mask from :func:`copy_attention_mask`, the clean keys/values of original
       positions ``< q_i`` and the row's own key/value, never another row's and never a position
       ``>= q_i``. A row therefore recomputes position ``q_i`` exactly; keys/values of earlier
       positions stay clean: the local ablation by construction.
    3. Staggered rows. The copy for head ``(l, h)`` differs from an un-ablated *control* copy
       only from layer ``l``'s ``o_proj`` on (the hook replaces head ``h``'s slice there); below
       layer ``l`` the two are the same computation on the same inputs. So the control row of
       each target goes through every layer, its hidden state entering each layer is kept, and
       the row for ``(l, h)`` starts at layer ``l`` as a clone of the control's state there: rows
       of layer ``l`` join the batch at layer ``l`` and run ``l..L-1``, the final norm and the LM
       head. Copy-layers drop from ``(1 + L·H)·L`` per target (every copy through the whole
       tower) to ``L + H·L(L+1)/2`` (0.52 of it on 32 layers × 32 heads), same results.
    4. Units ``(l, i, h)`` go layer-major in chunks such that no layer's batch exceeds
       ``chunk_size`` rows (memory bound on 7B). A chunk starting at layer ``l_min`` carries the
       control row of each of its targets (from the kept state at ``l_min``), and a unit's row
       joins as a clone of that control row: from layer ``l`` on, ablated and control rows go
       through the same kernel calls, and influences are taken against that control, so the
       numerical noise of the batched path cancels in the difference. The first chunk carries
       every target's control row from layer 0 and its states are the ones kept; when there is
       no room for that (``n_targets + 1 > chunk_size``) the control rows first go alone
       through the layers (and with ``chunk_size=1`` units are compared with those).
       On CUDA with ``sdpa`` the replay keeps PyTorch off the cuDNN attention backend: it builds
       a plan for every new shape (tens of ms each), and the batch grows at almost every layer.
    Every control row's full next-token distribution must equal the plain forward's at ``q``
    (``control_gap``); a mask that leaked other rows or later positions, or an adapter that
    misdescribes a layer input, a step between layers or the logits, would break that, so the
    check raises. A self-attention layer whose attention does not read its keys/values through
    the cache's ``update`` is refused; a cross-attention layer (:meth:`Adapter.replay_uses_cache`
    False) gets no cache and computes its keys from the image states it receives.
    A row's mask is the structural one (:func:`copy_attention_mask`) intersected with what the
    layer's clean mask let position ``q`` see. Where an ablation at ``q`` would change *earlier*
    positions (a position ``<= q`` other than ``q`` sees a key ``>= q`` in some layer: the last
    position of PaliGemma's prefix, a position inside Gemma 3's image block), copy rows cannot
    recompute ``q`` alone; those targets are computed like the global scope below, on whole
    prefixes with the head ablated at ``q`` only (exact, costlier).

Global scope (ablation at every position)
    The residual stream entering layer ``l`` (and every input each layer received) is captured in
    one clean forward. For each layer it is replicated
    into a batch, one row per head (+ a control row); layers ``l..L-1``, the final norm and the
    LM head run on the batch with head ``h`` of layer ``l`` ablated in row ``h`` at every
    position. Layers below ``l`` (and the vision tower) are not recomputed; positions after the
    last target are dropped (causality), unless a bidirectional block reaches past it (then the
    kept prefix ends with the block).

The 4-D mask (transformers 5.23): the replayed decoder layers hand ``attention_mask`` to the
attention function unchanged (so does ``create_causal_mask`` with a 4-D mask in a plain forward,
``masking_utils._preprocess_mask_arguments``). ``eager`` *adds* it to the scores, so it must be
additive float (0 / dtype min; a boolean mask would be added as 0/1 and silently ignored);
``sdpa`` takes a boolean mask (True = attend). :func:`attention_mask_4d` builds the right one for
the text tower's implementation.

Example
-------
>>> res = exact_influences(vlm, enc["input_ids"], enc["pixel_values"], targets=[40, 45])   # doctest: +SKIP
>>> res.influence.shape, res.control_gap                                                # doctest: +SKIP
(torch.Size([2, 32, 32]), 0.0)
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterable, Sequence

import torch
from torch import nn

from transformers import DynamicCache

from ..hooks.ablation import InterventionNotAppliedError, head_output_hooks
from ..models.adapters import AdapterError
from ..models.compat import CACHE_KEYWORDS, cache_from_output, cache_kwargs
from .naive import InfluenceResult, check_options, forward_inputs, metric_diff, prepare_inputs

# Max |log p| gap (over the vocabulary) tolerated between control copies and the plain forward.
CONTROL_TOL = {torch.float32: 1e-3, torch.float64: 1e-6}
HALF_CONTROL_TOL = 0.5  # bf16/fp16: kernels differ between the two paths; only gross leaks are caught


class MaskNotHonouredError(RuntimeError):
    """The batched pass did not reproduce the plain forward: the 4-D mask was not applied as built."""


# ---------------------------------------------------------------------------------------- helpers
def attn_implementation(vlm) -> str:
    """The text tower's attention implementation name (e.g. ``"eager"``, ``"sdpa"``)."""
    lm = vlm.spec.language_model(vlm.model)
    return str(getattr(lm.config, "_attn_implementation", None) or "eager")


def copy_attention_mask(q: torch.Tensor, prefix_len: int) -> torch.Tensor:
    """Boolean ``[n, prefix_len + n]``: copy ``j`` sees prefix positions ``< q[j]`` and itself.

    Key axis = the ``prefix_len`` cached positions followed by the ``n`` copies of this chunk.
    """
    n = q.numel()
    keys = torch.arange(prefix_len, device=q.device)
    mask = torch.zeros(n, prefix_len + n, dtype=torch.bool, device=q.device)
    mask[:, :prefix_len] = keys[None, :] < q[:, None]
    mask[:, prefix_len:] = torch.eye(n, dtype=torch.bool, device=q.device)
    return mask


def attention_mask_4d(allowed: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """The 4-D mask in the form ``implementation`` honours (see module doc), from bool ``allowed``
    ``[n_query, n_key]`` (-> ``[1, 1, n_query, n_key]``) or ``[b, h, n_query, n_key]`` (True = attend)."""
    if implementation.startswith("flash") or implementation.startswith("flex") or implementation == "paged":
        raise ValueError(
            f"the exact batched method needs an arbitrary 4-D attention mask, which {implementation!r} does not "
            "take; load the text tower with attn_implementation='eager' or 'sdpa'.")
    if allowed.dim() == 2:
        allowed = allowed[None, None]
    if implementation == "sdpa":
        return allowed
    # eager and registered attention functions that follow eager's additive convention
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def _check_control(gap: float, dtype: torch.dtype, what: str) -> None:
    tol = CONTROL_TOL.get(dtype, HALF_CONTROL_TOL)
    if gap > tol:
        raise MaskNotHonouredError(
            f"{what}: un-ablated control rows differ from the plain forward by {gap:.3g} in log-probability "
            f"(tolerance {tol:g}). The replay did not reproduce the plain forward: the attention mask or positions "
            f"were not applied as built (check the attention implementation: eager and sdpa are supported), or the "
            f"family's adapter misdescribes a layer input, a step between layers or the logits (replay hooks).")


@contextmanager
def _head_fill_hooks(model, spec, layers: Iterable[int], state: dict, fill: torch.Tensor | None):
    """Pre-hooks on ``o_proj`` of ``layers``: where ``state["ablate"][l]`` (bool ``[B, S, H]`` or
    broadcastable) is True, head ``h``'s slice is replaced by ``fill[l, h]`` (zero when None).

    Yields layer -> number of forwards in which the layer had an ablation entry (the calls that
    ablated; a forward without an entry leaves the input unchanged and is not counted)."""
    H, D = spec.n_heads, spec.head_dim
    layers = list(layers)
    applied = {layer: 0 for layer in layers}

    def make(layer):
        def fill_heads(x):
            where = state["ablate"].get(layer)
            if where is None:
                return None
            applied[layer] += 1
            xv = x.view(*x.shape[:-1], H, D)
            value = torch.zeros((), dtype=x.dtype, device=x.device) if fill is None else fill[layer].to(x)
            return torch.where(where[..., None], value, xv).view_as(x)
        return fill_heads

    with head_output_hooks(model, spec, {layer: make(layer) for layer in layers}):
        yield applied


def _check_calls(calls: dict, expected: dict) -> None:
    missed = [layer for layer, n in expected.items() if n > 0 and calls.get(layer, 0) < n]
    if missed:
        raise InterventionNotAppliedError(f"ablation hooks on layer(s) {missed} did not run for every batch.")


# ---------------------------------------------------------------------------------------- clean forward
# Keyword arguments of a decoder layer the replay knows how to restrict to the replayed positions.
_KNOWN = {"attention_mask", "position_embeddings", "position_ids", "cache_position", "use_cache", *CACHE_KEYWORDS}


def _has_tensor(value) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return any(_has_tensor(v) for v in value)
    if isinstance(value, dict):
        return any(_has_tensor(v) for v in value.values())
    return False


class _Clean:
    """What one plain forward gave, per decoder layer ``k``: ``inputs[k]`` (hidden states entering it,
    ``[1, T, d]``), ``kwargs[k]`` (every keyword argument it received), ``axes[k]`` (the adapter's extra
    per-position keywords), ``steps[k]`` (the text model's step between ``k`` and ``k + 1``, or None),
    ``uses_cache[k]``; ``keys``/``values`` (``[1, n_kv, T, head_dim]`` per self-attention layer, local
    scope only) and ``logits`` ``[T, V]``."""


@torch.no_grad()
def _clean_forward(vlm, ids, pixel_values, model_kwargs, with_cache: bool) -> _Clean:
    model, spec = vlm.model, vlm.spec
    adapter = spec.adapter
    layers = spec.layers(model)
    L, T = len(layers), ids.shape[1]
    inputs: dict[int, torch.Tensor] = {}
    kwargs: dict[int, dict] = {}
    outputs: dict[int, torch.Tensor] = {}

    def pre(i):
        def grab(mod, args, kw):
            if len(args) > 1:
                raise RuntimeError(f"decoder layer {i} ({type(mod).__name__}) got {len(args)} positional arguments; the "
                                   "exact replay passes every input but the hidden states by keyword.")
            inputs[i] = args[0] if args else kw["hidden_states"]
            kwargs[i] = {k: v for k, v in kw.items() if k != "hidden_states"}
        return grab

    def post(i):
        def grab(mod, args, kw, out):
            out = out[0] if isinstance(out, (tuple, list)) else out
            outputs[i] = out.clone()  # the text model may edit the output in place before the next layer
        return grab

    handles = [layer.register_forward_pre_hook(pre(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles += [layer.register_forward_hook(post(i), with_kwargs=True) for i, layer in enumerate(layers)]
    fwd = forward_inputs(ids, pixel_values, model_kwargs)
    # A cache without a config keeps every position of every layer (a configured one drops keys
    # outside a sliding window); the masks the layers get are the same for one prefill.
    cache = DynamicCache() if with_cache else None
    try:
        out = model(**fwd, use_cache=with_cache, **(cache_kwargs(model, cache) if with_cache else {}))
    finally:
        for hd in handles:
            hd.remove()
    if len(inputs) != L or len(outputs) != L:
        raise RuntimeError(f"the plain forward ran {len(inputs)} of the {L} decoder layers; the exact replay needs "
                           "each layer to run once on the whole sequence.")
    c = _Clean()
    c.T, c.L = T, L
    c.logits = out.logits[0]
    c.inputs = [inputs[k] for k in range(L)]
    c.kwargs = [adapter.replay_clean_kwargs(model, k, kwargs[k]) for k in range(L)]
    for k, h in enumerate(c.inputs):
        if not isinstance(h, torch.Tensor) or tuple(h.shape[:2]) != (1, T):
            raise RuntimeError(f"decoder layer {k} did not receive hidden states [1, {T}, d] in the plain forward.")
    c.axes, c.uses_cache, c.steps = [], [], []
    for k in range(L):
        axes = dict(adapter.replay_kwarg_axes(model, k))
        for name, value in c.kwargs[k].items():
            if name in _KNOWN or name in axes or not _has_tensor(value):
                continue
            raise AdapterError(
                f"decoder layer {k} ({type(layers[k]).__name__}) receives the tensor keyword {name!r}, which the exact "
                f"replay does not know how to restrict to the replayed positions; declare its axes in "
                f"Adapter.replay_kwarg_axes of the {adapter.name!r} adapter (lens_halluc/models/adapters/).")
        pe = c.kwargs[k].get("position_embeddings")
        for e in (pe if isinstance(pe, (tuple, list)) else [pe] if pe is not None else []):
            if not isinstance(e, torch.Tensor) or e.dim() < 2 or e.shape[-2] != T:
                raise RuntimeError(
                    f"decoder layer {k} ({type(layers[k]).__name__}) received position embeddings the replay cannot "
                    f"index (expected tensors [..., {T}, dim]); override the {adapter.name!r} adapter's replay hooks.")
        for name in ("position_ids", "cache_position"):
            v = c.kwargs[k].get(name)
            if v is not None and (not isinstance(v, torch.Tensor) or v.shape[-1] != T):
                raise RuntimeError(f"decoder layer {k} received {name} without the {T} positions on its last axis.")
        c.axes.append(axes)
        c.uses_cache.append(bool(adapter.replay_uses_cache(model, k)))
    for k in range(L - 1):
        same = outputs[k] is c.inputs[k + 1] or torch.equal(outputs[k], c.inputs[k + 1])
        c.steps.append(None if same else adapter.replay_between_layers(model, k, outputs[k], c.inputs[k + 1]))
    c.steps.append(None)
    c.keys = c.values = None
    if with_cache:
        cache = cache_from_output(out) or cache
        c.keys, c.values = [None] * L, [None] * L
        kv_layers = getattr(cache, "layers", None)
        for k in range(L):
            if not c.uses_cache[k]:
                continue
            lay = kv_layers[k] if kv_layers is not None and k < len(kv_layers) else None
            keys = getattr(lay, "keys", None)
            if keys is None or keys.shape[-2] != T:
                raise RuntimeError(f"could not read the {T} cached keys/values of decoder layer {k} from the plain "
                                   f"forward's {type(cache).__name__}.")
            c.keys[k], c.values[k] = keys, lay.values
    return c


def _index(value: torch.Tensor, axis: int, sel) -> torch.Tensor:
    axis = axis % value.dim()
    return value[(slice(None),) * axis + (sel,)]


def _layer_kwargs(c: _Clean, layer: nn.Module, k: int, sel, batch: int, cache) -> dict:
    """Layer ``k``'s clean keyword arguments at the replayed positions ``sel`` (an index tensor: local
    rows; a slice: global prefix), for a batch of ``batch`` rows, with ``cache`` (or None). The
    attention mask is left to the caller."""
    kw = {}
    for name, value in c.kwargs[k].items():
        if name in CACHE_KEYWORDS or name in ("attention_mask", "use_cache"):
            continue
        if name == "position_embeddings" and value is not None:
            value = type(value)(e[..., sel, :] for e in value) if isinstance(value, (tuple, list)) else value[..., sel, :]
        elif name in ("position_ids", "cache_position") and value is not None:
            value = value[..., sel]
        elif name in c.axes[k] and isinstance(value, torch.Tensor):
            b_axis, p_axis = c.axes[k][name]
            if p_axis is not None:
                value = _index(value, p_axis, sel)
            if b_axis is not None and batch > 1:
                # the clean forward had batch 1: its entries along the batch axis (possibly several per
                # sample, e.g. image tiles) are one sample's, repeated once per replayed row
                reps = [1] * value.dim()
                reps[b_axis % value.dim()] = batch
                value = value.repeat(reps)
        kw[name] = value
    kw.update(cache_kwargs(layer, cache))
    kw["use_cache"] = cache is not None
    return kw


def _allowed(mask: torch.Tensor, T: int, layer: int) -> torch.Tensor:
    """Bool (True = attend) from a layer's clean 4-D mask ``[b, h, T, T]`` (boolean, or additive 0 / very negative)."""
    if mask.dim() != 4 or mask.shape[-1] != T or mask.shape[-2] != T:
        raise RuntimeError(f"decoder layer {layer} received an attention mask of shape {tuple(mask.shape)}, not "
                           f"[b, h, {T}, {T}]; the exact replay cannot restrict it to the replayed positions.")
    if mask.dtype == torch.bool:
        return mask
    allowed, blocked = mask == 0, mask <= torch.finfo(mask.dtype).min / 2
    if not bool((allowed | blocked).all()):
        raise RuntimeError(f"decoder layer {layer} received an additive mask with values other than 0 and -inf "
                           "(a bias); the exact replay handles masks that allow or block keys only.")
    return allowed


def _local_mask(vlm, c: _Clean, k: int, rows_q: torch.Tensor, impl: str, dtype) -> torch.Tensor:
    """Layer ``k``'s 4-D mask for copy rows of positions ``rows_q`` over the ``T`` cached keys then the rows.

    The structural mask (:func:`copy_attention_mask`: cached keys before the row's position, and the row
    itself) is intersected with what the layer's clean mask let that position see (sliding windows,
    prefix/bidirectional blocks); with no clean mask, :meth:`Adapter.replay_default_mask`."""
    T = c.T
    base = copy_attention_mask(rows_q, T)  # [R, T + R]
    mask = c.kwargs[k].get("attention_mask")
    if mask is None:
        clean = vlm.spec.adapter.replay_default_mask(vlm.model, k, rows_q, T)[None, None]
    elif isinstance(mask, torch.Tensor):
        clean = _allowed(mask, T, k)[..., rows_q, :]  # [b, h, R, T]
    else:
        raise RuntimeError(f"decoder layer {k} received a {type(mask).__name__} attention mask; the exact replay needs "
                           "a 4-D tensor (use attn_implementation='eager' or 'sdpa').")
    keys = torch.arange(T, device=rows_q.device)
    ahead = clean & (keys > rows_q[:, None])
    if bool(ahead.any()):
        rows = ahead.flatten(0, -3).any(0).any(-1).nonzero().flatten()
        raise ValueError(
            f"decoder layer {k}: position(s) {rows_q[rows].unique().tolist()} attend to later positions (a "
            "bidirectional image or prefix block); ablating a head there changes those later positions too, which "
            "the local copy rows do not recompute. Take targets after the block, or use method='naive'.")
    rows = torch.arange(len(rows_q), device=rows_q.device)
    if not bool(clean[..., rows, rows_q].all()):
        raise RuntimeError(f"decoder layer {k}: the clean mask hides a position from itself; cannot replay it.")
    full = torch.cat([base[:, :T] & clean, base[:, T:].expand(*clean.shape[:-1], -1)], dim=-1)
    return attention_mask_4d(full, impl, dtype)


def _reach(c: _Clean, Tp: int) -> int:
    """Smallest ``Tp' >= Tp`` such that positions ``< Tp'`` see no key ``>= Tp'`` in any layer's clean mask
    (more than ``Tp`` only with bidirectional blocks across the last predicting position)."""
    masks = {id(m): m for kw in c.kwargs for m in [kw.get("attention_mask")] if isinstance(m, torch.Tensor)}
    seen = [_allowed(m, c.T, -1).flatten(0, -3).any(0) for m in masks.values()]  # [T, T]
    last = [torch.where(s, torch.arange(c.T, device=s.device), -1).amax(-1).cummax(0).values for s in seen]
    while True:
        new = max([Tp] + [int(v[Tp - 1]) + 1 for v in last])
        if new == Tp:
            return Tp
        Tp = new


# ---------------------------------------------------------------------------------------- local
class _PrefixKV:
    """Stands in for the KV cache when a decoder layer is replayed on copy rows.

    The attention calls ``update(key_states, value_states, layer_idx)`` with the rows' own keys and
    values; this returns the clean forward's keys/values of that layer (all ``T`` positions)
    followed by the rows' own, and stores nothing, so rows of any number can go through any
    layer. ``calls`` counts the updates per layer (a layer that never calls it cannot be replayed).
    """

    def __init__(self, keys: list[torch.Tensor | None], values: list[torch.Tensor | None]):
        self.keys, self.values = keys, values
        self.calls = [0] * len(keys)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.calls[layer_idx] += 1
        return (torch.cat([self.keys[layer_idx], key_states], dim=-2),
                torch.cat([self.values[layer_idx], value_states], dim=-2))

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.keys[layer_idx].shape[-2]


def _plan_chunks(u_target: list[int], chunk_size: int, with_control: bool,
                 first_targets: list[int] | None = None) -> list[tuple[int, int, list[int]]]:
    """Split the (layer-major) units into ``(start, stop, targets)`` so that no layer's batch exceeds
    ``chunk_size`` rows: ``stop - start`` unit rows plus one control row per target of ``targets``
    (the targets of the chunk's units; ``first_targets`` instead for the first chunk)."""
    chunks, start = [], 0
    while start < len(u_target):
        fixed = first_targets is not None and not chunks
        seen: dict[int, None] = dict.fromkeys(first_targets) if fixed else {}
        stop = start
        while stop < len(u_target):
            new = with_control and not fixed and u_target[stop] not in seen
            if stop > start and (stop - start + 1) + ((len(seen) + new) if with_control else 0) > chunk_size:
                break
            if with_control:
                seen.setdefault(u_target[stop])
            stop += 1
        chunks.append((start, stop, list(seen)))
        start = stop
    return chunks


def _replay_attention(impl: str, device: torch.device):
    """Context for the replayed layers: on CUDA with sdpa, keep PyTorch off the cuDNN attention
    backend, which builds an execution plan for every new shape (tens of ms each, cached per
    shape) while the staggered batches change size at almost every layer; the memory-efficient
    kernel takes the same boolean mask with no per-shape set-up."""
    if impl != "sdpa" or device.type != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _needs_full_rows(vlm, c: _Clean, q: torch.Tensor) -> torch.Tensor:
    """Bool ``[n]``: predicting positions ``q`` that copy rows cannot recompute alone, because in some layer a
    position ``<= q`` other than ``q`` sees a key ``>= q`` (PaliGemma's prefix, Gemma 3's image block: an
    ablation at ``q`` then changes earlier positions' states, which ``q`` reads back)."""
    out = torch.zeros(len(q), dtype=torch.bool, device=q.device)
    masks = {id(m): m for kw in c.kwargs for m in [kw.get("attention_mask")] if isinstance(m, torch.Tensor)}
    for m in masks.values():
        seen = _allowed(m, c.T, -1).flatten(0, -3).any(0)  # [T, T]
        for i, qi in enumerate(q.tolist()):
            block = seen[:qi + 1, qi:].clone()
            block[qi, 0] = False
            out[i] |= bool(block.any())
    return out


@torch.no_grad()
def _local(vlm, ids, t, pixel_values, fill, chunk_size, model_kwargs, row_chunk):
    """Local scope: copy rows (:func:`_copy_rows`) for every target they can recompute; the others
    (see :func:`_needs_full_rows`) by a replay of the whole prefix with the head ablated at ``q`` only."""
    c = _clean_forward(vlm, ids, pixel_values, model_kwargs, with_cache=True)
    q, y = t - 1, ids[0, t]
    clean_full = torch.log_softmax(c.logits[q].float(), dim=-1)  # [n, V]
    clean_lp = clean_full.gather(-1, y[:, None])[:, 0]
    full = _needs_full_rows(vlm, c, q)
    n, L, H = len(t), vlm.spec.n_layers, vlm.spec.n_heads
    base_lp = torch.empty(n, device=ids.device)
    unit_base = torch.empty(n, L, H, device=ids.device)
    abl = torch.empty(n, L, H, device=ids.device)
    gap = 0.0
    if bool((~full).any()):
        sel = (~full).nonzero().flatten()
        b, ub, a, g = _copy_rows(vlm, c, ids, t[sel], clean_full[sel], fill, chunk_size)
        base_lp[sel], unit_base[sel], abl[sel], gap = b, ub, a, max(gap, g)
    if bool(full.any()):
        sel = full.nonzero().flatten()
        lp, g = _replay_full(vlm, c, q[sel], y[sel], clean_full[sel], fill, row_chunk, at_q=True)
        base_lp[sel] = lp[0, 0]
        unit_base[sel] = lp[:, 0].T[:, :, None].expand(-1, -1, H)
        abl[sel] = lp[:, 1:].permute(2, 0, 1)
        gap = max(gap, g)
        _check_control(gap, c.inputs[0].dtype, "exact local attribution (whole-prefix rows)")
    return clean_lp, base_lp, unit_base, abl, gap


@torch.no_grad()
def _copy_rows(vlm, c: _Clean, ids, t, clean_full, fill, chunk_size):
    model, spec = vlm.model, vlm.spec
    layers = spec.layers(model)
    impl = attn_implementation(vlm)
    attention_mask_4d(torch.ones(1, 1, dtype=torch.bool), impl, torch.float32)  # refuses flash/flex early
    L, H = spec.n_layers, spec.n_heads
    T = ids.shape[1]
    q, y = t - 1, ids[0, t]
    n = len(t)
    dev = ids.device

    prefix = _PrefixKV(c.keys, c.values)
    h0 = c.inputs[0]
    dtype, d = h0.dtype, h0.shape[-1]
    heads = torch.arange(H, device=dev)
    state: dict = {"ablate": {}}
    expected = {layer: 0 for layer in range(L)}

    # Control state entering every layer, per target; an ablated row of layer l starts from it.
    ctrl = torch.empty(L, n, d, dtype=dtype, device=dev)
    ctrl[0] = h0[0, q]
    base_lp = torch.empty(n, device=dev)  # the control rows' log p(y) (the result's baseline)
    gap = 0.0

    def run(k0, x, tc, u_start, u_stop, record):
        """Layers ``k0..L-1`` on ``x`` (the control rows of targets ``tc``, entering layer ``k0``),
        adding the rows of units ``u_start:u_stop`` at their layer (``record``: keep the control
        rows' states in ``ctrl``). Returns log p(y) of every row (control rows first, then the
        units'), the control rows' full log-probabilities, and each unit's control row."""
        rows_t = torch.cat([tc, u_target[u_start:u_stop]])
        rows_q = q[rows_t]
        m = len(tc)
        # Rows only ever join at the end, so the rows in layer k are the first R of the final
        # rows: each layer's mask is built once for the final rows and sliced.
        built: dict = {}
        masks = {}
        for k in range(k0, L):
            mk = c.kwargs[k].get("attention_mask")
            key = id(mk) if isinstance(mk, torch.Tensor) else ("default", k)
            if key not in built:
                built[key] = _local_mask(vlm, c, k, rows_q, impl, dtype)
            masks[k] = built[key]
        onehot = torch.cat([torch.zeros(m, H, dtype=torch.bool, device=dev),
                            u_head[u_start:u_stop, None] == heads])  # [R, H]
        row_layer = torch.cat([torch.full((m,), -1, device=dev), u_layer[u_start:u_stop]])
        ctrl_row = torch.full((n,), -1, dtype=torch.long, device=dev)
        ctrl_row[tc] = torch.arange(m, device=dev)
        src = ctrl_row[rows_t]  # a unit's row clones its target's control row
        u = u_start
        for k in range(k0, L):
            v = u
            while v < u_stop and u_layer_l[v] == k:
                v += 1
            if v > u:  # the units of layer k join, head ablated at this layer's o_proj
                r0, r1 = m + u - u_start, m + v - u_start
                new = x[src[r0:r1]] if m else ctrl[k, u_target[u:v]]
                x = torch.cat([x, new])
                state["ablate"] = {k: (onehot[:r1] & (row_layer[:r1] == k)[:, None])[None]}
                expected[k] += 1
                u = v
            else:
                state["ablate"] = {}
            if record:
                ctrl[k, tc] = x[:m]
            R = x.shape[0]
            before = prefix.calls[k]
            kw = _layer_kwargs(c, layers[k], k, rows_q[:R], 1, prefix if c.uses_cache[k] else None)
            x = layers[k](x[None], attention_mask=masks[k][..., :R, :T + R], **kw)
            x = (x[0] if isinstance(x, tuple) else x)[0]
            if c.uses_cache[k] and prefix.calls[k] != before + 1:
                raise RuntimeError(
                    f"decoder layer {k} ({type(layers[k]).__name__}) did not fetch its keys/values through "
                    "past_key_values.update(); the staggered local method cannot replay this architecture.")
            if c.steps[k] is not None:
                x = c.steps[k](x[None], rows_q[:R])[0]
        state["ablate"] = {}
        logp = torch.log_softmax(spec.logits(model, x).float(), dim=-1)
        return logp.gather(-1, y[rows_t][:, None])[:, 0], logp[:m], src[m:]

    # Units (layer l, target i, head h), layer-major.
    u_layer = torch.arange(L, device=dev).repeat_interleave(n * H)
    u_target = torch.arange(n, device=dev).repeat_interleave(H).repeat(L)
    u_head = heads.repeat(n * L)
    u_layer_l = u_layer.tolist()
    abl = torch.empty(n * L * H, device=dev)
    base_u = torch.empty(n * L * H, device=dev)
    all_t = torch.arange(n, device=dev)
    with_control = chunk_size >= 2
    merged = n + 1 <= chunk_size  # the first chunk has room for every target's control row
    plan = _plan_chunks(u_target.tolist(), chunk_size, with_control, all_t.tolist() if merged else None)
    with _head_fill_hooks(model, spec, range(L), state, fill) as calls, _replay_attention(impl, dev):
        if not merged:
            # 2. Control rows alone through every layer, keeping the state entering each layer.
            for start in range(0, n, chunk_size):
                tc = all_t[start:start + chunk_size]
                lp, full, _ = run(0, ctrl[0, tc], tc, 0, 0, record=True)
                base_lp[tc] = lp
                gap = max(gap, float((full - clean_full[tc]).abs().max()))
        # 3. Chunks of units. A chunk starting at layer l_min carries the control rows of its
        # targets from the state at l_min; a unit's row joins at its layer as a clone of its
        # target's control row, so from there on both go through the same kernel calls. The first
        # chunk, when ``merged``, carries every control row from layer 0 and records their states.
        for ci, (a, b, tc_list) in enumerate(plan):
            record = merged and ci == 0
            k0 = u_layer_l[a]
            tc = torch.tensor(tc_list, dtype=torch.long, device=dev)
            lp, full, src = run(k0, ctrl[k0, tc], tc, a, b, record)
            m = len(tc)
            abl[a:b] = lp[m:]
            if m:
                base_u[a:b] = lp[src]
                gap = max(gap, float((full - clean_full[tc]).abs().max()))
                if record:
                    base_lp[tc] = lp[:m]
            else:
                base_u[a:b] = base_lp[u_target[a:b]]
    _check_calls(calls, expected)
    _check_control(gap, dtype, "exact local attribution")
    # units are (layer, target, head)-major -> [n, L, H]
    to_nlh = lambda v: v.view(L, n, H).permute(1, 0, 2)  # noqa: E731
    return base_lp, to_nlh(base_u), to_nlh(abl), gap


# ---------------------------------------------------------------------------------------- global
@torch.no_grad()
def _global(vlm, ids, t, pixel_values, fill, row_chunk, model_kwargs):
    c = _clean_forward(vlm, ids, pixel_values, model_kwargs, with_cache=False)
    q, y = t - 1, ids[0, t]
    clean_full = torch.log_softmax(c.logits[q].float(), dim=-1)
    clean_lp = clean_full.gather(-1, y[:, None])[:, 0]
    lp, gap = _replay_full(vlm, c, q, y, clean_full, fill, row_chunk, at_q=False)
    _check_control(gap, c.inputs[0].dtype, "exact global attribution")
    # lp [L, 1 + H, n] -> per layer control [n, L] and ablated [n, L, H]
    return clean_lp, lp[:, 0].T, lp[:, 1:].permute(2, 0, 1), gap


def _replay_full(vlm, c: _Clean, q, y, clean_full, fill, row_chunk, at_q: bool):
    """Replay of whole prefixes from each layer ``l``: one row per head of ``l`` (+ a control row), the
    head ablated at every position (``at_q=False``: global scope, all targets in one pass) or at the
    target's predicting position only (``at_q=True``: one pass per target). Layers below ``l`` are not
    recomputed; positions after the last one that can matter are dropped (:func:`_reach`).
    Returns log p(y) ``[L, 1 + H, n]`` (row 0 the control) and the control rows' gap."""
    model, spec = vlm.model, vlm.spec
    layers = spec.layers(model)
    L, H = spec.n_layers, spec.n_heads
    dev = q.device
    n = len(q)
    groups = [list(range(n))] if not at_q else [[i] for i in range(n)]
    rows_head = torch.arange(-1, H, device=dev)  # row 0 = control, row 1 + h = head h ablated
    heads = torch.arange(H, device=dev)
    lp = torch.empty(L, H + 1, n, device=dev)
    gap = 0.0
    state: dict = {"ablate": {}}
    expected = {layer: 0 for layer in range(L)}
    with _head_fill_hooks(model, spec, range(L), state, fill) as calls:
        for group in groups:
            gq = q[group]
            # Positions after the last predicting position cannot influence any target (causal model);
            # a bidirectional block across it extends the kept prefix to the block's end.
            Tp = _reach(c, int(gq.max()) + 1)
            sel = slice(0, Tp)
            pos = torch.arange(Tp, device=dev)
            masks = [c.kwargs[k].get("attention_mask") for k in range(L)]
            masks = [m[..., :Tp, :Tp] if isinstance(m, torch.Tensor) and m.dim() == 4 else m for m in masks]
            for layer in range(L):
                hs = c.inputs[layer]
                for start in range(0, H + 1, row_chunk):
                    rows = rows_head[start:start + row_chunk]
                    B = len(rows)
                    x = hs[:, :Tp].expand(B, -1, -1).contiguous()
                    where = (rows[:, None] == heads)[:, None, :]  # [B, 1, H]: every position
                    if at_q:
                        where = where & (pos == gq[0])[None, :, None]  # [B, Tp, H]: the predicting position
                    state["ablate"] = {layer: where}
                    expected[layer] += 1
                    for k in range(layer, L):
                        x = layers[k](x, attention_mask=masks[k], **_layer_kwargs(c, layers[k], k, sel, B, None))
                        x = x[0] if isinstance(x, tuple) else x
                        if c.steps[k] is not None:
                            x = c.steps[k](x, pos)
                    state["ablate"] = {}
                    logp = torch.log_softmax(spec.logits(model, x[:, gq]).float(), dim=-1)  # [B, g, V]
                    lp[layer, start:start + B][:, group] = logp.gather(-1, y[group].expand(B, -1)[..., None])[..., 0]
                    if start == 0:
                        gap = max(gap, float((logp[0] - clean_full[group]).abs().max()))
    _check_calls(calls, expected)
    return lp, gap


# ---------------------------------------------------------------------------------------- public
def exact_influences(
    vlm,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None,
    targets: Sequence[int] | torch.Tensor,
    scope: str = "local",
    ablation: str = "zero",
    metric: str = "prob_diff",
    means: torch.Tensor | None = None,
    chunk_size: int = 1024,
    row_chunk: int | None = None,
    **model_kwargs,
) -> InfluenceResult:
    """Exact influences of every head on every target, batched (see module doc).

    Parameters
    ----------
    input_ids : ``[T]`` or ``[1, T]``, one unpadded sequence (prompt with image + caption).
    pixel_values : the processor's ``pixel_values`` (e.g. ``[1, 3, H, W]``), or None when the family
        takes none or it travels in ``model_kwargs``.
    targets : positions ``t`` (``1 <= t < T``); the target token is ``input_ids[t]``.
    scope : ``"local"`` (ablate at ``t - 1`` only) or ``"global"`` (every position).
    ablation : ``"zero"`` or ``"mean"`` (then ``means`` ``[n_layers, n_heads, head_dim]``).
    metric : ``"prob_diff"`` (reference default), ``"abs_prob_diff"`` or ``"log_prob_diff"``.
    chunk_size : local scope: most rows (copies of a predicting position) in one decoder layer's batch;
        bounds memory. Any value gives the same influences.
    row_chunk : global scope: batch rows per replay (default ``n_heads + 1``: one layer at once).
    model_kwargs : every other forward input (``image_sizes``, ``image_grid_thw``, ``mm_token_type_ids``,
        ``token_type_ids``, ``aspect_ratio_ids``, ``cross_attention_mask`` ...; per-token ones of length ``T``,
        extended over the caption with ``Adapter.extend_inputs``).

    Returns :class:`InfluenceResult` with ``influence`` ``[n_targets, n_layers, n_heads]`` =
    ``m(baseline) - m(ablated)``, ``baseline`` the control copy (local; each chunk's influences use
    that chunk's control row of the target) or the control row of the first layer (global; each
    layer's influences use that layer's control row).

    Example
    -------
    >>> enc = vlm.adapter.extend_inputs(vlm.encode([image], [prompt]), caption_ids)          # doctest: +SKIP
    >>> ids, pix = enc.pop("input_ids"), enc.pop("pixel_values", None)                       # doctest: +SKIP
    >>> exact_influences(vlm, ids, pix, targets=[40, 45], **enc).influence.shape              # doctest: +SKIP
    torch.Size([2, 32, 32])
    """
    spec = vlm.spec
    means = check_options(scope, ablation, metric, means, spec)
    ids, t = prepare_inputs(input_ids, targets, model_kwargs.pop("attention_mask", None))
    dev = vlm.device
    ids, t = ids.to(dev), t.to(dev)
    if vlm.model.training:
        raise ValueError("put the model in eval mode (dropout would make ablations incomparable).")
    fill = means.to(dev) if means is not None else None
    if scope == "local":
        if chunk_size < 1:
            raise ValueError("chunk_size must be >= 1.")
        clean_lp, base_lp, unit_base_lp, abl_lp, gap = _local(vlm, ids, t, pixel_values, fill, chunk_size,
                                                              model_kwargs, row_chunk or spec.n_heads + 1)
        influence = metric_diff(metric, unit_base_lp, abl_lp)  # each head against the control row of its own chunk
    else:
        rc = row_chunk or spec.n_heads + 1
        clean_lp, base_lp, abl_lp, gap = _global(vlm, ids, t, pixel_values, fill, rc, model_kwargs)
        influence = metric_diff(metric, base_lp[:, :, None], abl_lp)  # base_lp [n, L]: per-layer control row
        base_lp = base_lp[:, 0]
    return InfluenceResult(
        influence=influence.cpu(), clean=clean_lp.exp().cpu(), ablated=abl_lp.exp().cpu(), targets=t.cpu(),
        target_ids=ids[0, t].cpu(), scope=scope, ablation=ablation, metric=metric, method="exact",
        baseline=base_lp.exp().cpu(), control_gap=gap,
    )


# ---------------------------------------------------------------------------------------- means
@torch.no_grad()
def head_means(vlm, sequences: Iterable, positions: Iterable) -> torch.Tensor:
    """Mean of every head's output (its ``o_proj``-input slice) over chosen positions.

    Parameters
    ----------
    sequences : iterable of model inputs, each a mapping (e.g. a processor ``BatchEncoding`` with
        ``input_ids``, ``pixel_values`` and optionally ``attention_mask``) or an
        ``(input_ids, pixel_values)`` pair.
    positions : one mask per sequence: bool ``[T]`` / ``[B, T]`` shaped like its ``input_ids``, or
        a list of position indices (batch 1), e.g. the caption positions of reference captions.

    Returns float32 ``[n_layers, n_heads, head_dim]`` (accumulated in float64).

    Example
    -------
    >>> means = head_means(vlm, [enc_a, enc_b], [caption_mask_a, caption_mask_b])  # doctest: +SKIP
    """
    model, spec = vlm.model, vlm.spec
    L, H, D = spec.n_layers, spec.n_heads, spec.head_dim
    total = torch.zeros(L, H * D, dtype=torch.float64, device=vlm.device)
    count = 0
    current: dict = {}

    def make(layer):
        def accumulate(x):
            total[layer] += x[current["mask"].to(x.device)].double().sum(0)
            return None  # read only
        return accumulate

    with head_output_hooks(model, spec, {layer: make(layer) for layer in range(L)}):
        for seq, pos in zip(sequences, positions, strict=True):
            kwargs = dict(seq) if hasattr(seq, "keys") else {"input_ids": seq[0], "pixel_values": seq[1]}
            ids = torch.as_tensor(kwargs["input_ids"])
            if ids.dim() == 1:
                ids = ids[None]
            kwargs["input_ids"] = ids.to(vlm.device)
            pos = torch.as_tensor(pos)
            if pos.dtype != torch.bool:  # indices -> mask
                m = torch.zeros(ids.shape[-1], dtype=torch.bool)
                m[pos.long()] = True
                pos = m
            mask = pos.reshape(ids.shape) if pos.numel() == ids.numel() else None
            if mask is None:
                raise ValueError(f"positions mask has {pos.numel()} entries for input_ids of shape {tuple(ids.shape)}.")
            current["mask"] = mask
            count += int(mask.sum())
            model(**kwargs, use_cache=False)
    if count == 0:
        raise ValueError("no positions selected: the means would be undefined.")
    return (total / count).float().view(L, H, D).cpu()
