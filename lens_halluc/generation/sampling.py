"""How the next token is chosen: :class:`Sampling` (seeded multinomial) — greedy is ``None``.

A :class:`~lens_halluc.generation.decoding.DecodingStrategy` may carry a default ``sampling``
(VCD and CausalMM sample in their reference code); ``caption(..., sampling=...)`` overrides it.

Example
-------
>>> Sampling()
Sampling(temperature=1.0, top_k=None, top_p=None, seed=0)
>>> Sampling(temperature=0.7, top_p=0.9, seed=3).get_params()
{'temperature': 0.7, 'top_k': None, 'top_p': 0.9, 'seed': 3}
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

__all__ = ["Sampling"]


@dataclass(frozen=True)
class Sampling:
    """Multinomial sampling from ``softmax(scores / temperature)`` after optional top-k / top-p filtering.

    Parameters
    ----------
    temperature : > 0. Default 1.0 (the reference VCD/CausalMM setting).
    top_k : keep the k highest scores (``None``: all).
    top_p : keep the smallest set whose probability reaches ``top_p`` (``None``: all).
    seed : seed of the generator; a run with the same seed reproduces its tokens.
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not math.isfinite(self.temperature) or self.temperature <= 0:
            raise ValueError(f"Sampling: temperature must be a finite number > 0, got {self.temperature!r}.")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"Sampling: top_k must be an integer >= 1 or None, got {self.top_k!r}.")
        if self.top_p is not None and (isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float))
                                       or not 0 < self.top_p <= 1):
            raise ValueError(f"Sampling: top_p must be in (0, 1] or None, got {self.top_p!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"Sampling: seed must be an integer >= 0, got {self.seed!r}.")

    def get_params(self) -> dict:
        """The parameters as a JSON-able dict (what caches are keyed by)."""
        return asdict(self)
