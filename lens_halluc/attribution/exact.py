"""Exact head influences for all heads at once (same numbers as :mod:`.naive`, far fewer passes).

Local scope (ablation at the predicting position ``q = t - 1`` only)
    1. One forward over the sequence with a KV cache; it gives ``p(y_t | x)``, the keys/values of
       every original position at every layer, and what decoder layer 0 received (input
       embeddings with the image features merged in, rotary cos/sin and position ids).
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
    (``control_gap``); a mask that leaked other rows or later positions would break that, so the
    check raises. The replay calls each layer as the decoder model does (``hidden_states``,
    ``attention_mask``, ``position_embeddings``, ``position_ids``, ``past_key_values``,
    ``use_cache``); a layer whose attention does not read its keys/values through
    ``past_key_values.update`` (or gets no rotary (cos, sin)) is refused with an error.

Global scope (ablation at every position)
    The residual stream entering layer ``l`` (and the causal mask, rotary embeddings, position
    ids that layer received) is captured in one clean forward. For each layer it is replicated
    into a batch, one row per head (+ a control row); layers ``l..L-1``, the final norm and the
    LM head run on the batch with head ``h`` of layer ``l`` ablated in row ``h`` at every
    position. Layers below ``l`` (and the vision tower) are not recomputed; positions after the
    last target are dropped (causality).

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

from ..hooks.ablation import InterventionNotAppliedError, head_output_hooks
from ..models.compat import cache_from_output, cache_kwargs
from .naive import InfluenceResult, check_options, metric_diff, prepare_inputs

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
    """``[1, 1, n_query, n_key]`` mask in the form ``implementation`` honours (see module doc)."""
    if implementation.startswith("flash") or implementation.startswith("flex") or implementation == "paged":
        raise ValueError(
            f"the exact batched method needs an arbitrary 4-D attention mask, which {implementation!r} does not "
            "take; load the text tower with attn_implementation='eager' or 'sdpa'.")
    if implementation == "sdpa":
        return allowed[None, None]
    # eager and registered attention functions that follow eager's additive convention
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)[None, None]


def _lm_head(model: nn.Module) -> nn.Module:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (LM head).")
    return head


def _check_control(gap: float, dtype: torch.dtype, what: str) -> None:
    tol = CONTROL_TOL.get(dtype, HALF_CONTROL_TOL)
    if gap > tol:
        raise MaskNotHonouredError(
            f"{what}: un-ablated control rows differ from the plain forward by {gap:.3g} in log-probability "
            f"(tolerance {tol:g}). The attention mask or positions were not applied as built; "
            f"check the attention implementation (eager and sdpa are supported).")


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


# ---------------------------------------------------------------------------------------- local
class _PrefixKV:
    """Stands in for the KV cache when a decoder layer is replayed on copy rows.

    The attention calls ``update(key_states, value_states, layer_idx)`` with the rows' own keys and
    values; this returns the clean forward's keys/values of that layer (all ``T`` positions)
    followed by the rows' own, and stores nothing, so rows of any number can go through any
    layer. ``calls`` counts the updates per layer (a layer that never calls it cannot be replayed).
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        self.keys, self.values = keys, values
        self.calls = [0] * len(keys)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.calls[layer_idx] += 1
        return (torch.cat([self.keys[layer_idx], key_states], dim=-2),
                torch.cat([self.values[layer_idx], value_states], dim=-2))

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.keys[layer_idx].shape[-2]


