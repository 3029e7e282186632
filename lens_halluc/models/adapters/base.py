"""The architecture adapter: everything lens_halluc needs to know about one VLM family, in one place.

An :class:`Adapter` answers, for a loaded model of its family, the questions the methods ask:

* **where** the text decoder and its layers are (:meth:`Adapter.language_model`), each layer's
  attention module and kind (``"self"`` or ``"cross"``, :meth:`Adapter.attention`), and the
  ``o_proj`` whose *input* holds the heads' outputs side by side (head ``h`` at columns
  ``h*head_dim:(h+1)*head_dim``);
* **which tokens** are image tokens and which are image *structure* (separators, row/column
  markers, begin/end-of-image tokens: :meth:`Adapter.image_token_ids`,
  :meth:`Adapter.structure_token_ids`);
* **which inputs** travel with an image (``image_sizes``, ``image_grid_thw``, ``token_type_ids``,
  ``aspect_ratio_ids`` ...: :attr:`Adapter.image_input_keys`) and how per-token ones extend over a
  caption appended to the prompt (:attr:`Adapter.per_token_inputs`, :meth:`Adapter.extend_inputs`);
* **the prompt format** (:meth:`Adapter.format_prompt`: the processor's own chat template with its
  own image placeholder unless a lens_halluc template is asked for) and how images are passed to
  the processor (:meth:`Adapter.processor_images`: one flat list, or one list per sample);
* **the logits** as the model computes them from the last hidden state (:meth:`Adapter.logits`:
  final norm, LM head, then :meth:`Adapter.postprocess_logits`: soft-capping, token suppression);
* what the methods need beyond the text tower: the vision tower's attention modules
  (:meth:`Adapter.vision_attention`, CausalMM's vision counterfactual) and the patch grid of an
  image (:meth:`Adapter.patch_grid`, the confounder analysis);
* which methods have **no meaning** for the family, and why (:attr:`Adapter.not_defined`).

The defaults describe a LLaVA-style model in transformers v5 (``model.model.language_model`` a
Llama-like decoder, one image token, ``pixel_values`` only, final ``norm`` then ``lm_head``). A
family's module overrides what differs; nothing is trusted: the exactness checks (control rows
against the plain forward, the per-head loop, ``model.generate``) catch an adapter that is wrong.

Example
-------
>>> from lens_halluc.models.adapters import adapter_for
>>> adapter = adapter_for(model)                                        # doctest: +SKIP
>>> adapter.name, adapter.attention_kind(model, 0)                      # doctest: +SKIP
('llava', 'self')
"""
from __future__ import annotations

from typing import Any, ClassVar, Mapping, Sequence

import torch
from torch import nn

__all__ = ["Adapter", "AdapterError", "NotDefinedForArchitecture"]


class AdapterError(ValueError):
    """A model the adapter cannot describe (unknown architecture, missing module); the message says what to do."""


class NotDefinedForArchitecture(ValueError):
    """A method that has no meaning for this architecture; the message gives the reason.

    Example
    -------
    >>> raise NotDefinedForArchitecture("CausalMM's vision counterfactual: ...")   # doctest: +SKIP
    """


def _get_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


