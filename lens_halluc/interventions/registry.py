"""Registry of the hallucination interventions: name → its :class:`~lens_halluc.interventions.base.Intervention` class.

Each method's options (names, kinds, defaults, choices, help, CLI aliases) are read from its class:
the defaults from the ``__init__`` signature, the rest from the class's ``options`` (:class:`Param`
per parameter). Nothing here repeats them. Classes are imported lazily by module path, so a method
whose module cannot be imported is reported as unavailable only when it is chosen.

* ``greedy`` — plain greedy decoding (``None`` strategy); no options.
* ``ablate`` — :class:`~lens_halluc.interventions.ablation.HeadAblation` (heads); no options.
* ``adhh`` — :class:`~lens_halluc.interventions.editing.ADHH` (heads): ``--tau``, ``--renormalize``,
  ``--rows``, ``--flavour``.
* ``reweight`` — :class:`~lens_halluc.interventions.editing.Reweight` (heads): ``--alpha``,
  ``--keys`` (alias ``--key-group``), ``--renormalize``.
* ``vcd`` — :class:`~lens_halluc.interventions.vcd.VCD`: ``--strength`` (``--alpha``), ``--cutoff``
  (``--beta``), ``--noise-step``, ``--seed``.
* ``seed`` — :class:`~lens_halluc.interventions.seed.SEEDContrast`: ``--strength`` (``--beta``), ``--a``,
  ``--cutoff``, ``--seed``.
* ``causalmm`` — :class:`~lens_halluc.interventions.causalmm.CausalMM`: ``--strength`` (``--gamma``),
  ``--cutoff`` (``--epsilon``), ``--vision``, ``--vision-layer``, ``--llm``, ``--llm-layers``, ``--llm-heads``, ``--seed``.
* ``dola`` — :class:`~lens_halluc.interventions.dola.DoLa`: ``--candidate-layers``, ``--cutoff`` (``--beta``),
  ``--strength``, ``--contrast``, ``--final-norm``, ``--divergence``, ``--repetition-penalty``, ``--flavour``.
* ``opera`` — :class:`~lens_halluc.interventions.opera.OPERA`: ``--num-beams``, ``--scale-factor``, ``--threshold``,
  ``--num-attn-candidates``, ``--penalty-weights``, ``--window-size``, ``--layer``, ``--rollback``, ``--flavour``,
  ``--score-dtype``, ``--history`` (a beam search: its bound strategy decodes with ``Beams(num_beams)``).

A class with a ``flavour`` parameter gets ``--flavour`` (reference | corrected) like any other
option; its parameters that default to ``None`` take the flavour's value
(:attr:`Option.flavoured` lists them, the CLI's help shows them).

Methods that edit attention weights (adhh, reweight, causalmm with ``--llm``) need the text tower on
the editable ``"lens_halluc"`` attention; their bound strategies switch to it by themselves for each
decoding call (:func:`needs_editable_attention` still says which ones do).

Example
-------
>>> from lens_halluc.interventions.registry import build_intervention, method_options
>>> [o.flag for o in method_options("adhh")]
['--tau', '--renormalize', '--rows', '--flavour']
>>> dict(method_options("adhh")[0].flavoured)
{'reference': 0.5, 'corrected': 0.5}
>>> [(o.flag, o.aliases) for o in method_options("vcd")][:2]
[('--strength', ('--alpha',)), ('--cutoff', ('--beta',))]
>>> build_intervention("adhh", heads=[(0, 0), (1, 7)], tau=0.3)
ADHH(heads=[[0, 0], [1, 7]], tau=0.3)
>>> build_intervention("adhh", heads=[(0, 0)], flavour="corrected").rows
'all'
>>> strat = build_strategy("adhh", vlm, heads=[(0, 0), (1, 7)], tau=0.45)     # doctest: +SKIP
>>> controls = control_strategies("adhh", vlm, heads, draws=5, tau=0.45)       # doctest: +SKIP
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Sequence

from ..models.heads import random_heads

__all__ = [
    "METHODS", "Method", "MethodUnavailableError", "Option", "available_methods", "build_intervention",
    "build_strategy", "control_heads", "control_strategies", "get_method", "method_options",
    "needs_editable_attention", "options_of", "resolve_options",
]

Head = tuple[int, int]


class MethodUnavailableError(ValueError):
    """A registered method whose module cannot be imported (not written yet, or a missing dependency)."""


def _int_list(text: str | Sequence[int] | None) -> list[int] | None:
    """``"0,2,4"`` → ``[0, 2, 4]``; ``None``/``""`` → ``None``; a sequence is passed through."""
    if text is None or text == "":
        return None
    if isinstance(text, str):
        try:
            return [int(t) for t in text.replace(" ", "").split(",") if t]
        except ValueError:
            raise ValueError(f"expected comma-separated integers, got {text!r}") from None
    return [int(t) for t in text]


@dataclass(frozen=True)
class Option:
    """One method option: keyword ``name`` of the class, its CLI flag (and aliases), type and default.

    ``kind``: "float", "int", "str", "bool" (a ``store_true`` flag) or "ints" (comma-separated
    integers). ``choices`` restricts "str" values (``None`` is written ``none`` on the command line).
    ``aliases``: further CLI flags meaning the same option (e.g. VCD's ``--alpha`` for ``--strength``).
    ``flavoured``: ``((flavour, value), ...)`` when the default (``None``) is taken from the class's
    flavour table (``Intervention.flavours``), empty otherwise.

    Example
    -------
    >>> o = Option("strength", "float", 1.0, aliases=("--alpha",))
    >>> o.flag, o.flags, o.convert("0.5")
    ('--strength', ('--strength', '--alpha'), 0.5)
    """

    name: str
    kind: str
    default: Any
    help: str = ""
    choices: tuple | None = None
    aliases: tuple[str, ...] = ()
    flavoured: tuple[tuple[str, Any], ...] = ()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def flags(self) -> tuple[str, ...]:
        """The main flag, then the aliases (what ``argparse.add_argument`` gets)."""
        return (self.flag, *self.aliases)

    @property
    def keywords(self) -> tuple[str, ...]:
        """Python keywords of the aliases (``--key-group`` → ``key_group``), accepted by :func:`resolve_options`."""
        return tuple(a.lstrip("-").replace("-", "_") for a in self.aliases)

    def convert(self, value: Any) -> Any:
        if value is None:
            return None
        if self.kind == "float":
            return float(value)
        if self.kind == "int":
            return int(value)
        if self.kind == "bool":
            return bool(value)
        if self.kind == "ints":
            return _int_list(value)
        value = None if isinstance(value, str) and value.lower() == "none" and None in (self.choices or ()) else value
        if self.choices is not None and value not in self.choices:
            shown = ", ".join("none" if c is None else str(c) for c in self.choices)
            raise ValueError(f"{self.flag}: {value!r} is not one of {shown}.")
        return value


def options_of(cls) -> tuple[Option, ...]:
    """The :class:`Option` s of an intervention class: its ``__init__`` parameters (``heads`` aside) in order.

    Defaults come from the signature, kind / help / choices / aliases from ``cls.options``.

    Example
    -------
    >>> from lens_halluc.interventions import Reweight
    >>> [(o.name, o.default) for o in options_of(Reweight)]
    [('alpha', 0.4), ('keys', 'text'), ('renormalize', False)]
    """
    out = []
    for p in inspect.signature(cls.__init__).parameters.values():
        if p.name in ("self", "heads"):
            continue
        desc = cls.options.get(p.name)
        if desc is None:
            raise TypeError(f"{cls.__name__}.options does not describe its parameter {p.name!r}.")
        if desc.kind == "object":  # a live object (HALC's detector): given from Python or built by the CLI
            continue
        default = None if p.default is inspect.Parameter.empty else p.default
        flavoured = ()
        if default is None and any(p.name in t for t in cls.flavours.values()):
            flavoured = tuple((f, t.get(p.name)) for f, t in cls.flavours.items())
        out.append(Option(p.name, desc.kind, default, desc.help, desc.choices, tuple(desc.aliases), flavoured))
    return tuple(out)


@dataclass(frozen=True)
class Method:
    """A registered method: ``target`` is ``"module:Class"`` of an intervention class (``None`` = plain greedy)."""

    name: str
    target: str | None
    description: str = ""

    def load(self):
        """The intervention class (``None`` for greedy); :class:`MethodUnavailableError` if it cannot be imported."""
        if self.target is None:
            return None
        module, attr = self.target.split(":")
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            raise MethodUnavailableError(
                f"method {self.name!r} is unavailable: its module {module} cannot be imported ({e}).") from None
        try:
            return getattr(mod, attr)
        except AttributeError:
            raise MethodUnavailableError(f"method {self.name!r} is unavailable: {module} has no {attr}.") from None

    def available(self) -> bool:
        try:
            self.load()
            return True
        except MethodUnavailableError:
            return False

    @cached_property
    def options(self) -> tuple[Option, ...]:
        cls = self.load()
        return () if cls is None else options_of(cls)

    @property
    def needs_heads(self) -> bool:
        """Whether the class takes ``heads`` without a default (ablate, adhh, reweight)."""
        cls = self.load()
        if cls is None:
            return False
        p = inspect.signature(cls.__init__).parameters.get("heads")
        return p is not None and p.default is inspect.Parameter.empty

    @property
    def takes_heads(self) -> bool:
        """Whether the method accepts heads (greedy accepts and ignores them)."""
        cls = self.load()
        return cls is None or "heads" in inspect.signature(cls.__init__).parameters

    def editable(self, opts: dict) -> bool:
        """Whether the method with ``opts`` edits post-softmax attention."""
        cls = self.load()
        return cls is not None and bool(cls.needs_editable(opts))


_PKG = "lens_halluc.interventions"

METHODS: dict[str, Method] = {m.name: m for m in (
    Method("greedy", None, "plain greedy decoding (the baseline)"),
    Method("ablate", f"{_PKG}.ablation:HeadAblation", "static deactivation: zero-ablate the heads at every forward"),
    Method("adhh", f"{_PKG}.editing:ADHH", "ADHH: zero the heads' text attention where it is >= tau"),
    Method("reweight", f"{_PKG}.editing:Reweight", "attention re-weighting: scale one key group of the heads by alpha"),
    Method("vcd", f"{_PKG}.vcd:VCD", "visual contrastive decoding (diffusion-noised image)"),
    Method("seed", f"{_PKG}.seed:SEEDContrast", "SEED noise-contrastive logit purification"),
    Method("causalmm", f"{_PKG}.causalmm:CausalMM", "CausalMM counterfactual attention"),
    Method("dola", f"{_PKG}.dola:DoLa", "DoLa: contrast the final layer with an early layer"),
    Method("opera", f"{_PKG}.opera:OPERA", "OPERA: beam search with the over-trust penalty and rollback"),
    Method("halc", f"{_PKG}.halc:HALC", "HALC: detector-grounded contrast of fields of view at object words"),
)}


# ---------------------------------------------------------------------------- API
def get_method(name: str) -> Method:
    """The registered method ``name``; a clear ``ValueError`` listing the known ones otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}.") from None


