"""Checkpoint add-ons: modules saved beside a checkpoint that :func:`~lens_halluc.models.load_vlm` re-attaches.

An add-on (e.g. Causal-LLaVA's confounder module, :mod:`lens_halluc.training.causal`) saves a
JSON file in the checkpoint directory that names its loader as ``"module:function"`` under the
key ``"loader"`` (like transformers' ``auto_map``). ``load_vlm`` finds the add-on files this
registry knows, imports each loader by name and calls ``loader(vlm, meta_path)``. So the models
layer attaches add-ons without importing the layers that define them.

A checkpoint whose add-on cannot be loaded raises :class:`AddonError` naming the file and the
loader: a model is never returned silently without its add-on. Files written before the loader
field existed fall back to the registry's default loader for their file name.

Example
-------
>>> addon_loader("causal_intervention.json")
'lens_halluc.training.causal:load_attached'
>>> register_addon("my_probe.json", "my_package.probe:attach")                  # doctest: +SKIP
>>> attach_addons(vlm)                      # load_vlm does this               # doctest: +SKIP
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Callable

from .errors import ModelLoadError

LOADER_KEY = "loader"

# Add-on file name -> default loader: the files load_vlm looks for, and the loader of files that
# name none (causal_intervention.json saved before the loader field existed).
DEFAULT_ADDONS: dict[str, str] = {"causal_intervention.json": "lens_halluc.training.causal:load_attached"}
_ADDONS: dict[str, str] = dict(DEFAULT_ADDONS)
# Loaders outside this package run only when registered here or with trust_remote_code: a
# checkpoint must not make load_vlm import arbitrary installed modules.
_TRUSTED: set[str] = set(DEFAULT_ADDONS.values())


class AddonError(ModelLoadError):
    """A checkpoint declares an add-on that cannot be loaded; the message names the file and its loader."""


def register_addon(filename: str, loader: str) -> None:
    """Make ``load_vlm`` look for ``filename`` in checkpoints and load it with ``loader`` (``"module:function"``)
    when the file names none. ``loader(vlm, meta_path)`` attaches the add-on to ``vlm`` (in place).

    Example
    -------
    >>> register_addon("my_probe.json", "my_package.probe:attach")              # doctest: +SKIP
    """
    _split(loader, filename)
    _ADDONS[str(filename)] = loader
    _TRUSTED.add(loader)


def addon_loader(filename: str) -> str | None:
    """The registered default loader of an add-on file name, or None.

    Example
    -------
    >>> addon_loader("config.json") is None
    True
    """
    return _ADDONS.get(filename)


def addon_files(path: str | Path) -> list[Path]:
    """The add-on files (registered names) present in checkpoint directory ``path``.

    Example
    -------
    >>> addon_files("/nonexistent")
    []
    """
    p = Path(path)
    return [p / name for name in _ADDONS if (p / name).is_file()]


def _split(spec: object, where: str) -> tuple[str, str]:
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise AddonError(f"{where}: the add-on loader must be a 'module:function' string, got {spec!r}.")
    module, func = spec.split(":")
    return module, func


def resolve_loader(spec: str, where: str = "add-on", trust_remote_code: bool = False) -> Callable:
    """Import the loader ``"module:function"``; :class:`AddonError` naming ``where`` and ``spec`` if it cannot be.

    Example
    -------
    >>> resolve_loader("lens_halluc.training.causal:load_attached").__name__
    'load_attached'
    """
    module, func = _split(spec, where)
    if not (trust_remote_code or spec in _TRUSTED or module == "lens_halluc" or module.startswith("lens_halluc.")):
        raise AddonError(f"{where} names the loader {spec!r}, outside lens_halluc and not registered: "
                         "register it with lens_halluc.models.addons.register_addon(...) or pass trust_remote_code=True.")
    try:
        fn = getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as e:
        raise AddonError(f"{where} needs the add-on loader {spec!r}, which cannot be imported ({e}); "
                         "install the package that defines it, or load a checkpoint without the add-on.") from e
    if not callable(fn):
        raise AddonError(f"{where}: the add-on loader {spec!r} is not callable.")
    return fn


def attach_addons(vlm, trust_remote_code: bool = False) -> dict[str, object]:
    """Re-attach every add-on of ``vlm.path`` to ``vlm`` (in place); ``{file name: loader's return value}``.

    Example
    -------
    >>> attach_addons(load_vlm("runs/retrain/causal"))                          # doctest: +SKIP
    {'causal_intervention.json': {'lm': ConfounderAttention(...)}}
    """
    if vlm.path is None:
        return {}
    out = {}
    for meta in addon_files(vlm.path):
        try:
            declared = json.loads(meta.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise AddonError(f"{meta} is not valid JSON ({e}); re-save the model.") from None
        spec = declared.get(LOADER_KEY) if isinstance(declared, dict) else None
        spec = spec if spec is not None else _ADDONS[meta.name]
        fn = resolve_loader(spec, str(meta), trust_remote_code)
        try:
            out[meta.name] = fn(vlm, meta)
        except AddonError:
            raise
        except Exception as e:
            raise AddonError(f"{meta}: the add-on loader {spec!r} failed ({type(e).__name__}: {e}).") from e
    return out
