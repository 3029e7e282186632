"""Mllama (Llama-3.2-Vision, ``MllamaForConditionalGeneration``, ``model_type`` ``mllama``).

How the image reaches the text
------------------------------
The image **never enters the token sequence**. The text holds one ``<|image|>`` token per image (a
learned text embedding, the image's *position* in the text stream), and the vision states reach the
text tower only through the **cross-attention decoder layers** ``config.text_config.cross_attention_layers``
(``[3, 8, 13, 18, 23, 28, 33, 38]`` of 40 in the 11B model). A cross-attention layer
(``MllamaCrossAttentionDecoderLayer``) computes::

    a   = cross_attn(input_layernorm(h), keys/values = k_norm(k_proj(V)), v_proj(V), mask = M)
    h'  = h + tanh(cross_attn_attn_gate) * a                                 # attention output, gated
    h'' = h' + tanh(cross_attn_mlp_gate) * R * mlp(post_attention_layernorm(h'))

with ``V`` ``[B, N, d]`` the projected vision states (``N = n_images * n_tiles * P`` vision tokens,
``P = (image_size / patch_size)**2 + 1`` patches + CLS per tile, padding tiles included),
``M`` ``[B, 1, T, N]`` the additive cross-attention mask (0 / dtype-min) and ``R`` ``[B, 1, T, 1]``
``full_text_row_masked_out_mask`` (0 for a text row that sees no image). The cross-attention module
``cross_attn`` has ``q_proj``/``k_proj``/``v_proj``/``o_proj`` (no bias), ``q_norm``/``k_norm`` RMSNorms
over ``head_dim``, no rotary embedding, ``num_heads``/``num_key_value_heads``/``head_dim`` as the
self-attention layers (``head_dim = hidden_size / num_attention_heads``), ``scaling = head_dim**-0.5``.
Its ``o_proj`` input is the heads' outputs side by side, as for self-attention: a cross-attention
head is an attribution unit like any other.

Quirks, as transformers 5.x implements them (and the tests check):

* **Rows that see no image still cross-attend.** ``_prepare_cross_attention_mask`` multiplies the mask by
  ``R``, so a row with no image (the tokens *before* ``<|image|>``: ``<|begin_of_text|>`` and the user
  header in the chat template; left padding) gets an all-zero mask: it attends *uniformly to every vision
  token* (padding tiles included), and that gated attention output is added; only its MLP output is
  zeroed by ``R``. So the logits of the positions before ``<|image|>`` depend on the image.
* ``MllamaTextCrossAttention`` has no ``is_causal`` attribute: with ``sdpa`` and *no* cross-attention mask,
  the torch kernel would apply a causal ``[T, N]`` mask (eager would not). :meth:`MllamaAdapter.model_inputs`
  therefore refuses image inputs without ``cross_attention_mask``.
* The cache: at prefill (``cross_attention_states`` given) the cross layer appends its vision keys/values
  with ``cache.update`` (a second prefill on the same cache would *concatenate* a second copy); while
  decoding (no ``cross_attention_states``) it reads ``cache.layers[idx].keys/.values``, and the text model
  *skips* a cross layer whose cache is empty when no vision states are given (text-only forward).
  ``MllamaTextModel`` reads the sequence length from ``cache.get_seq_length()`` = layer 0, which must be a
  self-attention layer.
* ``cross_attention_states`` as the layers receive it is ``[B * n_images * n_tiles, P, d]`` (the
  cross-attention reshapes it with ``view(bsz, -1, ...)`` to ``[B, N, ...]``): its first axis is *not* the
  text batch. Repeating a batch-1 value ``batch`` times along axis 0 (what the exact replay does) is right;
  *expanding* it, or slicing it per sample, is not. :meth:`MllamaAdapter.replay_clean_kwargs` gives it as
  ``[B, N, d]`` (text batch first), which is what a replay of a clean forward of batch > 1 needs.
* The ``<|image|>`` id is ``text_config.vocab_size`` on the real checkpoints (one past the LM head: it
  cannot be generated; the embedding table has ``vocab_size + 8`` rows).
* The processor prepends ``<|begin_of_text|>`` to a text lacking it; the real Llama-3 tokenizer adds one
  too, so a rendered chat template is encoded with a double BOS unless ``add_special_tokens=False``
  (:meth:`MllamaAdapter.processor_call_kwargs`).

What "image attention" means for Mllama
---------------------------------------
Image attention is the attention of **text queries to the vision tokens in the cross-attention layers**;
self-attention layers attend to text only (the ``<|image|>`` key is a text embedding, role IMAGE by
position but holding no image features). Consequences:

* **Attribution** (influences, exact replay): defined; heads of cross-attention layers are heads like any
  other (their ``o_proj`` input slices), and ablating one removes that head's (gated) read of the image.
* **Bias analysis** (image vs text share of a head's attention): *not defined*. No softmax mixes image and
  text keys: a cross-attention head puts mass 1 on the image by construction (text share 0 for every row
  that sees an image), a self-attention head has no image keys (its "image mass" would be the placeholder
  token's). A share computed either way measures nothing about the head.
* **ADHH** (zero a head's *text* attention when it dominates, so the image gets it): *not defined*. Its
  premise, a softmax over image and text keys, holds in no layer: cross-attention heads have no text keys,
  and zeroing a self-attention head's text attention leaves only the placeholder/system keys (it ablates
  the head rather than redirecting it to the image).
* **Attention re-weighting** (``ScaleKeys``): defined per layer kind. ``"image"`` applies to
  cross-attention heads only: every key is a vision token, so without renormalisation it scales the head's
  cross-attention output by ``alpha``, with renormalisation it is the identity. ``"text"``/``"system"`` apply
  to self-attention heads only. A head list that asks a group of a layer without it raises
  (:meth:`Adapter.attention_key_group_reason`).
* **CausalMM**: the vision counterfactual edits the vision tower's attention (:meth:`vision_attention`:
  the local ``transformer`` then the ``global_transformer`` layers); the language counterfactual edits
  text attention maps, including the cross-attention maps (uniform/random attention over the vision
  tokens of a row is well defined).
* **Confounders** (patch map): *not defined*: the vision tokens are tiles of patches plus one CLS per tile,
  and none of them is a text position (:meth:`patch_grid` raises).
* **VCD**: defined (noise on real tiles only: :meth:`Adapter.pixel_noise_mask` reads ``aspect_ratio_mask``).

Example
-------
>>> from lens_halluc.models.adapters import ADAPTERS
>>> ADAPTERS["mllama"].nested_images
True
>>> adapter = ADAPTERS["mllama"]
>>> adapter.attention_kind(model, 1)                                      # doctest: +SKIP
'cross'
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ..compat import cache_kwargs
from . import register_adapter
from .base import Adapter, AdapterError, NotDefinedForArchitecture

__all__ = ["MllamaAdapter"]

#: The keyword arguments ``MllamaTextModel`` passes to *every* decoder layer beyond the Llama-style ones
#: (self-attention layers receive and ignore them): name -> (batch axis, position axis) as the layers get
#: them after :meth:`MllamaAdapter.replay_clean_kwargs`.
_CROSS_KWARG_AXES = {
    "cross_attention_states": (0, None),          # [B, N, d]: the same vision keys for every query row
    "cross_attention_mask": (0, -2),              # [B, 1, T, N] additive
    "full_text_row_masked_out_mask": (0, -2),     # [B, 1, T, 1]
}


class MllamaAdapter(Adapter):
    """Llama-3.2-Vision: images through cross-attention layers only (see the module doc)."""

    name = "mllama"
    model_types = ("mllama",)
    language_model_paths = ("model.language_model",)
    image_input_keys = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask")
    #: ``cross_attention_mask`` ``[B, T, n_images, n_tiles]`` has the text positions on axis 1 (padding and
    #: slicing treat it as per-token). Appended tokens do not get a constant: they repeat the last row
    #: (:meth:`extend_inputs`, as ``model.generate`` does); the value 1 here is what those rows hold on
    #: every real tile of an image the last token sees.
    per_token_inputs = {"cross_attention_mask": 1}
    nested_images = True
    not_defined = {
        "bias": "Mllama's images enter only through cross-attention layers, whose keys are all vision tokens "
                "(image share 1 by construction), while self-attention layers have no image keys; no head mixes "
                "image and text keys in one softmax, so an image-vs-text attention share measures nothing.",
        "adhh": "ADHH zeroes a head's text attention so that its image attention takes over; in Mllama no attention "
                "has both: cross-attention heads have no text keys and self-attention heads no image keys.",
        "confounders": "the vision tokens are tiles of patches plus a CLS token per tile, outside the text sequence; "
                       "there is no row-major patch grid of image positions.",
        "patch_grid": "image tokens are tiles (plus a CLS per tile) seen through cross-attention, not text positions.",
        "inheritance": "the base LM (Llama 3.1) has fewer layers (no cross-attention layers); comparing heads needs the "
                       "layer map of MllamaAdapter.base_lm_layer, which the inheritance analysis does not use yet.",
    }

    # ------------------------------------------------------------------ layers
    def cross_attention_layers(self, model: nn.Module) -> tuple[int, ...]:
        """Indices of the cross-attention decoder layers (``text_config.cross_attention_layers``)."""
        layers = getattr(self.text_config(model.config), "cross_attention_layers", None)
        if layers is None:
            raise AdapterError(f"{type(model).__name__}: no text_config.cross_attention_layers; not an Mllama model.")
        return tuple(sorted(int(i) for i in layers))

    def attention_kind(self, model: nn.Module, layer: int) -> str:
        return "cross" if int(layer) in self.cross_attention_layers(model) else "self"

    def attention(self, model: nn.Module, layer: int) -> nn.Module:
        module = super().attention(model, layer)
        kind = self.attention_kind(model, layer)
        # The layer class must agree with the config: a mismatch would describe heads that do not exist.
        expected = "cross_attn" if kind == "cross" else "self_attn"
        if not hasattr(self.layers(model)[layer], expected):
            raise AdapterError(f"mllama layer {layer}: config says {kind!r} but the layer has no `{expected}`.")
        return module

    def attention_heads(self, model: nn.Module, layer: int) -> tuple[int, int, int]:
        """``(n_heads, n_kv_heads, head_dim)`` of layer ``layer``'s attention (self or cross), read from the module.

        Example
        -------
        >>> adapter.attention_heads(model, 1)                              # doctest: +SKIP
        (4, 2, 16)
        """
        attn = self.attention(model, layer)
        return int(attn.num_heads), int(attn.num_key_value_heads), int(attn.head_dim)

    def base_lm_layer(self, model: nn.Module, layer: int) -> int | None:
        """The layer of the base language model (Llama-3.1 for Llama-3.2-Vision) that self-attention layer
        ``layer`` was initialised from: ``layer`` minus the cross-attention layers inserted before it; None for a
        cross-attention layer (new in the VLM: no base counterpart). For the inheritance analysis.

        Example
        -------
        >>> [adapter.base_lm_layer(model, i) for i in range(4)]          # cross layers [1, 3]  # doctest: +SKIP
        [0, None, 1, None]
        """
        cross = self.cross_attention_layers(model)
        if int(layer) in cross:
            return None
        return int(layer) - sum(1 for c in cross if c < int(layer))

    # ------------------------------------------------------------------ inputs
    def model_inputs(self, encoding: Mapping[str, Any]) -> dict[str, Any]:
        """As :meth:`Adapter.model_inputs`; raises when ``pixel_values`` come without ``cross_attention_mask``
        (without it, sdpa masks the cross-attention causally over the vision tokens, eager not at all:
        neither is what the processor's mask says)."""
        out = super().model_inputs(encoding)
        if out.get("pixel_values") is not None and out.get("cross_attention_mask") is None:
            raise AdapterError("mllama: pixel_values without cross_attention_mask; carry the processor's "
                               "cross_attention_mask [B, T, n_images, n_tiles] with the image.")
        return out

    def extend_inputs(self, inputs: Mapping[str, Any], new_ids: torch.Tensor) -> dict[str, Any]:
        """``inputs`` with ``new_ids`` ``[B, n]`` appended: ids, attention mask (ones), and
        ``cross_attention_mask`` ``[B, T, n_images, n_tiles]`` extended by repeating its **last row** ``n``
        times (what ``MllamaForConditionalGeneration._update_model_kwargs_for_generation`` does per
        generated token: a caption token sees the images the last prompt token sees).

        Example
        -------
        >>> full = adapter.extend_inputs(adapter.model_inputs(enc), caption_ids[None])   # doctest: +SKIP
        >>> full["cross_attention_mask"].shape[1] == full["input_ids"].shape[1]         # doctest: +SKIP
        True
        """
        cam = inputs.get("cross_attention_mask")
        rest = {k: v for k, v in inputs.items() if k != "cross_attention_mask"}
        out = super().extend_inputs(rest, new_ids)   # ids and attention mask (the mask is not in `rest`)
        if cam is not None:
            n = out["input_ids"].shape[1] - cam.shape[1]
            if n < 0:
                raise AdapterError(f"mllama: cross_attention_mask covers {cam.shape[1]} positions, more than the "
                                   f"{out['input_ids'].shape[1]} input ids.")
            out["cross_attention_mask"] = torch.cat([cam, cam[:, -1:].expand(-1, n, *cam.shape[2:])], dim=1)
        return out

    def processor_call_kwargs(self, processor) -> dict[str, Any]:
        """Extra keyword arguments for ``processor(images=..., text=...)`` on a :meth:`format_prompt` text:
        ``{"add_special_tokens": False}`` when the tokenizer adds ``<|begin_of_text|>`` itself (the real
        Llama-3 tokenizer: the rendered template already starts with it, and MllamaProcessor adds none to a
        text that has one), else ``{}``.

        Example
        -------
        >>> enc = processor(images=[[im]], text=[adapter.format_prompt(processor, "Describe.")],
        ...                 return_tensors="pt", **adapter.processor_call_kwargs(processor))   # doctest: +SKIP
        """
        tok = getattr(processor, "tokenizer", processor)
        bos = getattr(tok, "bos_token_id", None)
        if bos is None:
            return {}
        ids = tok("a").input_ids
        return {"add_special_tokens": False} if ids and ids[0] == bos else {}

    # ------------------------------------------------------------------ vision side
    def vision_attention(self, model: nn.Module) -> list[nn.Module]:
        """The vision tower's self-attention modules: the local encoder's layers (``transformer``), then the
        gated global encoder's (``global_transformer``), in the order the tower runs them."""
        vision = getattr(getattr(model, "model", model), "vision_model", None)
        local = getattr(getattr(vision, "transformer", None), "layers", None)
        glob = getattr(getattr(vision, "global_transformer", None), "layers", None)
        if local is None or glob is None:
            raise AdapterError(f"{type(model).__name__}: no Mllama vision encoder at model.vision_model.transformer / "
                               ".global_transformer.")
        return [layer.self_attn for layer in (*local, *glob)]

    def patch_grid(self, model: nn.Module, encoding: Mapping[str, Any], row: int = 0) -> tuple[int, int]:
        raise NotDefinedForArchitecture(f"mllama: {self.not_defined['patch_grid']}")

    # ------------------------------------------------------------------ cross-attention, plainly
    def vision_tokens_per_tile(self, model: nn.Module) -> int:
        """``P = (image_size / patch_size)**2 + 1``: vision tokens (patches + CLS) per tile."""
        return int(model.model.vision_model.num_patches)

    @torch.no_grad()
    def cross_attention_inputs(self, model: nn.Module, inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """What every cross-attention layer receives for ``inputs`` (processor output of :meth:`model_inputs`),
        computed as ``MllamaModel.forward`` does:

        * ``cross_attention_states`` ``[B, N, d]`` (text batch first; ``N = n_images * n_tiles * P``),
        * ``cross_attention_mask`` ``[B, 1, T, N]`` additive (0 = attend, dtype-min = blocked; all 0 on rows
          that see no image),
        * ``full_text_row_masked_out_mask`` ``[B, 1, T, 1]`` (0 on rows that see no image).

        Example
        -------
        >>> ca = adapter.cross_attention_inputs(model, enc)                 # doctest: +SKIP
        >>> ca["cross_attention_mask"].shape                                # doctest: +SKIP
        torch.Size([2, 1, 16, 34])
        """
        from transformers.models.mllama.modeling_mllama import _prepare_cross_attention_mask

        inner = model.model
        pv = inputs["pixel_values"]
        vision = inner.vision_model(pixel_values=pv, aspect_ratio_ids=inputs["aspect_ratio_ids"],
                                    aspect_ratio_mask=inputs["aspect_ratio_mask"]).last_hidden_state
        states = inner.multi_modal_projector(vision)          # [B, n_images, n_tiles, P, d]
        B = inputs["input_ids"].shape[0]
        states = states.reshape(B, -1, states.shape[-1])
        mask, rows = _prepare_cross_attention_mask(inputs["cross_attention_mask"],
                                                   num_vision_tokens=inner.vision_model.num_patches,
                                                   dtype=inner.dtype)
        return {"cross_attention_states": states, "cross_attention_mask": mask, "full_text_row_masked_out_mask": rows}

    def cross_layer_kwargs(self, model: nn.Module, layer: int, cross_inputs: Mapping[str, torch.Tensor],
                           positions: torch.Tensor | slice | None = None, batch: int | None = None) -> dict[str, Any]:
        """Keyword arguments to call cross-attention decoder layer ``layer`` by hand on query rows at
        ``positions`` (an index tensor ``[S]`` or slice over the ``T`` text positions; None: all) of
        ``cross_inputs`` (:meth:`cross_attention_inputs`, or the clean kwargs after
        :meth:`replay_clean_kwargs`), for ``batch`` rows (``cross_inputs`` of batch 1 are expanded).

        Call as ``layers[layer](h_rows, **kw)`` with ``h_rows`` ``[batch, S, d]``: keys/values are computed from
        ``cross_attention_states`` (``cache=None``: nothing is read from or appended to a cache — a cached
        replay must not hand this layer a stand-in cache whose ``update()`` concatenates the rows' keys;
        the layer's keys are the vision tokens only). ``attention_mask``/``position_embeddings`` are not
        used by a cross-attention layer and are passed as None.

        Example
        -------
        >>> ca = adapter.cross_attention_inputs(model, enc)                       # doctest: +SKIP
        >>> kw = adapter.cross_layer_kwargs(model, 1, ca, torch.tensor([5, 9]))   # doctest: +SKIP
        >>> out = adapter.layers(model)[1](h[:, [5, 9]], **kw)                   # doctest: +SKIP
        """
        if self.attention_kind(model, layer) != "cross":
            raise AdapterError(f"mllama layer {layer} is a self-attention layer; cross_layer_kwargs is for the "
                               f"cross-attention layers {list(self.cross_attention_layers(model))}.")
        sel = slice(None) if positions is None else positions
        states = cross_inputs["cross_attention_states"]
        mask = cross_inputs["cross_attention_mask"][:, :, sel]
        rows = cross_inputs["full_text_row_masked_out_mask"][:, :, sel]
        if batch is not None and states.shape[0] != batch:
            if states.shape[0] != 1:
                raise AdapterError(f"mllama: cross inputs of batch {states.shape[0]} cannot be expanded to {batch}.")
            states = states.expand(batch, *states.shape[1:])
            mask = mask.expand(batch, *mask.shape[1:])
            rows = rows.expand(batch, *rows.shape[1:])
        return {"cross_attention_states": states, "cross_attention_mask": mask, "attention_mask": None,
                "full_text_row_masked_out_mask": rows, "position_ids": None, "position_embeddings": None,
                **cache_kwargs(self.layers(model)[layer], None), "use_cache": False}

    # ------------------------------------------------------------------ replay hooks (see base.py's section)
    def replay_kwarg_axes(self, model: nn.Module, layer: int) -> Mapping[str, tuple[int | None, int | None]]:
        """Every decoder layer (self *and* cross) receives the cross-attention keywords from ``MllamaTextModel``;
        self-attention layers ignore them, cross-attention layers use them. ``cross_attention_states``: no
        position axis (the same vision keys for every query row), batch axis 0 — ``[B * n_images * n_tiles, P, d]``
        as captured (repeat, do not expand, a batch-1 value) or ``[B, N, d]`` after :meth:`replay_clean_kwargs`;
        the two masks ``[B, 1, T, ·]``: positions on axis -2."""
        return dict(_CROSS_KWARG_AXES)

    def replay_clean_kwargs(self, model: nn.Module, layer: int, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The keyword arguments a decoder layer received in a plain forward, rewritten so that every tensor
        of :meth:`replay_kwarg_axes` has the text batch on its batch axis: ``cross_attention_states`` arrives
        as ``[B * n_images * n_tiles, P, d]`` and becomes ``[B, n_images * n_tiles * P, d]`` (exactly the
        ``view(bsz, -1, ...)`` the cross-attention applies, so the layer's output is unchanged). Needed to
        take one sample's vision states out of a clean forward of batch > 1 (slicing axis 0 at the sample
        index would take a tile of sample 0) and to *expand* rather than repeat them.

        Example
        -------
        >>> kw = adapter.replay_clean_kwargs(model, 1, captured_kwargs)          # doctest: +SKIP
        >>> kw["cross_attention_states"].shape                                  # doctest: +SKIP
        torch.Size([1, 34, 64])
        """
        out = dict(kwargs)
        states = out.get("cross_attention_states")
        mask = out.get("cross_attention_mask")
        if isinstance(states, torch.Tensor) and states.dim() == 3:
            batch = None
            for ref in (mask, out.get("full_text_row_masked_out_mask"), out.get("hidden_states")):
                if isinstance(ref, torch.Tensor):
                    batch = ref.shape[0]
                    break
            if batch is None:
                raise AdapterError("mllama: cannot tell the text batch of cross_attention_states (no "
                                   "cross_attention_mask among the layer's keyword arguments).")
            if states.shape[0] % batch:
                raise AdapterError(f"mllama: cross_attention_states of {states.shape[0]} tiles for a batch of {batch}.")
            out["cross_attention_states"] = states.reshape(batch, -1, states.shape[-1])
        return out


register_adapter(MllamaAdapter)
