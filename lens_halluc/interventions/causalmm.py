"""CausalMM — contrastive decoding against counterfactual attention (vision encoder and/or LLM).

Scores for the next token::

    one counterfactual:   s = (1 + γ)·l − γ·l_cf
    both counterfactuals: s = (1 + 2γ)·l − γ·l_cf_v − γ·l_cf_l
    s(y) = −inf  where  p(y) < ε · max p     (plausibility cut-off on the factual branch)

* Vision counterfactual (``vision=...``): in the vision tower's layer ``vision_layer`` the
  attention map ``A = softmax(QKᵀ·scale)`` (per head, over patches + CLS) is replaced by a
  counterfactual ``A'`` before ``A'·V`` — so the patch features are re-weighted by ``A'``:

  - ``"random"``: uniform noise per row, normalised (seeded: same ``seed`` ⇒ same map);
  - ``"uniform"``: ``1 / n_keys`` everywhere;
  - ``"reversed"``: ``(max_row A − A)`` normalised per row (a row of equal weights → uniform);
  - ``"shuffle"``: each row of ``A`` with its keys permuted by one seeded permutation.

  Implemented as a forward hook on that CLIP attention module that recomputes its output with
  ``A'`` (q/k/v/out_proj of the module itself). ``vision_layer`` indexes the layers that feed the
  features LLaVA uses: negative values count back from the selected feature layer
  (``config.vision_feature_layer``; −1 = the last layer whose output is used, e.g. CLIP layer 22
  of 24 in LLaVA-1.5), non-negative values are absolute encoder-layer indices and must be below it.
* LLM counterfactual (``llm=...``): :class:`~lens_halluc.hooks.attention.Counterfactual` through
  :func:`~lens_halluc.hooks.attention.edit_attention` on ``llm_layers`` × ``llm_heads`` (causal
  and padding mask kept). Needs the text tower on ``"lens_halluc"`` attention
  (the bound strategy switches to it by itself for each decoding call, in ``session()``, and
  restores the previous implementation; a forward outside that raises ``InterventionNotAppliedError``).

Deviation from the reference: there one KV cache is shared by all branches, so the contrast only
acts on the first token; here every branch has its own cache (``greedy_decode``). ``γ = 0`` gives
exactly greedy decoding. Here γ is ``strength`` and ε is ``cutoff`` (the names shared by the
contrastive family).

Example
-------
>>> from lens_halluc.interventions import CausalMM
>>> CausalMM(strength=1.0, vision="random", llm="reverse")
CausalMM(vision='random')
>>> caps = lh.caption(vlm, ds, strategy=CausalMM(llm="reverse"))                 # doctest: +SKIP
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

from ..generation.decoding import Branch, DecodingStrategy
from ..hooks.ablation import InterventionNotAppliedError
from ..hooks.attention import (ATTN_IMPLEMENTATION, Counterfactual, edit_attention, editable_attention,
                               text_attn_implementation)
from ..models.loading import LoadedVLM
from .base import Intervention, Param, check_choice, check_int, check_ints, check_number
from .contrastive import apply_plausibility, check_cutoff, contrast

__all__ = ["CausalMM", "CausalMMStrategy", "LLM_COUNTERFACTUALS", "VISION_COUNTERFACTUALS", "vision_attention_module", "vision_counterfactual",
           "vision_counterfactual_weights"]

VISION_COUNTERFACTUALS = ("random", "uniform", "reversed", "shuffle")
LLM_COUNTERFACTUALS = Counterfactual.KINDS


def vision_counterfactual_weights(weights: torch.Tensor, kind: str, seed: int = 0) -> torch.Tensor:
    """Counterfactual attention map for post-softmax ``weights [B, H, Q, K]`` (vision tower, no mask).

    Computed in float32 and returned in ``weights.dtype``; every row sums to 1. Random draws come
    from a CPU generator seeded with ``seed`` (deterministic, device-independent).
    """
    if kind not in VISION_COUNTERFACTUALS:
        raise ValueError(f"unknown vision counterfactual {kind!r}; use one of {VISION_COUNTERFACTUALS}.")
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


def _vision_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", model)
    tower = getattr(inner, "vision_tower", None) or getattr(model, "vision_tower", None)
    if tower is None:
        raise ValueError(f"{type(model).__name__} has no vision_tower: CausalMM's vision counterfactual needs a VLM.")
    vm = getattr(tower, "vision_model", tower)
    layers = getattr(getattr(vm, "encoder", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"cannot find the vision encoder layers of {type(tower).__name__} (expected .vision_model.encoder.layers).")
    return layers


def vision_attention_module(model: nn.Module, vision_layer: int = -1) -> tuple[int, nn.Module]:
    """``(absolute layer index, self_attn module)`` of the vision layer that CausalMM edits.

    Negative ``vision_layer`` counts back from the selected feature layer (``config.vision_feature_layer``),
    so −1 is the last encoder layer whose output reaches the LLM.
    """
    layers = _vision_layers(model)
    n = len(layers)
    feat = getattr(model.config, "vision_feature_layer", -1)
    feat = max(feat) if isinstance(feat, (list, tuple)) else int(feat)
    feat_index = feat + n + 1 if feat < 0 else feat  # index into hidden_states (0 = embeddings)
    n_used = feat_index                              # layers 0..feat_index-1 feed the features
    idx = n_used + int(vision_layer) if vision_layer < 0 else int(vision_layer)
    if not 0 <= idx < n_used:
        raise ValueError(f"vision_layer {vision_layer} is out of range: only vision layers 0..{n_used - 1} feed the "
                         f"features LLaVA uses (vision_feature_layer={feat}); an edit elsewhere would change nothing.")
    attn = layers[idx].self_attn
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        if not isinstance(getattr(attn, name, None), nn.Linear):
            raise ValueError(f"vision attention {type(attn).__name__} has no {name} Linear; only CLIP-style attention is supported.")
    return idx, attn


@contextmanager
def vision_counterfactual(model: nn.Module, kind: str, vision_layer: int = -1, seed: int = 0,
                          counter: list | None = None) -> Iterator[nn.Module]:
    """Inside the context, the chosen vision attention layer uses a counterfactual attention map.

    A forward hook on the CLIP attention module recomputes its output as ``out_proj(A'·V)``.
    ``counter`` (a list), if given, gets one entry appended per hooked call. Raises
    ``InterventionNotAppliedError`` on exit if the hooked layer never ran inside the context.
    """
    if kind not in VISION_COUNTERFACTUALS:
        raise ValueError(f"unknown vision counterfactual {kind!r}; use one of {VISION_COUNTERFACTUALS}.")
    _, attn = vision_attention_module(model, vision_layer)
    calls = [0]

    def hook(module, args, kwargs, output):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        b, t, _ = hidden.shape
        shape = (b, t, -1, module.head_dim)
        q = module.q_proj(hidden).view(shape).transpose(1, 2)
        k = module.k_proj(hidden).view(shape).transpose(1, 2)
        v = module.v_proj(hidden).view(shape).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-1, -2)) * module.scale
        if mask is not None:
            scores = scores + mask
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        cf = vision_counterfactual_weights(weights, kind, seed)
        out = torch.matmul(cf, v).transpose(1, 2).reshape(b, t, -1).contiguous()
        calls[0] += 1
        if counter is not None:
            counter.append(1)
        return (module.out_proj(out), cf)

    handle = attn.register_forward_hook(hook, with_kwargs=True)
    try:
        yield attn
    finally:
        handle.remove()
    if calls[0] == 0:
        raise InterventionNotAppliedError(
            f"the vision counterfactual ({kind!r}) never ran: no image went through the vision tower inside the context.")


class CausalMMStrategy(DecodingStrategy):
    """Counterfactual-attention contrastive decoding (CausalMM), every branch with its own KV cache.

    The bound form of :class:`CausalMM`. With an LLM counterfactual, :meth:`session` switches the
    text tower to the editable attention for the decoding call and restores it afterwards.

    Parameters
    ----------
    vlm : the LoadedVLM.
    strength : contrast weight γ (0 ⇒ greedy). Default 1.
    cutoff : plausibility cut-off ε on the factual branch (None disables). Default 0.1.
    vision : None or one of ``"random" | "uniform" | "reversed" | "shuffle"`` (vision counterfactual).
    vision_layer : vision layer to edit (see the module docstring). Default −1.
    llm : None or one of ``"reverse" | "reverse_normalize" | "random" | "uniform"`` (LLM counterfactual).
    llm_layers : text layers to edit (None = all).
    llm_heads : heads edited in each of those layers (None = all heads).
    seed : seed of the random counterfactuals.

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
                 llm_heads: Sequence[int] | None = None, seed: int = 0):
        if vision is None and llm is None:
            raise ValueError("CausalMM needs a counterfactual: give vision=... and/or llm=....")
        self.vlm = vlm
        self.strength = float(strength)
        self.cutoff = check_cutoff(cutoff, "cutoff")
        self.vision, self.vision_layer, self.llm, self.seed = vision, int(vision_layer), llm, int(seed)
        self.vision_calls: list = []
        self._expect_vision = False
        if vision is not None:
            if vision not in VISION_COUNTERFACTUALS:
                raise ValueError(f"unknown vision counterfactual {vision!r}; use one of {VISION_COUNTERFACTUALS}.")
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

    def _vision_context(self):
        # The image is encoded only at prefill; cached steps carry no pixels, so the hook must not
        # demand a call there (the counterfactual features live on in this branch's cache).
        return _PrefillOnly(self)

    def _llm_context(self):
        return edit_attention(self.vlm, self.llm_edit, self.llm_heads)

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
    """Vision-counterfactual hook around one forward of the ``cf_vision`` branch.

    The first forward after :meth:`CausalMMStrategy.begin` (the prefill, which encodes the image) must fire
    the hook, else ``InterventionNotAppliedError``; later cached steps carry no pixels.
    """

    def __init__(self, strategy: CausalMMStrategy):
        self.s = strategy

    def __enter__(self):
        self._n0 = len(self.s.vision_calls)
        self._handle = vision_counterfactual(self.s.vlm.model, self.s.vision, self.s.vision_layer, self.s.seed,
                                             counter=self.s.vision_calls)
        self._handle.__enter__()
        return self

    def __exit__(self, *exc):
        try:
            self._handle.__exit__(*exc)
        except InterventionNotAppliedError:
            if self.s._expect_vision and exc[0] is None:
                raise
        self.s._expect_vision = False
        return False


