"""lens_halluc: find why vision-language models hallucinate objects, and fix it.

One obvious way from Python (``import lens_halluc as lh``); every command line is a thin adapter
over these names.

Example
-------
>>> import lens_halluc as lh                                                     # doctest: +SKIP
>>> vlm = lh.load_vlm()                       # the shipped model organism       # doctest: +SKIP
>>> ds = lh.organism.split("break", n=100, seed=1)                               # doctest: +SKIP
>>> caps = lh.caption(vlm, ds, max_new_tokens=40)                                # doctest: +SKIP
>>> lh.chair(caps, ds).summary                                                   # doctest: +SKIP
>>> attr = lh.Attribution().fit(vlm, caps, ds)                                   # doctest: +SKIP
>>> heads = attr.top_heads(5)                                                    # doctest: +SKIP
>>> lh.compare(vlm, {"greedy": None, "adhh": lh.ADHH(heads),                     # doctest: +SKIP
...                  "adhh-random": lh.ADHH(lh.random_heads(vlm, 5, exclude=heads, seed=0))},
...            datasets={"break": ds}).table

Nouns: a loaded model (:func:`load_vlm`), a dataset (:class:`CocoDataset`, :func:`organism.split`),
captions (:func:`caption` → :class:`Captions`), metrics (:func:`chair`, :mod:`pope`), an
attribution (:class:`Attribution`), analyses (:mod:`analysis`), interventions (:class:`ADHH`,
:class:`VCD`, ...), a comparison (:func:`compare`) and re-training (:mod:`train`).

Names are imported on first use, so ``import lens_halluc`` is cheap and the ``python -m
lens_halluc.<command>`` entry points (``caption``, ``chair``, ``answer``, ``pope``, ...) never
collide with the functions of the same name here.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

# public name -> "module:attribute" (or "module" for a namespace), resolved on first access
_EXPORTS: dict[str, str] = {
    # models
    "load_vlm": "lens_halluc.models.loading:load_vlm",
    "load_causal_lm": "lens_halluc.models.loading:load_causal_lm",
    "LoadedVLM": "lens_halluc.models.loading:LoadedVLM",
    "ModelSpec": "lens_halluc.models.spec:ModelSpec",
    "TokenRole": "lens_halluc.models.spec:TokenRole",
    "random_heads": "lens_halluc.models.heads:random_heads",
    "read_heads": "lens_halluc.models.heads:read_heads",
    # data and metrics
    "CocoDataset": "lens_halluc.data.coco:CocoDataset",
    "ChairResult": "lens_halluc.data.chair:ChairResult",
    "chair": "lens_halluc.data.chair:chair",
    "pope": "lens_halluc.pope",
    # generation
    "caption": "lens_halluc.generation.runner:caption",
    "answer": "lens_halluc.generation.runner:answer",
    "Captions": "lens_halluc.generation.runner:Captions",
    "Answers": "lens_halluc.generation.runner:Answers",
    "Sampling": "lens_halluc.generation.sampling:Sampling",
    "Beams": "lens_halluc.generation.sampling:Beams",
    "decode": "lens_halluc.generation.decoding:decode",
    # methods
    "Attribution": "lens_halluc.attribution.result:Attribution",
    "analysis": "lens_halluc.analysis",
    "Intervention": "lens_halluc.interventions.base:Intervention",
    "HeadAblation": "lens_halluc.interventions:HeadAblation",
    "ADHH": "lens_halluc.interventions:ADHH",
    "Reweight": "lens_halluc.interventions:Reweight",
    "VCD": "lens_halluc.interventions:VCD",
    "SEEDContrast": "lens_halluc.interventions:SEEDContrast",
    "CausalMM": "lens_halluc.interventions:CausalMM",
    "DoLa": "lens_halluc.interventions:DoLa",
    "OPERA": "lens_halluc.interventions.opera:OPERA",
    "HALC": "lens_halluc.interventions.halc:HALC",
    "train": "lens_halluc.training",
    # evaluation
    "compare": "lens_halluc.evaluation.compare:compare",
    "Comparison": "lens_halluc.evaluation.compare:Comparison",
    # the model organism
    "organism": "lens_halluc.organism",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    try:
        target = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'lens_halluc' has no attribute {name!r}") from None
    module, _, attr = target.partition(":")
    value = importlib.import_module(module)
    if attr:
        value = getattr(value, attr)
    # Cache functions and classes. Namespaces are not cached here: importing the submodule already
    # bound it on this package.
    if attr:
        globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
