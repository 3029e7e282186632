"""Attention editing: one registered attention function that edits post-softmax weights per head.

The text tower runs ``"lens_halluc"``, an attention function registered with
``transformers.AttentionInterface``. It computes exactly what ``eager`` computes (scores =
``QK^T · scaling + mask``, softmax in float32, dropout only in training, GQA keys/values repeated)
and, between the softmax and ``@ V``, applies the :class:`AttentionEdit` s that are active for that
layer to the chosen heads. One mechanism serves attention re-weighting (:class:`ScaleKeys`), ADHH
(:class:`ThresholdZeroText`), CausalMM's counterfactual LLM attention (:class:`Counterfactual`)
and head-level reads (:func:`capture_attention`).

Why a registered function and not hooks: the post-softmax weights are internal to the attention
function; under ``sdpa`` they never exist, so an edit there would silently do nothing (a defect of
the reference code). :func:`edit_attention` therefore refuses to start unless the text tower runs
``"lens_halluc"``, and raises on exit if none of the edited layers ran.

Why the mask registration: in transformers v5, ``masking_utils._preprocess_mask_arguments`` returns
*no mask at all* for an implementation name that is not in ``AttentionMaskInterface`` — the causal
and padding mask would silently disappear. The same name is therefore registered there with
``eager_mask`` (the 4-D float mask: 0 = attend, dtype-min = masked), which is what eager uses.

Example
-------
>>> from lens_halluc.hooks.attention import ScaleKeys, edit_attention, use_editable_attention
>>> use_editable_attention(vlm)                                           # doctest: +SKIP
'eager'
>>> with edit_attention(vlm, ScaleKeys("image", 2.0), [(10, 3), (14, 7)]):  # doctest: +SKIP
...     logits = vlm.model(**enc).logits
"""
from __future__ import annotations

import weakref
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping, Protocol, Sequence, runtime_checkable

import torch
from torch import nn

from ..generation.decoding import DecodingStrategy
from ..models.compat import cache_from_kwargs, config_path
from ..models.spec import ModelSpec, SpecError, TokenRole
from .ablation import InterventionNotAppliedError

ATTN_IMPLEMENTATION = "lens_halluc"
"""The name under which the editable attention function (and its mask function) is registered."""

__all__ = [
    "ATTN_IMPLEMENTATION", "AttentionEdit", "AttentionEditing", "Counterfactual", "EditContext", "Identity",
    "ScaleKeys", "ThresholdZeroText", "capture_attention", "edit_attention", "editable_attention",
    "edit_key_groups", "lens_halluc_attention_forward", "register_editable_attention",
    "text_attn_implementation",
    "use_editable_attention", "set_text_attn_implementation",
]


# ====================================================================== edit protocol and context
class EditContext:
    """What an edit may know about the current attention call.

    Attributes
    ----------
    layer : int — decoder layer index.
    heads : tuple[int, ...] — the head indices (within the layer) of the ``h_sel`` axis of the
        weights passed to the edit, in that order.
    query_positions : LongTensor ``[B, Q]`` — index on the key axis of each query row (with a KV
        cache, keys = past + current, so query ``i`` sits at key index ``K - Q + i``).
    allowed : BoolTensor ``[B, 1, Q, K]`` — keys the causal + padding mask lets each query see.
    key_roles : LongTensor ``[B, K]`` of :class:`TokenRole` (SYSTEM / IMAGE / TEXT / PAD) — raises
        if the roles are unknown (forward without ``input_ids``, or a cached step whose prefill ran
        outside any :func:`edit_attention`).
    """

    def __init__(self, layer: int, heads: tuple[int, ...], query_positions: torch.Tensor, allowed: torch.Tensor,
                 roles: Callable[[], torch.Tensor]):
        self.layer, self.heads = layer, heads
        self.query_positions, self.allowed = query_positions, allowed
        self._roles = roles

    @property
    def key_roles(self) -> torch.Tensor:
        return self._roles()

    def key_group(self, group: str) -> torch.Tensor:
        """BoolTensor ``[B, 1, 1, K]``: keys of ``group`` ("text", "image" or "system").

        "text" = TEXT-role keys: after the image up to the query (causality removes later ones; the
        system prompt before the image is excluded), as in the reference's text attention.
        """
        role = _GROUPS.get(group)
        if role is None:
            raise ValueError(f"unknown key group {group!r}; use one of {sorted(_GROUPS)}.")
        return (self.key_roles == int(role))[:, None, None, :]


_GROUPS = {"text": TokenRole.TEXT, "image": TokenRole.IMAGE, "system": TokenRole.SYSTEM}


