"""Static head deactivation as a decoding strategy (zero-ablate chosen heads at every step).

Example
-------
>>> strategy = HeadAblation(vlm, [(3, 1), (5, 0)])                      # doctest: +SKIP
>>> caption_dataset(vlm, ds, "ablated.jsonl", strategy=strategy)        # doctest: +SKIP
"""
from __future__ import annotations

from typing import Sequence

from ..generation.decoding import DecodingStrategy
from ..hooks.ablation import ablate_heads
from ..models.loading import LoadedVLM


class HeadAblation(DecodingStrategy):
    """Greedy decoding with ``heads`` zero-ablated (or mean-ablated with ``values``) at every forward."""

    name = "head_ablation"

    def __init__(self, vlm: LoadedVLM, heads: Sequence[tuple[int, int]], values=None):
        self.model, self.spec = vlm.model, vlm.spec
        self.heads = vlm.spec.check_heads(heads)
        self.values = values

    def context(self):
        return ablate_heads(self.model, self.spec, self.heads, values=self.values)
