"""The model organism: a synthetic world with planted co-occurrence priors, and LLaVA-style models trained on it.

From Python, :func:`split` gives a held-out split of the world as a
:class:`~lens_halluc.data.CocoDataset` (exported once into a cache folder), and
:func:`eval_splits` the evaluation splits of a checkpoint. The world itself is in
:mod:`lens_halluc.organism.world`, the exporter in :mod:`~lens_halluc.organism.export`, the
training recipe in :mod:`~lens_halluc.organism.recipe`.

Example
-------
>>> import lens_halluc as lh                                     # doctest: +SKIP
>>> ds = lh.organism.split("break", n=100, seed=1)               # doctest: +SKIP
>>> ds.probes[1]                                                 # doctest: +SKIP
{'A': 'dog', 'B': 'frisbee'}
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

__all__ = ["EVAL_SEEDS", "cache_root", "eval_splits", "split", "split_dir"]

from .export import EVAL_SEEDS, FORMAT  # noqa: E402


def cache_root() -> Path:
    """Default cache folder: ``$LENS_HALLUC_CACHE``, else ``~/.cache/lens_halluc``.

    >>> isinstance(cache_root(), Path)
    True
    """
    env = os.environ.get("LENS_HALLUC_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lens_halluc"


def _world(model):
    """The world of ``model``: None → the shipped organism; a checkpoint dir or a LoadedVLM → its world."""
    from ..models.default import organism_path
    from .recipe import read_organism_meta

    if model is None:
        model = organism_path("final")
    model = getattr(model, "path", model)  # a LoadedVLM
    if model is None:
        raise ValueError("this model was not loaded from a directory; pass the organism checkpoint directory as model=.")
    try:
        world, _ = read_organism_meta(model)
    except FileNotFoundError:
        raise ValueError(f"{model} is not an organism checkpoint (no organism metadata); pass model=None for the "
                         "shipped organism or a directory written by `python -m lens_halluc.organism train`.") from None
    return world


def split_dir(name: str, n: int = 100, seed: int = 1, model=None, cache_dir: str | Path | None = None) -> Path:
    """The folder :func:`split` uses (exporting it there first if missing).

    Example
    -------
    >>> d = split_dir("control", n=50, seed=3)                       # doctest: +SKIP
    >>> sorted(p.name for p in d.iterdir())[:3]                      # doctest: +SKIP
    ['captions.json', 'images', 'instances.json']
    """
    from .. import __version__
    from .export import export_cached
    from .world import SPLITS

    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}; choose from {SPLITS}.")
    n, seed = int(n), int(seed)
    world = _world(model)
    key = {"format": FORMAT, "version": __version__, "world": world.config.to_dict(), "world_seed": world.seed,
           "split": name, "n": n, "seed": seed}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "splits"
    return export_cached(world, name, n, seed, root / f"{name}-n{n}-seed{seed}-{digest}")


def split(name: str, n: int = 100, seed: int = 1, model=None, cache_dir: str | Path | None = None):
    """A split of the organism's world as a :class:`~lens_halluc.data.CocoDataset` (images, references, probes).

    Parameters
    ----------
    name : ``"normal"``, ``"break"`` (A drawn, its partner B absent), ``"control"`` (neither) or ``"mixed"``.
    n : number of images (ids 1..n; a smaller split is a prefix of a larger one).
    seed : sampling seed (the attribution CLI uses 1 for its break split; see :data:`EVAL_SEEDS`).
    model : None for the shipped organism's world, or an organism checkpoint directory (or a
        LoadedVLM loaded from one) whose world to use.
    cache_dir : where exports are kept: ``cache_dir/<name>-n<n>-seed<seed>-<hash>``; default
        ``cache_root()/splits``. The hash covers the world, the arguments and the export format, so
        each distinct split is exported once (atomically) and reused by every later call.

    Example
    -------
    >>> ds = split("break", n=100, seed=1)                           # doctest: +SKIP
    >>> len(ds.image_ids), ds.probes[1]["B"]                         # doctest: +SKIP
    (100, 'frisbee')
    """
    from ..data.coco import CocoDataset

    d = split_dir(name, n=n, seed=seed, model=model, cache_dir=cache_dir)
    return CocoDataset.load(d / "instances.json", d / "captions.json", d / "images")


def eval_splits(model=None, n: int = 400, cache_dir: str | Path | None = None) -> dict:
    """The held-out evaluation splits (normal, break, control, mixed; seeds :data:`EVAL_SEEDS`) of a checkpoint's world.

    Returns ``{split name: CocoDataset}``, each from :func:`split`.

    Example
    -------
    >>> splits = eval_splits(n=50)                                   # doctest: +SKIP
    >>> sorted(splits)                                               # doctest: +SKIP
    ['break', 'control', 'mixed', 'normal']
    """
    return {s: split(s, n=n, seed=seed, model=model, cache_dir=cache_dir) for s, seed in EVAL_SEEDS.items()}