def method_options(name: str) -> tuple[Option, ...]:
    """The options of ``name`` (for CLI flags): ``Option.flag``, ``.aliases``, ``.kind``, ``.default``, ``.choices``."""
    return get_method(name).options


def available_methods() -> dict[str, bool]:
    """``{name: importable}`` for every registered method (imports the modules)."""
    return {name: m.available() for name, m in METHODS.items()}


def resolve_options(name: str, **opts) -> dict:
    """Defaults of ``name`` overridden by ``opts`` (converted), keyed by the class's parameter names.

    Alias keywords (``alpha`` for VCD's ``strength``, ``key_group`` for Reweight's ``keys``...) are
    accepted and renamed; unknown keywords, or an option given under two names, raise ``ValueError``.
    """
    m = get_method(name)
    known = {o.name: o for o in m.options}
    alias = {kw: o.name for o in m.options for kw in o.keywords if kw not in known}
    given: dict[str, Any] = {}
    for k, v in opts.items():
        canon = k if k in known else alias.get(k)
        if canon is None:
            raise ValueError(f"method {name!r} takes no option {k!r}; its options are {sorted(known) or 'none'}.")
        if canon in given:
            raise ValueError(f"method {name!r}: option {canon!r} given twice (as {k!r} and another name).")
        given[canon] = v
    return {k: o.convert(given.get(k, o.default)) for k, o in known.items()}