@runtime_checkable
class AttentionEdit(Protocol):
    """Anything mapping post-softmax weights ``[B, h_sel, Q, K]`` (float32) to edited weights of that shape.

    Example
    -------
    >>> def halve_image(weights, ctx):          # a custom edit is just a callable
    ...     return weights * torch.where(ctx.key_group("image"), 0.5, 1.0)
    """

    def __call__(self, weights: torch.Tensor, ctx: EditContext) -> torch.Tensor: ...


def _renorm(weights: torch.Tensor) -> torch.Tensor:
    # Rows that lost all their mass stay zero instead of becoming NaN.
    return weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)


@dataclass(frozen=True)
class Identity:
    """The no-op edit (checks that the machinery itself changes nothing).

    Example
    -------
    >>> with edit_attention(vlm, Identity(), [(0, 0)]): ...              # doctest: +SKIP
    """

    def __call__(self, weights: torch.Tensor, ctx: EditContext) -> torch.Tensor:
        return weights


@dataclass(frozen=True)
class ScaleKeys:
    """Post-softmax scaling of one key group by ``alpha`` (attention re-weighting, Fig. 6).

    ``group`` is "text" (TEXT-role keys after the image) or "image" (or "system"). Every query row
    of every forward is scaled (prefill and each decoding step), as the reference does:
    ``attn_weights[:, head, :, text_start:] *= alpha`` (or the image slice) in
    TianyunYoung/Hallucination-Attribution ``LLaVA/llava/model/language_model/modeling_llama.py``
    lines 583-593. The reference does not renormalise; ``renormalize=True`` divides each row by its
    new sum.

    Example
    -------
    >>> with edit_attention(vlm, ScaleKeys("text", 0.4), hal_heads): ...    # doctest: +SKIP
    """

    group: str
    alpha: float
    renormalize: bool = False

    @property
    def key_groups(self) -> tuple[str, ...]:
        return (self.group,)

    def __call__(self, weights: torch.Tensor, ctx: EditContext) -> torch.Tensor:
        scale = torch.where(ctx.key_group(self.group), float(self.alpha), 1.0).to(weights)
        out = weights * scale
        return _renorm(out) if self.renormalize else out


@dataclass(frozen=True)
class ThresholdZeroText:
    """ADHH: if a query row's attention mass on text keys is ≥ ``tau``, set that text attention to 0.

    ``rows`` says which query rows are tested (and edited):

    * ``"last"`` (the reference): only the last query row of each forward — in the prefill the last
      prompt position, at each cached decoding step the current one. This is what the reference's
      modified ``LlamaAttention.forward`` does: ``attn_weights[:, head, -1, text_start:]``
      (TianyunYoung/Hallucination-Attribution, ``baselines/minigpt4/models/modeling_llama.py``
      lines 433-439 and ``LLaVA/llava/model/language_model/modeling_llama.py`` lines 575-581).
    * ``"all"``: every query row of every forward (the earlier prompt rows too).

    Text keys are the TEXT-role keys: every position after the image up to the query, the generated
    tokens included (the reference's ``text_start = img_start_pos + img_length`` to the end, with
    its offsets hard-coded per model; here they come from the token roles, padding excluded). The
    test is per batch row (the reference sums over the batch too, with batch size 1). The reference
    does not renormalise (rows then sum to less than 1); ``renormalize=True`` divides the edited
    rows (only those) by their remaining mass.

    Example
    -------
    >>> with edit_attention(vlm, ThresholdZeroText(0.5), hal_heads): ...    # doctest: +SKIP
    >>> ThresholdZeroText(0.5, rows="all").rows
    'all'
    """

    tau: float
    renormalize: bool = False
    rows: str = "last"

    ROWS = ("last", "all")
    # ADHH weighs text against image attention: both must be keys of the edited softmax (not so in Mllama).
    key_groups = ("text", "image")

    def __post_init__(self):
        if self.rows not in self.ROWS:
            raise ValueError(f"ThresholdZeroText: rows must be one of {self.ROWS}, got {self.rows!r}.")

    def __call__(self, weights: torch.Tensor, ctx: EditContext) -> torch.Tensor:
        text = ctx.key_group("text")                                     # [B,1,1,K]
        hit = (weights * text).sum(-1, keepdim=True) >= self.tau         # [B,h,Q,1]
        if self.rows == "last":
            last = torch.zeros(weights.shape[-2], dtype=torch.bool, device=weights.device)
            last[-1] = True
            hit = hit & last[None, None, :, None]                        # only the last query row
        out = torch.where(hit & text, torch.zeros((), dtype=weights.dtype, device=weights.device), weights)
        return torch.where(hit, _renorm(out), out) if self.renormalize else out


