"""Architecture adapters, one module per VLM family, found by ``config.model_type``.

Example
-------
>>> from lens_halluc.models.adapters import adapter_for, ADAPTERS
>>> "llava" in ADAPTERS
True
>>> adapter_for(model).name                                               # doctest: +SKIP
'llava'
"""
from __future__ import annotations

import importlib
from typing import Any

from .base import Adapter, AdapterError, NotDefinedForArchitecture

__all__ = ["ADAPTERS", "Adapter", "AdapterError", "NotDefinedForArchitecture", "adapter_for", "register_adapter",
           "require_defined"]

#: ``config.model_type`` -> adapter instance.
ADAPTERS: dict[str, Adapter] = {}

# The family modules; each registers its adapter(s) on import.
_FAMILIES = ("llava", "llava_next", "llava_onevision", "mistral3", "internvl", "qwen2_vl", "qwen3_vl",
             "gemma3", "paligemma", "idefics3", "chameleon", "mllama", "causal_lm")


def register_adapter(adapter: Adapter | type[Adapter]) -> Adapter:
    """Register ``adapter`` (an instance or a class) for each of its ``model_types``; returns the instance.

    Example
    -------
    >>> class MyAdapter(Adapter):
    ...     name, model_types = "my_vlm", ("my_vlm",)
    >>> register_adapter(MyAdapter).name
    'my_vlm'
    """
    instance = adapter() if isinstance(adapter, type) else adapter
    if not instance.model_types:
        raise AdapterError(f"{type(instance).__name__} declares no model_types.")
    for model_type in instance.model_types:
        ADAPTERS[model_type] = instance
    return instance


def _model_type(obj: Any) -> str | None:
    config = getattr(obj, "config", obj)
    return getattr(config, "model_type", None)


def _is_text_only(obj: Any) -> bool:
    config = getattr(obj, "config", obj)
    return getattr(config, "vision_config", None) is None and getattr(config, "vq_config", None) is None and \
        getattr(config, "image_token_id", None) is None and getattr(config, "image_token_index", None) is None


def adapter_for(model_or_config: Any) -> Adapter:
    """The adapter of a model (or config), by ``config.model_type``.

    Raises :class:`AdapterError` naming the adapter module to write for an unknown architecture.
    """
    model_type = _model_type(model_or_config)
    adapter = ADAPTERS.get(str(model_type))
    if adapter is None and _is_text_only(model_or_config) and "causal_lm" in ADAPTERS:
        adapter = ADAPTERS["causal_lm"]
    if adapter is None:
        known = ", ".join(sorted(ADAPTERS))
        raise AdapterError(
            f"no lens_halluc adapter for model_type {model_type!r} ({type(model_or_config).__name__}). Write one: "
            f"a subclass of lens_halluc.models.adapters.Adapter with model_types=({model_type!r},) in "
            f"lens_halluc/models/adapters/{model_type}.py, registered with register_adapter(). Known: {known}.")
    return adapter


def require_defined(vlm: Any, method: str) -> None:
    """Raise :class:`NotDefinedForArchitecture` (with the family's reason) when ``method`` has no meaning for the
    model of ``vlm`` (a LoadedVLM, or anything with ``.spec.adapter``); a stand-in without an adapter passes.

    Example
    -------
    >>> require_defined(vlm, "bias")                                      # doctest: +SKIP
    """
    adapter = getattr(getattr(vlm, "spec", None), "adapter", None)
    if adapter is not None:
        adapter.require(method)


for _name in _FAMILIES:
    importlib.import_module(f"{__name__}.{_name}")
