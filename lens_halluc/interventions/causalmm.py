"""CausalMM — contrastive decoding against counterfactual attention (vision encoder and/or LLM).

Scores for the next token (The-Martyr/CausalMM ``llava-1.5/causalmm_cf/causalmm_sm.py``)::

    one counterfactual:   s = (1 + γ)·l − γ·l_cf
    both counterfactuals: s = (1 + 2γ)·l − γ·l_cf_v − γ·l_cf_l          (``causalmm_mm.py``)
    s(y) = −inf  where  l(y) < log ε + max l     (plausibility cut-off on the factual branch's logits)

Vision counterfactual (``vision=...``), two ways (``vision_mode``):

* ``"features"`` — what the released LLaVA code does (``multimodal_encoder/cf_encoder.py``,
  ``llava_arch_cf.py``), the ``reference`` flavour. CLIP runs unchanged; the post-softmax attention
  map ``A [B, H, N, N]`` (N = 1 + patches, CLS included) of the vision layer ``vision_layer`` is
  edited as a whole map per head:

  - ``"random"``: ``U[0, 1) · 2`` (one draw of ``[H, N, N]`` per image, see *Random draws* below);
  - ``"uniform"``: the map's global mean (per image and head), everywhere;
  - ``"reversed"``: the map's global maximum (per image and head) − ``A``;
  - ``"shuffle"``: per head, all N·N entries permuted by one permutation (one set per image);

  then bilinearly resized (``align_corners=False``) to the patch grid ``√P × √P`` (577×577 → 24×24
  on LLaVA-1.5), averaged over heads, and the selected patch features ``[B, P, D]`` (CLS dropped)
  are multiplied by it (patch ``i·√P + j`` by cell ``(i, j)``) before the projector. Those
  re-weighted features are the image tokens of the counterfactual branch. Nothing is renormalised.
* ``"attention"`` — our variant, the ``corrected`` flavour's mechanism: the attention of layer
  ``vision_layer`` itself is replaced by a row-normalised counterfactual ``A'`` before ``A'·V``
  (``"random"``: uniform noise per row, normalised; ``"uniform"``: ``1/N``; ``"reversed"``:
  ``(max_row A − A)`` normalised per row; ``"shuffle"``: each row's keys permuted by one permutation),
  a forward hook on that CLIP attention module recomputing its output with the module's own
  q/k/v/out_proj.

``vision_layer`` indexes the layers that feed the features LLaVA uses: negative values count back
from the selected feature layer (``config.vision_feature_layer``; −1 = the last layer whose output
is used, CLIP layer 22 of 24 in LLaVA-1.5 — the layer whose map the reference takes,
``attentions[mm_vision_select_layer]`` with ``mm_vision_select_layer = −2``), non-negative values
are absolute encoder-layer indices and must be below it.

*Random draws* (``"random"``, ``"shuffle"``, both modes) come from CPU generators. The reference
captions one image at a time (batch size 1, ``set_seed`` once per run), each image getting a fresh
map; its ``"shuffle"`` would share one permutation per head across a batch (``randperm(...).expand(batch)``)
and its ``"random"`` draws ``[batch, H, N, N]``, but it never batches. Here, in the runners
(``caption``, ``answer``...: ``decode(..., keys=)``) every image draws its own map from a generator
seeded with ``row_seed(seed, key)`` (key: image id / question id), as if it were captioned alone, so
its map (hence its caption) does not depend on the batch size or order. A direct ``decode`` without
``keys`` draws one map from a generator seeded with ``seed``, shared by every image of the batch.

LLM counterfactual (``llm=...``): :class:`~lens_halluc.hooks.attention.Counterfactual` through
:func:`~lens_halluc.hooks.attention.edit_attention` on ``llm_layers`` × ``llm_heads`` (causal and
padding mask kept). The reference shows it only as a snippet for Qwen2-VL (README); its LLaVA code
has none. Needs the text tower on ``"lens_halluc"`` attention (the bound strategy switches to it by
itself for each decoding call, in ``session()``, and restores the previous implementation; a forward
outside that raises ``InterventionNotAppliedError``).

Flavours (``flavour=``; an explicit argument always wins):

=============  ==========================================  ==========================================
parameter      ``reference`` (default)                     ``corrected``
=============  ==========================================  ==========================================
vision / llm   ``"shuffle"`` / None (the released code)    None / ``"reverse"``
vision_mode    ``"features"``                              ``"attention"``
cutoff ε       0.6 (``scripts/llava1.5_eval.bash``)        0.1 (the eval script's argparse default)
sample         True: multinomial at T = 1 (``do_sample``)  False: argmax
=============  ==========================================  ==========================================

γ (``strength``) is 1 in both (the bash script's ``gamma=1.0``; the sampler's own fallback is 0.5).
``vision`` and ``llm`` take the flavour's values only when *both* are None: ``CausalMM(llm="reverse")``
is the LLM counterfactual alone in either flavour.

Fixed in both flavours: the reference runs both branches on one KV cache (``past_key_values`` of
the factual branch), so after the first token its counterfactual branch sees the factual image and
its contrast acts on the first token only; here every branch has its own cache
(``greedy_decode``). With ``sample=False``, ``γ = 0`` gives exactly greedy decoding. Here γ is
``strength`` and ε is ``cutoff`` (the names shared by the contrastive family).

Example
-------
>>> from lens_halluc.interventions import CausalMM
>>> CausalMM()
CausalMM()
>>> CausalMM().vision, CausalMM().vision_mode, CausalMM().cutoff, CausalMM().sample
('shuffle', 'features', 0.6, True)
>>> CausalMM(flavour="corrected").llm
'reverse'
>>> caps = lh.caption(vlm, ds, strategy=CausalMM(llm="reverse"))                 # doctest: +SKIP
"""
from __future__ import annotations

