"""Exact head influences for all heads at once (same numbers as :mod:`.naive`, far fewer passes).

Local scope (ablation at the predicting position ``q = t - 1`` only)
    1. One forward over the sequence with a KV cache (``DynamicCache``); it gives ``p(y_t | x)``
       and the keys/values of every original position.
    2. "Copies": for target ``i`` and head ``(l, h)`` one extra token whose input embedding is the
       one of position ``q_i`` (so image positions work too), with position id ``q_i``. A 4-D
       attention mask lets copy ``c`` attend to original positions ``< q_i`` and to itself only
       (never to other copies, never to positions ``>= q_i``). Copy ``c`` therefore recomputes
       position ``q_i`` exactly, and a hook on layer ``l``'s ``o_proj`` input replaces head ``h``'s
       slice in that copy only, so the copy's logits give ``p_{-(l,h)}(y_i | x)``. Keys/values
       of earlier positions come from the clean cache: the local ablation by construction.
    3. Copies go in chunks of ``chunk_size`` tokens (memory bound on 7B); the cache is cropped
       back to ``T`` after each chunk, so chunks never see each other.
    Each target also gets one *control* copy with nothing ablated. Its full next-token
    distribution must equal the plain forward's at ``q`` (``control_gap``); a mask that leaked
    other copies or later positions would break that, so the check raises. Influences are taken
    against the control copy (same kernels and shapes as the ablated copies).

Global scope (ablation at every position)
    The residual stream entering layer ``l`` (and the causal mask, rotary embeddings, position
    ids that layer received) is captured in one clean forward. For each layer it is replicated
    into a batch, one row per head (+ a control row); layers ``l..L-1``, the final norm and the
    LM head run on the batch with head ``h`` of layer ``l`` ablated in row ``h`` at every
    position. Layers below ``l`` (and the vision tower) are not recomputed; positions after the
    last target are dropped (causality).

The 4-D mask in transformers 5.23: ``create_causal_mask`` returns a 4-D ``attention_mask`` as it
is (``masking_utils._preprocess_mask_arguments``), and the attention function receives it
unchanged. ``eager`` *adds* it to the scores, so it must be additive float (0 / dtype min; a
boolean mask would be added as 0/1 and silently ignored); ``sdpa`` takes a boolean mask (True =
attend). :func:`attention_mask_4d` builds the right one for the text tower's implementation.

Example
-------
>>> res = exact_influences(vlm, enc["input_ids"], enc["pixel_values"], targets=[40, 45])   # doctest: +SKIP
>>> res.influence.shape, res.control_gap                                                # doctest: +SKIP
(torch.Size([2, 32, 32]), 0.0)
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Sequence

import torch
from torch import nn

from ..hooks.ablation import InterventionNotAppliedError
from .naive import InfluenceResult, check_options, metric_fn, prepare_inputs

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
    broadcastable) is True, head ``h``'s slice is replaced by ``fill[l, h]`` (zero when None)."""
    H, D = spec.n_heads, spec.head_dim
    calls = {layer: 0 for layer in layers}

    def make(layer):
        def hook(module, args):
            where = state["ablate"].get(layer)
            if where is None:
                return None
            calls[layer] += 1
            x = args[0]
            xv = x.view(*x.shape[:-1], H, D)
            value = torch.zeros((), dtype=x.dtype, device=x.device) if fill is None else fill[layer].to(x)
            out = torch.where(where[..., None], value, xv)
            return (out.view_as(x),) + tuple(args[1:])
        return hook

    handles = [spec.o_proj(model, layer).register_forward_pre_hook(make(layer)) for layer in calls]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def _check_calls(calls: dict, expected: dict) -> None:
    missed = [layer for layer, n in expected.items() if n > 0 and calls.get(layer, 0) < n]
    if missed:
        raise InterventionNotAppliedError(f"ablation hooks on layer(s) {missed} did not run for every batch.")


