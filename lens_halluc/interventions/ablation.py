"""Static head deactivation: zero-ablate chosen heads at every forward.

:class:`HeadAblation` is the intervention (parameters only); :meth:`HeadAblation.bind` gives the
:class:`HeadAblationStrategy` that hooks the ``o_proj`` inputs of the model.

Example
-------
>>> from lens_halluc.interventions import HeadAblation
>>> HeadAblation([(3, 1), (5, 0)])
HeadAblation(heads=[[3, 1], [5, 0]])
>>> caps = lh.caption(vlm, ds, strategy=HeadAblation([(3, 1), (5, 0)]))      # doctest: +SKIP
"""
from __future__ import annotations

from typing import Sequence

from ..generation.decoding import DecodingStrategy
from ..hooks.ablation import ablate_heads
from ..models.loading import LoadedVLM
from .base import Intervention, check_heads

__all__ = ["HeadAblation", "HeadAblationStrategy"]


class HeadAblationStrategy(DecodingStrategy):
    """Greedy decoding with ``heads`` zero-ablated (or mean-ablated with ``values``) at every forward.

    The bound form of :class:`HeadAblation`; ``values`` maps a head to its ``[head_dim]``
    replacement (mean ablation), zero otherwise.

    Example
    -------
    >>> strategy = HeadAblationStrategy(vlm, [(3, 1), (5, 0)])                 # doctest: +SKIP
    >>> out = greedy_decode(vlm.model, enc, 32, strategy=strategy)             # doctest: +SKIP
    """

    name = "head_ablation"

    def __init__(self, vlm: LoadedVLM, heads: Sequence[tuple[int, int]], values=None):
        self.model, self.spec = vlm.model, vlm.spec
        self.heads = vlm.spec.check_heads(heads)
        self.values = values
        self._runs: list[int] = []

    def begin(self, inputs: dict) -> None:
        self._runs = []

    def context(self):
        # runs=: the decoding loop also enters this context around a prefill's image pre-encoding (no model
        # forward, no text layer); a model forward that misses the hooked layers still raises
        return ablate_heads(self.model, self.spec, self.heads, values=self.values, runs=self._runs)


class HeadAblation(Intervention):
    """Static deactivation: the outputs of ``heads`` are zeroed (their ``o_proj`` input slice) at every forward.

    Parameters
    ----------
    heads : (layer, head) pairs, e.g. ``attribution.top_heads(5)``; checked against the model at :meth:`bind`.

    Example
    -------
    >>> from lens_halluc.interventions import HeadAblation
    >>> ablate = HeadAblation([(3, 1), (5, 0)])
    >>> ablate.get_params()
    {'heads': [[3, 1], [5, 0]]}
    >>> caps = lh.caption(vlm, ds, strategy=ablate)                          # doctest: +SKIP
    """

    name = "ablate"
    description = "static deactivation: zero-ablate the heads at every forward"
    options = {}

    def __init__(self, heads):
        self.heads = check_heads(heads, "HeadAblation")

    def bind(self, vlm) -> HeadAblationStrategy:
        return self._bound(HeadAblationStrategy(vlm, self.heads))
