"""SEED at inference — noise-contrastive logit purification.

Scores for the next token::

    s(y) = (1 + β) · l(y | x, v) − β · l(y | x, v')      with  v' = √a · v + √(1 − a) · ε
    s(y) = −inf  where  p(y | x, v) < cutoff · max p(· | x, v)   (optional plausibility cut-off)

``ε ~ N(0, I)`` is drawn with ``seed`` (in the runners, per image with ``row_seed(seed, image id)``,
so it does not depend on the batch; see :class:`~lens_halluc.interventions.vcd.ImageNoiseContrast`)
and added to the processor's ``pixel_values``. The noisy
branch has its own KV cache. ``β = 0`` gives exactly greedy decoding. Same machinery as
:class:`~lens_halluc.interventions.vcd.VCD` (only the noise mixing differs).

Here β is ``strength`` (the name shared by the contrastive family).

No public code implements this contrastive variant (the SEED reproduction only specifies the
distillation, ``lens_halluc.training``), so there is no reference flavour to follow: it takes the
argmax, and ``a`` = 0.5 is our choice (the distillation's α = 0.3 is another reasonable value).

Example
-------
>>> from lens_halluc.interventions import SEEDContrast
>>> SEEDContrast(strength=1.0, a=0.5)
SEEDContrast()
>>> caps = lh.caption(vlm, ds, strategy=SEEDContrast(a=0.25))                # doctest: +SKIP
"""
from __future__ import annotations

import math

from ..models.loading import LoadedVLM
from .base import Intervention, Param, check_int, check_number
from .vcd import ImageNoiseContrast

__all__ = ["SEEDContrast", "SEEDStrategy"]


class SEEDStrategy(ImageNoiseContrast):
    """SEED's noise-contrastive decoding: ``(1+β)·l_clean − β·l_noisy``, ``x' = √a·x + √(1−a)·ε``.

    The bound form of :class:`SEEDContrast` (same parameters, plus the model).

    Example
    -------
    >>> out = greedy_decode(vlm.model, enc, 32, strategy=SEEDStrategy(vlm, strength=1.0))  # doctest: +SKIP
    """

    name = "seed"

    def __init__(self, vlm: LoadedVLM, strength: float = 1.0, a: float = 0.5, cutoff: float | None = 0.1,
                 seed: int = 0):
        if not 0.0 <= float(a) <= 1.0:
            raise ValueError(f"a must be in [0, 1], got {a}.")
        super().__init__(vlm, weight=strength, signal=math.sqrt(a), noise_scale=math.sqrt(1.0 - a), cutoff=cutoff,
                         seed=seed)
        self.strength, self.a = self.weight, float(a)


class SEEDContrast(Intervention):
    """SEED at inference: noise-contrastive logit purification against a Gaussian-noised image.

    ``s = (1 + β)·l(y | x, v) − β·l(y | x, v')`` with ``v' = √a·v + √(1 − a)·ε``; tokens with
    ``p(y | x, v) < cutoff·max p`` get −inf.

    Parameters
    ----------
    strength : contrast weight β ≥ 0 (0 ⇒ exactly greedy). Default 1.
    a : signal fraction in [0, 1] of the noisy image (1 = clean, 0 = pure noise). Default 0.5.
    cutoff : plausibility cut-off in [0, 1] on the clean branch; None disables. Default 0.1.
    seed : seed of the Gaussian noise (in the runners each image's is seeded with ``row_seed(seed, image id)``).
        Default 0.

    Example
    -------
    >>> from lens_halluc.interventions import SEEDContrast
    >>> SEEDContrast(strength=2.0).get_params()
    {'strength': 2.0, 'a': 0.5, 'cutoff': 0.1, 'seed': 0}
    >>> caps = lh.caption(vlm, ds, strategy=SEEDContrast())                     # doctest: +SKIP
    """

    name = "seed"
    description = "SEED noise-contrastive logit purification"
    options = {
        "strength": Param("float", "contrast strength (SEED's beta)", aliases=("--beta",)),
        "a": Param("float", "signal fraction: x' = sqrt(a) x + sqrt(1-a) eps"),
        "cutoff": Param("float", "plausibility cut-off"),
        "seed": Param("int", "noise seed"),
    }

    def __init__(self, strength: float = 1.0, a: float = 0.5, cutoff: float | None = 0.1, seed: int = 0):
        self.strength = check_number(strength, "strength", "SEEDContrast", low=0.0)
        self.a = check_number(a, "a", "SEEDContrast", 0.0, 1.0)
        self.cutoff = check_number(cutoff, "cutoff", "SEEDContrast", 0.0, 1.0, optional=True)
        self.seed = check_int(seed, "seed", "SEEDContrast")

    def bind(self, vlm) -> SEEDStrategy:
        return self._bound(SEEDStrategy(vlm, self.strength, self.a, self.cutoff, self.seed))