import inspect
import math
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data.flavour import FLAVOURS, check_flavour
from ..generation.decoding import Branch, DecodingStrategy
from ..generation.sampling import Sampling, row_seed
from ..hooks.ablation import InterventionNotAppliedError
from ..hooks.attention import (ATTN_IMPLEMENTATION, Counterfactual, edit_attention, editable_attention,
                               text_attn_implementation)
from ..models.loading import LoadedVLM
from .base import Intervention, Param, check_bool, check_choice, check_int, check_ints, check_number
from .contrastive import apply_plausibility, check_cutoff, contrast

__all__ = ["CausalMM", "CausalMMStrategy", "LLM_COUNTERFACTUALS", "VISION_COUNTERFACTUALS", "VISION_MODES",
           "patch_weights", "vision_attention_module", "vision_counterfactual", "vision_counterfactual_map",
           "vision_counterfactual_weights", "vision_feature_counterfactual"]

VISION_COUNTERFACTUALS = ("random", "uniform", "reversed", "shuffle")
VISION_MODES = ("features", "attention")
LLM_COUNTERFACTUALS = Counterfactual.KINDS

_NOT_CLIP = ("CausalMM's vision counterfactual needs a CLIP-like vision tower (as LLaVA-1.5's CLIP ViT-L/14: "
             ".vision_model.encoder.layers[i].self_attn with q_proj / k_proj / v_proj / out_proj Linear layers, "
             "head_dim and scale)")
_INSTEAD = "Pass vision=None with llm='reverse' (the LLM counterfactual, which needs no vision tower edit) instead."