class CausalMM(Intervention):
    """CausalMM: contrast the factual logits with those under counterfactual attention (vision encoder and/or LLM).

    ``s = (1 + γ)·l − γ·l_cf`` (one counterfactual) or ``(1 + 2γ)·l − γ·l_cf_v − γ·l_cf_l`` (both);
    tokens with ``p(y) < ε·max p`` on the factual branch get −inf (see the module docstring).

    Parameters
    ----------
    strength : contrast weight γ ≥ 0 (0 ⇒ exactly greedy). Default 1.
    cutoff : plausibility cut-off ε in [0, 1]; None disables. Default 0.1.
    vision : vision-encoder counterfactual, None or one of ``"random" | "uniform" | "reversed" | "shuffle"``.
        Default None.
    vision_layer : vision layer whose attention map is replaced (negative: counted back from the
        feature layer LLaVA uses). Default −1.
    llm : LLM counterfactual attention, None or one of ``"reverse" | "reverse_normalize" | "random" |
        "uniform"``. Default ``"reverse"``. Needs the editable attention (switched on by itself).
    llm_layers : text layers edited (None = all). llm_heads : heads edited in each (None = all).
    seed : seed of the random counterfactuals. Default 0.

    At least one of ``vision`` / ``llm`` must be given.

    Example
    -------
    >>> from lens_halluc.interventions import CausalMM
    >>> cmm = CausalMM(vision="random", llm=None)
    >>> cmm.needs_editable_attention
    False
    >>> caps = lh.caption(vlm, ds, strategy=CausalMM(llm="reverse"))              # doctest: +SKIP
    """

    name = "causalmm"
    description = "CausalMM counterfactual attention"
    options = {
        "strength": Param("float", "contrast strength (CausalMM's gamma)", aliases=("--gamma",)),
        "cutoff": Param("float", "plausibility cut-off (CausalMM's epsilon)", aliases=("--epsilon",)),
        "vision": Param("str", "vision-encoder counterfactual", (None,) + VISION_COUNTERFACTUALS),
        "vision_layer": Param("int", "vision layer whose attention is replaced"),
        "llm": Param("str", "LLM counterfactual attention", (None,) + tuple(LLM_COUNTERFACTUALS)),
        "llm_layers": Param("ints", "LLM layers (comma-separated; default all)"),
        "llm_heads": Param("ints", "head indices edited in each of those layers (comma-separated; default all)"),
        "seed": Param("int", "seed of random counterfactuals"),
    }

    def __init__(self, strength: float = 1.0, cutoff: float | None = 0.1, vision: str | None = None,
                 vision_layer: int = -1, llm: str | None = "reverse", llm_layers: Sequence[int] | None = None,
                 llm_heads: Sequence[int] | None = None, seed: int = 0):
        self.strength = check_number(strength, "strength", "CausalMM", low=0.0)
        self.cutoff = check_number(cutoff, "cutoff", "CausalMM", 0.0, 1.0, optional=True)
        self.vision = check_choice(vision, "vision", "CausalMM", (None,) + VISION_COUNTERFACTUALS)
        self.vision_layer = check_int(vision_layer, "vision_layer", "CausalMM")
        self.llm = check_choice(llm, "llm", "CausalMM", (None,) + tuple(LLM_COUNTERFACTUALS))
        self.llm_layers = check_ints(llm_layers, "llm_layers", "CausalMM")
        self.llm_heads = check_ints(llm_heads, "llm_heads", "CausalMM")
        self.seed = check_int(seed, "seed", "CausalMM")
        if self.vision is None and self.llm is None:
            raise ValueError("CausalMM needs a counterfactual: give vision=... and/or llm=... (both None do nothing).")

    @classmethod
    def needs_editable(cls, params) -> bool:
        return params.get("llm", cls.defaults()["llm"]) is not None

    def bind(self, vlm) -> CausalMMStrategy:
        return self._bound(CausalMMStrategy(vlm, self.strength, self.cutoff, self.vision, self.vision_layer, self.llm,
                                            self.llm_layers, self.llm_heads, self.seed))
