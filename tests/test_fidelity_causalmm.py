"""CausalMM against its released LLaVA code (The-Martyr/CausalMM): the vision counterfactual of the
reference flavour (edited attention map → bilinear resize → head mean → × patch features), the
contrast and cut-off, the flavours' defaults and token choice, seeding, and the refusal of a vision
tower that is not CLIP-like. Each is compared with a plain re-statement written here from
``llava/model/multimodal_encoder/cf_encoder.py``, ``llava/model/llava_arch_cf.py``,
``causalmm_cf/causalmm_sm.py`` / ``causalmm_mm.py`` and ``scripts/llava1.5_eval.bash``."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from lens_halluc.generation.decoding import greedy_decode
from lens_halluc.generation.sampling import Sampling
from lens_halluc.hooks import InterventionNotAppliedError
from lens_halluc.interventions import CausalMM
from lens_halluc.interventions.causalmm import (
    check_feature_counterfactual, patch_weights, vision_attention_module, vision_counterfactual_map,
    vision_feature_counterfactual,
)

KINDS = ("random", "uniform", "reversed", "shuffle")


# ---------------------------------------------------------------- the reference, restated
def reference_edit(maps, method, seed):
    """cf_encoder.edit_attention on [B, H, N, N]; its random numbers come from our seeded CPU generator
    (random: one [1, H, N, N] draw shared by the batch; shuffle: randperm(N·N) for head 0, 1, ... in turn)."""
    b, h, n, _ = maps.shape
    g = torch.Generator().manual_seed(seed)
    out = torch.empty_like(maps)
    if method == "random":
        draw = torch.rand((1, h, n, n), generator=g)
        for i in range(b):
            out[i] = draw[0] * 2
    elif method == "uniform":
        for i in range(b):
            for k in range(h):
                out[i, k] = maps[i, k].mean()
    elif method == "reversed":
        for i in range(b):
            for k in range(h):
                out[i, k] = maps[i, k].max() - maps[i, k]
    else:  # shuffle: entry j of the flattened map takes entry perm[j], the same perm for every image
        for k in range(h):
            perm = torch.randperm(n * n, generator=g)
            for i in range(b):
                out[i, k] = maps[i, k].reshape(-1)[perm].reshape(n, n)
    return out


def bilinear(img, size):
    """[N, M] → [size, size] bilinear, align_corners=False, as F.interpolate(mode='bilinear') (half-pixel centres,
    source index clamped at 0, no antialiasing), written out by hand; source positions in float32 as torch's kernel."""
    n, m = img.shape
    f32 = np.float32

    def taps(i, in_size):
        src = max(f32(in_size) / f32(size) * (f32(i) + f32(0.5)) - f32(0.5), f32(0.0))
        lo = int(math.floor(src))
        hi = min(lo + 1, in_size - 1)
        return lo, hi, float(f32(src) - f32(lo))

    out = torch.empty(size, size)
    for i in range(size):
        y0, y1, wy = taps(i, n)
        for j in range(size):
            x0, x1, wx = taps(j, m)
            top = (1 - wx) * img[y0, x0] + wx * img[y0, x1]
            bottom = (1 - wx) * img[y1, x0] + wx * img[y1, x1]
            out[i, j] = (1 - wy) * top + wy * bottom
    return out


def reference_apply(features, edited):
    """cf_encoder.apply_attention: resize to √P × √P, mean over heads, flatten row-major, multiply the features."""
    b, p, _ = features.shape
    side = int(math.sqrt(p))
    weights = torch.stack([torch.stack([bilinear(edited[i, k], side) for k in range(edited.shape[1])]).mean(0)
                           for i in range(b)])
    return features * weights.reshape(b, side * side, 1)


def reference_scores(logits, cfs, gamma, epsilon):
    """causalmm_sm.py (one counterfactual) / causalmm_mm.py (two)."""
    cutoff = torch.log(torch.tensor(epsilon)) + logits.max(dim=-1, keepdim=True).values
    if len(cfs) == 1:
        diffs = (1 + gamma) * logits - gamma * cfs[0]
    else:
        diffs = (1 + 2 * gamma) * logits - gamma * cfs[0] - gamma * cfs[1]
    return diffs.masked_fill(logits < cutoff, -float("inf"))


def _maps(b, h, n, seed=0):
    return torch.softmax(torch.randn(b, h, n, n, generator=torch.Generator().manual_seed(seed)) * 2, -1)


# ---------------------------------------------------------------- the edit and the resize
@pytest.mark.parametrize("kind", KINDS)
def test_edit_equals_the_reference(kind):
    maps = _maps(2, 3, 10)
    assert torch.equal(vision_counterfactual_map(maps, kind, seed=3), reference_edit(maps, kind, 3))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,p", [(10, 9), (37, 36)])  # CLS + 3×3 patches; the tiny tower's CLS + 6×6