@dataclass(frozen=True)
class Counterfactual:
    """CausalMM counterfactual attention in the LLM, causal (and padding) mask kept.

    kind:
      * ``"reverse"``: ``max_row − w`` on allowed keys (as the reference: rows not normalised);
      * ``"reverse_normalize"``: the reversed row divided by its sum (a row whose allowed weights are
        all equal, e.g. a query that sees one key, reverses to 0 and stays 0; the reference gave NaN);
      * ``"uniform"``: ``1 / n_allowed`` on every allowed key;
      * ``"random"``: uniform noise on allowed keys, normalised per row (``seed`` and the layer fix
        the draw, so a run is reproducible).
    Masked keys (future or padding) always get weight 0. Deviation from the reference: its
    uniform / random rows are normalised over *all* keys before masking, so prefill rows did not
    sum to 1; here they do (identical for a single-query decoding step without padding).

    Example
    -------
    >>> with edit_attention(vlm, Counterfactual("uniform"), all_heads): ...  # doctest: +SKIP
    """

    kind: str = "reverse"
    seed: int = 0

    KINDS = ("reverse", "reverse_normalize", "uniform", "random")

    def __post_init__(self):
        if self.kind not in self.KINDS:
            raise ValueError(f"unknown counterfactual kind {self.kind!r}; use one of {self.KINDS}.")

    def __call__(self, weights: torch.Tensor, ctx: EditContext) -> torch.Tensor:
        allowed = ctx.allowed.expand_as(weights)
        zero = torch.zeros((), dtype=weights.dtype, device=weights.device)
        if self.kind in ("reverse", "reverse_normalize"):
            peak = torch.where(allowed, weights, zero).amax(-1, keepdim=True)
            out = torch.where(allowed, peak - weights, zero)
            return _renorm(out) if self.kind == "reverse_normalize" else out
        if self.kind == "uniform":
            return _renorm(allowed.to(weights.dtype))
        gen = torch.Generator(device=weights.device).manual_seed(int(self.seed) * 1_000_003 + ctx.layer)
        noise = torch.rand(weights.shape, generator=gen, device=weights.device, dtype=weights.dtype)
        return _renorm(torch.where(allowed, noise, zero))


# ====================================================================== registry of active edits
@dataclass
class _Registration:
    """One edit on one layer: which heads, and a counter proving the layer ran."""

    edit: AttentionEdit
    layer: int
    heads: tuple[int, ...]
    roles: "_RoleTracker"
    calls: int = 0
    model: nn.Module | None = None

    def key_roles(self, bsz: int, k_len: int) -> torch.Tensor:
        """Roles ``[B, K]`` of this layer's keys: the tokens' (self-attention) or the vision tokens' (cross)."""
        tokens = self.roles.roles
        adapter = self.roles.spec.adapter
        if adapter is not None and self.model is not None:
            # the layer's own keys: cross-attention -> the vision tokens; sliding cache -> the window's tokens
            kind = self.roles.spec.attention_kinds[self.layer] if self.roles.spec.attention_kinds else "self"
            r = adapter.attention_key_roles(self.model, self.layer, tokens, k_len)
            if kind == "cross" and r is not None:
                return r.expand(bsz, k_len) if r.shape[0] == 1 else r
            tokens = r
        if tokens is None:
            raise InterventionNotAppliedError(
                f"edit {self.edit!r} needs key roles but they are unknown: {self.roles.why_unknown}.")
        if tokens.shape != (bsz, k_len):
            raise InterventionNotAppliedError(
                f"key roles cover {tuple(tokens.shape)} positions but layer {self.layer} attends over {(bsz, k_len)} "
                "keys: the cache and the inputs disagree (reuse one cache per branch, pass the full attention_mask).")
        return tokens


@dataclass
class _RoleTracker:
    """Key roles of the forward in flight, set by a pre-hook on the top-level model."""

    spec: ModelSpec
    roles: torch.Tensor | None = None
    why_unknown: str = "no forward of the hooked model has run"
    forwards: int = 0


# attention module -> active registrations (several nested edit_attention contexts may stack).
_ACTIVE: dict[nn.Module, list[_Registration]] = defaultdict(list)
# KV cache -> roles of the keys it holds, so cached decoding steps know the roles of past keys even
# though greedy_decode enters a fresh edit_attention context around every step.
_CACHE_ROLES: "weakref.WeakKeyDictionary[object, torch.Tensor]" = weakref.WeakKeyDictionary()
# layers whose weights capture_attention is recording: attention module -> list of tensors.
_CAPTURE: dict[nn.Module, list[torch.Tensor]] = {}


