"""Registry of the hallucination interventions: name → how to build its decoding strategy, and its options.

Every method is registered *lazily* by module path, so listing the registry imports nothing heavy
and a method whose module is not installed is reported as unavailable (with the import error) only
when it is chosen.

=========  =====================================================  ===========================  =======
name       strategy                                               options (CLI flag → keyword)  heads
=========  =====================================================  ===========================  =======
greedy     plain greedy decoding (``None`` strategy)               —                             no
ablate     :class:`~lens_halluc.interventions.ablation.HeadAblation` (static deactivation)  —   yes
adhh       ADHH: :class:`~lens_halluc.hooks.attention.ThresholdZeroText`  --tau 0.45, --renormalize  yes
reweight   :class:`~lens_halluc.hooks.attention.ScaleKeys`        --key-group text, --alpha 0.4, --renormalize  yes
vcd        ``lens_halluc.interventions.vcd.VCD``                   --alpha --beta --noise-step --seed  no
seed       ``lens_halluc.interventions.seed.NoiseContrastive``    --beta --a --seed --cutoff     no
causalmm   ``lens_halluc.interventions.causalmm.CausalMM``        --gamma --epsilon --vision ... --llm ...  no
dola       ``lens_halluc.interventions.dola.DoLa``                --candidate-layers --beta --strength  no
=========  =====================================================  ===========================  =======

Methods that edit attention weights (adhh, reweight, causalmm with ``--llm``) need the text tower on
the editable ``"lens_halluc"`` attention; :func:`needs_editable_attention` says so and the CLI switches
with :func:`~lens_halluc.hooks.attention.editable_attention` around the run (restoring afterwards).

Example
-------
>>> from lens_halluc.interventions.registry import build_strategy, method_options
>>> [o.flag for o in method_options("adhh")]
['--tau', '--renormalize']
>>> strat = build_strategy("adhh", vlm, heads=[(0, 0), (1, 7)], tau=0.45)     # doctest: +SKIP
>>> controls = control_strategies("adhh", vlm, heads, draws=5, tau=0.45)       # doctest: +SKIP
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

__all__ = [
    "METHODS", "Method", "MethodUnavailableError", "Option", "available_methods", "build_strategy",
    "control_heads", "control_strategies", "get_method", "method_options", "needs_editable_attention",
    "resolve_options",
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


def _head_list(text: str | Sequence | None) -> list[Head] | None:
    """``"3:1,5:0"`` → ``[(3, 1), (5, 0)]``."""
    if text is None or text == "":
        return None
    if isinstance(text, str):
        try:
            return [(int(a), int(b)) for a, b in (t.split(":") for t in text.replace(" ", "").split(",") if t)]
        except ValueError:
            raise ValueError(f"expected heads as layer:head,layer:head..., got {text!r}") from None
    return [(int(l), int(h)) for l, h in text]


@dataclass(frozen=True)
class Option:
    """One method option: keyword ``name`` of the class/factory, its CLI flag, type and default.

    ``kind``: "float", "int", "str", "bool" (a ``store_true`` flag), "ints" (comma-separated
    integers) or "heads" (``layer:head`` list). ``choices`` restricts "str" values (``None`` is
    written ``none`` on the command line).
    """

    name: str
    kind: str
    default: Any
    help: str = ""
    choices: tuple | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

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
        if self.kind == "heads":
            return _head_list(value)
        value = None if isinstance(value, str) and value.lower() == "none" and None in (self.choices or ()) else value
        if self.choices is not None and value not in self.choices:
            shown = ", ".join("none" if c is None else str(c) for c in self.choices)
            raise ValueError(f"{self.flag}: {value!r} is not one of {shown}.")
        return value


@dataclass(frozen=True)
class Method:
    """A registered method: ``target`` is ``"module:attribute"`` (a class or a factory ``f(vlm, heads, **opts)``)."""

    name: str
    target: str
    description: str
    options: tuple[Option, ...] = ()
    needs_heads: bool = False
    takes_heads: bool = False  # the target's second positional argument is the head list
    editable: Callable[[dict], bool] = field(default=lambda opts: False)

    def load(self) -> Callable:
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


# ---------------------------------------------------------------------------- factories of the built-in methods
def _greedy(vlm, heads=None):
    """Plain greedy decoding: no strategy at all (the exact path of ``caption_and_score`` without one)."""
    return None


def _ablate(vlm, heads):
    from .ablation import HeadAblation

    return HeadAblation(vlm, heads)


def _adhh(vlm, heads, tau: float = 0.45, renormalize: bool = False):
    from ..hooks.attention import AttentionEditing, ThresholdZeroText

    return AttentionEditing(vlm, ThresholdZeroText(float(tau), bool(renormalize)), heads)


def _reweight(vlm, heads, key_group: str = "text", alpha: float = 0.4, renormalize: bool = False):
    from ..hooks.attention import AttentionEditing, ScaleKeys

    return AttentionEditing(vlm, ScaleKeys(key_group, float(alpha), bool(renormalize)), heads)


_HERE = __name__  # lens_halluc.interventions.registry

METHODS: dict[str, Method] = {m.name: m for m in (
    Method("greedy", f"{_HERE}:_greedy", "plain greedy decoding (the baseline)", takes_heads=True),
    Method("ablate", f"{_HERE}:_ablate", "static deactivation: zero-ablate the heads at every forward",
           needs_heads=True, takes_heads=True),
    Method("adhh", f"{_HERE}:_adhh", "ADHH: zero the heads' text attention where it is >= tau",
           (Option("tau", "float", 0.45, "text-attention threshold"),
            Option("renormalize", "bool", False, "renormalise edited rows (the reference does not)")),
           needs_heads=True, takes_heads=True, editable=lambda o: True),
    Method("reweight", f"{_HERE}:_reweight", "attention re-weighting: scale one key group of the heads by alpha",
           (Option("key_group", "str", "text", "key group to scale", ("text", "image")),
            Option("alpha", "float", 0.4, "scale (text: < 1 lowers the prior; image: > 1)"),
            Option("renormalize", "bool", False, "renormalise rows after scaling (the reference does not)")),
           needs_heads=True, takes_heads=True, editable=lambda o: True),
    Method("vcd", "lens_halluc.interventions.vcd:VCD", "visual contrastive decoding (diffusion-noised image)",
           (Option("alpha", "float", 1.0, "contrast strength"),
            Option("beta", "float", 0.1, "plausibility cut-off"),
            Option("noise_step", "int", 500, "diffusion step of the noisy image (of 1000)"),
            Option("seed", "int", 0, "noise seed"))),
    Method("seed", "lens_halluc.interventions.seed:NoiseContrastive", "SEED noise-contrastive logit purification",
           (Option("beta", "float", 1.0, "contrast strength"),
            Option("a", "float", 0.5, "signal fraction: x' = sqrt(a) x + sqrt(1-a) eps"),
            Option("seed", "int", 0, "noise seed"),
            Option("cutoff", "float", 0.1, "plausibility cut-off"))),
    Method("causalmm", "lens_halluc.interventions.causalmm:CausalMM", "CausalMM counterfactual attention",
           (Option("gamma", "float", 1.0, "contrast strength"),
            Option("epsilon", "float", 0.1, "plausibility cut-off"),
            Option("vision", "str", None, "vision-encoder counterfactual", (None, "random", "uniform", "reversed", "shuffle")),
            Option("vision_layer", "int", -1, "vision layer whose attention is replaced"),
            Option("llm", "str", "reverse", "LLM counterfactual attention",
                   (None, "reverse", "reverse_normalize", "random", "uniform")),
            Option("llm_layers", "ints", None, "LLM layers (comma-separated; default all)"),
            Option("llm_heads", "ints", None, "head indices edited in each of those layers (comma-separated; default all)"),
            Option("seed", "int", 0, "seed of random counterfactuals")),
           editable=lambda o: o.get("llm") is not None),
    Method("dola", "lens_halluc.interventions.dola:DoLa", "DoLa: contrast the final layer with an early layer",
           (Option("candidate_layers", "ints", None, "premature layers (comma-separated; default: the lower half)"),
            Option("beta", "float", 0.1, "plausibility cut-off"),
            Option("strength", "float", 1.0, "contrast strength"))),
)}


# ---------------------------------------------------------------------------- API
def get_method(name: str) -> Method:
    """The registered method ``name``; a clear ``ValueError`` listing the known ones otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}.") from None


