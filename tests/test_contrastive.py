"""Contrastive decoding (VCD, SEED, CausalMM, DoLa): strength 0 is greedy, the helpers match hand numbers,
every branch has its own KV cache, and the interventions really act."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from lens_halluc.generation.decoding import Branch, DecodingStrategy, greedy_decode
from lens_halluc.hooks import InterventionNotAppliedError
from lens_halluc.hooks.attention import editable_attention, text_attn_implementation
from lens_halluc.interventions import VCD, CausalMM, DoLa, SEEDContrast
from lens_halluc.interventions.causalmm import (
    vision_attention_module, vision_counterfactual, vision_counterfactual_weights,
)
from lens_halluc.interventions.contrastive import apply_plausibility, contrast, plausibility_mask
from lens_halluc.interventions.dola import jensen_shannon
from lens_halluc.interventions.vcd import diffusion_alpha_bar

PROMPTS = ["Please describe this image in detail.", "is there a cat ?", "describe the image ."]
N_NEW = 10


@pytest.fixture(scope="module")
def vlm(tiny_llava_dir):
    """A private copy of the tiny LLaVA (some tests switch its attention implementation)."""
    from lens_halluc.models import load_vlm

    return load_vlm(tiny_llava_dir)


@pytest.fixture(scope="module")
def enc(vlm):
    rng = np.random.default_rng(0)
    ims = [Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)) for _ in PROMPTS]
    e = vlm.encode(ims, PROMPTS)
    assert (e["attention_mask"] == 0).any()  # really left-padded
    return e


def _decode(vlm, enc, strategy=None, n=N_NEW):
    # eos_token_ids left empty: every row generates n tokens, so more positions are compared.
    if strategy is not None and not isinstance(strategy, DecodingStrategy):
        strategy = strategy.bind(vlm)
    return greedy_decode(vlm.model, enc, max_new_tokens=n, strategy=strategy).sequences


@pytest.fixture(scope="module")
def greedy(vlm, enc):
    return _decode(vlm, enc)


# ---------------------------------------------------------------- helpers on hand logits
def test_plausibility_mask_hand_logits():
    p = torch.tensor([[0.5, 0.3, 0.04, 0.16], [0.05, 0.9, 0.01, 0.04]])
    logits = torch.log(p) + 3.0  # an arbitrary shift: raw logits, not normalised
    got = plausibility_mask(logits, 0.1)
    want = p < 0.1 * p.max(-1, keepdim=True).values   # 0.04 < 0.05 ; 0.05,0.01,0.04 < 0.09
    assert got.tolist() == want.tolist() == [[False, False, True, False], [True, False, True, True]]
    assert not plausibility_mask(logits, None).any() and not plausibility_mask(logits, 0.0).any()
    assert plausibility_mask(logits, 1.0).sum(-1).tolist() == [3, 3]
    scores = apply_plausibility(torch.zeros_like(logits), logits, 0.1)
    assert torch.isinf(scores[got]).all() and (scores[~got] == 0).all()
    with pytest.raises(ValueError):
        plausibility_mask(logits, 1.5)


def test_contrast_hand_logits():
    l = torch.tensor([[2.0, 1.0, -1.0]])
    a = torch.tensor([[1.0, 3.0, 0.0]])
    b = torch.tensor([[0.0, 1.0, 2.0]])
    assert contrast(l, a, 0.5).tolist() == [[1.5 * 2 - 0.5 * 1, 1.5 * 1 - 0.5 * 3, 1.5 * -1 - 0]]
    g = 2.0  # (1+2γ)·l − γ·a − γ·b
    assert torch.allclose(contrast(l, [a, b], g), (1 + 2 * g) * l - g * a - g * b)
    assert contrast(l, a, 0.0) is l


def test_jsd_and_alpha_bar():
    p = torch.log_softmax(torch.tensor([1.0, 2.0, 3.0]), -1)
    assert jensen_shannon(p, p).abs() < 1e-6
    q = torch.log(torch.tensor([1.0, 1e-30, 1e-30]))
    assert 0 < float(jensen_shannon(p, torch.log_softmax(q, -1))) <= math.log(2) + 1e-6
    betas = torch.sigmoid(torch.linspace(-6, 6, 1000, dtype=torch.float64)) * (5e-3 - 1e-5) + 1e-5
    # computed in float32 as the reference (tests/test_fidelity_vcd.py pins it bit for bit): within 1e-5 of float64
    assert diffusion_alpha_bar(500) == pytest.approx(float(torch.prod(1 - betas[:501])), rel=1e-5)
    assert 0 < diffusion_alpha_bar(999) < diffusion_alpha_bar(500) < diffusion_alpha_bar(0) < 1


# ---------------------------------------------------------------- strength 0 = greedy (argmax flavours)
# The reference flavours of VCD and CausalMM sample (tests/test_fidelity_*.py); with the argmax
# (flavour="corrected", or sample=False) strength 0 is greedy token for token.
@pytest.mark.parametrize("make", [
    lambda: VCD(strength=0.0, flavour="corrected"),
    lambda: VCD(strength=0.0, sample=False),
    lambda: SEEDContrast(strength=0.0),
    lambda: CausalMM(strength=0.0, vision="random", llm=None, flavour="corrected"),
    lambda: CausalMM(strength=0.0, vision="random", llm=None, sample=False),   # reference feature re-weighting
    lambda: CausalMM(strength=0.0, sample=False),                              # reference default (cut-off 0.6)
    lambda: DoLa(strength=0.0),
], ids=["vcd_corrected", "vcd_argmax", "seed", "causalmm_vision_corrected", "causalmm_vision_features", "causalmm_reference_argmax",
        "dola"])
def test_zero_strength_is_greedy(vlm, enc, greedy, make):
    assert torch.equal(_decode(vlm, enc, make()), greedy)


def test_zero_strength_causalmm_llm_is_greedy(vlm, enc, greedy):
    # the bound strategy switches to the editable attention by itself (and back)
    out = _decode(vlm, enc, CausalMM(strength=0.0, flavour="corrected"))   # the corrected default: llm="reverse"
    assert torch.equal(out, greedy)
    assert text_attn_implementation(vlm) != "lens_halluc"


# ---------------------------------------------------------------- strong settings act
@pytest.mark.parametrize("make", [
    lambda: VCD(strength=5.0, cutoff=None, noise_step=999, flavour="corrected"),
    lambda: SEEDContrast(strength=5.0, a=0.0, cutoff=None),
    lambda: CausalMM(strength=5.0, cutoff=0.0, vision="uniform", llm=None, flavour="corrected"),
    lambda: CausalMM(strength=5.0, cutoff=0.0, vision="uniform", llm=None, sample=False),   # reference re-weighting
    lambda: DoLa(cutoff=None, strength=None),
], ids=["vcd", "seed", "causalmm_vision_attention", "causalmm_vision_features", "dola"])
def test_strong_setting_changes_output(vlm, enc, greedy, make):
    assert not torch.equal(_decode(vlm, enc, make()), greedy)


def test_strong_causalmm_llm_and_both_change_output(vlm, enc, greedy):
    with editable_attention(vlm):
        llm = _decode(vlm, enc, CausalMM(strength=5.0, cutoff=0.0, llm="uniform", flavour="corrected"))
        both = _decode(vlm, enc, CausalMM(strength=5.0, cutoff=0.0, vision="uniform", llm="uniform",
                                          llm_layers=[1], llm_heads=[0, 1], flavour="corrected"))
    assert not torch.equal(llm, greedy)
    assert not torch.equal(both, greedy)


# ---------------------------------------------------------------- noise determinism
@pytest.mark.parametrize("cls", [VCD, SEEDContrast])
def test_noise_is_deterministic_given_seed(vlm, enc, cls):
    x = enc["pixel_values"]
    n1, n2, n3 = (cls(seed=s).bind(vlm).noisy_pixels(x) for s in (0, 0, 1))
    assert torch.equal(n1, n2) and not torch.equal(n1, n3) and not torch.equal(n1, x)


def test_noise_formula(vlm, enc):
    x = enc["pixel_values"]
    vcd, seed = VCD(noise_step=500, seed=3).bind(vlm), SEEDContrast(a=0.25, seed=3).bind(vlm)
    eps = (seed.noisy_pixels(x) - 0.5 * x) / math.sqrt(0.75)
    abar = diffusion_alpha_bar(500)
    assert torch.allclose(vcd.noisy_pixels(x), math.sqrt(abar) * x + math.sqrt(1 - abar) * eps, atol=1e-5)


def test_vcd_combine_formula(vlm, enc):
    s = VCD(strength=2.0, cutoff=0.1).bind(vlm)
    l = torch.tensor([[3.0, 2.9, 0.0, -5.0]])
    n = torch.tensor([[1.0, 3.0, 0.0, -9.0]])
    got = s.combine(l, {"noisy": n})
    want = 3 * l - 2 * n
    keep = ~plausibility_mask(l, 0.1)
    assert torch.equal(got[keep], want[keep]) and torch.isinf(got[~keep]).all()


# ---------------------------------------------------------------- own KV cache per branch
class _OtherImageBranch(DecodingStrategy):
    """One branch on another image; the scores are the main logits or the branch's (``use``)."""

    def __init__(self, pixels, use):
        self.pixels, self.use = pixels, use

    def branches(self):
        return [Branch("other", inputs=lambda inp: {**inp, "pixel_values": self.pixels})]

    def combine(self, logits, branch_logits):
        return logits if self.use == "main" else branch_logits["other"]


