"""Hand a loaded VLM to TransformerLens' ``TransformerBridge``, with images passed through.

TransformerLens 4.x ships a ``LlavaForConditionalGeneration`` adapter, so the whole LLaVA model
(vision tower, projector, text tower) can be bridged; its text-tower hook names are the usual
``blocks.{l}.attn.hook_pattern`` etc. (the vision tower's are ``vision_encoder.…``). Two things
need care, and this module handles them:

* **Images.** ``bridge.run_with_cache(ids, pixel_values=px)`` works, but anything that calls the
  bridge with tokens alone — TransformerLens' patching helpers (``transformer_lens.patching``)
  call ``model.run_with_hooks(corrupted_tokens, fwd_hooks=...)`` — runs LLaVA *without* the image:
  the ``<image>`` positions keep their placeholder embedding, no error is raised, and the
  attention maps differ completely (max |Δ| ≈ 1.0 on the organism). :func:`run_with_cache_images`,
  :func:`run_with_hooks_images` and :func:`with_images` always pass ``pixel_values`` (and the
  attention mask), and refuse image-token inputs that come without pixels.
* **The user's model stays intact.** Bridging replaces submodules *in place* (TransformerLens'
  ``build_bridge_from_module`` says so), after which ``vlm.model(..., output_attentions=True)``
  returns no attention weights (transformers records them by module class). So
  :func:`to_transformer_bridge` bridges a structural copy whose parameters and buffers *are* the
  original tensors: no extra weight memory, weight edits are seen by both, and the plain /
  nnsight paths on ``vlm.model`` keep working.

Not possible / not done here:

* ``TransformerBridge.boot_transformers`` is not used: with a pre-loaded model it still loads a
  processor by name and, when that fails, tries to ``pip install torchvision`` — not acceptable
  offline. The bridge is built with ``build_bridge_from_module`` and gets ``vlm.processor``.
* Architectures without a TransformerLens adapter raise :class:`BridgeUnsupportedError`.
* lens_halluc's attention edits (``attn_implementation="lens_halluc"``) do not act inside the
  bridge: the bridge computes attention itself (eager), so use TransformerLens hooks there
  (e.g. on ``blocks.{l}.attn.hook_pattern``) instead.
* Generation through the bridge is not wrapped; use ``vlm.model.generate``.

Measured on the shipped organism (CPU, float32): ``hook_pattern`` maps equal the eager
``output_attentions`` maps to max |Δ| = 1.4e-6.

Example
-------
>>> vlm = load_vlm()                                                           # doctest: +SKIP
>>> bridge = to_transformer_bridge(vlm)                                        # doctest: +SKIP
>>> enc = vlm.encode([image], ["Please describe this image in detail."])       # doctest: +SKIP
>>> logits, cache = run_with_cache_images(bridge, enc, names_filter=lambda n: n.endswith("hook_pattern"))  # doctest: +SKIP
>>> cache["blocks.0.attn.hook_pattern"].shape                                  # [B, H, T, T]  # doctest: +SKIP
"""
from __future__ import annotations

import copy
import weakref
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

__all__ = [
    "BridgeUnsupportedError", "ImagesMissingError", "ImageBoundBridge", "attention_patterns",
    "run_with_cache_images", "run_with_hooks_images", "to_transformer_bridge", "with_images",
]


class BridgeUnsupportedError(RuntimeError):
    """TransformerLens (or this installation of it) cannot bridge this model."""


class ImagesMissingError(ValueError):
    """Image-token ids were given without ``pixel_values``; the bridge would silently ignore the image."""


# One bridge per model object: building one copies the module tree and wires ~100 hook points
# per layer, too slow to repeat for every sample in attention_patterns(vlm, ...).
_BRIDGES: "weakref.WeakKeyDictionary[nn.Module, Any]" = weakref.WeakKeyDictionary()


def _require_transformer_lens():
    try:
        from transformer_lens.model_bridge.sources import build_bridge_from_module
        from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES
    except ImportError as e:  # optional dependency
        raise BridgeUnsupportedError(
            "TransformerLens with TransformerBridge is not installed; `pip install 'transformer-lens>=3'` "
            f"({e}).") from e
    return build_bridge_from_module, SUPPORTED_ARCHITECTURES


