"""Text-only causal LMs (the base language model of a VLM, for the inheritance analysis).

Any decoder-only ``*ForCausalLM`` with its layers at ``model.model.layers`` (Llama, Vicuna, Qwen2,
Mistral, Gemma ...). It has no image token: token roles and image inputs are undefined for it.

Example
-------
>>> from lens_halluc.models.adapters.causal_lm import causal_lm_adapter
>>> causal_lm_adapter().name
'causal_lm'
"""
from __future__ import annotations

from . import register_adapter
from .base import Adapter, AdapterError


class CausalLMAdapter(Adapter):
    name = "causal_lm"
    model_types = ("causal_lm",)  # the fallback for configs without a vision tower (see adapter_for)
    language_model_paths = ("model", "model.language_model", "transformer")
    image_input_keys = ()

    def image_token_ids(self, model, processor=None) -> tuple[int, ...]:
        raise AdapterError(f"{type(model).__name__} is a text-only LM: it has no image token.")


def causal_lm_adapter() -> CausalLMAdapter:
    """The registered fallback adapter of text-only LMs."""
    from . import ADAPTERS

    return ADAPTERS["causal_lm"]


register_adapter(CausalLMAdapter)