def test_each_branch_has_its_own_kv_cache(vlm, enc, greedy, monkeypatch):
    other_px = torch.flip(enc["pixel_values"], dims=[-1, -2]) * -1.0
    greedy_other = _decode(vlm, {**enc, "pixel_values": other_px})
    assert not torch.equal(greedy_other, greedy)
    # Own caches: each branch decodes exactly as if it ran alone (the other branch is invisible to it).
    assert torch.equal(_decode(vlm, enc, _OtherImageBranch(other_px, "main")), greedy)
    assert torch.equal(_decode(vlm, enc, _OtherImageBranch(other_px, "branch")), greedy_other)
    # One shared cache (the reference CausalMM) mixes the branches' keys: the same checks then fail.
    # (A copy of the main branch could not tell: attention over duplicated keys is unchanged.)
    import sys

    from transformers.cache_utils import DynamicCache

    shared, made = {}, []

    def one_cache(*a, **k):
        made.append(1)
        return shared.setdefault("c", DynamicCache())

    # greedy_decode imports DynamicCache from whatever module is sys.modules["transformers"] at call time
    monkeypatch.setattr(sys.modules["transformers"], "DynamicCache", one_cache)
    try:
        mixed_main = _decode(vlm, enc, _OtherImageBranch(other_px, "main"))
        shared.clear()
        mixed_branch = _decode(vlm, enc, _OtherImageBranch(other_px, "branch"))
    except Exception:  # a shared cache may also just break (key lengths vs mask)
        assert made, "the shared-cache simulation did not reach greedy_decode"
        return
    assert made, "the shared-cache simulation did not reach greedy_decode"
    assert not (torch.equal(mixed_main, greedy) and torch.equal(mixed_branch, greedy_other))