def _shared_weight_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s module tree whose parameters and buffers are the original tensors.

    Why: bridging rewires submodules in place; the copy absorbs that, while the deepcopy memo
    makes every parameter/buffer map to itself, so no weight memory is duplicated.
    """
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def to_transformer_bridge(vlm, processor=None, *, cache: bool = True):
    """A TransformerLens ``TransformerBridge`` over an already-loaded VLM (nothing is downloaded).

    Parameters
    ----------
    vlm : :class:`~lens_halluc.models.loading.LoadedVLM`, a transformers LLaVA model or an
        nnsight-wrapped one (then pass ``processor``).
    processor : the model's processor, when ``vlm`` is not a ``LoadedVLM``.
    cache : reuse the bridge built earlier for the same model object (default True).

    Returns
    -------
    ``transformer_lens.model_bridge.TransformerBridge`` over a structural copy of ``vlm.model``
    that shares its weights (``vlm.model`` itself is left unchanged). ``bridge.processor`` is
    the VLM's processor; ``bridge.tokenizer`` a configured copy of its tokenizer.

    Raises
    ------
    BridgeUnsupportedError : TransformerLens is missing or has no adapter for the model class.

    Example
    -------
    >>> bridge = to_transformer_bridge(load_vlm())                                # doctest: +SKIP
    >>> bridge.cfg.n_layers, bridge.cfg.n_heads, bridge.cfg.is_multimodal         # doctest: +SKIP
    (6, 8, True)
    """
    from .adapt import as_loaded_vlm, unwrap_model

    if not _is_loaded_vlm(vlm):
        vlm = as_loaded_vlm(unwrap_model(vlm), processor=processor)
    model = vlm.model
    if cache and model in _BRIDGES:
        return _BRIDGES[model]
    build_bridge_from_module, supported = _require_transformer_lens()
    arch = type(model).__name__
    if arch not in supported:
        near = sorted(a for a in supported if "lava" in a.lower() or "ForConditionalGeneration" in a)
        raise BridgeUnsupportedError(
            f"TransformerLens has no TransformerBridge adapter for {arch}. Multimodal classes it can bridge "
            f"include: {', '.join(near[:12])}. Use lens_halluc's plain or nnsight paths for this model.")
    try:
        bridge = build_bridge_from_module(
            _shared_weight_copy(model), arch,
            hf_config=copy.deepcopy(model.config),
            # a copy: TransformerLens normalises the tokenizer in place (padding side, pad/bos tokens)
            tokenizer=copy.deepcopy(vlm.tokenizer),
            model_name=str(vlm.path) if vlm.path is not None else arch,
        )
    except Exception as e:  # adapter path mismatch (e.g. a LLaVA variant with another module layout)
        raise BridgeUnsupportedError(
            f"TransformerLens could not bridge this {arch} ({type(e).__name__}: {e}).") from e
    bridge.processor = vlm.processor
    if cache:
        _BRIDGES[model] = bridge
    return bridge


def _is_loaded_vlm(obj) -> bool:
    from .loading import LoadedVLM

    return isinstance(obj, LoadedVLM)


def _is_bridge(obj) -> bool:
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:
        return False
    return isinstance(obj, TransformerBridge)


def _image_token_id(bridge) -> int | None:
    cfg = getattr(bridge.original_model, "config", None)
    for key in ("image_token_id", "image_token_index"):
        v = getattr(cfg, key, None)
        if v is not None:
            return int(v)
    return None


def _model_inputs(bridge, inputs, pixel_values=None, attention_mask=None) -> tuple[torch.Tensor, dict]:
    """``(input_ids [B, T], kwargs)`` with ``pixel_values`` / ``attention_mask`` on the model's device and dtype.

    Why the check: LLaVA accepts image-token ids without pixels and silently embeds the
    placeholder token instead of the image.
    """
    if isinstance(inputs, Mapping):
        ids = inputs["input_ids"]
        pixel_values = inputs.get("pixel_values") if pixel_values is None else pixel_values
        attention_mask = inputs.get("attention_mask") if attention_mask is None else attention_mask
    else:
        ids = inputs
    p = next(bridge.original_model.parameters())
    ids = torch.as_tensor(ids, dtype=torch.long, device=p.device)
    if ids.ndim == 1:
        ids = ids.unsqueeze(0)
    image_id = _image_token_id(bridge)
    if pixel_values is None and image_id is not None and bool((ids == image_id).any()):
        raise ImagesMissingError(
            f"input_ids contain image tokens (id {image_id}) but no pixel_values were given; the model would "
            "run on the placeholder embedding instead of the image. Pass the processor's pixel_values.")
    kw: dict = {}
    if pixel_values is not None:
        kw["pixel_values"] = torch.as_tensor(pixel_values).to(device=p.device, dtype=p.dtype)
    if attention_mask is not None:
        kw["attention_mask"] = torch.as_tensor(attention_mask, device=p.device)
    return ids, kw


def run_with_cache_images(bridge, inputs, pixel_values: torch.Tensor | None = None,
                          attention_mask: torch.Tensor | None = None, **kw):
    """``bridge.run_with_cache`` with ``pixel_values`` and ``attention_mask`` reaching the LLaVA model.

    Parameters
    ----------
    bridge : a ``TransformerBridge`` from :func:`to_transformer_bridge`.
    inputs : a processor output / ``LoadedVLM.encode`` result (``input_ids [B, T]``,
        ``pixel_values [B, 3, H, W]``, ``attention_mask [B, T]``), or an ``input_ids`` tensor
        ``[B, T]`` / ``[T]`` with ``pixel_values`` given separately.
    pixel_values, attention_mask : override or supply those of ``inputs``.
    **kw : passed to ``run_with_cache`` (``names_filter``, ``return_type``, ``stop_at_layer``, …).

    Returns
    -------
    ``(output, ActivationCache)`` as ``run_with_cache`` returns them.

    Raises
    ------
    ImagesMissingError : ``input_ids`` hold image tokens and no ``pixel_values`` were given.

    Example
    -------
    >>> logits, cache = run_with_cache_images(bridge, vlm.encode([img], [prompt]),
    ...                                       names_filter="blocks.3.attn.hook_pattern")   # doctest: +SKIP
    """
    ids, extra = _model_inputs(bridge, inputs, pixel_values, attention_mask)
    return bridge.run_with_cache(ids, **extra, **kw)


def run_with_hooks_images(bridge, inputs, fwd_hooks: Sequence[tuple[str | Callable, Callable]] = (),
                          pixel_values: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                          **kw):
    """``bridge.run_with_hooks`` with ``pixel_values`` and ``attention_mask`` reaching the LLaVA model.

    ``inputs`` as in :func:`run_with_cache_images`; ``fwd_hooks``: ``[(hook_name, fn), ...]``;
    ``**kw`` go to ``run_with_hooks`` (``bwd_hooks``, ``return_type``, …). Returns its output
    (logits ``[B, T, vocab]`` by default).

    Example
    -------
    >>> def zero_head(pattern, hook):          # pattern [B, H, T, T]
    ...     pattern[:, 5] = 0
    ...     return pattern
    >>> logits = run_with_hooks_images(bridge, enc, [("blocks.3.attn.hook_pattern", zero_head)])  # doctest: +SKIP
    """
    ids, extra = _model_inputs(bridge, inputs, pixel_values, attention_mask)
    return bridge.run_with_hooks(ids, fwd_hooks=list(fwd_hooks), **extra, **kw)


class ImageBoundBridge:
    """A bridge with one batch of images bound: every forward / ``run_with_hooks`` / ``run_with_cache``
    call made with tokens only gets these ``pixel_values`` (and ``attention_mask``).

    Why: TransformerLens' patching helpers (``transformer_lens.patching.get_act_patch_*``,
    ``generic_activation_patch``) call ``model.run_with_hooks(corrupted_tokens, fwd_hooks=...)``
    and never pass images. Everything else (``cfg``, ``blocks``, ``hook_dict``, …) is the bridge's.
    The token batch of each call must match the bound ``pixel_values`` batch ``[B, 3, H, W]``.
    Create with :func:`with_images`.
    """

    def __init__(self, bridge, pixel_values: torch.Tensor, attention_mask: torch.Tensor | None = None):
        if pixel_values is None:
            raise ImagesMissingError("with_images() needs pixel_values [B, 3, H, W].")
        self._bridge = bridge
        self._pixel_values = pixel_values
        self._attention_mask = attention_mask

    @property
    def bridge(self):
        """The wrapped ``TransformerBridge``."""
        return self._bridge

    def _bind(self, input, kw: dict) -> tuple[torch.Tensor, dict]:
        ids, extra = _model_inputs(self._bridge, input, kw.pop("pixel_values", self._pixel_values),
                                   kw.pop("attention_mask", self._attention_mask))
        if extra["pixel_values"].shape[0] != ids.shape[0]:
            raise ValueError(f"{ids.shape[0]} token rows but {extra['pixel_values'].shape[0]} bound images; "
                             "bind pixel_values with one image per row of the token batch.")
        return ids, {**extra, **kw}

    def run_with_hooks(self, input, *args, **kw):
        ids, kw = self._bind(input, kw)
        return self._bridge.run_with_hooks(ids, *args, **kw)

    def run_with_cache(self, input, *args, **kw):
        ids, kw = self._bind(input, kw)
        return self._bridge.run_with_cache(ids, *args, **kw)

    def forward(self, input, *args, **kw):
        ids, kw = self._bind(input, kw)
        return self._bridge(ids, *args, **kw)

    __call__ = forward

    def __getattr__(self, name):  # only reached for names not defined above
        return getattr(self._bridge, name)


def with_images(bridge, pixel_values: torch.Tensor, attention_mask: torch.Tensor | None = None) -> ImageBoundBridge:
    """``bridge`` with ``pixel_values [B, 3, H, W]`` (and ``attention_mask [B, T]``) bound to every call.

    Use it wherever TransformerLens code calls the model with tokens only, e.g. its patching helpers.

    Example
    -------
    >>> from transformer_lens import patching
    >>> _, clean_cache = run_with_cache_images(bridge, clean_enc)                          # doctest: +SKIP
    >>> model = with_images(bridge, corrupt_enc["pixel_values"], corrupt_enc["attention_mask"])  # doctest: +SKIP
    >>> effect = patching.get_act_patch_attn_head_out_all_pos(
    ...     model, corrupt_enc["input_ids"], clean_cache, metric)                           # [L, H]  # doctest: +SKIP
    """
    return ImageBoundBridge(bridge, pixel_values, attention_mask)


@torch.no_grad()
def attention_patterns(bridge_or_vlm, input_ids: Sequence[int] | torch.Tensor,
                       pixel_values: torch.Tensor | None = None) -> torch.Tensor:
    """Post-softmax text-tower attention of one sequence, read from the bridge's ``blocks.{l}.attn.hook_pattern``.

    Same contract as :func:`lens_halluc.analysis.attention.attention_maps`, through TransformerLens.

    Parameters
    ----------
    bridge_or_vlm : a ``TransformerBridge`` (from :func:`to_transformer_bridge`) or a ``LoadedVLM``
        (bridged once, then reused).
    input_ids : ``[T]`` token ids (image tokens expanded, as in ``samples.jsonl``).
    pixel_values : ``[1, 3, H, W]``; required when ``input_ids`` hold image tokens.

    Returns
    -------
    float32 tensor ``[L, H, T, T]`` on the CPU.

    Example
    -------
    >>> att = attention_patterns(vlm, sample["input_ids"], sample_pixels(vlm, sample))   # doctest: +SKIP
    >>> att.shape                                                                       # [L, H, T, T]  # doctest: +SKIP
    """
    bridge = bridge_or_vlm if _is_bridge(bridge_or_vlm) else to_transformer_bridge(bridge_or_vlm)
    ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(1, -1)
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(bridge.cfg.n_layers)]
    # only the text tower's patterns: the vision tower's have the same suffix
    _, cache = run_with_cache_images(bridge, ids, pixel_values=pixel_values,
                                     attention_mask=torch.ones_like(ids), names_filter=names)
    return torch.stack([cache[n][0] for n in names]).float().cpu()