def _role_pre_hook(tracker: _RoleTracker):
    """Forward pre-hook (with kwargs) on the top-level model: label the keys of this forward."""

    def hook(module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        attention_mask = kwargs.get("attention_mask")
        cache = cache_from_kwargs(kwargs)  # `cache=` under model.generate() of transformers >= 5.2x
        tracker.roles = None
        tracker.forwards += 1
        if input_ids is None:
            tracker.why_unknown = "the forward got no input_ids (inputs_embeds only), so image/text keys are unknown"
            return None
        n_new = input_ids.shape[1]
        if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[1] > n_new:
            # the 2-D mask covers past + new tokens: the self-attention keys. (cache.get_seq_length() reads
            # layer 0, which is a cross-attention layer's vision keys in some Mllama configurations.)
            past = attention_mask.shape[1] - n_new
        else:
            past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.shape[0], past + n_new, dtype=torch.long, device=input_ids.device)
        if past == 0:
            try:
                roles = tracker.spec.token_roles(input_ids, attention_mask[:, -n_new:])
            except SpecError as e:
                tracker.why_unknown = str(e)
                return None
        else:
            prev = _CACHE_ROLES.get(cache)
            if prev is None or prev.shape[1] != past:
                tracker.why_unknown = (
                    "this is a cached step whose prefill ran outside edit_attention (or with another cache), so the "
                    "roles of past keys are unknown; run the prefill inside edit_attention too (AttentionEditing does)")
                return None
            # generated / appended tokens come after the image: TEXT (image-structure ids keep their role),
            # unless padded
            new = torch.full_like(input_ids, int(TokenRole.TEXT))
            if tracker.spec.structure_token_ids:
                structure = torch.tensor(tracker.spec.structure_token_ids, device=input_ids.device)
                new[torch.isin(input_ids, structure)] = int(TokenRole.IMAGE_STRUCTURE)
            new[attention_mask[:, -n_new:] == 0] = int(TokenRole.PAD)
            roles = torch.cat([prev.to(new.device), new], dim=1)
        if cache is not None:
            _CACHE_ROLES[cache] = roles
        tracker.roles = roles
        return None

    return hook


# ====================================================================== the attention function
def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    # [B, kv_heads, K, d] -> [B, kv_heads * n_rep, K, d], head h uses kv head h // n_rep (as Llama's repeat_kv)
    if n_rep == 1:
        return x
    b, kv, k, d = x.shape
    return x[:, :, None].expand(b, kv, n_rep, k, d).reshape(b, kv * n_rep, k, d)


def _allowed(attention_mask: torch.Tensor | None, q_pos: torch.Tensor, k_len: int) -> torch.Tensor:
    """BoolTensor ``[B or 1, 1, Q, K]`` of keys each query may attend to."""
    if attention_mask is None:
        return (torch.arange(k_len, device=q_pos.device)[None, None, None, :] <= q_pos[:, None, :, None])
    if attention_mask.dtype == torch.bool:
        return attention_mask
    # eager_mask: 0 where allowed, dtype-min where masked
    return attention_mask > torch.finfo(attention_mask.dtype).min / 2


def _apply_edits(module: nn.Module, regs: Sequence[_Registration], weights: torch.Tensor,
                 attention_mask: torch.Tensor | None) -> torch.Tensor:
    bsz, _, q_len, k_len = weights.shape
    q_pos = torch.arange(k_len - q_len, k_len, device=weights.device).expand(bsz, q_len)
    allowed = _allowed(attention_mask, q_pos, k_len)[..., :k_len]
    allowed = allowed.expand(bsz, 1, q_len, k_len) if allowed.shape[0] == 1 else allowed
    # Edits run in float32 on a copy, whatever the model dtype, then are cast back.
    out = weights.to(torch.float32, copy=True)
    for reg in regs:
        reg.calls += 1

        def roles(reg=reg) -> torch.Tensor:
            return reg.key_roles(bsz, k_len).to(weights.device)

        ctx = EditContext(reg.layer, reg.heads, q_pos, allowed, roles)
        idx = list(reg.heads)
        edited = reg.edit(out[:, idx], ctx)
        if edited.shape != out[:, idx].shape:
            raise ValueError(f"edit {reg.edit!r} returned shape {tuple(edited.shape)}, expected {tuple(out[:, idx].shape)}.")
        out[:, idx] = edited.to(out.dtype)
    return out.to(weights.dtype)


def _additive_mask(attention_mask: torch.Tensor, k_len: int, dtype: torch.dtype) -> torch.Tensor:
    """The mask as eager adds it: float ``[B|1, 1|H, Q, K]``, 0 = attend, dtype-min = masked.

    transformers' ``eager_mask`` (registered under our name) gives exactly that; a boolean mask
    (True = attend, the ``sdpa_mask`` convention) is converted; a mask longer than the keys (a static
    cache's full length) is cut to the keys, as older eager functions did."""
    if attention_mask.shape[-1] != k_len:
        attention_mask = attention_mask[..., :k_len]
    if attention_mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
        return torch.where(attention_mask, zero, torch.finfo(dtype).min)
    return attention_mask


