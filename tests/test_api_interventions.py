"""Interventions as classes on the organism: bind + decode, strength 0 = greedy, parameters round-trip,
the editable attention switched by the strategy itself, ADHH under plain ``model.generate()``, the
registry reading its options from the classes, and transformers' cache keyword handled in one place."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from lens_halluc.generation.decoding import DecodingStrategy, greedy_decode, resolve_strategy
from lens_halluc.hooks.attention import text_attn_implementation
from lens_halluc.interventions import (ADHH, VCD, CausalMM, DoLa, HeadAblation, Intervention, Reweight,
                                       SEEDContrast)
from lens_halluc.interventions import registry
from lens_halluc.interventions.base import Param
from lens_halluc.models.compat import cache_from_kwargs, cache_from_output, cache_keyword, cache_kwargs
from lens_halluc.models.spec import SpecError

N_NEW = 10
HEADS = [(1, 2), (3, 4), (5, 0)]


@pytest.fixture(scope="module")
def vlm():
    """A private copy of the organism (these tests switch its attention implementation)."""
    from lens_halluc.models import load_vlm

    return load_vlm()


@pytest.fixture(scope="module")
def all_heads(vlm):
    return [(l, h) for l in range(vlm.spec.n_layers) for h in range(vlm.spec.n_heads)]


@pytest.fixture(scope="module")
def enc(vlm):
    from lens_halluc.models import CAPTION_PROMPT

    rng = np.random.default_rng(0)
    ims = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(3)]
    e = vlm.encode(ims, [CAPTION_PROMPT, "is there a cat ?", CAPTION_PROMPT])
    assert (e["attention_mask"] == 0).any()  # left-padded: the padding path is exercised too
    return e


def _decode(vlm, enc, strategy=None, n=N_NEW, sampling=None):
    """Argmax unless told (VCD and CausalMM sample in their reference flavour: tested in test_sampling_defaults)."""
    return greedy_decode(vlm.model, enc, max_new_tokens=n, strategy=resolve_strategy(strategy, vlm),
                         sampling=sampling).sequences


@pytest.fixture(scope="module")
def greedy(vlm, enc):
    return _decode(vlm, enc)


def _instances():
    return [HeadAblation(HEADS), ADHH(HEADS), Reweight(HEADS), Reweight(HEADS, alpha=2.0, keys="image", renormalize=True),
            VCD(), SEEDContrast(), CausalMM(), CausalMM(vision="random", llm=None), DoLa(), DoLa(candidate_layers=[0, 2])]


# ---------------------------------------------------------------- bind and decode
@pytest.mark.parametrize("iv", _instances(), ids=repr)
def test_each_class_binds_and_decodes(vlm, enc, iv):
    bound = iv.bind(vlm)
    assert isinstance(bound, DecodingStrategy) and bound.intervention is iv
    assert resolve_strategy(iv, vlm).intervention is iv  # what every generation entry point does
    out = _decode(vlm, enc, iv)
    assert out.shape == (enc["input_ids"].shape[0], N_NEW)


@pytest.mark.parametrize("iv", [
    VCD(strength=0.0), SEEDContrast(strength=0.0), CausalMM(strength=0.0),
    CausalMM(strength=0.0, vision="uniform", llm=None), DoLa(strength=0.0), Reweight(HEADS, alpha=1.0),
], ids=repr)
def test_zero_strength_is_greedy_token_for_token(vlm, enc, greedy, iv):
    assert torch.equal(_decode(vlm, enc, iv), greedy)


def test_strong_settings_change_the_output(vlm, enc, greedy, all_heads):
    for iv in (ADHH(all_heads, tau=0.0), Reweight(all_heads, alpha=0.0), HeadAblation(all_heads[:16]),
               VCD(strength=5.0, cutoff=None, noise_step=999)):
        assert not torch.equal(_decode(vlm, enc, iv), greedy), iv


def test_bind_checks_against_the_model(vlm):
    n = vlm.spec.n_layers
    with pytest.raises(SpecError, match="out of range"):
        ADHH([(n, 0)]).bind(vlm)
    with pytest.raises(SpecError, match="out of range"):
        HeadAblation([(0, vlm.spec.n_heads)]).bind(vlm)
    with pytest.raises(ValueError, match="out of range"):
        DoLa(candidate_layers=[n]).bind(vlm)


# ---------------------------------------------------------------- parameters
@pytest.mark.parametrize("iv", _instances(), ids=repr)
def test_get_params_round_trip(iv):
    params = iv.get_params()
    assert list(params) == type(iv).param_names()
    assert json.loads(json.dumps(params)) == params             # JSON-able, hence usable as a cache key
    again = type(iv)(**params)
    assert again == iv and hash(again) == hash(iv) and repr(again) == repr(iv) and again.key() == iv.key()
    ns = {c.__name__: c for c in (HeadAblation, ADHH, Reweight, VCD, SEEDContrast, CausalMM, DoLa)}
    assert eval(repr(iv), ns) == iv                              # the repr is the constructor call


def test_params_are_validated_in_init():
    cases = [
        (lambda: ADHH([]), ValueError, "empty"),
        (lambda: ADHH([(0, 0)], tau=1.5), ValueError, "tau"),
        (lambda: ADHH([(0, 0), (0, 0)]), ValueError, "twice"),
        (lambda: ADHH([(0, 0)], renormalize="false"), TypeError, "renormalize"),
        (lambda: ADHH("0:1"), ValueError, "heads"),
        (lambda: Reweight([(0, 0)], keys="audio"), ValueError, "keys"),
        (lambda: Reweight([(0, 0)], alpha=-1), ValueError, "alpha"),
        (lambda: VCD(strength=-1.0), ValueError, "strength"),
        (lambda: VCD(cutoff=1.5), ValueError, "cutoff"),
        (lambda: VCD(noise_step=1000), ValueError, "noise_step"),
        (lambda: VCD(seed=0.5), TypeError, "seed"),
        (lambda: SEEDContrast(a=2.0), ValueError, "a must"),
        (lambda: CausalMM(vision_mode="pixels"), ValueError, "vision_mode"),
        (lambda: CausalMM(llm="backwards"), ValueError, "llm"),
        (lambda: CausalMM(llm_layers=[]), ValueError, "llm_layers"),
        (lambda: DoLa(candidate_layers="0,1"), TypeError, "candidate_layers"),
        (lambda: DoLa(strength=float("nan")), ValueError, "strength"),
    ]
    for make, exc, match in cases:
        with pytest.raises(exc, match=match):
            make()
    v = VCD().set_params(strength=0.5)
    assert v.strength == 0.5
    with pytest.raises(ValueError, match="no parameter"):
        v.set_params(alpha=0.5)


def test_sampling_defaults_follow_the_flavour(vlm, enc):
    """Reference VCD / CausalMM sample (seeded, reproducible); their corrected flavours and the rest take the argmax."""
    from lens_halluc.generation import Sampling

    for iv in (VCD(seed=3), CausalMM(seed=3)):
        bound = iv.bind(vlm)
        assert bound.sampling == Sampling(seed=3), iv
        a = _decode(vlm, enc, iv, sampling="strategy")
        assert torch.equal(a, _decode(vlm, enc, iv, sampling="strategy"))  # same seed, same tokens
        assert torch.equal(a, _decode(vlm, enc, iv, sampling=Sampling(seed=3)))  # what "strategy" stands for
        assert type(iv)(seed=3, flavour="corrected").bind(vlm).sampling is None
    for iv in (ADHH(HEADS), Reweight(HEADS), DoLa(), SEEDContrast(), HeadAblation(HEADS)):
        assert iv.bind(vlm).sampling is None, iv


def test_one_set_of_names_across_the_contrastive_family():
    for cls in (VCD, SEEDContrast, CausalMM, DoLa):
        assert {"strength", "cutoff"} <= set(cls.param_names()), cls
        assert "Example" in cls.__doc__
    for cls in (HeadAblation, ADHH, Reweight):
        assert cls.param_names()[0] == "heads" and "Example" in cls.__doc__


# ---------------------------------------------------------------- the editable attention, switched by the strategy
class _Spy(DecodingStrategy):
    """Wraps a bound strategy and records the text attention implementation at every step."""

    def __init__(self, inner, vlm, fail=False):
        self.inner, self.vlm, self.fail, self.seen = inner, vlm, fail, []

    def session(self):
        return self.inner.session()

    def context(self):
        return self.inner.context()

    def branches(self):
        return self.inner.branches()

    def begin(self, inputs):
        self.inner.begin(inputs)

    def combine(self, logits, branch_logits):
        self.seen.append(text_attn_implementation(self.vlm))
        if self.fail:
            raise RuntimeError("boom")
        return self.inner.combine(logits, branch_logits)


@pytest.mark.parametrize("iv,switches", [
    (ADHH(HEADS), True), (Reweight(HEADS), True), (CausalMM(llm="reverse"), True),
    (CausalMM(vision="random", llm=None), False), (VCD(), False), (HeadAblation(HEADS), False),
], ids=repr)
def test_editable_attention_is_switched_on_and_restored_by_itself(vlm, enc, iv, switches):
    before = text_attn_implementation(vlm)
    assert before != "lens_halluc" and iv.needs_editable_attention is switches
    spy = _Spy(iv.bind(vlm), vlm)
    greedy_decode(vlm.model, enc, max_new_tokens=3, strategy=spy)
    assert spy.seen and set(spy.seen) == ({"lens_halluc"} if switches else {before})
    assert text_attn_implementation(vlm) == before
    # restored even when the decode fails half-way
    with pytest.raises(RuntimeError, match="boom"):
        greedy_decode(vlm.model, enc, max_new_tokens=3, strategy=_Spy(iv.bind(vlm), vlm, fail=True))
    assert text_attn_implementation(vlm) == before


# ---------------------------------------------------------------- plain model.generate()
@pytest.mark.parametrize("tau", [0.45, 0.0])
def test_adhh_under_plain_generate_equals_our_loop(vlm, enc, all_heads, tau):
    iv = ADHH(all_heads if tau == 0.0 else HEADS, tau=tau)
    n = 12
    ours = greedy_decode(vlm.model, enc, max_new_tokens=n, strategy=iv.bind(vlm), eos_token_ids=vlm.spec.eos_token_ids)
    bound = iv.bind(vlm)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with bound.session(), bound.context():
            gen = vlm.model.generate(**enc, max_new_tokens=n, do_sample=False, num_beams=1)
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]
    new = gen[:, enc["input_ids"].shape[1]:]
    for row in range(new.shape[0]):
        assert ours.tokens(row) == new[row, : ours.lengths[row]].tolist(), row
    if tau == 0.0:  # the edit really acted under generate(): plain generate differs
        plain = vlm.model.generate(**enc, max_new_tokens=n, do_sample=False, num_beams=1)
        assert not torch.equal(plain, gen)


def test_decoding_raises_no_future_warning(vlm, enc):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _decode(vlm, enc, CausalMM(vision="random"), n=3)
    assert not [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))], \
        [str(w.message) for w in caught]


# ---------------------------------------------------------------- compat: the cache keyword in one place
def test_compat_cache_keyword_and_fields(vlm, enc):
    from transformers import DynamicCache

    kw = cache_keyword(vlm.model)
    assert kw in ("cache", "past_key_values")
    assert cache_keyword(vlm.spec.layers(vlm.model)[0]) == kw
    empty = DynamicCache()
    for name in ("cache", "past_key_values"):
        assert cache_from_kwargs({name: empty, "input_ids": None}) is empty  # an empty cache is falsy: not lost
    assert cache_from_kwargs({"input_ids": None}) is None
    cache = DynamicCache()
    with torch.no_grad():
        out = vlm.model(**enc, **cache_kwargs(vlm.model, cache), use_cache=True)
    assert cache_from_output(out) is cache and cache.get_seq_length() == enc["input_ids"].shape[1]


# ---------------------------------------------------------------- the registry reads the classes
def test_registry_options_come_from_the_class():
    for name, m in registry.METHODS.items():
        cls = m.load()
        if cls is None:
            assert name == "greedy" and m.options == ()
            continue
        objects = {k for k, d in cls.options.items() if d.kind == "object"}  # live objects: no CLI option
        params = [p for p in cls.param_names() if p != "heads" and p not in objects]
        assert [o.name for o in m.options] == params, name
        defaults = {k: v for k, v in cls.defaults().items() if k != "heads" and k not in objects}
        assert {o.name: o.default for o in m.options} == defaults, name
        assert registry.resolve_options(name) == defaults, name
        assert m.needs_heads == ("heads" in cls.param_names()), name
        for o in m.options:
            assert o.help and o.kind == cls.options[o.name].kind and o.aliases == cls.options[o.name].aliases
        built = registry.build_intervention(name, heads=HEADS if m.needs_heads else None)
        assert type(built) is cls and built == (cls(HEADS) if m.needs_heads else cls())


def test_cli_aliases_keep_todays_flags():
    flags = {name: {f for o in registry.method_options(name) for f in o.flags} for name in registry.METHODS}
    assert {"--strength", "--alpha", "--cutoff", "--beta", "--noise-step", "--seed"} <= flags["vcd"]
    assert {"--strength", "--beta", "--cutoff", "--a", "--seed"} <= flags["seed"]
    assert {"--strength", "--gamma", "--cutoff", "--epsilon", "--vision", "--llm", "--llm-layers"} <= flags["causalmm"]
    assert {"--strength", "--cutoff", "--beta", "--candidate-layers"} <= flags["dola"]
    assert {"--alpha", "--keys", "--key-group", "--renormalize"} <= flags["reweight"]
    assert registry.resolve_options("causalmm", gamma=0.5, epsilon=0.2, llm="none",
                                    vision="random")["strength"] == 0.5
    assert registry.resolve_options("dola", beta=0.3)["cutoff"] == 0.3


class _Tuned(ADHH):
    """ADHH with another default, registered on the fly: the registry must follow the class."""

    name = "adhh_tuned"
    options = {**ADHH.options, "tau": Param("float", "text-attention threshold", aliases=("--threshold",))}

    def __init__(self, heads, tau: float = 0.25, renormalize: bool = True):
        super().__init__(heads, tau, renormalize)


def test_registry_follows_a_changed_default(monkeypatch, vlm):
    monkeypatch.setitem(registry.METHODS, "adhh_tuned", registry.Method("adhh_tuned", f"{__name__}:_Tuned", "test"))
    assert registry.resolve_options("adhh_tuned") == {"tau": 0.25, "renormalize": True}
    assert registry.resolve_options("adhh_tuned", threshold=0.5)["tau"] == 0.5
    assert registry.needs_editable_attention("adhh_tuned")
    strat = registry.build_strategy("adhh_tuned", vlm, HEADS)
    assert strat.edit.tau == 0.25 and strat.edit.renormalize is True
    ctrl = registry.control_strategies("adhh_tuned", vlm, HEADS, draws=2, seed=0)
    assert [d for d, _, _ in ctrl] == [0, 1] and all(not set(hs) & set(HEADS) for _, hs, _ in ctrl)
    assert isinstance(ctrl[0][2].intervention, Intervention)
