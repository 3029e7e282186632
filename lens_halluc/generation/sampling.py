"""How the next token is chosen: argmax (``None``), :class:`Sampling` (seeded multinomial) or :class:`Beams`.

Every decoding entry point (:func:`~lens_halluc.generation.decoding.decode`, ``generate``,
``caption``, ``caption_dataset``, ``answer``, ``answer_questions``) takes ``sampling=``:

* ``"strategy"`` (the default): the strategy's own choice, ``DecodingStrategy.sampling`` — ``None``
  (argmax) for plain greedy and most methods; VCD and CausalMM sample in their reference code, so
  their bound strategies carry a :class:`Sampling`;
* ``None``: argmax of the strategy's combined scores (greedy), whatever the strategy prefers;
* a :class:`Sampling`: multinomial sampling from ``softmax(warp(scores))``;
* a :class:`Beams`: beam search over the strategy's scores (every beam of every branch keeps its
  own KV-cache rows).

:func:`resolve_choice` turns the argument into the choice used; :func:`choice_label` is what caches
are keyed by and what ``Captions.config["decoding"]`` records.

Reproducibility: a decoding call draws from CPU ``torch.Generator`` s, so the tokens depend on the
seed, not on the device's RNG state. ``decode`` with one generator for the batch (the default)
draws like ``torch.manual_seed(seed); model.generate(do_sample=True, ...)`` on CPU; the runners
give every row its own generator seeded with :func:`row_seed` ``(seed, key)`` (key: the image id or
question id), so a row's tokens do not depend on the batch it was decoded in.

Example
-------
>>> Sampling()
Sampling(temperature=1.0, top_k=None, top_p=None, seed=0)
>>> Sampling(temperature=0.7, top_p=0.9, seed=3).get_params()
{'temperature': 0.7, 'top_k': None, 'top_p': 0.9, 'seed': 3}
>>> Beams(num_beams=3)
Beams(num_beams=3, length_penalty=1.0, early_stopping=False)
>>> choice_label(None), choice_label(Beams(2))["kind"]
({'kind': 'greedy'}, 'beams')
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch

__all__ = ["STRATEGY_CHOICE", "Beams", "Sampling", "choice_label", "resolve_choice", "row_generators", "row_seed"]

STRATEGY_CHOICE = "strategy"
"""The default ``sampling=`` value: use the strategy's own ``sampling`` (``None`` = argmax)."""


