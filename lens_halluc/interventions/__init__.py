"""Interventions that reduce hallucination: classes with one base, each usable as ``strategy=``.

Every class is an :class:`~lens_halluc.interventions.base.Intervention` (parameters in
``__init__``, ``get_params()``, ``bind(vlm)`` → the decoding strategy). The contrastive family
shares the names ``strength`` (the contrast weight) and ``cutoff`` (the plausibility cut-off);
each docstring gives the paper's symbol. :mod:`.registry` lists them by name for the CLI
(``greedy, ablate, adhh, reweight, vcd, seed, causalmm, dola, opera``) and reads their options from the classes.

Example
-------
>>> from lens_halluc.interventions import ADHH, VCD
>>> ADHH([(3, 1)]).get_params()
{'heads': [[3, 1]], 'tau': 0.45, 'renormalize': False}
>>> caps = lh.caption(vlm, ds, strategy=VCD(strength=1.0))                      # doctest: +SKIP
"""
from .ablation import HeadAblation
from .base import Intervention, Param
from .causalmm import CausalMM
from .contrastive import contrast, plausibility_mask
from .dola import DoLa
from .editing import ADHH, Reweight
from .opera import OPERA
from .registry import (METHODS, MethodUnavailableError, build_intervention, build_strategy, control_strategies,
                       method_options)
from .seed import SEEDContrast
from .vcd import VCD

__all__ = ["ADHH", "CausalMM", "DoLa", "HeadAblation", "Intervention", "METHODS", "MethodUnavailableError", "OPERA", "Param",
           "Reweight", "SEEDContrast", "VCD", "build_intervention", "build_strategy", "contrast",
           "control_strategies", "method_options", "plausibility_mask"]
