"""SEED at inference — noise-contrastive logit purification.

Scores for the next token::

    s(y) = (1 + β) · l(y | x, v) − β · l(y | x, v')      with  v' = √a · v + √(1 − a) · ε
    s(y) = −inf  where  p(y | x, v) < cutoff · max p(· | x, v)   (optional plausibility cut-off)

``ε ~ N(0, I)`` is drawn with ``seed`` and added to the processor's ``pixel_values``. The noisy
branch has its own KV cache. ``β = 0`` gives exactly greedy decoding. Same machinery as
:class:`~lens_halluc.interventions.vcd.VCD` (only the noise mixing differs).

Example
-------
>>> strategy = NoiseContrastive(vlm, beta=1.0, a=0.5)                         # doctest: +SKIP
>>> out = greedy_decode(vlm.model, enc, max_new_tokens=64, strategy=strategy)  # doctest: +SKIP
"""
from __future__ import annotations

import math

from ..models.loading import LoadedVLM
from .vcd import ImageNoiseContrast

__all__ = ["NoiseContrastive"]


class NoiseContrastive(ImageNoiseContrast):
    """SEED's noise-contrastive decoding: ``(1+β)·l_clean − β·l_noisy``, ``x' = √a·x + √(1−a)·ε``.

    Parameters
    ----------
    vlm : the LoadedVLM.
    beta : contrast weight β (0 ⇒ greedy). Default 1.
    a : signal fraction in [0, 1] of the noisy image (1 = clean, 0 = pure noise). Default 0.5.
    seed : seed of the Gaussian noise.
    cutoff : plausibility cut-off on the clean branch (``p < cutoff·max p`` ⇒ −inf); None disables. Default 0.1.

    Example
    -------
    >>> out = greedy_decode(vlm.model, enc, 32, strategy=NoiseContrastive(vlm, beta=1.0))  # doctest: +SKIP
    """

    name = "seed"

    def __init__(self, vlm: LoadedVLM, beta: float = 1.0, a: float = 0.5, seed: int = 0, cutoff: float | None = 0.1):
        if not 0.0 <= float(a) <= 1.0:
            raise ValueError(f"a must be in [0, 1], got {a}.")
        super().__init__(vlm, weight=beta, signal=math.sqrt(a), noise_scale=math.sqrt(1.0 - a), cutoff=cutoff, seed=seed)
        self.beta, self.a = float(beta), float(a)
