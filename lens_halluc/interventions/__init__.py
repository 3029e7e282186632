"""Interventions that reduce hallucination, each usable as a decoding strategy.

:mod:`.registry` lists them all by name (``greedy, ablate, adhh, reweight, vcd, seed, causalmm,
dola``), imported lazily; ``python -m lens_halluc.intervene`` runs one and scores it.
"""
from .ablation import HeadAblation
from .causalmm import CausalMM
from .contrastive import contrast, plausibility_mask
from .dola import DoLa
from .registry import METHODS, MethodUnavailableError, build_strategy, control_strategies, method_options
from .seed import NoiseContrastive
from .vcd import VCD

__all__ = ["CausalMM", "DoLa", "HeadAblation", "METHODS", "MethodUnavailableError", "NoiseContrastive", "VCD",
           "build_strategy", "contrast", "control_strategies", "method_options", "plausibility_mask"]