def _cache_kv(cache, n_layers: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer keys and values ``[1, n_kv_heads, T, head_dim]`` of a transformers cache."""
    layers = getattr(cache, "layers", None)
    if layers is not None and len(layers) == n_layers:
        return [lay.keys for lay in layers], [lay.values for lay in layers]
    if hasattr(cache, "key_cache") and len(cache.key_cache) == n_layers:  # older transformers
        return list(cache.key_cache), list(cache.value_cache)
    raise RuntimeError(f"cannot read per-layer keys/values of {n_layers} layers from {type(cache).__name__}.")


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


@torch.no_grad()
def _local(vlm, ids, t, pixel_values, fill, chunk_size, model_kwargs):
    model, spec = vlm.model, vlm.spec
    lm = spec.language_model(model)
    layers = spec.layers(model)
    head = _lm_head(model)
    impl = attn_implementation(vlm)
    L, H = spec.n_layers, spec.n_heads
    T = ids.shape[1]
    q, y = t - 1, ids[0, t]
    n = len(t)
    dev = ids.device

    # 1. Plain forward with a cache; capture what decoder layer 0 received (the input embeddings
    # with the image features merged in, the rotary cos/sin and position ids of every position).
    captured = {}

    def grab(mod, args, kw):
        captured["h0"] = args[0] if args else kw.get("hidden_states")
        captured["kw"] = {k: kw.get(k) for k in ("position_embeddings", "position_ids")}

    hk = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        out = model(input_ids=ids, pixel_values=pixel_values, use_cache=True, **model_kwargs)
    finally:
        hk.remove()
    h0, cache = captured.get("h0"), cache_from_output(out)
    if h0 is None or cache is None or cache.get_seq_length() != T or tuple(h0.shape[:2]) != (1, T):
        raise RuntimeError("could not capture the decoder's layer-0 input and KV cache from the plain forward.")
    pos_emb, pos_ids = captured["kw"]["position_embeddings"], captured["kw"]["position_ids"]
    if not (isinstance(pos_emb, (tuple, list)) and len(pos_emb) == 2 and pos_emb[0].shape[-2] == T):
        raise RuntimeError(
            f"{type(layers[0]).__name__} did not receive rotary (cos, sin) position embeddings of the {T} positions; "
            "the staggered local method replays Llama-style decoder layers only.")
    if not isinstance(pos_ids, torch.Tensor):
        pos_ids = torch.arange(T, device=dev)[None]
    prefix = _PrefixKV(*_cache_kv(cache, L))
    clean_full = torch.log_softmax(out.logits[0, q].float(), dim=-1)  # [n, V]
    clean_lp = clean_full.gather(-1, y[:, None])[:, 0]
    del out
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
        # rows: the mask, rotary embeddings and position ids are built once and sliced.
        mask = attention_mask_4d(copy_attention_mask(rows_q, T), impl, dtype)
        cos, sin = (e[..., rows_q, :] for e in pos_emb)
        pid = pos_ids[..., rows_q]
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
            x = layers[k](x[None], attention_mask=mask[..., :R, :T + R],
                          position_embeddings=(cos[..., :R, :], sin[..., :R, :]), position_ids=pid[..., :R],
                          **cache_kwargs(layers[k], prefix), use_cache=True)
            x = (x[0] if isinstance(x, tuple) else x)[0]
            if prefix.calls[k] != before + 1:
                raise RuntimeError(
                    f"decoder layer {k} ({type(layers[k]).__name__}) did not fetch its keys/values through "
                    "past_key_values.update(); the staggered local method cannot replay this architecture.")
        state["ablate"] = {}
        logp = torch.log_softmax(head(lm.norm(x)).float(), dim=-1)
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
    return clean_lp, base_lp, to_nlh(base_u), to_nlh(abl), gap


# ---------------------------------------------------------------------------------------- global
@torch.no_grad()
def _global(vlm, ids, t, pixel_values, fill, row_chunk, model_kwargs):
    model, spec = vlm.model, vlm.spec
    lm = spec.language_model(model)
    layers = spec.layers(model)
    head = _lm_head(model)
    L, H = spec.n_layers, spec.n_heads
    q, y = t - 1, ids[0, t]
    n = len(t)

    # 1. Plain forward; capture what each decoder layer received.
    inputs: dict[int, tuple] = {}

    def make(i):
        def pre(mod, args, kw):
            hs = args[0] if args else kw["hidden_states"]
            inputs[i] = (hs, {k: kw.get(k) for k in ("attention_mask", "position_embeddings", "position_ids")})
        return pre

    handles = [layer.register_forward_pre_hook(make(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        out = model(input_ids=ids, pixel_values=pixel_values, use_cache=False, **model_kwargs)
    finally:
        for hd in handles:
            hd.remove()
    if len(inputs) != L:
        raise RuntimeError(f"captured the inputs of {len(inputs)} of {L} decoder layers.")
    clean_full = torch.log_softmax(out.logits[0, q].float(), dim=-1)
    clean_lp = clean_full.gather(-1, y[:, None])[:, 0]
    del out

    # Positions after the last predicting position cannot influence any target (causal model).
    Tp = int(q.max()) + 1

    def crop(kw):
        mask, (cos, sin), pos = kw["attention_mask"], kw["position_embeddings"], kw["position_ids"]
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:
            mask = mask[..., :Tp, :Tp]
        return {"attention_mask": mask, "position_embeddings": (cos[:, :Tp], sin[:, :Tp]),
                "position_ids": pos[..., :Tp] if isinstance(pos, torch.Tensor) else pos}

    rows_head = torch.arange(-1, H, device=ids.device)  # row 0 = control, row 1 + h = head h ablated
    lp = torch.empty(L, H + 1, n, device=ids.device)
    gap = 0.0
    state: dict = {"ablate": {}}
    expected = {layer: 0 for layer in range(L)}
    heads = torch.arange(H, device=ids.device)
    with _head_fill_hooks(model, spec, range(L), state, fill) as calls:
        for layer in range(L):
            hs, kw = inputs[layer]
            kw = crop(kw)
            for start in range(0, H + 1, row_chunk):
                rows = rows_head[start:start + row_chunk]
                x = hs[:, :Tp].expand(len(rows), -1, -1).contiguous()
                state["ablate"] = {layer: (rows[:, None] == heads)[:, None, :]}  # [B, 1, H]: every position
                expected[layer] += 1
                for k in range(layer, L):
                    x = layers[k](x, **cache_kwargs(layers[k], None), use_cache=False, **kw)
                    x = x[0] if isinstance(x, tuple) else x
                logp = torch.log_softmax(head(lm.norm(x[:, q])).float(), dim=-1)  # [B, n, V]
                lp[layer, start:start + len(rows)] = logp.gather(-1, y.expand(len(rows), -1)[..., None])[..., 0]
                if start == 0:
                    gap = max(gap, float((logp[0] - clean_full).abs().max()))
    _check_calls(calls, expected)
    _check_control(gap, hs.dtype, "exact global attribution")
    # lp [L, 1 + H, n] -> per layer control [L, n] and ablated [n, L, H]
    return clean_lp, lp[:, 0].T, lp[:, 1:].permute(2, 0, 1), gap


# ---------------------------------------------------------------------------------------- public
def exact_influences(
    vlm,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
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
    pixel_values : ``[1, 3, H, W]`` from the processor.
    targets : positions ``t`` (``1 <= t < T``); the target token is ``input_ids[t]``.
    scope : ``"local"`` (ablate at ``t - 1`` only) or ``"global"`` (every position).
    ablation : ``"zero"`` or ``"mean"`` (then ``means`` ``[n_layers, n_heads, head_dim]``).
    metric : ``"prob_diff"`` (reference default), ``"abs_prob_diff"`` or ``"log_prob_diff"``.
    chunk_size : local scope: most rows (copies of a predicting position) in one decoder layer's batch;
        bounds memory. Any value gives the same influences.
    row_chunk : global scope: batch rows per replay (default ``n_heads + 1``: one layer at once).
    model_kwargs : passed to the plain forward (e.g. ``image_sizes``).

    Returns :class:`InfluenceResult` with ``influence`` ``[n_targets, n_layers, n_heads]`` =
    ``m(baseline) - m(ablated)``, ``baseline`` the control copy (local; each chunk's influences use
    that chunk's control row of the target) or the control row of the first layer (global; each
    layer's influences use that layer's control row).
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
                                                              model_kwargs)
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