def test_feature_reweighting_equals_the_reference(kind, n, p):
    maps = _maps(2, 2, n, seed=n)
    feats = torch.randn(2, p, 5, generator=torch.Generator().manual_seed(1))
    edited = vision_counterfactual_map(maps, kind, seed=4)
    got = feats * patch_weights(edited, p).unsqueeze(-1)
    assert torch.allclose(got, reference_apply(feats, reference_edit(maps, kind, 4)), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["reversed", "shuffle"])
def test_llava_size_577_to_24(kind):
    maps = _maps(1, 2, 577, seed=5)  # LLaVA-1.5: CLS + 24×24 patches, resized 577×577 → 24×24
    w = patch_weights(vision_counterfactual_map(maps, kind, seed=0), 576)
    want = reference_apply(torch.ones(1, 576, 1), reference_edit(maps, kind, 0))[..., 0]
    assert w.shape == (1, 576) and torch.allclose(w, want, atol=1e-9, rtol=1e-5)


def test_non_square_patch_grid_is_refused():
    with pytest.raises(ValueError, match="square"):
        patch_weights(_maps(1, 1, 10), 10)


# ---------------------------------------------------------------- on the tiny LLaVA: CLIP unchanged, features re-weighted
@pytest.fixture(scope="module")
def enc(tiny_vlm):
    rng = np.random.default_rng(0)
    ims = [Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)) for _ in range(2)]
    return tiny_vlm.encode(ims, ["describe", "is there a cat ?"])