def method_options(name: str) -> tuple[Option, ...]:
    """The options of ``name`` (for CLI flags): ``Option.flag``, ``.kind``, ``.default``, ``.choices``."""
    return get_method(name).options


def available_methods() -> dict[str, bool]:
    """``{name: importable}`` for every registered method (imports the modules)."""
    return {name: m.available() for name, m in METHODS.items()}


def resolve_options(name: str, **opts) -> dict:
    """Defaults of ``name`` overridden by ``opts`` (converted); unknown keywords raise ``ValueError``."""
    m = get_method(name)
    known = {o.name: o for o in m.options}
    extra = sorted(set(opts) - set(known))
    if extra:
        raise ValueError(f"method {name!r} takes no option(s) {extra}; its options are {sorted(known) or 'none'}.")
    return {k: o.convert(opts.get(k, o.default)) for k, o in known.items()}


def needs_editable_attention(name: str, **opts) -> bool:
    """Whether ``name`` with ``opts`` edits post-softmax attention (needs the "lens_halluc" text attention)."""
    return bool(get_method(name).editable(resolve_options(name, **opts)))


def build_strategy(name: str, vlm, heads: Sequence[Head] | None = None, **opts):
    """The decoding strategy of ``name`` (``None`` for greedy) with ``opts`` over the method's defaults.

    Raises ``ValueError`` for an unknown method, a method needing heads called without them, or an
    unknown option; :class:`MethodUnavailableError` (a ``ValueError``) if its module is missing.
    """
    m = get_method(name)
    if m.needs_heads and not heads:
        raise ValueError(f"method {name!r} needs hallucination heads: pass --heads top_heads.json "
                         "(written by `python -m lens_halluc.attribute`).")
    kwargs = resolve_options(name, **opts)
    target = m.load()
    if m.takes_heads:
        return target(vlm, [tuple(map(int, h)) for h in heads] if heads else None, **kwargs)
    return target(vlm, **kwargs)


def control_heads(n_layers: int, n_heads: int, heads: Sequence[Head], draws: int = 5, seed: int = 0) -> list[list[Head]]:
    """``draws`` sets of ``len(heads)`` random heads, none of them in ``heads`` (the random-head control)."""
    from ..analysis.reweighting import random_heads

    return random_heads(n_layers, n_heads, exclude=heads, k=len(heads), n_draws=draws, seed=seed)


def control_strategies(name: str, vlm, heads: Sequence[Head], draws: int = 5, seed: int = 0, **opts) -> list[tuple[int, list[Head], Any]]:
    """The random-head control of ``name``: ``[(draw, random heads, strategy), ...]`` with the same options."""
    m = get_method(name)
    if not m.needs_heads:
        raise ValueError(f"method {name!r} does not act on heads, so it has no random-head control.")
    if not heads:
        raise ValueError(f"the random-head control of {name!r} needs the attributed heads (--heads) to exclude.")
    sets = control_heads(vlm.spec.n_layers, vlm.spec.n_heads, heads, draws, seed)
    return [(d, hs, build_strategy(name, vlm, hs, **opts)) for d, hs in enumerate(sets)]