def needs_editable_attention(name: str, **opts) -> bool:
    """Whether ``name`` with ``opts`` edits post-softmax attention (its strategy switches to "lens_halluc" itself)."""
    return get_method(name).editable(resolve_options(name, **opts))


def build_intervention(name: str, heads: Sequence[Head] | None = None, **opts):
    """The :class:`~lens_halluc.interventions.base.Intervention` of ``name`` (``None`` for greedy).

    Raises ``ValueError`` for an unknown method, a method needing heads called without them, or an
    unknown option; :class:`MethodUnavailableError` (a ``ValueError``) if its module is missing.
    """
    m = get_method(name)
    if m.needs_heads and not heads:
        raise ValueError(f"method {name!r} needs hallucination heads: pass --heads top_heads.json "
                         "(written by `python -m lens_halluc.attribute`).")
    cls = m.load()
    objects = {}  # live objects (kind "object", e.g. HALC's detector) are passed through as given
    if cls is not None:
        objects = {k: opts.pop(k) for k in [k for k in opts if getattr(cls.options.get(k), "kind", None) == "object"]}
    kwargs = {**resolve_options(name, **opts), **objects}
    if cls is None:
        return None
    if "heads" in inspect.signature(cls.__init__).parameters and heads:
        kwargs["heads"] = [tuple(map(int, h)) for h in heads]
    return cls(**kwargs)


