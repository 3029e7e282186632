"""The one base of every intervention: parameters in ``__init__``, ``bind(vlm)`` gives the decoding strategy.

scikit-learn style: an :class:`Intervention` holds only its parameters (validated in ``__init__``,
no model); :meth:`~Intervention.get_params` returns them as a JSON-able dict (what caches are keyed
by), ``repr`` is deterministic, and :meth:`~Intervention.bind` attaches a model and returns the
:class:`~lens_halluc.generation.decoding.DecodingStrategy` that does the work. Every generation
entry point binds for you (``resolve_strategy``), so an intervention is passed as ``strategy=``::

    caps = lh.caption(vlm, ds, strategy=lh.ADHH(heads, tau=0.45))

A bound strategy that edits post-softmax attention switches the text tower to the editable
``"lens_halluc"`` attention by itself for the decoding call (``DecodingStrategy.session()``) and
restores the previous implementation afterwards.

Each class also describes its options once (:class:`Param`: kind, help, choices, CLI aliases);
with the defaults of its ``__init__`` signature they are all the registry and the CLI know.

Example
-------
>>> from lens_halluc.interventions import ADHH
>>> a = ADHH([(3, 1), (5, 0)], tau=0.3)
>>> a
ADHH(heads=[[3, 1], [5, 0]], tau=0.3)
>>> a.get_params()
{'heads': [[3, 1], [5, 0]], 'tau': 0.3, 'renormalize': False}
>>> ADHH(**a.get_params()) == a
True
>>> strategy = a.bind(vlm)                                                 # doctest: +SKIP
"""
from __future__ import annotations

import inspect
import json
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Mapping, Sequence

from ..data.flavour import resolve
from ..generation.decoding import DecodingStrategy
from ..models.heads import HeadsFileError, parse_heads

__all__ = ["Intervention", "Param"]


@dataclass(frozen=True)
class Param:
    """How one ``__init__`` parameter of an intervention is described to the registry and the CLI.

    ``kind``: "float", "int", "str", "bool" (a ``store_true`` flag), "ints" (comma-separated
    integers on the command line) or "object" (a live object such as HALC's detector: no CLI option). ``choices`` restricts "str" values (``None`` is written ``none``).
    ``aliases``: extra CLI flags that mean the same option (the paper's symbols, e.g. ``--alpha``).

    Example
    -------
    >>> Param("float", "contrast strength", aliases=("--alpha",)).aliases
    ('--alpha',)
    """

    kind: str
    help: str = ""
    choices: tuple | None = None
    aliases: tuple[str, ...] = ()


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


class Intervention:
    """Base of all interventions: parameters only, bound to a model with :meth:`bind`.

    Subclasses set ``name`` (the registry name), ``description``, ``options`` (a :class:`Param` per
    ``__init__`` parameter except ``heads``), store each ``__init__`` parameter under its own name
    (validated) and implement :meth:`bind`. ``editable = True`` (or overriding
    :meth:`needs_editable`) says the bound strategy edits post-softmax attention.

    Example
    -------
    >>> from lens_halluc.interventions import VCD
    >>> VCD(strength=0.5).get_params()
    {'strength': 0.5, 'cutoff': 0.1, 'noise_step': 500, 'seed': 0}
    >>> VCD(strength=0.5)
    VCD(strength=0.5)
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    options: ClassVar[Mapping[str, Param]] = {}
    editable: ClassVar[bool] = False
    flavours: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    """``{"reference": {param: value}, "corrected": {...}}``: the values of the parameters that default to
    ``None`` in ``__init__`` under each flavour (a class with a ``flavour`` parameter; see ``data.flavour``)."""

    # ------------------------------------------------------------------ parameters
    @classmethod
    def _signature(cls) -> list[inspect.Parameter]:
        params = [p for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"]
        bad = [p.name for p in params if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if bad:
            raise TypeError(f"{cls.__name__}.__init__ must list its parameters explicitly (no *args/**kwargs: {bad}).")
        return params

    @classmethod
    def param_names(cls) -> list[str]:
        """The ``__init__`` parameter names, in signature order.

        Example
        -------
        >>> from lens_halluc.interventions import Reweight
        >>> Reweight.param_names()
        ['heads', 'alpha', 'keys', 'renormalize']
        """
        return [p.name for p in cls._signature()]

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """``{name: default}`` of the parameters that have one (the one definition of the defaults).

        Example
        -------
        >>> from lens_halluc.interventions import SEEDContrast
        >>> SEEDContrast.defaults()
        {'strength': 1.0, 'a': 0.5, 'cutoff': 0.1, 'seed': 0}
        """
        return {p.name: p.default for p in cls._signature() if p.default is not inspect.Parameter.empty}

    def get_params(self) -> dict[str, Any]:
        """The parameters as a JSON-able dict (tuples become lists); ``type(self)(**params)`` rebuilds it.

        Example
        -------
        >>> from lens_halluc.interventions import HeadAblation
        >>> HeadAblation([(0, 1)]).get_params()
        {'heads': [[0, 1]]}
        """
        return {n: _jsonable(getattr(self, n)) for n in self.param_names()}

    def set_params(self, **params) -> "Intervention":
        """Change parameters in place (validated as in ``__init__``); returns ``self``.

        Example
        -------
        >>> from lens_halluc.interventions import VCD
        >>> VCD().set_params(strength=2.0).strength
        2.0
        """
        unknown = sorted(set(params) - set(self.param_names()))
        if unknown:
            raise ValueError(f"{type(self).__name__} has no parameter(s) {unknown}; its parameters are {self.param_names()}.")
        merged = {**self.get_params(), **params}
        type(self).__init__(self, **merged)
        return self

    def key(self) -> str:
        """A stable text identity (``name`` + sorted JSON parameters), e.g. to key caches.

        Example
        -------
        >>> from lens_halluc.interventions import VCD
        >>> VCD(seed=1).key()
        'vcd{"cutoff": 0.1, "noise_step": 500, "seed": 1, "strength": 1.0}'
        """
        return self.name + json.dumps(self.get_params(), sort_keys=True)

    def _flavoured(self, name: str, value: Any) -> Any:
        """``value``, or this instance's flavour's default for ``name`` when ``value`` is ``None``."""
        return resolve(self.flavours, getattr(self, "flavour", "reference"), name, value)

    def effective_defaults(self) -> dict[str, Any]:
        """The signature defaults with this instance's flavour's values filled in (what ``repr`` hides)."""
        return {**self.defaults(), **self.flavours.get(getattr(self, "flavour", "reference"), {})}

    def __repr__(self) -> str:
        defaults = self.effective_defaults()
        shown = [f"{k}={v!r}" for k, v in self.get_params().items() if k not in defaults or v != _jsonable(defaults[k])]
        return f"{type(self).__name__}({', '.join(shown)})"

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and other.get_params() == self.get_params()

    def __hash__(self) -> int:
        return hash((type(self).__name__, json.dumps(self.get_params(), sort_keys=True)))

    # ------------------------------------------------------------------ model
    @classmethod
    def needs_editable(cls, params: Mapping[str, Any]) -> bool:
        """Whether an instance with ``params`` edits post-softmax attention (needs ``"lens_halluc"``)."""
        return bool(cls.editable)

    @property
    def needs_editable_attention(self) -> bool:
        """Whether the bound strategy switches the text tower to the editable attention (it does so by itself).

        Example
        -------
        >>> from lens_halluc.interventions import ADHH, VCD
        >>> ADHH([(0, 0)]).needs_editable_attention, VCD().needs_editable_attention
        (True, False)
        """
        return type(self).needs_editable(self.get_params())

    def bind(self, vlm) -> DecodingStrategy:
        """The decoding strategy of this intervention on ``vlm`` (a ``LoadedVLM``); model-dependent checks here.

        Example
        -------
        >>> strategy = ADHH(heads).bind(vlm)                                   # doctest: +SKIP
        >>> out = greedy_decode(vlm.model, enc, 32, strategy=strategy)         # doctest: +SKIP
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement bind(vlm).")

    def _bound(self, strategy: DecodingStrategy) -> DecodingStrategy:
        strategy.intervention = self  # provenance: which intervention (and parameters) made this strategy
        return strategy


