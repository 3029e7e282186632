"""Exact batched head attribution equals the naive per-head loop; AtP equals gradient × delta.

All on tiny random LLaVA models, float32, CPU. Targets deliberately include positions where a
leaky copy mask would change the answer: a system-prompt position, an image position, the first
text token after the image, the first and last caption tokens, and neighbouring targets (whose
copies share chunks and differ only by one visible position).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lens_halluc.attribution import (
    MaskNotHonouredError, atp_influences, exact_influences, head_means, influences, naive_influences,
)
from lens_halluc.attribution import exact as exact_mod
from lens_halluc.models import load_vlm
from lens_halluc.models.compat import cache_from_kwargs
from lens_halluc.models.tiny import save_tiny_llava

ATOL = 1e-5


def _case(vlm, seed=0, n_caption=10):
    """Random image + prompt + random caption; targets covering every kind of position."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))
    enc = vlm.encode([image], ["Please describe this image in detail."])
    special = {vlm.spec.image_token_id, *vlm.tokenizer.all_special_ids}
    words = [i for i in range(len(vlm.tokenizer)) if i not in special]
    caption = torch.tensor(rng.choice(words, n_caption))
    ids = torch.cat([enc["input_ids"][0], caption])
    T0, T = enc["input_ids"].shape[1], len(ids)
    is_image = (ids == vlm.spec.image_token_id).nonzero().flatten()
    targets = [1, 3, int(is_image[5]), int(is_image[-1]) + 1, T0, T0 + 1, T0 + 4, T0 + 5, T - 1]
    return ids, enc["pixel_values"], sorted(set(targets)), T0


def _means(vlm, seed=1):
    """Head means over the caption positions of two other random captions (exercises head_means)."""
    seqs, masks = [], []
    for s in (seed, seed + 10):
        ids, pix, _, T0 = _case(vlm, seed=s)
        seqs.append({"input_ids": ids[None], "pixel_values": pix})
        masks.append(torch.arange(len(ids)) >= T0)
    return head_means(vlm, seqs, masks)


@pytest.fixture(scope="module")
def case(tiny_vlm):
    return _case(tiny_vlm)


@pytest.fixture(scope="module")
def means(tiny_vlm):
    return _means(tiny_vlm)


@pytest.fixture(scope="module")
def tiny3_dir(tmp_path_factory):
    """3 layers × 4 heads, 2 kv heads (GQA)."""
    return save_tiny_llava(tmp_path_factory.mktemp("tiny3"), seed=3, n_layers=3, n_heads=4, n_kv_heads=2)


@pytest.fixture(scope="module")
def vlm3(tiny3_dir):
    """The 3-layer model with the text tower on sdpa (the 2-layer fixture is eager)."""
    return load_vlm(tiny3_dir, attn_implementation="sdpa")


def _compare(vlm, case, means, scope, ablation, metric, **opts):
    ids, pix, targets, _ = case
    m = means if ablation == "mean" else None
    ref = naive_influences(vlm, ids, pix, targets, scope=scope, ablation=ablation, metric=metric, means=m)
    got = exact_influences(vlm, ids, pix, targets, scope=scope, ablation=ablation, metric=metric, means=m, **opts)
    assert got.influence.shape == (len(targets), vlm.spec.n_layers, vlm.spec.n_heads)
    torch.testing.assert_close(got.influence, ref.influence, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.ablated, ref.ablated, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.clean, ref.clean, atol=ATOL, rtol=0)
    assert got.control_gap < 1e-4
    # the comparison is not vacuous: ablations move the target probabilities
    assert float(ref.influence.abs().max()) > 1e-3
    return ref, got


@pytest.mark.parametrize("metric", ["prob_diff", "abs_prob_diff", "log_prob_diff"])
@pytest.mark.parametrize("ablation", ["zero", "mean"])
@pytest.mark.parametrize("scope", ["local", "global"])
def test_exact_equals_naive(tiny_vlm, case, means, scope, ablation, metric):
    # chunk 5 < 1 + 8 copies per target: a target's heads are split across chunks
    _compare(tiny_vlm, case, means, scope, ablation, metric, chunk_size=5, row_chunk=2)