def _per_image(row_seeds: Sequence[int], n_rows: int) -> list[int]:
    """One seed per row of a ``[n_rows, ...]`` tensor from one seed per image (beam search: ``k`` contiguous rows each)."""
    seeds = [int(s) for s in row_seeds]
    if not seeds or n_rows % len(seeds):
        raise ValueError(f"CausalMM: {len(seeds)} row seeds for {n_rows} images in the vision tower.")
    return [s for s in seeds for _ in range(n_rows // len(seeds))]


def vision_counterfactual_weights(weights: torch.Tensor, kind: str, seed: int = 0,
                                  row_seeds: Sequence[int] | None = None) -> torch.Tensor:
    """Row-normalised counterfactual attention for post-softmax ``weights [B, H, Q, K]`` (``vision_mode="attention"``).

    Computed in float32 and returned in ``weights.dtype``; every row sums to 1. Random draws come
    from a CPU generator seeded with ``seed`` (deterministic, device-independent); with
    ``row_seeds`` (one per image) image ``b``'s from its own generator seeded with ``row_seeds[b]``,
    exactly as ``vision_counterfactual_weights(weights[b:b+1], kind, row_seeds[b])``.
    """
    if kind not in VISION_COUNTERFACTUALS:
        raise ValueError(f"unknown vision counterfactual {kind!r}; use one of {VISION_COUNTERFACTUALS}.")
    return _drawn(_counterfactual_weights, weights, kind, seed, row_seeds)


def _drawn(edit, weights: torch.Tensor, kind: str, seed: int, row_seeds: Sequence[int] | None) -> torch.Tensor:
    """``edit(weights, kind, seed)``, or per image with its own seed when ``row_seeds`` and the kind draws noise."""
    if row_seeds is not None and kind in ("random", "shuffle"):
        seeds = _per_image(row_seeds, weights.shape[0])
        return torch.cat([edit(weights[b: b + 1], kind, s) for b, s in enumerate(seeds)])
    return edit(weights, kind, seed)


def _counterfactual_weights(weights: torch.Tensor, kind: str, seed: int) -> torch.Tensor:
    w = weights.float()
    tiny = torch.finfo(torch.float32).tiny
    if kind == "uniform":
        out = torch.full_like(w, 1.0 / w.shape[-1])
    elif kind == "reversed":
        rev = w.amax(-1, keepdim=True) - w
        s = rev.sum(-1, keepdim=True)
        out = torch.where(s > tiny, rev / s.clamp_min(tiny), torch.full_like(w, 1.0 / w.shape[-1]))
    else:
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        if kind == "random":
            noise = torch.rand(w.shape, generator=gen, dtype=torch.float32).to(w.device)
            out = noise / noise.sum(-1, keepdim=True).clamp_min(tiny)
        else:  # shuffle
            perm = torch.randperm(w.shape[-1], generator=gen).to(w.device)
            out = w[..., perm]
    return out.to(weights.dtype)


def vision_counterfactual_map(weights: torch.Tensor, kind: str, seed: int = 0,
                              row_seeds: Sequence[int] | None = None) -> torch.Tensor:
    """The reference's edit of whole attention maps ``weights [B, H, N, M]`` (``vision_mode="features"``), float32.

    As ``cf_encoder.CLIPVisionTower.edit_attention``: ``"random"`` ``U[0,1)·2``; ``"uniform"`` the
    per-(image, head) mean over the whole map; ``"reversed"`` the per-(image, head) maximum minus the
    map; ``"shuffle"`` per head one permutation of all ``N·M`` entries.
    Random draws: a CPU generator seeded with ``seed`` — ``"random"`` draws one ``[1, H, N, M]`` map
    shared by the batch, ``"shuffle"`` draws ``randperm(N·M)`` for head 0, 1, ... in turn, the same for
    every image — so an image's map does not depend on the batch it is in. With ``row_seeds`` (one
    per image, what the runners use) image ``b`` gets its own draw, exactly
    ``vision_counterfactual_map(weights[b:b+1], kind, row_seeds[b])`` (the reference's batch of one).
    Not renormalised.

    Example
    -------
    >>> w = torch.softmax(torch.randn(1, 2, 3, 3), -1)
    >>> torch.allclose(vision_counterfactual_map(w, "uniform"), torch.full_like(w, 1 / 3))
    True
    """
    if kind not in VISION_COUNTERFACTUALS:
        raise ValueError(f"unknown vision counterfactual {kind!r}; use one of {VISION_COUNTERFACTUALS}.")
    if weights.dim() != 4:
        raise ValueError(f"vision_counterfactual_map expects attention maps [B, H, N, N], got {tuple(weights.shape)}.")
    return _drawn(_counterfactual_map, weights, kind, seed, row_seeds)


def _counterfactual_map(weights: torch.Tensor, kind: str, seed: int) -> torch.Tensor:
    w = weights.float()
    b, h, n, m = w.shape
    if kind == "uniform":
        return w.mean(dim=(2, 3), keepdim=True).expand(b, h, n, m)
    if kind == "reversed":
        return w.amax(dim=(2, 3), keepdim=True) - w
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    if kind == "random":
        return (torch.rand((1, h, n, m), generator=gen, dtype=torch.float32) * 2).to(w.device).expand(b, h, n, m)
    perms = torch.stack([torch.randperm(n * m, generator=gen) for _ in range(h)]).to(w.device)  # [H, N·M]
    return torch.gather(w.reshape(b, h, n * m), 2, perms.unsqueeze(0).expand(b, h, n * m)).view(b, h, n, m)


def patch_weights(edited: torch.Tensor, n_patches: int) -> torch.Tensor:
    """``[B, P]``: the maps ``edited [B, H, N, N]`` resized bilinearly to ``√P × √P`` and averaged over heads.

    As ``cf_encoder.CLIPVisionTower.apply_attention``: ``F.interpolate(..., mode="bilinear",
    align_corners=False)`` then the mean over heads, flattened row-major (cell ``(i, j)`` →
    patch ``i·√P + j``). ``P`` must be a square number (the reference's ``int(sqrt(P))`` otherwise
    mis-shapes and crashes).
    """
    side = math.isqrt(int(n_patches))
    if side * side != int(n_patches):
        raise ValueError(f"CausalMM's feature re-weighting resizes the attention map to a square patch grid, but the "
                         f"image has {n_patches} patch features (not a square number). Use vision_mode='attention' "
                         "for towers with a non-square patch grid or a kept CLS feature.")
    resized = F.interpolate(edited.float(), size=(side, side), mode="bilinear", align_corners=False)
    return resized.mean(dim=1).reshape(edited.shape[0], side * side)


def _vision_tower(model: nn.Module) -> nn.Module:
    inner = getattr(model, "model", model)
    tower = getattr(inner, "vision_tower", None) or getattr(model, "vision_tower", None)
    if tower is None:
        raise ValueError(f"{type(model).__name__} has no vision_tower: CausalMM's vision counterfactual needs a VLM. "
                         + _INSTEAD)
    return tower


def _vision_layers(model: nn.Module) -> nn.ModuleList:
    tower = _vision_tower(model)
    vm = getattr(tower, "vision_model", tower)
    layers = getattr(getattr(vm, "encoder", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{_NOT_CLIP}; {type(tower).__name__} has no .vision_model.encoder.layers. {_INSTEAD}")
    return layers


def _vision_attention_modules(model: nn.Module) -> list[nn.Module]:
    """The vision tower's self-attention modules in layer order: the family adapter's
    (:meth:`~lens_halluc.models.adapters.Adapter.vision_attention`), or LLaVA's CLIP path for a model
    without an adapter. :class:`NotDefinedForArchitecture` where the family has no such tower."""
    from ..models.adapters import ADAPTERS, NotDefinedForArchitecture

    adapter = ADAPTERS.get(str(getattr(getattr(model, "config", None), "model_type", None)))
    if adapter is None:
        return [getattr(layer, "self_attn", None) for layer in _vision_layers(model)]
    try:
        return list(adapter.vision_attention(model))
    except NotDefinedForArchitecture as e:
        raise NotDefinedForArchitecture(f"CausalMM's vision counterfactual is not defined for {adapter.name}: {e} "
                                        + _INSTEAD) from None


def vision_attention_module(model: nn.Module, vision_layer: int = -1) -> tuple[int, nn.Module]:
    """``(absolute layer index, self_attn module)`` of the vision layer that CausalMM reads or edits.

    The layers come from the family's adapter (``adapter.vision_attention(model)``: CLIP for LLaVA,
    SigLIP for PaliGemma / Gemma 3 / Idefics3 ...). Negative ``vision_layer`` counts back from the
    selected feature layer (``config.vision_feature_layer``; a family without one uses its last layer),
    so −1 is the last encoder layer whose output reaches the LLM. Raises ``ValueError`` (saying what
    to pass instead) for a vision tower whose attention is not CLIP-like (separate ``q_proj`` /
    ``k_proj`` / ``v_proj`` / ``out_proj``, ``head_dim``, ``scale``, no rotary embedding: the map is
    recomputed from the layer's input) and :class:`NotDefinedForArchitecture` for a family whose
    adapter describes no vision attention.
    """
    layers = _vision_attention_modules(model)
    n = len(layers)
    feat = getattr(model.config, "vision_feature_layer", -1)
    feat = max(feat) if isinstance(feat, (list, tuple)) else int(feat)
    feat_index = feat + n + 1 if feat < 0 else feat  # index into hidden_states (0 = embeddings)
    n_used = feat_index                              # layers 0..feat_index-1 feed the features
    idx = n_used + int(vision_layer) if vision_layer < 0 else int(vision_layer)
    if not 0 <= idx < n_used:
        raise ValueError(f"vision_layer {vision_layer} is out of range: only vision layers 0..{n_used - 1} feed the "
                         f"features LLaVA uses (vision_feature_layer={feat}); an edit elsewhere would change nothing.")
    attn = layers[idx]
    missing = [name for name in ("q_proj", "k_proj", "v_proj") if not isinstance(getattr(attn, name, None), nn.Linear)]
    if _out_proj(attn) is None:
        missing.append("out_proj")
    missing += [name for name in ("head_dim",) if not hasattr(attn, name)]
    if _scale(attn) is None:
        missing.append("scale")
    # q/k normalisation inside the attention (InternViT's qk_normalization) is not in the recomputation
    if not missing and any(isinstance(getattr(attn, n, None), nn.Module) and not isinstance(getattr(attn, n), nn.Identity)
                           for n in ("q_norm", "k_norm")):
        missing = ["q/k normalisation-free projections (it normalises queries and keys)"]
    if not missing and any(name in inspect.signature(type(attn).forward).parameters
                           for name in ("position_embeddings", "rotary_pos_emb")):
        missing = ["a rotary-free signature (it takes position embeddings the recomputation cannot apply)"]
    if missing:
        from ..models.adapters import NotDefinedForArchitecture  # a ValueError

        raise NotDefinedForArchitecture(f"{_NOT_CLIP}; vision layer {idx}'s attention {type(attn).__name__} has no "
                                        f"{', '.join(missing)}. " + _INSTEAD)
    return idx, attn


def _out_proj(module: nn.Module) -> nn.Linear | None:
    """The attention's output projection: ``out_proj`` (CLIP, SigLIP) or ``o_proj`` (Mllama's ViT)."""
    for name in ("out_proj", "o_proj"):
        proj = getattr(module, name, None)
        if isinstance(proj, nn.Linear):
            return proj
    return None


def _scale(module: nn.Module) -> float | None:
    """The attention's score scale: ``scale`` (CLIP, SigLIP) or ``scaling`` (Mllama's ViT)."""
    for name in ("scale", "scaling"):
        value = getattr(module, name, None)
        if isinstance(value, (int, float)):
            return float(value)
    return None


def _clip_attention_probs(module: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(post-softmax weights [B, H, T, T] float32, values [B, H, T, d])`` recomputed as CLIP's eager attention."""
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    b, t, _ = hidden.shape
    shape = (b, t, -1, module.head_dim)
    q = module.q_proj(hidden).view(shape).transpose(1, 2)
    k = module.k_proj(hidden).view(shape).transpose(1, 2)
    v = module.v_proj(hidden).view(shape).transpose(1, 2)
    scores = torch.matmul(q, k.transpose(-1, -2)) * _scale(module)
    if mask is not None:
        scores = scores + mask
    return torch.softmax(scores, dim=-1, dtype=torch.float32), v


@contextmanager
def vision_counterfactual(model: nn.Module, kind: str, vision_layer: int = -1, seed: int = 0,
                          counter: list | None = None, row_seeds: Sequence[int] | None = None) -> Iterator[nn.Module]:
    """Inside the context, the chosen vision attention layer uses a row-normalised counterfactual map (``"attention"`` mode).

    A forward hook on the CLIP attention module recomputes its output as ``out_proj(A'·V)``.
    ``counter`` (a list), if given, gets one entry appended per hooked call. ``row_seeds``: one seed
    per image, for per-image random draws (:func:`vision_counterfactual_weights`). Raises
    ``InterventionNotAppliedError`` on exit if the hooked layer never ran inside the context.
    """
    if kind not in VISION_COUNTERFACTUALS:
        raise ValueError(f"unknown vision counterfactual {kind!r}; use one of {VISION_COUNTERFACTUALS}.")
    _, attn = vision_attention_module(model, vision_layer)
    calls = [0]

    def hook(module, args, kwargs, output):
        weights, v = _clip_attention_probs(module, args, kwargs)
        cf = vision_counterfactual_weights(weights.to(v.dtype), kind, seed, row_seeds)
        b, _, t, _ = cf.shape
        out = torch.matmul(cf, v).transpose(1, 2).reshape(b, t, -1).contiguous()
        calls[0] += 1
        if counter is not None:
            counter.append(1)
        return (_out_proj(module)(out), cf)

    handle = attn.register_forward_hook(hook, with_kwargs=True)
    try:
        yield attn
    finally:
        handle.remove()
    if calls[0] == 0:
        raise InterventionNotAppliedError(
            f"the vision counterfactual ({kind!r}) never ran: no image went through the vision tower inside the context.")


def _projector(model: nn.Module) -> nn.Module:
    inner = getattr(model, "model", model)
    proj = getattr(inner, "multi_modal_projector", None) or getattr(model, "multi_modal_projector", None)
    if not isinstance(proj, nn.Module):
        raise ValueError(f"CausalMM's reference vision counterfactual re-weights the patch features before the "
                         f"projector, but {type(model).__name__} has no multi_modal_projector (a LLaVA-style VLM). "
                         "Use vision_mode='attention', or vision=None with llm='reverse'.")
    return proj


def check_feature_counterfactual(model: nn.Module, vision_layer: int = -1) -> int:
    """The absolute vision layer the ``"features"`` mode reads; ``ValueError`` if the model cannot take it."""
    idx, _ = vision_attention_module(model, vision_layer)
    _projector(model)
    strategy = getattr(model.config, "vision_feature_select_strategy", "default")
    if strategy != "default":
        raise ValueError(f"CausalMM's reference vision counterfactual multiplies the patch features with the CLS "
                         f"feature dropped (LLaVA's vision_feature_select_strategy='default'); this model uses "
                         f"{strategy!r}. Use vision_mode='attention' instead.")
    return idx


@contextmanager
def vision_feature_counterfactual(model: nn.Module, kind: str, vision_layer: int = -1, seed: int = 0,
                                  counter: list | None = None,
                                  row_seeds: Sequence[int] | None = None) -> Iterator[nn.Module]:
    """Inside the context, the patch features entering the projector are re-weighted as the reference (``"features"`` mode).

    CLIP runs unchanged. A forward hook on vision layer ``vision_layer``'s attention records its
    post-softmax map (recomputed from its input, float32); a forward pre-hook on the projector
    multiplies the features ``[B, P, D]`` by :func:`patch_weights` of :func:`vision_counterfactual_map`
    (in float32, cast back to the features' dtype). ``row_seeds``: one seed per image, for per-image
    random draws (:func:`vision_counterfactual_map`). ``counter`` gets one entry per re-weighted call;
    ``InterventionNotAppliedError`` on exit if no image went through.
    """
    if kind not in VISION_COUNTERFACTUALS:
        raise ValueError(f"unknown vision counterfactual {kind!r}; use one of {VISION_COUNTERFACTUALS}.")
    check_feature_counterfactual(model, vision_layer)
    _, attn = vision_attention_module(model, vision_layer)
    proj = _projector(model)
    state: dict[str, Any] = {}
    calls = [0]

    def record(module, args, kwargs, output):
        state["weights"] = _clip_attention_probs(module, args, kwargs)[0]

    def reweight(module, args, kwargs):
        feats = args[0] if args else kwargs["image_features"]
        weights = state.pop("weights", None)
        if weights is None:
            raise InterventionNotAppliedError(
                "CausalMM: the projector ran without the vision layer's attention map (the vision tower did not run "
                "just before it), so the reference re-weighting cannot be applied.")
        if weights.shape[0] != feats.shape[0]:
            raise ValueError(f"CausalMM: {weights.shape[0]} attention maps for {feats.shape[0]} feature rows; the "
                             "reference re-weighting needs one image per feature row (no multi-crop inputs).")
        m = patch_weights(vision_counterfactual_map(weights, kind, seed, row_seeds), feats.shape[1])
        new = (feats.float() * m.unsqueeze(-1).to(feats.device)).to(feats.dtype)
        calls[0] += 1
        if counter is not None:
            counter.append(1)
        if args:
            return (new,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "image_features": new}

    handles = [attn.register_forward_hook(record, with_kwargs=True),
               proj.register_forward_pre_hook(reweight, with_kwargs=True)]
    try:
        yield proj
    finally:
        for h in handles:
            h.remove()
    if calls[0] == 0:
        raise InterventionNotAppliedError(
            f"the vision counterfactual ({kind!r}) never ran: no image went through the vision tower inside the context.")


class CausalMMStrategy(DecodingStrategy):
    """Counterfactual-attention contrastive decoding (CausalMM), every branch with its own KV cache.

    The bound form of :class:`CausalMM` (which resolves the flavour and passes every parameter). With an LLM
    counterfactual, :meth:`session` switches the text tower to the editable attention for the
    decoding call and restores it afterwards.

    Parameters
    ----------
    vlm : the LoadedVLM.
    strength : contrast weight γ (0 ⇒ greedy). Default 1.
    cutoff : plausibility cut-off ε on the factual branch (None or 0 disables). Default 0.1.
    vision : None or one of ``"random" | "uniform" | "reversed" | "shuffle"`` (vision counterfactual).
    vision_layer : vision layer read / edited (see the module docstring). Default −1.
    llm : None or one of ``"reverse" | "reverse_normalize" | "random" | "uniform"`` (LLM counterfactual).
    llm_layers : text layers to edit (None = all).
    llm_heads : heads edited in each of those layers (None = all heads).
    seed : seed of the random counterfactuals (with ``row_keys``, i.e. in the runners, each image's
        vision map is seeded with ``row_seed(seed, key)``).
    vision_mode : ``"features"`` (the reference: re-weight the patch features by the edited map) or
        ``"attention"`` (replace the layer's attention by a row-normalised map). Default ``"attention"``.

    At least one of ``vision`` / ``llm`` must be given. Branches: ``"cf_vision"`` (the vision
    counterfactual during its prefill, when the image is encoded) and ``"cf_llm"`` (the LLM
    counterfactual at every forward of that branch).

    Example
    -------
    >>> out = greedy_decode(vlm.model, enc, 32, strategy=CausalMMStrategy(vlm, llm="reverse"))  # doctest: +SKIP
    """

    name = "causalmm"

    def __init__(self, vlm: LoadedVLM, strength: float = 1.0, cutoff: float | None = 0.1, vision: str | None = None,
                 vision_layer: int = -1, llm: str | None = "reverse", llm_layers: Sequence[int] | None = None,
                 llm_heads: Sequence[int] | None = None, seed: int = 0, vision_mode: str = "attention"):
        if vision is None and llm is None:
            raise ValueError("CausalMM needs a counterfactual: give vision=... and/or llm=....")
        if vision_mode not in VISION_MODES:
            raise ValueError(f"unknown vision_mode {vision_mode!r}; use one of {VISION_MODES}.")
        self.vlm = vlm
        self.strength = float(strength)
        self.cutoff = check_cutoff(cutoff, "cutoff")
        self.vision, self.vision_layer, self.llm, self.seed = vision, int(vision_layer), llm, int(seed)
        self.vision_mode = vision_mode
        self.vision_calls: list = []
        self._llm_runs: list[int] = []
        self._expect_vision = False
        self._row_seeds: list[int] | None = None
        if vision is not None:
            if vision not in VISION_COUNTERFACTUALS:
                raise ValueError(f"unknown vision counterfactual {vision!r}; use one of {VISION_COUNTERFACTUALS}.")
            if vision_mode == "features":
                self.vision_layer_index = check_feature_counterfactual(vlm.model, vision_layer)
            else:
                self.vision_layer_index, _ = vision_attention_module(vlm.model, vision_layer)
        self.llm_edit = Counterfactual(llm, seed=self.seed) if llm is not None else None
        spec = vlm.spec
        layers = list(range(spec.n_layers)) if llm_layers is None else [int(l) for l in llm_layers]
        heads = list(range(spec.n_heads)) if llm_heads is None else [int(h) for h in llm_heads]
        self.llm_heads = spec.check_heads([(l, h) for l in layers for h in heads]) if llm is not None else []
        if llm is not None and not self.llm_heads:
            raise ValueError("CausalMM: llm_layers × llm_heads selects no head.")

    def session(self):
        # The LLM counterfactual edits post-softmax weights: only the "lens_halluc" attention has them.
        return editable_attention(self.vlm) if self.llm is not None else nullcontext()

    def begin(self, inputs: dict) -> None:
        if self.llm is not None:
            impl = text_attn_implementation(self.vlm)
            if impl != ATTN_IMPLEMENTATION:
                raise InterventionNotAppliedError(
                    f"CausalMM's LLM counterfactual needs the text tower on {ATTN_IMPLEMENTATION!r} attention, but it runs "
                    f"{impl!r}. Decode through greedy_decode (it enters strategy.session(), which switches), or "
                    "call lens_halluc.hooks.attention.use_editable_attention(vlm) first.")
        if self.vision is not None and "pixel_values" not in inputs:
            raise ValueError("CausalMM's vision counterfactual needs pixel_values in the inputs.")
        self._expect_vision = self.vision is not None
        self._llm_runs = []
        # per-image random maps in the runners (decode(..., keys=)); one shared draw without keys
        keys = self.row_keys
        self._row_seeds = None if keys is None else [row_seed(self.seed, k) for k in keys]

    def _vision_context(self):
        # The image is encoded only at prefill; cached steps carry no pixels, so the hook must not
        # demand a call there (the counterfactual features live on in this branch's cache).
        return _PrefillOnly(self)

    def _llm_context(self):
        # runs=: this context also wraps the image pre-encoding (no model forward: accepted)
        return edit_attention(self.vlm, self.llm_edit, self.llm_heads, runs=self._llm_runs)

    def branches(self):
        out = []
        if self.vision is not None:
            out.append(Branch("cf_vision", context=self._vision_context))
        if self.llm is not None:
            out.append(Branch("cf_llm", context=self._llm_context))
        return out

    def combine(self, logits: torch.Tensor, branch_logits: Mapping[str, torch.Tensor]) -> torch.Tensor:
        others = [branch_logits[b.name] for b in self.branches()]
        return apply_plausibility(contrast(logits, others, self.strength), logits, self.cutoff)


class _PrefillOnly:
    """Vision-counterfactual hooks around one forward of the ``cf_vision`` branch.

    The first forward after :meth:`CausalMMStrategy.begin` (the prefill, which encodes the image) must fire
    the hook, else ``InterventionNotAppliedError``; later cached steps carry no pixels.
    """

    def __init__(self, strategy: CausalMMStrategy):
        self.s = strategy

    def __enter__(self):
        make = vision_feature_counterfactual if self.s.vision_mode == "features" else vision_counterfactual
        self._before = len(self.s.vision_calls)
        self._forwards = [0]
        # count the model's own forwards: the decoding loop also enters this context around a prefill's image
        # pre-encoding (the vision tower runs, the model's forward does not) — or around nothing, for families
        # whose image is encoded inside the prefill forward
        self._count = self.s.vlm.model.register_forward_pre_hook(
            lambda module, args: self._forwards.__setitem__(0, self._forwards[0] + 1))
        self._handle = make(self.s.vlm.model, self.s.vision, self.s.vision_layer, self.s.seed,
                            counter=self.s.vision_calls, row_seeds=self.s._row_seeds)
        self._handle.__enter__()
        return self

    def __exit__(self, *exc):
        self._count.remove()
        try:
            self._handle.__exit__(*exc)
        except InterventionNotAppliedError:
            # a model forward ran while the image still had to be encoded, and the hook never fired
            if self.s._expect_vision and exc[0] is None and self._forwards[0]:
                raise
        if len(self.s.vision_calls) > self._before or self._forwards[0]:
            self.s._expect_vision = False
        return False


def _counterfactuals(vision: Any, llm: Any, flavour: str) -> tuple[Any, Any]:
    """``(vision, llm)``: the flavour's pair when both are None, else as given (None = that counterfactual off)."""
    if vision is None and llm is None:
        table = CausalMM.flavours.get(flavour, CausalMM.flavours["reference"])
        return table["vision"], table["llm"]
    return vision, llm


class CausalMM(Intervention):
    """CausalMM: contrast the factual logits with those under counterfactual attention (vision encoder and/or LLM).

    ``s = (1 + γ)·l − γ·l_cf`` (one counterfactual) or ``(1 + 2γ)·l − γ·l_cf_v − γ·l_cf_l`` (both);
    tokens with ``l(y) < log ε + max l`` on the factual branch get −inf (see the module docstring).

    Parameters
    ----------
    strength : contrast weight γ ≥ 0 (0 with ``sample=False`` ⇒ exactly greedy). Default 1.
    cutoff : plausibility cut-off ε in [0, 1]; 0 disables. None: the flavour's (reference 0.6, corrected 0.1).
    vision : vision-encoder counterfactual, None or one of ``"random" | "uniform" | "reversed" | "shuffle"``.
    vision_layer : vision layer whose attention map is used (negative: counted back from the
        feature layer LLaVA uses). Default −1 (the reference's layer).
    llm : LLM counterfactual attention, None or one of ``"reverse" | "reverse_normalize" | "random" |
        "uniform"``. Needs the editable attention (switched on by itself).
        ``vision`` and ``llm`` both None: the flavour's pair (reference ``"shuffle"`` / None, corrected
        None / ``"reverse"``); otherwise a None one is off.
    llm_layers : text layers edited (None = all). llm_heads : heads edited in each (None = all).
    seed : seed of the random counterfactuals and, when sampling, of the token sampler. Default 0. In
        the runners each image's random vision map is seeded with ``row_seed(seed, image id)``.
    flavour : ``"reference"`` (default; the released LLaVA code and script) or ``"corrected"``.
    vision_mode : ``"features"`` (the reference: CLIP unchanged, patch features × the edited,
        resized, head-averaged map) or ``"attention"`` (the layer's attention replaced by a
        row-normalised map). None: the flavour's.
    sample : multinomial sampling at T = 1 (``Sampling(seed=seed)``) instead of the argmax. None:
        the flavour's (reference True, corrected False).

    Example
    -------
    >>> from lens_halluc.interventions import CausalMM
    >>> cmm = CausalMM(vision="random", llm=None)
    >>> cmm.needs_editable_attention, cmm.vision_mode
    (False, 'features')
    >>> CausalMM(flavour="corrected")
    CausalMM(flavour='corrected')
    >>> caps = lh.caption(vlm, ds, strategy=CausalMM(llm="reverse"))              # doctest: +SKIP
    """

    name = "causalmm"
    description = "CausalMM counterfactual attention"
    options = {
        "strength": Param("float", "contrast strength (CausalMM's gamma)", aliases=("--gamma",)),
        "cutoff": Param("float", "plausibility cut-off (CausalMM's epsilon; 0 disables)",
                        aliases=("--epsilon",)),
        "vision": Param("str", "vision-encoder counterfactual", (None,) + VISION_COUNTERFACTUALS),
        "vision_layer": Param("int", "vision layer whose attention map is used"),
        "llm": Param("str", "LLM counterfactual attention", (None,) + tuple(LLM_COUNTERFACTUALS)),
        "llm_layers": Param("ints", "LLM layers (comma-separated; default all)"),
        "llm_heads": Param("ints", "head indices edited in each of those layers (comma-separated; default all)"),
        "seed": Param("int", "seed of random counterfactuals (and sampling seed)"),
        "flavour": Param("str", "reference (the released LLaVA code) or corrected", FLAVOURS),
        "vision_mode": Param("str", "features (reference: re-weight patch features) or attention (replace the layer's "
                                    "attention)", (None,) + VISION_MODES),
        "sample": Param("bool", "sample the next token (multinomial at T=1) instead of the argmax"),
    }
    flavours = {
        "reference": {"cutoff": 0.6, "vision": "shuffle", "llm": None, "vision_mode": "features", "sample": True},
        "corrected": {"cutoff": 0.1, "vision": None, "llm": "reverse", "vision_mode": "attention", "sample": False},
    }

    def __init__(self, strength: float = 1.0, cutoff: float | None = None, vision: str | None = None,
                 vision_layer: int = -1, llm: str | None = None, llm_layers: Sequence[int] | None = None,
                 llm_heads: Sequence[int] | None = None, seed: int = 0, flavour: str = "reference",
                 vision_mode: str | None = None, sample: bool | None = None):
        owner = "CausalMM"
        self.flavour = check_flavour(flavour, owner)
        self.strength = check_number(strength, "strength", owner, low=0.0)
        self.cutoff = check_number(self._flavoured("cutoff", cutoff), "cutoff", owner, 0.0, 1.0)
        vision = check_choice(vision, "vision", owner, (None,) + VISION_COUNTERFACTUALS)
        llm = check_choice(llm, "llm", owner, (None,) + tuple(LLM_COUNTERFACTUALS))
        self.vision, self.llm = _counterfactuals(vision, llm, self.flavour)
        self.vision_layer = check_int(vision_layer, "vision_layer", owner)
        self.llm_layers = check_ints(llm_layers, "llm_layers", owner)
        self.llm_heads = check_ints(llm_heads, "llm_heads", owner)
        self.seed = check_int(seed, "seed", owner, low=0)
        self.vision_mode = check_choice(self._flavoured("vision_mode", vision_mode), "vision_mode", owner, VISION_MODES)
        self.sample = check_bool(self._flavoured("sample", sample), "sample", owner)

    @classmethod
    def needs_editable(cls, params) -> bool:
        _, llm = _counterfactuals(params.get("vision"), params.get("llm"), params.get("flavour") or "reference")
        return llm is not None

    def bind(self, vlm) -> CausalMMStrategy:
        strategy = CausalMMStrategy(vlm, self.strength, self.cutoff, self.vision, self.vision_layer, self.llm,
                                    self.llm_layers, self.llm_heads, self.seed, self.vision_mode)
        strategy.sampling = Sampling(seed=self.seed) if self.sample else None
        return self._bound(strategy)