# ---------------------------------------------------------------------- validation helpers
def check_heads(heads: Iterable, owner: str) -> tuple[tuple[int, int], ...]:
    """Heads as a non-empty tuple of ``(layer, head)`` int pairs (range is checked at :meth:`bind`)."""
    if heads is None or isinstance(heads, (str, bytes)):
        raise ValueError(f"{owner} needs heads: a list of (layer, head) pairs, e.g. attribution.top_heads(5).")
    try:
        pairs = parse_heads(heads, where=f"{owner} heads")
    except HeadsFileError as e:
        raise ValueError(str(e)) from None
    except TypeError:
        raise ValueError(f"{owner} heads must be a list of (layer, head) pairs, got {type(heads).__name__}.") from None
    if not pairs:
        raise ValueError(f"{owner} got an empty head list: the intervention would change nothing.")
    return tuple(pairs)


def check_number(value: Any, name: str, owner: str, low: float | None = None, high: float | None = None,
                 optional: bool = False) -> float | None:
    """A finite float in ``[low, high]`` (``None`` allowed when ``optional``)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise TypeError(f"{owner}: {name} must be a number{' or None' if optional else ''}, got {value!r}.")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{owner}: {name} must be a finite number, got {value!r}.")
    if (low is not None and v < low) or (high is not None and v > high):
        bounds = (f"in [{low:g}, {high:g}]" if low is not None and high is not None
                  else f">= {low:g}" if low is not None else f"<= {high:g}")
        raise ValueError(f"{owner}: {name} must be {bounds}, got {value!r}.")
    return v


def check_int(value: Any, name: str, owner: str, low: int | None = None, high: int | None = None) -> int:
    """An integer (not a bool) in ``[low, high]``."""
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())
                                       or type(value).__name__.startswith(("int", "uint"))):
        raise TypeError(f"{owner}: {name} must be an integer, got {value!r}.")
    v = int(value)
    if (low is not None and v < low) or (high is not None and v > high):
        raise ValueError(f"{owner}: {name} must be in [{low}, {'inf' if high is None else high}], got {value!r}.")
    return v


def check_bool(value: Any, name: str, owner: str) -> bool:
    """``True`` / ``False`` only (a string such as ``"false"`` would silently be true)."""
    if not isinstance(value, bool) and type(value).__name__ != "bool_":
        raise TypeError(f"{owner}: {name} must be True or False, got {value!r}.")
    return bool(value)


def check_choice(value: Any, name: str, owner: str, choices: Sequence) -> Any:
    """``value`` if it is one of ``choices``."""
    if value not in tuple(choices):
        shown = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{owner}: {name} must be one of {shown}, got {value!r}.")
    return value


def check_ints(value: Any, name: str, owner: str, optional: bool = True) -> tuple[int, ...] | None:
    """A non-empty tuple of non-negative ints (``None`` allowed when ``optional``)."""
    if value is None and optional:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"{owner}: {name} must be a list of integers{' or None' if optional else ''}, got {value!r}.")
    out = tuple(check_int(v, name, owner, low=0) for v in value)
    if not out:
        raise ValueError(f"{owner}: {name} is empty; pass None for the default.")
    return out