@dataclass(frozen=True)
class Sampling:
    """Multinomial sampling from ``softmax(scores / temperature)`` after optional top-k / top-p filtering.

    The filters act on the strategy's combined scores in the order transformers applies its
    warpers (temperature, then top-k, then top-p); tokens a contrastive strategy set to ``-inf``
    stay impossible.

    Parameters
    ----------
    temperature : > 0. Default 1.0 (the reference VCD/CausalMM setting).
    top_k : keep the k highest scores (``None``: all; transformers' ``top_k=0``). Ties with the
        k-th score are kept, as transformers does.
    top_p : keep the smallest set of highest-probability tokens whose probability reaches
        ``top_p`` (``None`` or 1: all).
    seed : seed of the generator; a run with the same seed reproduces its tokens.

    Example
    -------
    >>> Sampling(temperature=0.7, top_p=0.9, seed=3)
    Sampling(temperature=0.7, top_k=None, top_p=0.9, seed=3)
    >>> caps = lh.caption(vlm, ds, sampling=Sampling(seed=1))       # per-image generators  # doctest: +SKIP
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

    def warp(self, scores: torch.Tensor) -> torch.Tensor:
        """``scores`` ``[rows, vocab]`` after temperature, top-k and top-p (removed tokens → ``-inf``).

        >>> s = Sampling(top_k=2).warp(torch.tensor([[3.0, 1.0, 2.0, 0.0]]))
        >>> s.tolist()
        [[3.0, -inf, 2.0, -inf]]
        """
        scores = scores.float()
        if self.temperature != 1.0:
            scores = scores / float(self.temperature)
        if self.top_k is not None:
            k = min(int(self.top_k), scores.shape[-1])
            kth = torch.topk(scores, k).values[..., -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1.0:
            ascending, order = torch.sort(scores, descending=False)
            cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
            drop_sorted = cumulative <= (1 - float(self.top_p))
            drop_sorted[..., -1:] = False  # the most likely token always stays
            drop = drop_sorted.scatter(-1, order, drop_sorted)
            scores = scores.masked_fill(drop, float("-inf"))
        return scores

    def choose(self, scores: torch.Tensor, generators: torch.Generator | Sequence[torch.Generator]) -> torch.Tensor:
        """One sampled token per row of ``scores`` ``[rows, vocab]`` (LongTensor ``[rows]`` on ``scores``' device).

        ``generators``: one CPU generator for all rows (drawn as one ``torch.multinomial`` call over
        the batch, as ``model.generate`` does) or one per row (row ``i`` draws from ``generators[i]``).
        """
        probs = torch.softmax(self.warp(scores), dim=-1).cpu()
        if isinstance(generators, torch.Generator):
            tokens = torch.multinomial(probs, num_samples=1, generator=generators).squeeze(1)
        else:
            if len(generators) != probs.shape[0]:
                raise ValueError(f"Sampling.choose: {len(generators)} generators for {probs.shape[0]} rows.")
            tokens = torch.cat([torch.multinomial(probs[i: i + 1], num_samples=1, generator=g).squeeze(1)
                                for i, g in enumerate(generators)])
        return tokens.to(scores.device)


@dataclass(frozen=True)
class Beams:
    """Beam search over the strategy's scores, as ``model.generate(num_beams=..., do_sample=False)``.

    A beam's score is the sum of its tokens' ``log_softmax(scores)``; a finished hypothesis
    (ended by EOS or by the token budget) is ranked by ``score / n_generated ** length_penalty``
    (EOS counted). The best finished hypothesis of each item is returned.

    Parameters
    ----------
    num_beams : beams per item (>= 1). With one beam and ``length_penalty=1`` this is greedy.
    length_penalty : exponent of the length normalisation (transformers' default 1.0).
    early_stopping : ``False`` (transformers' default heuristic: stop an item when its best running
        beam, normalised at the current length, cannot beat its worst finished one), ``True`` (stop
        as soon as ``num_beams`` hypotheses are finished) or ``"never"`` (the canonical bound).

    Example
    -------
    >>> Beams(5).num_beams
    5
    >>> caps = lh.caption(vlm, ds, sampling=Beams(5))      # == model.generate(num_beams=5)  # doctest: +SKIP
    """

    num_beams: int = 4
    length_penalty: float = 1.0
    early_stopping: bool | str = False

    def __post_init__(self):
        if isinstance(self.num_beams, bool) or not isinstance(self.num_beams, int) or self.num_beams < 1:
            raise ValueError(f"Beams: num_beams must be an integer >= 1, got {self.num_beams!r}.")
        if isinstance(self.length_penalty, bool) or not isinstance(self.length_penalty, (int, float)) \
                or not math.isfinite(self.length_penalty):
            raise ValueError(f"Beams: length_penalty must be a finite number, got {self.length_penalty!r}.")
        if self.early_stopping not in (True, False, "never") or isinstance(self.early_stopping, int) \
                and not isinstance(self.early_stopping, bool):
            raise ValueError(f"Beams: early_stopping must be True, False or 'never', got {self.early_stopping!r}.")

    def get_params(self) -> dict:
        """The parameters as a JSON-able dict."""
        return asdict(self)


def resolve_choice(sampling: Any, strategy=None) -> Sampling | Beams | None:
    """The token choice ``sampling=`` stands for: ``"strategy"`` → ``strategy.sampling`` (``None`` without a
    strategy); ``None``, a :class:`Sampling` or a :class:`Beams` → itself; anything else ``TypeError``.

    >>> resolve_choice("strategy") is None
    True
    >>> resolve_choice(Sampling(seed=1), strategy=None)
    Sampling(temperature=1.0, top_k=None, top_p=None, seed=1)
    """
    if isinstance(sampling, str) and sampling == STRATEGY_CHOICE:
        sampling = getattr(strategy, "sampling", None) if strategy is not None else None
        where = f"{type(strategy).__name__}.sampling"
    else:
        where = "sampling"
    if sampling is None or isinstance(sampling, (Sampling, Beams)):
        return sampling
    raise TypeError(f"{where} must be 'strategy', None (argmax), a Sampling or a Beams, got {sampling!r}.")


def choice_label(choice: Sampling | Beams | None) -> dict:
    """A JSON-able description of a resolved token choice (part of every cache key and ``config``).

    Sampled rows in the runners use a generator seeded by :func:`row_seed` from ``(seed, key)``.
    """
    if choice is None:
        return {"kind": "greedy"}
    if isinstance(choice, Sampling):
        return {"kind": "sample", **choice.get_params(), "generator": "per row: row_seed(seed, key), cpu"}
    if isinstance(choice, Beams):
        return {"kind": "beams", **choice.get_params()}
    raise TypeError(f"not a token choice: {choice!r}")


def row_seed(seed: int, key: Any) -> int:
    """The seed of one row's generator: the first 63 bits of SHA-256 of the JSON ``[seed, key]``.

    ``key`` is the item's identity (image id, question id); the same (seed, key) always gives the
    same seed, whatever the batch or order.

    >>> row_seed(0, 7) == row_seed(0, 7) != row_seed(1, 7)
    True
    """
    text = json.dumps([int(seed), key], sort_keys=True, separators=(",", ":"))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") & (2 ** 63 - 1)


def row_generators(sampling: Sampling, keys: Sequence[Any]) -> list[torch.Generator]:
    """One CPU generator per key, seeded with :func:`row_seed` ``(sampling.seed, key)``."""
    return [torch.Generator(device="cpu").manual_seed(row_seed(sampling.seed, k)) for k in keys]