def build_strategy(name: str, vlm, heads: Sequence[Head] | None = None, **opts):
    """The bound decoding strategy of ``name`` on ``vlm`` (``None`` for greedy): ``build_intervention(...).bind(vlm)``."""
    iv = build_intervention(name, heads, **opts)
    return None if iv is None else iv.bind(vlm)


def control_heads(n_layers: int, n_heads: int, heads: Sequence[Head], draws: int = 5, seed: int = 0) -> list[list[Head]]:
    """``draws`` sets of ``len(heads)`` random heads, none of them in ``heads`` (the random-head control)."""
    return random_heads((n_layers, n_heads), len(heads), exclude=heads, seed=seed, draws=draws)


def control_strategies(name: str, vlm, heads: Sequence[Head], draws: int = 5, seed: int = 0, **opts) -> list[tuple[int, list[Head], Any]]:
    """The random-head control of ``name``: ``[(draw, random heads, strategy), ...]`` with the same options."""
    m = get_method(name)
    if not m.needs_heads:
        raise ValueError(f"method {name!r} does not act on heads, so it has no random-head control.")
    if not heads:
        raise ValueError(f"the random-head control of {name!r} needs the attributed heads (--heads) to exclude.")
    sets = control_heads(vlm.spec.n_layers, vlm.spec.n_heads, heads, draws, seed)
    return [(d, hs, build_strategy(name, vlm, hs, **opts)) for d, hs in enumerate(sets)]