@pytest.mark.parametrize("chunk_size", [1, 7, 9, 4096])
def test_exact_local_any_chunking(tiny_vlm, case, means, chunk_size):
    _compare(tiny_vlm, case, means, "local", "mean", "log_prob_diff", chunk_size=chunk_size)


@pytest.mark.parametrize("ablation", ["zero", "mean"])
@pytest.mark.parametrize("scope", ["local", "global"])
def test_exact_equals_naive_three_layers_sdpa(vlm3, scope, ablation):
    assert exact_mod.attn_implementation(vlm3) == "sdpa"  # the boolean 4-D mask path
    _compare(vlm3, _case(vlm3, seed=5), _means(vlm3), scope, ablation, "prob_diff", chunk_size=11, row_chunk=3)


def test_three_layers_eager_matches_sdpa(tiny3_dir, vlm3):
    eager, sdpa = load_vlm(tiny3_dir, attn_implementation="eager"), vlm3
    ids, pix, targets, _ = _case(eager, seed=5)
    a = exact_influences(eager, ids, pix, targets, chunk_size=6)
    b = exact_influences(sdpa, ids, pix, targets, chunk_size=6)
    torch.testing.assert_close(a.influence, b.influence, atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def vlm_gqa(tmp_path_factory):
    """3 layers × 8 heads sharing 2 kv heads (groups of 4)."""
    d = save_tiny_llava(tmp_path_factory.mktemp("tiny-gqa"), seed=4, n_layers=3, n_heads=8, n_kv_heads=2)
    return load_vlm(d)


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_exact_local_gqa(vlm_gqa, ablation):
    spec = vlm_gqa.spec
    assert spec.n_kv_heads < spec.n_heads  # the cache (and the replayed prefix) holds kv heads only
    _compare(vlm_gqa, _case(vlm_gqa, seed=6), _means(vlm_gqa), "local", ablation, "log_prob_diff", chunk_size=4096)


class _RowSpy:
    """Rows per replayed decoder-layer call (the layers called with the prefix stand-in)."""

    def __init__(self, vlm):
        self.rows = []
        self.layers = vlm.spec.layers(vlm.model)

    def __enter__(self):
        def pre(mod, args, kw):
            if isinstance(cache_from_kwargs(kw), exact_mod._PrefixKV):  # under either cache keyword
                self.rows.append((mod.self_attn.layer_idx, args[0].shape[1]))
        self.handles = [layer.register_forward_pre_hook(pre, with_kwargs=True) for layer in self.layers]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("chunk_size", [2, 3, 5])
def test_exact_local_chunk_smaller_than_one_layer(vlm_gqa, chunk_size):
    """chunk_size below the 8 heads (+ control) of one layer: a layer's heads span several chunks."""
    case = _case(vlm_gqa, seed=6)
    with _RowSpy(vlm_gqa) as spy:
        _compare(vlm_gqa, case, None, "local", "zero", "prob_diff", chunk_size=chunk_size)
    assert max(r for _, r in spy.rows) == chunk_size


def test_exact_local_is_staggered(vlm_gqa):
    """Ablated rows of layer l skip layers < l: about half the copy-layers of whole-tower copies."""
    spec, (ids, pix, targets, _) = vlm_gqa.spec, _case(vlm_gqa, seed=6)
    L, H, n = spec.n_layers, spec.n_heads, len(targets)
    with _RowSpy(vlm_gqa) as spy:
        exact_influences(vlm_gqa, ids, pix, targets, chunk_size=4096)
    total = sum(r for _, r in spy.rows)
    # one chunk: the n control rows through every layer and the rows of layer l through l..L-1
    assert total == n * L + n * H * L * (L + 1) // 2
    # whole-tower copies: (1 + L·H)·L per target (ratio (L + 1) / 2L + O(1/H): 0.72 here, 0.52 on 32×32)
    assert total < 0.75 * n * (1 + L * H) * L
    per_layer = {k: sum(r for lay, r in spy.rows if lay == k) for k in range(L)}
    assert per_layer == {k: n + n * H * (k + 1) for k in range(L)}


def test_unreplayable_layer_is_refused(tiny_vlm, case, monkeypatch):
    """A layer whose attention does not read keys/values through the cache's update() is refused."""
    ids, pix, targets, _ = case
    monkeypatch.setattr(exact_mod._PrefixKV, "update",
                        lambda self, k, v, layer_idx, *a, **kw: (torch.cat([self.keys[layer_idx], k], -2),
                                                                 torch.cat([self.values[layer_idx], v], -2)))
    with pytest.raises(RuntimeError, match="cannot replay"):
        exact_influences(tiny_vlm, ids, pix, targets)


def test_dispatch_and_result_fields(tiny_vlm, case):
    ids, pix, targets, _ = case
    res = influences(tiny_vlm, ids[None], pix, torch.tensor(targets), method="exact")
    assert res.method == "exact" and res.scope == "local"
    assert res.targets.tolist() == targets
    assert res.target_ids.tolist() == ids[targets].tolist()
    assert res.influence.dtype == torch.float32
    torch.testing.assert_close(res.baseline, res.clean, atol=ATOL, rtol=0)


@pytest.mark.parametrize("leak", ["other_copies", "own_position", "whole_prefix"])
def test_leaky_mask_is_detected(tiny_vlm, case, monkeypatch, leak):
    """The control copies catch a mask that lets copies see what they must not."""
    real = exact_mod.copy_attention_mask

    def leaky(q, prefix_len):
        mask = real(q, prefix_len)
        if leak == "other_copies":
            mask[:, prefix_len:] = True
        elif leak == "own_position":
            mask[torch.arange(len(q)), q] = True
        else:
            mask[:, :prefix_len] = True
        return mask

    monkeypatch.setattr(exact_mod, "copy_attention_mask", leaky)
    ids, pix, targets, _ = case
    with pytest.raises(MaskNotHonouredError):
        exact_influences(tiny_vlm, ids, pix, targets, chunk_size=20)
    # and without the self-check, the equality with the naive loop would fail: the targets are
    # ones where such a leak changes the influences
    monkeypatch.setattr(exact_mod, "_check_control", lambda *a, **k: None)
    leaky_res = exact_influences(tiny_vlm, ids, pix, targets, chunk_size=20)
    ref = naive_influences(tiny_vlm, ids, pix, targets)
    assert float((leaky_res.ablated - ref.ablated).abs().max()) > 1e-3


def test_head_means_match_manual_capture(tiny_vlm):
    ids, pix, _, T0 = _case(tiny_vlm, seed=7)
    mask = torch.arange(len(ids)) >= T0
    got = head_means(tiny_vlm, [(ids, pix)], [mask.nonzero().flatten().tolist()])
    spec, acts = tiny_vlm.spec, {}
    hooks = [spec.o_proj(tiny_vlm.model, l).register_forward_pre_hook(
        lambda m, a, l=l: acts.__setitem__(l, a[0][0].clone())) for l in range(spec.n_layers)]
    with torch.no_grad():
        tiny_vlm.model(input_ids=ids[None], pixel_values=pix)
    for h in hooks:
        h.remove()
    want = torch.stack([acts[l][mask].mean(0).view(spec.n_heads, spec.head_dim) for l in range(spec.n_layers)])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_bad_inputs_raise(tiny_vlm, case):
    ids, pix, _, _ = case
    with pytest.raises(ValueError, match="1.."):
        exact_influences(tiny_vlm, ids, pix, [0])
    with pytest.raises(ValueError, match="means"):
        exact_influences(tiny_vlm, ids, pix, [5], ablation="mean")
    with pytest.raises(ValueError, match="padded"):
        padded = torch.ones_like(ids)
        padded[0] = 0
        exact_influences(tiny_vlm, ids, pix, [5], attention_mask=padded)
    with pytest.raises(ValueError, match="one sequence"):
        exact_influences(tiny_vlm, torch.stack([ids, ids]), pix, [5])


# ------------------------------------------------------------------------------------------- AtP
def _hand_atp(vlm, ids, pix, t, layer, head, scope, metric, fill):
    """-grad · (a' - a) for one head from plain autograd: the slice replaced by a leaf."""
    spec, q = vlm.spec, t - 1
    sl = spec.head_slice(head)
    store = {}

    def hook(module, args):
        x = args[0].clone()
        rows = slice(q, q + 1) if scope == "local" else slice(None)
        leaf = x[0, rows, sl].detach().clone().requires_grad_(True)
        store["leaf"] = leaf
        x[0, rows, sl] = leaf
        return (x,)

    h = spec.o_proj(vlm.model, layer).register_forward_pre_hook(hook)
    try:
        logits = vlm.model(input_ids=ids[None], pixel_values=pix).logits[0, q]
    finally:
        h.remove()
    lp = torch.log_softmax(logits, -1)[ids[t]]
    value = lp.exp() if metric == "prob_diff" else lp
    (grad,) = torch.autograd.grad(value, store["leaf"])
    leaf = store["leaf"].detach()
    return float(-(grad * (fill - leaf)).sum())


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("metric", ["prob_diff", "log_prob_diff"])
@pytest.mark.parametrize("scope", ["local", "global"])
def test_atp_equals_hand_gradient(tiny_vlm, case, means, scope, metric, batched):
    ids, pix, targets, _ = case
    sub = targets[-3:]
    est = atp_influences(tiny_vlm, ids, pix, sub, scope=scope, ablation="mean", metric=metric, means=means,
                         batched=batched, target_chunk=2)
    assert est.influence.shape == (len(sub), tiny_vlm.spec.n_layers, tiny_vlm.spec.n_heads)
    for i, t in enumerate(sub):
        for layer, head in [(0, 0), (0, 3), (1, 2)]:
            want = _hand_atp(tiny_vlm, ids, pix, t, layer, head, scope, metric, means[layer, head])
            assert est.influence[i, layer, head].item() == pytest.approx(want, rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("metric", ["prob_diff", "log_prob_diff"])
def test_atp_approximates_exact_for_tiny_ablations(tiny_vlm, case, metric):
    """Local mean ablation with mean = clean value at q + eps: AtP is exact to first order in eps.

    (Global mean ablation cannot be made small: one mean replaces every position's value.)
    """
    ids, pix, targets, _ = case
    spec, t = tiny_vlm.spec, targets[-2]
    acts = {}
    hooks = [spec.o_proj(tiny_vlm.model, l).register_forward_pre_hook(
        lambda m, a, l=l: acts.__setitem__(l, a[0][0].clone())) for l in range(spec.n_layers)]
    with torch.no_grad():
        tiny_vlm.model(input_ids=ids[None], pixel_values=pix)
    for h in hooks:
        h.remove()
    clean_q = torch.stack([acts[l][t - 1].view(spec.n_heads, spec.head_dim) for l in range(spec.n_layers)])
    step = torch.randn(clean_q.shape, generator=torch.Generator().manual_seed(0))
    errors = []
    for eps in (1e-2, 1e-3):
        kw = dict(scope="local", ablation="mean", metric=metric, means=clean_q + eps * step)
        exact = exact_influences(tiny_vlm, ids, pix, [t], **kw).influence
        est = atp_influences(tiny_vlm, ids, pix, [t], **kw).influence
        scale = float(exact.abs().max())
        assert 0 < scale < 0.5  # a small but measurable ablation (this model's logits are sharp)
        errors.append(float((est - exact).abs().max()) / scale)
    assert errors[1] < 0.02  # relative error of the estimate, O(eps)
    assert errors[1] < errors[0] / 3  # and it shrinks with eps (first-order agreement)