def _clip_attention(layer, hidden):
    """CLIP's attention probabilities of ``layer`` for its input ``hidden`` (pre-LN, scaled dot product, softmax)."""
    attn = layer.self_attn
    x = layer.layer_norm1(hidden)
    b, t, d = x.shape
    heads = attn.num_heads

    def split(z):
        return z.view(b, t, heads, d // heads).transpose(1, 2)

    q, k = split(attn.q_proj(x)), split(attn.k_proj(x))
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_llava_features_are_reweighted_as_the_reference(tiny_vlm, enc, kind):
    model = tiny_vlm.model
    inner = model.model
    px = enc["pixel_values"]
    feature_layer = model.config.vision_feature_layer      # −2 (LLaVA's mm_vision_select_layer)
    idx, _ = vision_attention_module(model, -1)
    with torch.no_grad():
        plain = inner.get_image_features(pixel_values=px, vision_feature_layer=feature_layer,
                                         vision_feature_select_strategy="default", output_hidden_states=True)
        hs = plain.hidden_states
        tower = inner.vision_tower
        layers = getattr(tower, "vision_model", tower).encoder.layers
        # attentions[select_layer]: the attention of the layer whose output is hidden_states[select_layer]
        assert idx == len(layers) + feature_layer
        maps = _clip_attention(layers[idx], hs[idx])
        feats = hs[feature_layer][:, 1:]                     # feature_select: CLS dropped
        want = inner.multi_modal_projector(reference_apply(feats, reference_edit(maps, kind, 2)))
        with vision_feature_counterfactual(model, kind, -1, seed=2):
            got = inner.get_image_features(pixel_values=px, vision_feature_layer=feature_layer,
                                           vision_feature_select_strategy="default", output_hidden_states=True)
    assert torch.allclose(torch.stack(list(got.pooler_output)), want, atol=1e-5)
    # CLIP itself ran unchanged: every hidden state is the plain one
    assert all(torch.equal(a, b) for a, b in zip(got.hidden_states, hs))


def test_tiny_llava_reweighting_does_not_depend_on_the_batch(tiny_vlm, enc):
    inner = tiny_vlm.model.model
    px = enc["pixel_values"]
    for kind in ("random", "shuffle"):
        with torch.no_grad():
            with vision_feature_counterfactual(tiny_vlm.model, kind, seed=1):
                both = torch.stack(list(inner.get_image_features(pixel_values=px).pooler_output))
            with vision_feature_counterfactual(tiny_vlm.model, kind, seed=1):
                second = torch.stack(list(inner.get_image_features(pixel_values=px[1:]).pooler_output))
            with vision_feature_counterfactual(tiny_vlm.model, kind, seed=2):
                other = torch.stack(list(inner.get_image_features(pixel_values=px).pooler_output))
        assert torch.allclose(both[1:], second, atol=1e-6), kind   # same seed, same map, whatever the batch
        assert not torch.allclose(both, other, atol=1e-4), kind     # another seed, another map


def test_reference_flavour_decodes_through_the_feature_counterfactual(tiny_vlm, enc):
    s = CausalMM(sample=False).bind(tiny_vlm)
    assert s.vision_mode == "features" and s.vision == "shuffle"
    greedy_decode(tiny_vlm.model, enc, max_new_tokens=3, strategy=s)
    assert len(s.vision_calls) == 1  # re-weighted once, at the counterfactual branch's prefill
    with pytest.raises(InterventionNotAppliedError):
        with vision_feature_counterfactual(tiny_vlm.model, "shuffle"):
            pass  # no image encoded: the edit would silently do nothing


# ---------------------------------------------------------------- contrast and cut-off
@pytest.mark.parametrize("gamma,epsilon", [(1.0, 0.6), (0.5, 0.1), (2.0, 0.3)])
def test_scores_equal_the_reference(tiny_vlm, gamma, epsilon):
    g = torch.Generator().manual_seed(int(gamma * 7 + epsilon * 10))
    l, v, t = (torch.randn(3, 40, generator=g) * 2 + 1 for _ in range(3))
    one = CausalMM(strength=gamma, cutoff=epsilon).bind(tiny_vlm)
    assert torch.equal(one.combine(l, {"cf_vision": v}), reference_scores(l, [v], gamma, epsilon))
    both = CausalMM(strength=gamma, cutoff=epsilon, vision="shuffle", llm="reverse").bind(tiny_vlm)
    assert torch.equal(both.combine(l, {"cf_vision": v, "cf_llm": t}), reference_scores(l, [v, t], gamma, epsilon))
    assert torch.isinf(one.combine(l, {"cf_vision": v})).any()


# ---------------------------------------------------------------- flavours: defaults and token choice
def test_reference_flavour_is_the_released_script(tiny_vlm):
    c = CausalMM()
    # scripts/llava1.5_eval.bash: gamma=1.0, epsilon=0.6; cf_encoder.forward: edit_attention(method='shuffle')
    assert (c.strength, c.cutoff, c.vision, c.vision_mode, c.llm, c.vision_layer) == (1.0, 0.6, "shuffle", "features", None, -1)
    s = c.bind(tiny_vlm)
    assert c.sample is True and s.sampling == Sampling(temperature=1.0, top_k=None, top_p=None, seed=0)
    assert CausalMM(seed=5).bind(tiny_vlm).sampling == Sampling(seed=5)
    assert not c.needs_editable_attention and [b.name for b in s.branches()] == ["cf_vision"]


def test_corrected_flavour_is_the_previous_default(tiny_vlm):
    c = CausalMM(flavour="corrected")
    assert (c.strength, c.cutoff, c.vision, c.llm, c.vision_mode, c.sample) == (1.0, 0.1, None, "reverse", "attention", False)
    s = c.bind(tiny_vlm)
    assert s.sampling is None and c.needs_editable_attention and [b.name for b in s.branches()] == ["cf_llm"]
    assert CausalMM(flavour="corrected", vision="random").vision_mode == "attention"


def test_explicit_values_win_and_a_named_counterfactual_stands_alone():
    assert (CausalMM(llm="reverse").vision, CausalMM(llm="reverse").llm) == (None, "reverse")
    assert (CausalMM(flavour="corrected", vision="uniform").llm) is None
    assert CausalMM(sample=False).sample is False and CausalMM(cutoff=0.0).cutoff == 0.0
    assert CausalMM.needs_editable({"llm": "reverse"}) and not CausalMM.needs_editable({})
    assert CausalMM.needs_editable({"flavour": "corrected"})
    for c in (CausalMM(), CausalMM(llm="reverse"), CausalMM(flavour="corrected", vision="random", sample=True)):
        assert CausalMM(**c.get_params()) == c and eval(repr(c), {"CausalMM": CausalMM}) == c
    with pytest.raises(ValueError, match="vision_mode"):
        CausalMM(vision_mode="pixels")


# ---------------------------------------------------------------- towers that are not CLIP-like
class _FusedQKV(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(4, 12)


def _fake_vlm(attn: nn.Module | None):
    layer = nn.Module()
    layer.self_attn = attn
    vision_model = nn.Module()
    vision_model.encoder = nn.Module()
    vision_model.encoder.layers = nn.ModuleList([layer, layer])
    tower = nn.Module()
    tower.vision_model = vision_model
    model = nn.Module()
    model.model = nn.Module()
    model.model.vision_tower = tower
    model.config = SimpleNamespace(vision_feature_layer=-1, vision_feature_select_strategy="default")
    return SimpleNamespace(model=model, spec=None)


def test_a_tower_that_is_not_clip_like_is_refused_clearly():
    fake = _fake_vlm(_FusedQKV())
    for vision_mode in ("features", "attention"):
        with pytest.raises(ValueError, match="CLIP-like") as e:
            CausalMM(vision="shuffle", vision_mode=vision_mode).bind(fake)
        assert "q_proj" in str(e.value) and "vision=None with llm='reverse'" in str(e.value)
    no_tower = SimpleNamespace(model=nn.Linear(2, 2), spec=None)
    no_tower.model.config = SimpleNamespace()
    with pytest.raises(ValueError, match="no vision_tower.*llm='reverse'"):
        CausalMM().bind(no_tower)


def test_kept_cls_feature_is_refused_in_features_mode(tiny_vlm, monkeypatch):
    monkeypatch.setattr(tiny_vlm.model.config, "vision_feature_select_strategy", "full")
    with pytest.raises(ValueError, match="vision_mode='attention'"):
        check_feature_counterfactual(tiny_vlm.model)
    CausalMM(vision="shuffle", vision_mode="attention").bind(tiny_vlm)  # the corrected mechanism still works