class Adapter:
    """Describes one VLM family to lens_halluc (see the module doc). Subclass per family; register with
    :func:`lens_halluc.models.adapters.register_adapter`.

    Class attributes
    ----------------
    name : the family's short name (``"qwen2_vl"``), used in messages and tables.
    model_types : the ``config.model_type`` values served (``("qwen2_vl",)``).
    language_model_paths : attribute paths, from the top-level model, tried in order for the module
        holding ``.layers`` (and ``.norm``).
    image_input_keys : processor outputs, besides ``input_ids``/``attention_mask``, that go to the
        forward with an image (always including ``pixel_values`` when the family has one).
    per_token_inputs : processor outputs shaped like ``input_ids`` (``[B, T]``) that must be extended
        when tokens are appended (a caption): name -> the value appended tokens get
        (``{"token_type_ids": 1}`` for PaliGemma's suffix, ``{"mm_token_type_ids": 0}`` for Qwen).
    nested_images : the processor wants one list of images per sample (Mllama, Gemma 3, Idefics3,
        SmolVLM) rather than one flat list.
    positions_by_model : the model computes its own position ids (M-RoPE): decoding and replays must
        not pass 1-D ``position_ids``.
    not_defined : method name -> reason it has no meaning here (raised as
        :class:`NotDefinedForArchitecture` by the method's entry point).
    """

    name: ClassVar[str] = "base"
    model_types: ClassVar[tuple[str, ...]] = ()
    language_model_paths: ClassVar[tuple[str, ...]] = ("model.language_model", "model.text_model",
                                                        "language_model.model", "model", "language_model")
    image_input_keys: ClassVar[tuple[str, ...]] = ("pixel_values",)
    per_token_inputs: ClassVar[Mapping[str, int]] = {}
    nested_images: ClassVar[bool] = False
    positions_by_model: ClassVar[bool] = False
    not_defined: ClassVar[Mapping[str, str]] = {}

    # ------------------------------------------------------------------ configuration
    def text_config(self, config) -> Any:
        """The text tower's config (the config itself for a flat one, e.g. Chameleon)."""
        get = getattr(config, "get_text_config", None)
        return get() if callable(get) else config

    # ------------------------------------------------------------------ modules
    def language_model(self, model: nn.Module) -> nn.Module:
        """The text decoder stack: the module holding ``.layers`` (an ``nn.ModuleList``)."""
        for path in self.language_model_paths:
            candidate = _get_path(model, path)
            if isinstance(candidate, nn.Module) and isinstance(getattr(candidate, "layers", None), nn.ModuleList):
                return candidate
        raise AdapterError(
            f"{type(model).__name__}: the {self.name!r} adapter found no text decoder layers at "
            f"{', '.join(self.language_model_paths)}; set `language_model_paths` in its adapter "
            f"(lens_halluc/models/adapters/).")

    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers, in order."""
        return self.language_model(model).layers

    def attention_kind(self, model: nn.Module, layer: int) -> str:
        """``"self"`` or ``"cross"`` (Mllama's cross-attention layers: queries from text, keys from the image)."""
        return "self"

    def attention(self, model: nn.Module, layer: int) -> nn.Module:
        """Layer ``layer``'s attention module (``self_attn``; ``cross_attn`` for a cross-attention layer)."""
        name = "cross_attn" if self.attention_kind(model, layer) == "cross" else "self_attn"
        module = getattr(self.layers(model)[layer], name, None)
        if not isinstance(module, nn.Module):
            raise AdapterError(f"{type(model).__name__} layer {layer} has no `{name}`; the {self.name!r} adapter "
                               "must say where this layer's attention is (Adapter.attention).")
        return module

    def o_proj(self, model: nn.Module, layer: int) -> nn.Linear:
        """The output projection of layer ``layer``'s attention: its input is the heads' outputs side by side."""
        proj = getattr(self.attention(model, layer), "o_proj", None)
        if not isinstance(proj, nn.Linear):
            raise AdapterError(f"{type(model).__name__} layer {layer}: attention has no `o_proj` Linear; head "
                               f"outputs cannot be located (the {self.name!r} adapter must name it).")
        return proj

    def final_norm(self, model: nn.Module) -> nn.Module:
        """The norm applied to the last layer's output before the LM head."""
        norm = getattr(self.language_model(model), "norm", None)
        if not isinstance(norm, nn.Module):
            raise AdapterError(f"{type(model).__name__}: no final `norm` on the text decoder; the {self.name!r} "
                               "adapter must say where it is (Adapter.final_norm).")
        return norm

    def lm_head(self, model: nn.Module) -> nn.Module:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is None:
            raise AdapterError(f"{type(model).__name__} has no output embeddings (LM head).")
        return head

    def postprocess_logits(self, model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
        """What the model does to ``lm_head``'s output before returning it (default: nothing).

        Gemma 2 soft-caps (``tanh(x / c) * c``), Chameleon sets image-token logits to the dtype minimum."""
        return logits

    def logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Logits ``[..., V]`` from the last decoder layer's output ``hidden`` ``[..., d]``, as the model's forward computes them."""
        return self.postprocess_logits(model, self.lm_head(model)(self.final_norm(model)(hidden)))

    # ------------------------------------------------------------------ tokens
    def image_token_ids(self, model: nn.Module, processor=None) -> tuple[int, ...]:
        """Ids of the tokens whose positions hold image features (``config.image_token_id``)."""
        cfg = model.config
        for key in ("image_token_id", "image_token_index"):
            value = getattr(cfg, key, None)
            if value is not None:
                return (int(value),)
        raise AdapterError(f"{type(model).__name__}: no image_token_id in its config; the {self.name!r} adapter "
                           "must say which tokens are image tokens (Adapter.image_token_ids).")

    def structure_token_ids(self, model: nn.Module, processor=None) -> tuple[int, ...]:
        """Ids of image *structure* tokens: separators and markers inside or around the image
        (``[IMG_BREAK]``, ``<fake_token_around_image>``, ``<row_i_col_j>``, ``<vision_start>``...).
        They are neither image nor text (role ``IMAGE_STRUCTURE``). Default: none."""
        return ()

    # ------------------------------------------------------------------ inputs
    def model_inputs(self, encoding: Mapping[str, Any]) -> dict[str, Any]:
        """The processor outputs the forward takes: ``input_ids``, ``attention_mask``, the image inputs and
        the per-token inputs (anything else the processor returned is dropped with a reason here)."""
        keep = ("input_ids", "attention_mask", *self.image_input_keys, *self.per_token_inputs)
        return {k: encoding[k] for k in keep if k in encoding and encoding[k] is not None}

    def extend_inputs(self, inputs: Mapping[str, Any], new_ids: torch.Tensor) -> dict[str, Any]:
        """``inputs`` with ``new_ids`` ``[B, n]`` appended to every row (right side): ``input_ids``,
        ``attention_mask`` (ones) and each per-token input (its :attr:`per_token_inputs` value)."""
        out = dict(inputs)
        ids = out["input_ids"]
        new_ids = new_ids.to(ids.device, ids.dtype)
        if new_ids.dim() == 1:
            new_ids = new_ids[None].expand(ids.shape[0], -1)
        out["input_ids"] = torch.cat([ids, new_ids], dim=-1)
        if "attention_mask" in out and out["attention_mask"] is not None:
            mask = out["attention_mask"]
            out["attention_mask"] = torch.cat([mask, torch.ones_like(new_ids, dtype=mask.dtype)], dim=-1)
        for key, value in self.per_token_inputs.items():
            if key in out and out[key] is not None:
                cur = out[key]
                out[key] = torch.cat([cur, torch.full_like(new_ids, int(value), dtype=cur.dtype)], dim=-1)
        return out

    # ------------------------------------------------------------------ prompts and images
    def chat_messages(self, prompt: str) -> list[dict]:
        """One user turn: the image, then the prompt (the order the families' model cards use)."""
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]

    def format_prompt(self, processor, prompt: str) -> str:
        """The processor's own chat template applied to one user turn, with the generation prompt.

        Raises :class:`AdapterError` when the processor carries no chat template (pass a lens_halluc
        template, ``template="llava-1.5"`` or ``--template``, or save one with the processor)."""
        if not getattr(processor, "chat_template", None):
            raise AdapterError(f"the {self.name!r} processor has no chat template; pass template=NAME "
                               "(lens_halluc.models.prompts) or save the processor with its chat template.")
        return processor.apply_chat_template(self.chat_messages(prompt), add_generation_prompt=True, tokenize=False)

    def format_text_only(self, tokenizer, prompt: str) -> str:
        """The text-only counterpart of :meth:`format_prompt` for the base language model (inheritance): the
        chat template of ``tokenizer`` (a tokenizer or processor) on one text-only user turn."""
        if not getattr(tokenizer, "chat_template", None):
            raise AdapterError(f"{self.name}: a text-only prompt in the chat format needs a tokenizer with a chat "
                               "template; give the base LM's tokenizer one, or pass template=NAME.")
        messages = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def base_lm_config(self, model: nn.Module):
        """The config of the text-only language model the family's text tower starts from (the base LM of the
        inheritance analysis), for building one of its architecture. Default: the text config."""
        return self.text_config(model.config)

    def image_placeholder(self, processor) -> str:
        """The text the processor expands into the image's tokens (``processor.image_token``)."""
        token = getattr(processor, "image_token", None)
        if not isinstance(token, str) or not token:
            raise AdapterError(f"the {self.name!r} processor has no `image_token`; the adapter must name the "
                               "image placeholder (Adapter.image_placeholder).")
        return token

    def processor_call_kwargs(self, processor) -> dict[str, Any]:
        """Extra keywords for the processor call on prompts rendered by :meth:`format_prompt` (e.g.
        ``add_special_tokens=False`` where the chat template already writes the BOS). Default: none."""
        return {}

    def processor_images(self, images: Sequence) -> list:
        """Images as the processor takes them for a batch: flat, or one list per sample."""
        return [[im] for im in images] if self.nested_images else list(images)

    # ------------------------------------------------------------------ vision side
    def vision_attention(self, model: nn.Module) -> list[nn.Module]:
        """The vision tower's self-attention modules, in layer order (CausalMM's vision counterfactual)."""
        raise NotDefinedForArchitecture(f"{self.name}: the vision tower's attention is not described by its "
                                        "adapter (Adapter.vision_attention).")

    def patch_grid(self, model: nn.Module, encoding: Mapping[str, Any], row: int = 0) -> tuple[int, int]:
        """``(rows, cols)`` of the image-token grid of sample ``row`` of ``encoding`` (processor output),
        row-major: image token ``k`` (in sequence order) is patch ``(k // cols, k % cols)`` (confounders' patch map).

        Raises :class:`NotDefinedForArchitecture` where image tokens are not one row-major grid."""
        raise NotDefinedForArchitecture(f"{self.name}: image tokens are not described as one row-major patch grid "
                                        "(Adapter.patch_grid).")

    # ------------------------------------------------------------------ replay hooks (owner: replay helper)
    # (methods the exact replay of attribution/exact.py calls; defaults describe a Llama-style decoder)
    #: What the text model does between decoder layers, when it does something (``None``: nothing).
    #: ``"additive"``: it adds a term that does not depend on the hidden state at fixed positions
    #: (Qwen3-VL's deepstack visual embeddings after the first layers); the replay adds the clean
    #: forward's difference ``input(k + 1) - output(k)`` to the replayed rows at their positions.
    between_layer_steps: ClassVar[str | None] = None

    def replay_kwarg_axes(self, model: nn.Module, layer: int) -> Mapping[str, tuple[int | None, int | None]]:
        """Extra tensor keyword arguments decoder layer ``layer`` receives, beyond the Llama-style ones
        (``attention_mask``, ``position_embeddings``, ``position_ids``, ``cache_position``, the cache):
        name -> ``(batch_axis, position_axis)``. ``position_axis`` is the axis over the ``T`` query
        positions (sliced at the replayed positions) or None (the same for every position, e.g. the
        image states of a cross-attention layer); along ``batch_axis`` (or None) the entries of the clean
        forward's one sample (possibly several, e.g. image tiles) are repeated once per replayed row. The replay refuses a tensor keyword that is named neither here nor among the known ones.

        Example (Mllama's cross-attention layers)::

            {"cross_attention_states": (0, None), "cross_attention_mask": (0, -2),
             "full_text_row_masked_out_mask": (0, -2)}
        """
        return {}

    def replay_clean_kwargs(self, model: nn.Module, layer: int, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The keyword arguments decoder layer ``layer`` received in the plain forward (hidden states
        excepted), rewritten into the layout :meth:`replay_kwarg_axes` describes; the replay calls the layer
        with them. Default: unchanged. (Mllama folds its image tiles into the batch axis of
        ``cross_attention_states`` and unfolds them here.)"""
        return dict(kwargs)

    def replay_uses_cache(self, model: nn.Module, layer: int) -> bool:
        """Whether layer ``layer``'s attention reads the keys/values of the text positions through the cache's
        ``update()`` (self-attention: the local replay hands it the clean prefix). A cross-attention layer
        computes its keys from the image states it receives and gets no cache in the replay."""
        return self.attention_kind(model, layer) == "self"

    def replay_default_mask(self, model: nn.Module, layer: int, queries: torch.Tensor, n_keys: int) -> torch.Tensor:
        """Bool ``[len(queries), n_keys]`` (True = attend): what query positions ``queries`` may see among keys
        ``0..n_keys-1`` in layer ``layer`` when the layer received no mask (``sdpa`` skips a plain causal or
        not-yet-sliding one): causal, within the attention module's ``sliding_window`` when it has one.
        Raises :class:`AdapterError` for chunked attention (``attention_chunk_size``), which it cannot rebuild."""
        attn = self.attention(model, layer)
        cfg = getattr(attn, "config", None)
        chunk = getattr(attn, "attention_chunk_size", None) or getattr(cfg, "attention_chunk_size", None)
        if chunk:
            raise AdapterError(f"{self.name} layer {layer}: chunked attention (attention_chunk_size={chunk}) received "
                               "no mask; the replay cannot rebuild it. Override Adapter.replay_default_mask.")
        keys = torch.arange(n_keys, device=queries.device)
        allowed = keys[None, :] <= queries[:, None]
        window = getattr(attn, "sliding_window", None)
        if window:
            allowed &= keys[None, :] > queries[:, None] - int(window)
        return allowed

    def replay_between_layers(self, model: nn.Module, layer: int, clean_output: torch.Tensor,
                              clean_next_input: torch.Tensor):
        """The step between decoder layers ``layer`` and ``layer + 1``, called only when the clean forward's
        input of ``layer + 1`` differs from the output of ``layer`` (both ``[1, T, d]``).

        Returns ``step(x, positions) -> x'`` for replayed rows ``x`` ``[B, S, d]`` at original positions
        ``positions`` ``[S]``. Default: with ``between_layer_steps = "additive"`` the clean difference is
        added (:meth:`additive_step`); otherwise raises :class:`AdapterError` (unknown step: not replayable)."""
        if self.between_layer_steps == "additive":
            return self.additive_step(clean_output, clean_next_input)
        changed = (clean_next_input != clean_output).any(-1).flatten().nonzero().flatten().tolist()
        raise AdapterError(
            f"{type(model).__name__}: the text model changes the hidden states between decoder layers {layer} and "
            f"{layer + 1} (at {len(changed)} positions, e.g. {changed[:5]}); the exact replay does not know this "
            f"step. In the {self.name!r} adapter set between_layer_steps = 'additive' (a term added independently "
            "of the hidden state, like Qwen3-VL's deepstack) or override Adapter.replay_between_layers.")

    @staticmethod
    def additive_step(clean_output: torch.Tensor, clean_next_input: torch.Tensor):
        """``step(x, positions)`` adding the clean difference ``clean_next_input - clean_output`` at ``positions``."""
        delta = (clean_next_input - clean_output)[0]  # [T, d]

        def step(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            return x + delta[positions].to(x.dtype)
        return step

    # ------------------------------------------------------------------ generation hooks (owner: generation helper)
    # How lens_halluc.generation.decode steps a model the way ``model.generate`` does. The defaults delegate
    # to the model's own transformers GenerationMixin (its ``_prepare_position_ids_for_generation`` — M-RoPE
    # for Qwen —, multimodal pre-encoding, ``_expand_inputs_for_generation``, ``prepare_inputs_for_generation``
    # and ``_update_model_kwargs_for_generation``: pixel inputs at prefill only, token_type_ids / mm_token_type_ids
    # / Mllama's cross_attention_mask extended per step, PaliGemma's 1-based positions). A model without that
    # mixin (a bare ``nn.Module`` LM) gets 1-D positions from the attention mask. A family adapter overrides
    # a hook only where its model's own generation code is not what ``generate`` does.

    @staticmethod
    def _has_generation_mixin(model: nn.Module) -> bool:
        return all(callable(getattr(model, name, None)) for name in (
            "prepare_inputs_for_generation", "_update_model_kwargs_for_generation", "_expand_inputs_for_generation"))

    def generation_inputs(self, model: nn.Module, input_ids: torch.Tensor, model_kwargs: Mapping[str, Any],
                          expand: int = 1) -> tuple[torch.Tensor, dict]:
        """``(input_ids, model_kwargs)`` as ``model.generate`` holds them before its prefill.

        ``input_ids`` ``[B, T]`` (left-padded) and ``model_kwargs`` (the other forward inputs of
        :meth:`model_inputs`: ``attention_mask``, ``pixel_values``, ``image_grid_thw``, ``token_type_ids``...)
        become: ``position_ids`` added (``[B, T]``, or ``[4, B, T]`` text + M-RoPE axes for Qwen-VL, computed
        once here from the whole prompt), the images pre-encoded into ``mm_encoder_outputs`` where the model
        takes them (as generate does; the raw inputs it consumes are dropped), then every row repeated
        ``expand`` times (beam search: row ``b·k + j``), the model's own way, and ``use_cache`` /
        ``logits_to_keep=1``. Call it inside the context of the branch (vision hooks see the encoding).

        Example
        -------
        >>> ids, kw = adapter.generation_inputs(model, enc["input_ids"], {"attention_mask": enc["attention_mask"],
        ...                                      "pixel_values": enc["pixel_values"]})        # doctest: +SKIP
        >>> kw["position_ids"].shape      # [B, T] (Qwen2-VL: [4, B, T])                    # doctest: +SKIP
        """
        kw = {k: v for k, v in model_kwargs.items() if v is not None}
        if not self._has_generation_mixin(model):
            mask = kw.get("attention_mask")
            if mask is None:
                mask = torch.ones_like(input_ids)
                kw["attention_mask"] = mask
            kw.setdefault("position_ids", (mask.long().cumsum(-1) - 1).clamp(min=0))
            if expand > 1:
                input_ids = input_ids.repeat_interleave(expand, dim=0)
                kw = {k: v.repeat_interleave(expand, dim=0) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
            return input_ids, kw
        import inspect

        if kw.get("attention_mask") is None:
            kw["attention_mask"] = torch.ones_like(input_ids)
        if "position_ids" not in kw and "position_ids" in inspect.signature(model.forward).parameters:
            kw["position_ids"] = model._prepare_position_ids_for_generation(input_ids, kw)
        prepare_encoder = getattr(model, "_maybe_prepare_encoder_kwargs_for_generation", None)
        if callable(prepare_encoder):  # generate pre-encodes the images before the prefill (transformers >= 5.2x)
            kw = prepare_encoder(input_ids, kw, "input_ids", model.generation_config)
        input_ids, kw = model._expand_inputs_for_generation(expand_size=expand, is_encoder_decoder=False,
                                                            input_ids=input_ids, **kw)
        supports = getattr(model, "_supports_logits_to_keep", None)
        if callable(supports) and supports() and "logits_to_keep" not in kw:
            kw["logits_to_keep"] = 1
        kw["use_cache"] = True
        return input_ids, kw

    def generation_cache(self, model: nn.Module):
        """A fresh KV cache for one decoding branch, as ``generate`` makes it (sliding-window layers where the
        text config has them: Gemma 3)."""
        from transformers import DynamicCache

        config = getattr(model, "config", None)
        get = getattr(config, "get_text_config", None)
        if callable(get):
            try:
                return DynamicCache(config=get(decoder=True))
            except TypeError:  # a DynamicCache without a config argument (older 5.x, or replaced in a test)
                pass
        return DynamicCache()

    def generation_step_inputs(self, model: nn.Module, input_ids: torch.Tensor, model_kwargs: Mapping[str, Any],
                               new_tokens: int | None, first: bool) -> dict:
        """The forward inputs of one decoding forward: ``input_ids`` ``[rows, T + n]`` (prompt and every
        token so far), ``model_kwargs`` as :meth:`generation_update` left them (cache included),
        ``new_tokens`` the tokens this forward feeds (``None``: the whole prompt, at prefill), ``first``
        whether this is the prefill (image inputs pass only then)."""
        kw = dict(model_kwargs)
        if self._has_generation_mixin(model):
            return model.prepare_inputs_for_generation(input_ids, next_sequence_length=new_tokens,
                                                       is_first_iteration=first, **kw)
        n = input_ids.shape[1] if new_tokens is None else int(new_tokens)
        if first:
            kw["input_ids"] = input_ids[:, -n:]
            return kw
        out = {"input_ids": input_ids[:, -n:], "attention_mask": kw.get("attention_mask"),
               "position_ids": kw["position_ids"][..., -n:], "use_cache": True}
        out.update({k: v for k, v in kw.items() if k in ("cache", "past_key_values", "output_attentions")})
        return out

    def generation_update(self, model: nn.Module, outputs: Any, model_kwargs: Mapping[str, Any],
                          new_tokens: int = 1) -> dict:
        """``model_kwargs`` extended for ``new_tokens`` more tokens after a forward with ``outputs``
        (attention mask, positions on every axis, per-token inputs), as ``generate`` does between steps."""
        kw = dict(model_kwargs)
        if self._has_generation_mixin(model):
            return model._update_model_kwargs_for_generation(outputs if outputs is not None else {}, kw,
                                                             is_encoder_decoder=False, num_new_tokens=int(new_tokens))
        mask = kw.get("attention_mask")
        if mask is not None:
            kw["attention_mask"] = torch.cat([mask, mask.new_ones((mask.shape[0], new_tokens))], dim=-1)
        pos = kw.get("position_ids")
        if pos is not None:
            step = torch.arange(1, new_tokens + 1, dtype=pos.dtype, device=pos.device)
            kw["position_ids"] = torch.cat([pos, pos[..., -1:] + step], dim=-1)
        return kw


    # ------------------------------------------------------------------ attention hooks (owner: attention helper)
    # (what the editable attention, its key groups, and the interventions built on it ask of a family)
    def images_in_self_attention(self, model: nn.Module) -> bool:
        """Whether image features are among the keys of the text tower's *self*-attention.

        True for every family that puts image features into the token sequence (LLaVA, Qwen, Gemma...).
        Default: False exactly when some layer is a cross-attention layer (Mllama: the image enters only
        through its cross-attention layers; the ``<|image|>`` token in the sequence is a placeholder whose
        embedding is a learned text embedding).

        Example
        -------
        >>> adapter_for(mllama).images_in_self_attention(mllama)            # doctest: +SKIP
        False
        """
        return not any(self.attention_kind(model, i) == "cross" for i in range(len(self.layers(model))))

    def attention_key_group_reason(self, model: nn.Module, layer: int, group: str) -> str | None:
        """None when layer ``layer``'s attention has keys of ``group`` ("image", "text", "system"); else why not.

        Self-attention keys are the sequence's tokens (every group, except "image" when
        :meth:`images_in_self_attention` is False); cross-attention keys are the image's vision tokens
        only (group "image"). Edits that need a group absent from a layer raise
        :class:`NotDefinedForArchitecture` with this reason.

        Example
        -------
        >>> adapter.attention_key_group_reason(mllama, 0, "image")          # doctest: +SKIP
        "layer 0 is a self-attention layer of mllama, whose images enter only through cross-attention ..."
        """
        if self.attention_kind(model, layer) == "cross":
            if group == "image":
                return None
            return (f"layer {layer} is a cross-attention layer of {self.name}: its keys are the image's vision tokens "
                    f"only (text queries attending to the image), so it has no {group!r} keys")
        if group == "image" and not self.images_in_self_attention(model):
            cross = [i for i in range(len(self.layers(model))) if self.attention_kind(model, i) == "cross"]
            return (f"layer {layer} is a self-attention layer of {self.name}, whose images enter only through the "
                    f"cross-attention layers {cross}: no self-attention key holds image features (the image "
                    "placeholder token is a text embedding); use a cross-attention layer's heads for image keys")
        return None

    def attention_key_roles(self, model: nn.Module, layer: int, token_roles: torch.Tensor | None,
                            n_keys: int) -> torch.Tensor | None:
        """Roles ``[B, K]`` (:class:`~lens_halluc.models.spec.TokenRole` values) of the keys of layer ``layer``.

        ``token_roles`` ``[B, K]``: the roles of the sequence's tokens (past + current; None when unknown).
        Self-attention: the token roles themselves. Cross-attention: every key is an image (vision) token,
        ``IMAGE`` for all ``n_keys`` (padding of missing images/tiles is in the attention mask, not here).
        Returns None when the roles are unknown.
        """
        if self.attention_kind(model, layer) == "cross":
            batch = token_roles.shape[0] if token_roles is not None else 1
            device = token_roles.device if token_roles is not None else None
            return torch.full((batch, int(n_keys)), 1, dtype=torch.long, device=device)  # TokenRole.IMAGE
        if token_roles is not None and int(n_keys) < token_roles.shape[1] and self.is_sliding_layer(model, layer):
            # a sliding-window cache keeps only the most recent keys of this layer (Gemma 2/3, Mistral...)
            return token_roles[:, token_roles.shape[1] - int(n_keys):]
        return token_roles

    def is_sliding_layer(self, model: nn.Module, layer: int) -> bool:
        """Whether layer ``layer`` attends within a sliding window (its cache may keep only the window's keys):
        the attention module's ``sliding_window`` (Gemma 2/3, Qwen2, Mistral set it on sliding layers only)
        or the text config's ``layer_types[layer] == "sliding_attention"``."""
        if getattr(self.attention(model, layer), "sliding_window", None):
            return True
        types = getattr(self.text_config(model.config), "layer_types", None)
        return bool(types) and layer < len(types) and types[layer] in ("sliding_attention", "chunked_attention")

    def pixel_noise_mask(self, model: nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor | None:
        """BoolTensor broadcastable to ``inputs["pixel_values"]``: where real image pixels are (VCD/SEED noise them
        only there), or None for everywhere.

        Padding must stay padding: Idefics3/SmolVLM pad missing crops with zeros (an all-zero crop is how the
        model recognises padding) and mark real pixels in ``pixel_attention_mask`` ``[B, N, H, W]``; Mllama marks
        real tiles in ``aspect_ratio_mask`` ``[B, images, tiles]``. Those processor conventions are read here;
        a family with another padding convention overrides this.
        """
        pv = inputs.get("pixel_values")
        if not torch.is_tensor(pv):
            return None
        pam = inputs.get("pixel_attention_mask")
        if torch.is_tensor(pam) and pv.dim() == pam.dim() + 1 and pv.shape[:-3] == pam.shape[:-2]:
            return pam.bool().unsqueeze(-3)                              # [B, N, 1, H, W]
        arm = inputs.get("aspect_ratio_mask")
        if torch.is_tensor(arm) and pv.dim() == arm.dim() + 3 and pv.shape[:arm.dim()] == arm.shape:
            return arm.bool()[(...,) + (None,) * 3]                     # [B, images, tiles, 1, 1, 1]
        return None

    def early_exit_logits(self, model: nn.Module, hidden: torch.Tensor, final_norm: bool) -> torch.Tensor:
        """Logits ``[..., V]`` of an early exit at ``hidden`` ``[..., d]`` (DoLa): ``lm_head`` (after the final norm
        when ``final_norm``), then the model's own post-processing (:meth:`postprocess_logits`: soft-capping,
        token suppression), so an early exit is scored as the final layer is."""
        if final_norm:
            return self.logits(model, hidden)
        return self.postprocess_logits(model, self.lm_head(model)(hidden))


    # ------------------------------------------------------------------ capabilities
    def require(self, method: str) -> None:
        """Raise :class:`NotDefinedForArchitecture` when ``method`` has no meaning for this family."""
        reason = self.not_defined.get(method)
        if reason is not None:
            raise NotDefinedForArchitecture(f"{method} is not defined for {self.name}: {reason}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