# ---------------------------------------------------------------- CausalMM guards and hooks
def test_causalmm_llm_switches_editable_attention_by_itself(vlm, enc, greedy):
    assert text_attn_implementation(vlm) != "lens_halluc"
    strategy = CausalMM(llm="reverse").bind(vlm)
    # outside its session (no greedy_decode around it) the LLM counterfactual refuses to start
    with pytest.raises(InterventionNotAppliedError):
        strategy.begin(dict(enc))
    seen = []
    orig = strategy.combine
    strategy.combine = lambda *a: (seen.append(text_attn_implementation(vlm)), orig(*a))[1]
    out = _decode(vlm, enc, strategy, n=2)
    assert out.shape == (len(PROMPTS), 2)
    assert seen and set(seen) == {"lens_halluc"}          # on during the decode
    assert text_attn_implementation(vlm) != "lens_halluc"  # restored afterwards


def test_vision_counterfactual_changes_features(vlm, enc):
    model = vlm.model
    idx, attn = vision_attention_module(model, -1)
    # config.vision_feature_layer = -2 on the 2-layer tower: only layer 0 feeds the LLM
    assert idx == 0
    with pytest.raises(ValueError):
        vision_attention_module(model, 1)
    px = enc["pixel_values"]
    with torch.no_grad():
        ref = model.model.get_image_features(pixel_values=px).pooler_output
        calls: list = []
        for kind in ("random", "uniform", "reversed", "shuffle"):
            with vision_counterfactual(model, kind, -1, counter=calls):
                cf = model.model.get_image_features(pixel_values=px).pooler_output
            assert not torch.allclose(torch.stack(list(cf)), torch.stack(list(ref)), atol=1e-4), kind
        assert len(calls) == 4  # the hook fired once per forward
        with pytest.raises(InterventionNotAppliedError):
            with vision_counterfactual(model, "uniform"):
                pass  # no image encoded: the edit would silently do nothing
        # after the context the model is back to normal
        again = model.model.get_image_features(pixel_values=px).pooler_output
    assert torch.equal(torch.stack(list(again)), torch.stack(list(ref)))


def test_vision_counterfactual_weights():
    w = torch.softmax(torch.randn(2, 2, 5, 5, generator=torch.Generator().manual_seed(0)), -1)
    for kind in ("random", "uniform", "reversed", "shuffle"):
        cf = vision_counterfactual_weights(w, kind, seed=1)
        assert torch.allclose(cf.sum(-1), torch.ones(2, 2, 5)), kind
        assert torch.equal(cf, vision_counterfactual_weights(w, kind, seed=1)), kind
    assert torch.allclose(vision_counterfactual_weights(w, "uniform"), torch.full_like(w, 0.2))
    rev = w.amax(-1, keepdim=True) - w
    assert torch.allclose(vision_counterfactual_weights(w, "reversed"), rev / rev.sum(-1, keepdim=True))
    assert torch.allclose(vision_counterfactual_weights(w, "shuffle").sort(-1).values, w.sort(-1).values)


@pytest.mark.parametrize("flavour", ["reference", "corrected"])
def test_causalmm_vision_hook_fires_in_decoding(vlm, enc, flavour):
    s = CausalMM(vision="reversed", llm=None, flavour=flavour, sample=False).bind(vlm)
    assert s.vision_mode == {"reference": "features", "corrected": "attention"}[flavour]
    _decode(vlm, enc, s, n=3)
    assert len(s.vision_calls) == 1  # the counterfactual branch's prefill encoded the image once


def test_dola_picks_candidate_layers(vlm, enc):
    s = DoLa(candidate_layers=[0, 1]).bind(vlm)
    _decode(vlm, enc, s, n=2)
    assert set(s.last_premature.tolist()) <= {0, 1} and s.last_premature.shape == (len(PROMPTS),)
    with pytest.raises(ValueError, match="out of range"):
        DoLa(candidate_layers=[vlm.spec.n_layers]).bind(vlm)
    with pytest.raises(ValueError):
        DoLa(candidate_layers=[])