# ---------------------------------------------------------------------------------------- local
@torch.no_grad()
def _local(vlm, ids, t, pixel_values, fill, chunk_size, model_kwargs):
    model, spec = vlm.model, vlm.spec
    lm = spec.language_model(model)
    head = _lm_head(model)
    impl = attn_implementation(vlm)
    L, H = spec.n_layers, spec.n_heads
    T = ids.shape[1]
    q, y = t - 1, ids[0, t]
    n = len(t)

    # 1. Plain forward with a cache; capture the embeddings the decoder received (image features
    # merged in), so a copy of an image position gets the image feature, not the placeholder.
    captured = {}

    def grab(mod, args, kw):
        captured["emb"] = kw.get("inputs_embeds")

    h = lm.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        out = model(input_ids=ids, pixel_values=pixel_values, use_cache=True, **model_kwargs)
    finally:
        h.remove()
    emb, cache = captured.get("emb"), out.past_key_values
    if emb is None or cache is None or cache.get_seq_length() != T:
        raise RuntimeError("could not capture the decoder's input embeddings and KV cache from the plain forward.")
    clean_full = torch.log_softmax(out.logits[0, q].float(), dim=-1)  # [n, V]
    clean_lp = clean_full.gather(-1, y[:, None])[:, 0]
    del out

    # 2. Copies: per target, one control (layer -1) then every (layer, head).
    per = 1 + L * H
    c_target = torch.arange(n, device=ids.device).repeat_interleave(per)
    c_layer = torch.cat([torch.tensor([-1]), torch.arange(L).repeat_interleave(H)]).to(ids.device).repeat(n)
    c_head = torch.cat([torch.tensor([-1]), torch.arange(H).repeat(L)]).to(ids.device).repeat(n)
    lp = torch.empty(n * per, device=ids.device)
    gap = 0.0
    state: dict = {"ablate": {}}
    expected = {layer: 0 for layer in range(L)}
    heads = torch.arange(H, device=ids.device)
    with _head_fill_hooks(model, spec, range(L), state, fill) as calls:
        for start in range(0, n * per, chunk_size):
            sl = slice(start, min(start + chunk_size, n * per))
            tgt, lay, hd = c_target[sl], c_layer[sl], c_head[sl]
            qq = q[tgt]
            state["ablate"] = {}
            for layer in lay.unique().tolist():
                if layer >= 0:
                    state["ablate"][layer] = ((lay == layer)[:, None] & (hd[:, None] == heads))[None]  # [1, S, H]
                    expected[layer] += 1
            mask = attention_mask_4d(copy_attention_mask(qq, T), impl, emb.dtype)
            hid = lm(inputs_embeds=emb[0, qq][None], attention_mask=mask, position_ids=qq[None],
                     past_key_values=cache, use_cache=True).last_hidden_state[0]
            cache.crop(-(sl.stop - sl.start))  # drop this chunk's keys/values: chunks never see each other
            if cache.get_seq_length() != T:
                raise RuntimeError(f"KV cache holds {cache.get_seq_length()} positions after cropping, expected {T}.")
            logp = torch.log_softmax(head(hid).float(), dim=-1)
            lp[sl] = logp.gather(-1, y[tgt][:, None])[:, 0]
            ctrl = lay < 0
            if bool(ctrl.any()):
                gap = max(gap, float((logp[ctrl] - clean_full[tgt[ctrl]]).abs().max()))
    _check_calls(calls, expected)
    _check_control(gap, emb.dtype, "exact local attribution")
    lp = lp.view(n, per)
    return clean_lp, lp[:, 0], lp[:, 1:].reshape(n, L, H), gap


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
                    x = layers[k](x, past_key_values=None, use_cache=False, **kw)
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
    metric : ``"prob_diff"`` or ``"log_prob_diff"``.
    chunk_size : local scope: copies (extra tokens) per forward; bounds memory.
    row_chunk : global scope: batch rows per replay (default ``n_heads + 1``: one layer at once).
    model_kwargs : passed to the plain forward (e.g. ``image_sizes``).

    Returns :class:`InfluenceResult` with ``influence`` ``[n_targets, n_layers, n_heads]`` =
    ``m(baseline) - m(ablated)``, ``baseline`` the control copy (local) or the control row of the
    first layer (global; each layer's influences use that layer's control row).
    """
    spec = vlm.spec
    means = check_options(scope, ablation, metric, means, spec)
    ids, t = prepare_inputs(input_ids, targets, model_kwargs.pop("attention_mask", None))
    dev = vlm.device
    ids, t = ids.to(dev), t.to(dev)
    if vlm.model.training:
        raise ValueError("put the model in eval mode (dropout would make ablations incomparable).")
    m = metric_fn(metric)
    fill = means.to(dev) if means is not None else None
    if scope == "local":
        if chunk_size < 1:
            raise ValueError("chunk_size must be >= 1.")
        clean_lp, base_lp, abl_lp, gap = _local(vlm, ids, t, pixel_values, fill, chunk_size, model_kwargs)
        influence = m(base_lp)[:, None, None] - m(abl_lp)
    else:
        rc = row_chunk or spec.n_heads + 1
        clean_lp, base_lp, abl_lp, gap = _global(vlm, ids, t, pixel_values, fill, rc, model_kwargs)
        influence = m(base_lp)[:, :, None] - m(abl_lp)  # base_lp [n, L]: per-layer control row
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
        def hook(module, args):
            x = args[0]
            total[layer] += x[current["mask"].to(x.device)].double().sum(0)
        return hook

    handles = [spec.o_proj(model, layer).register_forward_pre_hook(make(layer)) for layer in range(L)]
    try:
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
    finally:
        for h in handles:
            h.remove()
    if count == 0:
        raise ValueError("no positions selected: the means would be undefined.")
    return (total / count).float().view(L, H, D).cpu()
