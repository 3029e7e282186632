"""transformers compatibility in one place: the KV-cache keyword and the cache field of model outputs.

transformers 5.x renamed the forward keyword and the output field ``past_key_values`` to ``cache``
(5.24 warns that the old keyword is removed in 5.40; older 5.x releases only know the old one).
Every module of ours that passes a cache to a forward, reads one from a hook's keyword arguments
or from a forward's outputs goes through these helpers, so a rename is handled here and nowhere else.

* :func:`cache_keyword` — the keyword a module's ``forward`` takes (``"cache"`` or ``"past_key_values"``).
* :func:`cache_kwargs` — ``{keyword: cache}`` to splat into a forward call.
* :func:`cache_from_kwargs` — the cache in a forward pre-hook's ``kwargs``, under either name
  (``model.generate()`` of 5.24 passes ``cache=``, our decoding loop whatever :func:`cache_keyword` says).
* :func:`cache_from_output` — the cache of a forward's output, under either field name, without
  touching the deprecated alias (reading ``output.past_key_values`` logs a deprecation notice on 5.24).

Example
-------
>>> from transformers import DynamicCache
>>> cache = DynamicCache()
>>> out = vlm.model(**enc, **cache_kwargs(vlm.model, cache), use_cache=True)   # doctest: +SKIP
>>> cache_from_output(out) is cache                                          # doctest: +SKIP
True
>>> cache_from_kwargs({"past_key_values": cache}) is cache
True
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Mapping

__all__ = ["CACHE_KEYWORDS", "cache_from_kwargs", "cache_from_output", "cache_keyword", "cache_kwargs",
           "config_path", "default_cache_keyword"]

CACHE_KEYWORDS = ("cache", "past_key_values")
"""The names a KV cache goes by in transformers, newest first."""

_BY_TYPE: dict[type, str] = {}


def default_cache_keyword() -> str:
    """The cache name of the installed transformers: ``"cache"`` when its output classes have that field.

    Used for modules whose ``forward`` takes only ``**kwargs`` (e.g. a PEFT wrapper).

    Example
    -------
    >>> default_cache_keyword() in CACHE_KEYWORDS
    True
    """
    from transformers.modeling_outputs import BaseModelOutputWithPast

    names = {f.name for f in dataclasses.fields(BaseModelOutputWithPast)}
    return "cache" if "cache" in names else "past_key_values"


def cache_keyword(module: Any) -> str:
    """The keyword under which ``module.forward`` takes its KV cache (``"cache"`` or ``"past_key_values"``).

    Read from the signature (``inspect`` follows transformers' deprecation wrapper to the real
    ``forward``); a wrapper whose ``forward`` takes only ``**kwargs`` gets its base model's name
    (``get_base_model()``) or the installed transformers' default. Cached per class.

    Example
    -------
    >>> cache_keyword(vlm.model)                                  # doctest: +SKIP
    'cache'
    """
    cls = type(module)
    hit = _BY_TYPE.get(cls)
    if hit is not None:
        return hit
    name = None
    forward = getattr(cls, "forward", None)
    if forward is not None:
        try:
            params = inspect.signature(forward).parameters
        except (TypeError, ValueError):
            params = {}
        name = next((k for k in CACHE_KEYWORDS if k in params), None)
    if name is None:
        base = getattr(module, "get_base_model", None)
        inner = base() if callable(base) else None
        name = cache_keyword(inner) if inner is not None and inner is not module else default_cache_keyword()
    _BY_TYPE[cls] = name
    return name


def cache_kwargs(module: Any, cache: Any) -> dict[str, Any]:
    """``{cache_keyword(module): cache}``, to pass a cache (or ``None``) to ``module``'s forward.

    Example
    -------
    >>> out = layer(x, **cache_kwargs(layer, None), use_cache=False)    # doctest: +SKIP
    """
    return {cache_keyword(module): cache}


def cache_from_kwargs(kwargs: Mapping[str, Any]) -> Any:
    """The KV cache in a forward's keyword arguments under either name; ``None`` when there is none.

    Example
    -------
    >>> cache_from_kwargs({"cache": None, "input_ids": 1}) is None
    True
    """
    for name in CACHE_KEYWORDS:
        value = kwargs.get(name)
        if value is not None:  # not `or`: an empty cache may be falsy (it has a length)
            return value
    return None


def cache_from_output(output: Any) -> Any:
    """The KV cache a forward returned (``output.cache`` or, on older transformers, ``output.past_key_values``).

    Reads declared dataclass fields only, so transformers' deprecated ``past_key_values`` alias
    (which logs a notice) is never touched. ``None`` when the output holds no cache.

    Example
    -------
    >>> out = vlm.model(**enc, use_cache=True)                    # doctest: +SKIP
    >>> cache_from_output(out).get_seq_length()                   # doctest: +SKIP
    612
    """
    if dataclasses.is_dataclass(output):
        names = {f.name for f in dataclasses.fields(output)}
        for name in CACHE_KEYWORDS:
            if name in names:
                return getattr(output, name)
        return None
    if isinstance(output, Mapping):
        return cache_from_kwargs(output)
    for name in CACHE_KEYWORDS:
        value = getattr(output, name, None)
        if value is not None:
            return value
    return None


def config_path(root: Any, target: Any, path: tuple[str, ...] = ()) -> tuple[str, ...] | None:
    """Keys of ``sub_configs`` leading from config ``root`` to the config object ``target`` (``()`` for ``root``
    itself, ``None`` when it is not in the tree): where ``set_attn_implementation`` must aim to reach it.

    Example
    -------
    >>> from transformers import LlavaConfig
    >>> cfg = LlavaConfig()
    >>> config_path(cfg, cfg.text_config), config_path(cfg, cfg)
    (('text_config',), ())
    """
    if root is target:
        return path
    for key in getattr(root, "sub_configs", {}) or {}:
        sub = getattr(root, key, None)
        if sub is not None:
            found = config_path(sub, target, path + (key,))
            if found is not None:
                return found
    return None