def lens_halluc_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    sliding_window: int | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention with post-softmax edits; the signature of transformers' attention functions.

    Shapes: ``query [B, H, Q, d]``, ``key``/``value [B, H_kv, K, d]`` (GQA: head ``h`` uses kv head
    ``h // (H / H_kv)``, ``module.num_key_value_groups``), ``attention_mask [B|1, 1, Q, K]`` float
    (0 / dtype-min, ``eager_mask``) or bool (True = attend) or None.
    Returns ``(output [B, Q, H, d], weights [B, H, Q, K])`` like the family's ``eager_attention_forward``.

    Every keyword the families' attention modules pass is honoured, operation for operation as their
    eager functions:

    * ``scaling`` — scores ``= QK^T · scaling`` (None: ``head_dim ** -0.5``, as Gemma 2's eager);
    * ``softcap`` — Gemma 2 / PaliGemma 2 ``attn_logit_softcapping``: ``tanh(s / c) · c`` *before* the mask;
    * ``s_aux`` — attention sinks (GPT-OSS): one extra logit per head joins each row's softmax and is
      dropped after it (rows then sum to less than 1), max-subtracted and in the logits' dtype as GPT-OSS;
    * ``sliding_window`` — already in the mask: transformers builds each sliding layer's mask with the
      window for every implementation whose mask function is registered (ours is ``eager_mask``), and
      eager reads only the mask; nothing more is applied here (applying it again would not change it);
    * ``dropout`` — on the weights in training only (``module.training``), after the softmax;
    * other keywords (``position_ids``, ``is_causal``, ``cu_seq_lens_*`` ...) are for kernels that do
      not take a materialised mask; eager ignores them and so does this function.

    With no active edit the computation is eager's, so logits and weights equal eager's.

    Example
    -------
    >>> model.set_attn_implementation({"text_config": "lens_halluc"})        # doctest: +SKIP
    """
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    n_rep = getattr(module, "num_key_value_groups", None) or query.shape[1] // key.shape[1]
    key_states = _repeat_kv(key, n_rep)
    value_states = _repeat_kv(value, n_rep)
    scores = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    mask = None if attention_mask is None else _additive_mask(attention_mask, key_states.shape[-2], scores.dtype)
    if mask is not None:
        scores = scores + mask
    if s_aux is not None:
        sinks = s_aux.reshape(1, -1, 1, 1).expand(query.shape[0], -1, query.shape[-2], -1)
        combined = torch.cat([scores, sinks.to(scores.dtype)], dim=-1)
        combined = combined - combined.max(dim=-1, keepdim=True).values
        weights = nn.functional.softmax(combined, dim=-1, dtype=combined.dtype)[..., :-1]
        weights = nn.functional.dropout(weights, p=dropout, training=module.training).to(value_states.dtype)
    else:
        weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    regs = _ACTIVE.get(module)
    if regs:
        weights = _apply_edits(module, regs, weights, mask)
    if module in _CAPTURE:
        _CAPTURE[module].append(weights.detach())
    output = torch.matmul(weights, value_states).transpose(1, 2).contiguous()
    return output, weights


def register_editable_attention() -> None:
    """Register ``"lens_halluc"`` in ``AttentionInterface`` and its mask in ``AttentionMaskInterface``.

    Runs at import; idempotent (re-registering maps the same name to the same functions). The mask
    registration is essential: without it transformers builds no causal/padding mask at all for this
    name. Call it yourself only if something removed the registration.

    Example
    -------
    >>> register_editable_attention()
    >>> from transformers import AttentionInterface
    >>> "lens_halluc" in AttentionInterface()
    True
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, lens_halluc_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, eager_mask)


register_editable_attention()


# ====================================================================== switching the text tower
def _unpack(vlm_or_model) -> tuple[nn.Module, ModelSpec]:
    model = getattr(vlm_or_model, "model", None)
    spec = getattr(vlm_or_model, "spec", None)
    if isinstance(model, nn.Module) and isinstance(spec, ModelSpec):
        return model, spec  # a LoadedVLM / LoadedLM
    if isinstance(vlm_or_model, nn.Module):
        return vlm_or_model, ModelSpec.from_model(vlm_or_model)
    raise TypeError(f"expected a LoadedVLM or an nn.Module, got {type(vlm_or_model).__name__}.")


def _text_attention_configs(model: nn.Module, spec: ModelSpec) -> list:
    """The distinct config objects the text tower's attention modules (self and cross, every layer) read."""
    seen, out = set(), []
    for layer in range(spec.n_layers):
        cfg = spec.attention(model, layer).config
        if id(cfg) not in seen:
            seen.add(id(cfg))
            out.append(cfg)
    return out


def _implementation_request(root, path: tuple[str, ...], implementation: str):
    """The ``set_attn_implementation`` argument that sets ``implementation`` at ``path`` and nothing else.

    A nested dict keyed by sub-config names; for the top-level config itself (a flat config such as
    Chameleon's, whose text tower reads ``model.config``) ``{"": implementation}`` with every sub-config
    (the VQ-VAE, a vision config) pinned to its current implementation, so only the text tower changes."""
    if not path:
        keep = {key: getattr(root, key)._attn_implementation
                for key in (getattr(root, "sub_configs", {}) or {}) if getattr(root, key, None) is not None}
        return {"": implementation, **keep}
    key, rest = path[0], path[1:]
    return {key: _implementation_request(getattr(root, key), rest, implementation) if rest else implementation}


def text_attn_implementation(vlm_or_model) -> str:
    """The attention implementation the text decoder's attention modules actually read.

    Raises :class:`InterventionNotAppliedError` when its layers disagree (e.g. Mllama's cross-attention
    layers left on another implementation than its self-attention layers).

    Example
    -------
    >>> text_attn_implementation(vlm)                                        # doctest: +SKIP
    'eager'
    """
    model, spec = _unpack(vlm_or_model)
    impls = {cfg._attn_implementation for cfg in _text_attention_configs(model, spec)}
    if len(impls) != 1:
        raise InterventionNotAppliedError(f"the text tower's attention modules read different implementations "
                                          f"{sorted(map(str, impls))}; set one with set_text_attn_implementation().")
    return impls.pop()


def set_text_attn_implementation(vlm_or_model, implementation: str) -> str:
    """Switch only the text tower to ``implementation``; return the previous one.

    The config object the text tower's attention modules read is located in the model's config tree
    (``text_config`` for most VLMs; the top-level config itself for a flat one such as Chameleon's,
    where ``set_attn_implementation({"text_config": ...})`` would change nothing) and only it is set;
    the vision tower (and Chameleon's VQ-VAE) keep their own. Verifies the switch reached every text
    attention module (self- and cross-attention layers).

    Example
    -------
    >>> previous = set_text_attn_implementation(vlm, "eager")               # doctest: +SKIP
    """
    model, spec = _unpack(vlm_or_model)
    configs = _text_attention_configs(model, spec)
    previous = configs[0]._attn_implementation
    if all(cfg._attn_implementation == implementation for cfg in configs):
        return previous
    for cfg in configs:
        path = config_path(model.config, cfg)
        if path is None:
            raise InterventionNotAppliedError(
                f"the text tower's attention reads a config that is not in {type(model).__name__}'s config tree; "
                "its attention implementation cannot be switched through set_attn_implementation.")
        model.set_attn_implementation(_implementation_request(model.config, path, implementation))
    now = {cfg._attn_implementation for cfg in configs}
    if now != {implementation}:
        raise InterventionNotAppliedError(
            f"asked the text tower for {implementation!r} attention but its attention modules read {sorted(now)}; this "
            "model does not support switching attention implementations (see transformers' AttentionInterface docs).")
    return previous


def use_editable_attention(vlm_or_model) -> str:
    """Switch only the text tower to the editable ``"lens_halluc"`` attention; return the previous setting.

    Numerically this is eager attention (same weights, same logits), so it may stay on; restore
    with :func:`set_text_attn_implementation` or use :func:`editable_attention` as a context.

    Example
    -------
    >>> previous = use_editable_attention(vlm)        # e.g. 'eager'            # doctest: +SKIP
    >>> set_text_attn_implementation(vlm, previous)                              # doctest: +SKIP
    """
    register_editable_attention()  # cheap, and survives someone clearing the interface
    return set_text_attn_implementation(vlm_or_model, ATTN_IMPLEMENTATION)


@contextmanager
def editable_attention(vlm_or_model) -> Iterator[str]:
    """Context-manager form of :func:`use_editable_attention`: restores the previous setting on exit.

    Example
    -------
    >>> with editable_attention(vlm), edit_attention(vlm, ScaleKeys("text", 0.0), heads):  # doctest: +SKIP
    ...     out = greedy_decode(vlm.model, enc, max_new_tokens=32)
    """
    previous = use_editable_attention(vlm_or_model)
    try:
        yield previous
    finally:
        set_text_attn_implementation(vlm_or_model, previous)


# ====================================================================== applying edits
def _require_editable(model: nn.Module, spec: ModelSpec, what: str) -> None:
    impls = sorted({str(cfg._attn_implementation) for cfg in _text_attention_configs(model, spec)})
    impl = impls[0] if len(impls) == 1 else impls
    if impl != ATTN_IMPLEMENTATION:
        raise InterventionNotAppliedError(
            f"{what} needs the text tower on {ATTN_IMPLEMENTATION!r} attention, but it runs {impl!r}: the edit would "
            f"silently do nothing. Call lens_halluc.hooks.attention.use_editable_attention(vlm) first (or use "
            f"`with editable_attention(vlm):`), or load with load_vlm(..., attn_implementation={ATTN_IMPLEMENTATION!r}).")


def edit_key_groups(edit: AttentionEdit) -> tuple[str, ...]:
    """The key groups ``edit`` needs in the softmax it edits (its ``key_groups`` attribute; none for a plain callable).

    :class:`ScaleKeys` needs its group, :class:`ThresholdZeroText` "text" *and* "image" (ADHH weighs a
    head's text attention against its image attention, so both must be keys of the same softmax),
    :class:`Counterfactual` and :class:`Identity` none.
    """
    groups = getattr(edit, "key_groups", ())
    return tuple(groups() if callable(groups) else groups)


def _check_key_groups(model: nn.Module, spec: ModelSpec, edit: AttentionEdit, layers: Iterable[int]) -> None:
    """Raise :class:`NotDefinedForArchitecture` when ``edit`` needs a key group some edited layer does not have."""
    adapter = spec.adapter
    if adapter is None:
        return
    from ..models.adapters import NotDefinedForArchitecture

    for layer in layers:
        for group in edit_key_groups(edit):
            reason = adapter.attention_key_group_reason(model, layer, group)
            if reason is not None:
                raise NotDefinedForArchitecture(f"{edit!r} is not defined for {adapter.name} at layer {layer}: it needs "
                                                f"{group!r} keys, but {reason}.")


@contextmanager
def edit_attention(vlm_or_model, edit: AttentionEdit, heads: Iterable[tuple[int, int]],
                   runs: list | None = None) -> Iterator[None]:
    """Apply ``edit`` to the post-softmax weights of the listed (layer, head) pairs inside the context.

    Parameters
    ----------
    vlm_or_model : a LoadedVLM (or the model itself); the text tower must run ``"lens_halluc"``.
    edit : an :class:`AttentionEdit` — gets weights ``[B, h_sel, Q, K]`` of that layer's listed heads
        (float32) and an :class:`EditContext`; works at every forward (prefill and cached steps).
    heads : (layer, head) pairs, validated with ``spec.check_heads`` (SpecError when out of range).

    runs : optional list; when given, the number of edited-layer calls of this context is appended to
        it on exit, and a context in which no forward of the model ran at all is accepted (a decoding
        strategy's context also wraps a prefill's image pre-encoding, which runs no text layer); a
        forward of the model that ran none of the edited layers still raises.

    Raises :class:`InterventionNotAppliedError` on entry if the text tower is not on
    ``"lens_halluc"`` (eager / sdpa would ignore the edit), and on exit if none of the listed layers
    ran inside the context (with ``runs``: if a forward of the model ran without them).

    Edits that need key groups (:func:`edit_key_groups`) raise :class:`NotDefinedForArchitecture` on
    entry for a layer without them (Mllama: self-attention layers have no image keys, cross-attention
    layers only image keys), with the adapter's reason.

    Example
    -------
    >>> use_editable_attention(vlm)                                                 # doctest: +SKIP
    >>> with edit_attention(vlm, ThresholdZeroText(0.5), [(12, 3), (15, 0)]):        # doctest: +SKIP
    ...     logits = vlm.model(**enc).logits
    """
    model, spec = _unpack(vlm_or_model)
    pairs = spec.check_heads(heads)
    if not pairs:
        raise SpecError("edit_attention got no (layer, head) pairs: the edit would match nothing.")
    if not callable(edit):
        raise TypeError(f"edit must be callable (weights, ctx) -> weights, got {type(edit).__name__}.")
    _require_editable(model, spec, f"edit_attention({edit!r})")
    by_layer: dict[int, list[int]] = defaultdict(list)
    for layer, head in pairs:
        if head not in by_layer[layer]:
            by_layer[layer].append(head)
    _check_key_groups(model, spec, edit, sorted(by_layer))
    tracker = _RoleTracker(spec)
    regs = [_Registration(edit, layer, tuple(hs), tracker, model=model) for layer, hs in sorted(by_layer.items())]
    modules = [spec.attention(model, r.layer) for r in regs]
    handle = model.register_forward_pre_hook(_role_pre_hook(tracker), with_kwargs=True)
    try:
        for mod, reg in zip(modules, regs):
            _ACTIVE[mod].append(reg)
        yield
    finally:
        handle.remove()
        for mod, reg in zip(modules, regs):
            lst = _ACTIVE.get(mod, [])
            if reg in lst:
                lst.remove(reg)
            if not lst:
                _ACTIVE.pop(mod, None)
    if runs is not None:
        runs.append(sum(r.calls for r in regs))
        if tracker.forwards == 0:
            return  # no forward of the model here (a decoding loop's image pre-encoding): nothing to check
    if all(r.calls == 0 for r in regs):
        raise InterventionNotAppliedError(
            f"attention edit {edit!r} on layer(s) {sorted(by_layer)} never ran: no forward of this model ran inside the "
            "context, or the text tower was switched away from 'lens_halluc' during it.")


class AttentionEditing(DecodingStrategy):
    """Greedy decoding with an attention edit active at every main-branch forward (prefill + cached steps).

    :meth:`session` switches the text tower to the editable ``"lens_halluc"`` attention for the
    whole decoding call and restores the previous implementation afterwards, so no manual
    :func:`use_editable_attention` is needed. Under plain ``model.generate()`` enter both contexts
    yourself: ``with strat.session(), strat.context(): model.generate(...)``.

    Example
    -------
    >>> strat = AttentionEditing(vlm, ScaleKeys("image", 2.5), hal_heads)            # doctest: +SKIP
    >>> out = greedy_decode(vlm.model, enc, max_new_tokens=64, strategy=strat)        # doctest: +SKIP
    """

    name = "attention_editing"

    def __init__(self, vlm_or_model, edit: AttentionEdit, heads: Iterable[tuple[int, int]]):
        model, spec = _unpack(vlm_or_model)
        self.vlm, self.edit, self.heads = vlm_or_model, edit, spec.check_heads(heads)
        # refuse at bind time, with the reason, where the edit's key groups do not exist (Mllama)
        _check_key_groups(model, spec, edit, sorted({layer for layer, _ in self.heads}))
        self._runs: list[int] = []

    def session(self):
        return editable_attention(self.vlm)

    def begin(self, inputs: dict) -> None:
        self._runs = []

    def context(self):
        return edit_attention(self.vlm, self.edit, self.heads, runs=self._runs)

# ====================================================================== reading weights
@torch.no_grad()
def capture_attention(vlm_or_model, inputs: Mapping[str, torch.Tensor], layers: Iterable[int] | None = None) -> torch.Tensor:
    """Post-softmax attention weights of one forward: FloatTensor ``[n_layers_sel, B, H, Q, K]``.

    On a cross-attention layer (Mllama) the keys are the image's vision tokens: ``K`` = vision tokens
    (text queries attending to the image); mixing such layers with self-attention ones raises.

    Weights are after any active :func:`edit_attention` edit (what the model really used). Needs
    the text tower on ``"lens_halluc"`` (sdpa has no weights; eager bypasses the capture).
    ``layers``: layer indices in the order wanted (all layers when None).

    Example
    -------
    >>> use_editable_attention(vlm)                                                 # doctest: +SKIP
    >>> att = capture_attention(vlm, enc, layers=[0, 5])     # [2, B, H, T, T]          # doctest: +SKIP
    """
    model, spec = _unpack(vlm_or_model)
    layers = list(range(spec.n_layers)) if layers is None else [int(l) for l in layers]
    for l in layers:
        spec.check_layer(l)
    _require_editable(model, spec, "capture_attention")
    modules = [spec.attention(model, l) for l in layers]
    for mod in modules:
        _CAPTURE[mod] = []
    try:
        model(**inputs)
        got = [_CAPTURE[mod] for mod in modules]
    finally:
        for mod in modules:
            _CAPTURE.pop(mod, None)
    missing = [l for l, g in zip(layers, got) if len(g) != 1]
    if missing:
        raise InterventionNotAppliedError(f"attention capture on layer(s) {missing} did not record exactly one call"
                                          " (a cross-attention layer runs only when the forward carries an image).")
    shapes = {tuple(g[0].shape) for g in got}
    if len(shapes) != 1:
        kinds = {l: spec.attention_kinds[l] if spec.attention_kinds else "self" for l in layers}
        raise ValueError(f"capture_attention: the layers' weights have different shapes {sorted(shapes)} (kinds "
                         f"{kinds}): cross-attention weights are [B, H, Q, vision tokens], self-attention weights "
                         "[B, H, Q, T]; capture self- and cross-attention layers in separate calls.")
    return torch.stack([g[0] for g in got])
