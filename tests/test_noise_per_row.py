"""Per-row noise: VCD / SEED image noise and CausalMM's random vision maps are drawn per item in the runners
(from ``row_seed(seed, key)``), so a caption does not depend on the batch size or the order of the images;
a direct ``decode`` without keys draws as before (one generator for the batch)."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

import lens_halluc as lh
from lens_halluc.generation.decoding import decode
from lens_halluc.generation.sampling import Beams, row_seed
from lens_halluc.interventions import causalmm as cmm_module
from lens_halluc.interventions.vcd import image_rows, row_noise

N_NEW = 20


@pytest.fixture(scope="module")
def ds():
    return lh.organism.split("break", n=6, seed=1)


def _captions(vlm, ds, strategy, batch_size, reverse=False):
    ids = ds.image_ids[::-1] if reverse else ds.image_ids
    caps = lh.caption(vlm, ds, strategy=strategy, batch_size=batch_size, image_ids=ids, max_new_tokens=N_NEW,
                      progress=False)
    by_id = {r["image_id"]: r["caption"] for r in caps}
    return [by_id[i] for i in ds.image_ids]


DEFAULTS = {
    "vcd": lambda **k: lh.VCD(**k),                                   # reference: samples
    "vcd_corrected": lambda **k: lh.VCD(flavour="corrected", **k),
    "seed": lambda **k: lh.SEEDContrast(**k),
    "causalmm": lambda **k: lh.CausalMM(**k),                          # reference: vision="shuffle"
    "causalmm_random": lambda **k: lh.CausalMM(vision="random", llm=None, **k),
}


@pytest.mark.parametrize("name", list(DEFAULTS))
def test_captions_do_not_depend_on_batch_or_order(organism, ds, name):
    make = DEFAULTS[name]
    one = _captions(organism, ds, make(), 1)
    assert one == _captions(organism, ds, make(), 3)
    assert one == _captions(organism, ds, make(), 3, reverse=True)


# Strong settings whose captions on the organism do depend on the noise (checked below with another
# seed): with the old one-draw-per-batch noise, batch 1 and batch 3 gave different captions here.
STRONG = {
    "vcd_strong": lambda **k: lh.VCD(strength=3.0, cutoff=None, noise_step=999, **k),
    "seed_strong": lambda **k: lh.SEEDContrast(a=0.1, strength=3.0, cutoff=None, **k),
}


@pytest.mark.parametrize("name", list(STRONG))
def test_noise_sensitive_captions_do_not_depend_on_batch_or_order(organism, ds, name):
    make = STRONG[name]
    one = _captions(organism, ds, make(), 1)
    assert one != _captions(organism, ds, make(seed=1), 1)  # the captions really depend on the noise
    assert one == _captions(organism, ds, make(), 3)
    assert one == _captions(organism, ds, make(), 3, reverse=True)


# ---------------------------------------------------------------- the noise itself, per row
def _record_noisy(strategy):
    """Wrap a bound VCD/SEED strategy: record {key: noisy pixel row} (keys as decode passed them)."""
    seen: dict = {}
    inner = strategy._branch_inputs

    def branch_inputs(inputs):
        out = inner(inputs)
        keys = strategy.row_keys if strategy.row_keys is not None else list(range(len(out["pixel_values"])))
        for k, row in zip(keys, out["pixel_values"]):
            seen.setdefault(k, []).append(row.clone())
        return out

    strategy._branch_inputs = branch_inputs
    return seen


@pytest.mark.parametrize("make", [lambda: lh.VCD(seed=3), lambda: lh.SEEDContrast(a=0.25, seed=3)],
                         ids=["vcd", "seed"])
def test_each_image_draws_its_own_noise_from_its_key(organism, ds, make):
    strategy = make().bind(organism)
    seen = _record_noisy(strategy)
    for bs, rev in ((1, False), (3, False), (3, True), (6, False)):
        _captions(organism, ds, strategy, bs, reverse=rev)
    enc = organism.encode([Image.open(ds.image_path(i)).convert("RGB") for i in ds.image_ids],
                          ["x"] * len(ds.image_ids))
    for i, x in zip(ds.image_ids, enc["pixel_values"]):
        rows = seen[i]
        assert len(rows) == 4 and all(torch.equal(r, rows[0]) for r in rows)  # same noise in every batch
        # restated: signal·x + scale·ε, ε ~ N(0, I) of this image alone from a generator seeded row_seed(3, id)
        eps = torch.randn(x[None].shape, generator=torch.Generator().manual_seed(row_seed(3, i)))
        want = (strategy.signal * x[None].float() + strategy.noise_scale * eps).to(x.dtype)[0]
        assert torch.equal(rows[0], want)
    assert strategy.row_keys is None  # reset after every decoding call


def test_direct_decode_without_keys_draws_one_generator_for_the_batch(organism, ds):
    strategy = lh.VCD(seed=5, sample=False).bind(organism)
    seen = _record_noisy(strategy)
    ims = [Image.open(ds.image_path(i)).convert("RGB") for i in ds.image_ids[:3]]
    enc = organism.encode(ims, ["Please describe this image in detail."] * 3)
    decode(organism.model, enc, 2, strategy=strategy, eos_token_ids=organism.spec.eos_token_ids)
    px = enc["pixel_values"]
    # as before: ε [B, 3, H, W] in one draw from a generator seeded with the seed (the fidelity tests' ε)
    eps = torch.randn(px.shape, generator=torch.Generator().manual_seed(5))
    want = (strategy.signal * px.float() + strategy.noise_scale * eps).to(px.dtype)
    assert torch.equal(torch.stack([seen[b][0] for b in range(3)]), want)


def test_decode_checks_the_number_of_keys(organism, ds):
    enc = organism.encode([Image.open(ds.image_path(ds.image_ids[0])).convert("RGB")], ["x"])
    with pytest.raises(ValueError, match="keys"):
        decode(organism.model, enc, 1, strategy=lh.VCD().bind(organism), keys=[1, 2])


def test_row_noise_and_image_rows():
    like = torch.zeros(5, 4)
    # flattened patches (Qwen2-VL): rows split by image_grid_thw
    assert image_rows(like, 2, {"image_grid_thw": torch.tensor([[1, 1, 2], [1, 3, 1]])}) == [2, 3]
    with pytest.raises(ValueError, match="split"):
        image_rows(like, 2)
    got = row_noise(like, [7, 8], [2, 3])
    assert torch.equal(got[:2], torch.randn(2, 4, generator=torch.Generator().manual_seed(7)))
    assert torch.equal(got[2:], torch.randn(3, 4, generator=torch.Generator().manual_seed(8)))


# ---------------------------------------------------------------- CausalMM's random maps, per row
def reference_edit_one(maps, method, seed):
    """cf_encoder.edit_attention on one image's maps [1, H, N, N] (the reference's batch of one), its random
    numbers from a CPU generator seeded with ``seed``: random U[0,1)·2; shuffle randperm(N·N) per head in turn."""
    g = torch.Generator().manual_seed(seed)
    _, h, n, m = maps.shape
    if method == "random":
        return torch.rand((1, h, n, m), generator=g) * 2
    out = maps.clone()
    for i in range(h):
        out[:, i] = out[:, i].reshape(1, -1).gather(1, torch.randperm(n * m, generator=g)[None]).view(1, n, m)
    return out


@pytest.fixture()
def recorded_maps(monkeypatch):
    """Every call of the feature-mode map edit: (weights, seed, row_seeds, output)."""
    calls = []
    real = cmm_module.vision_counterfactual_map

    def wrapper(weights, kind, seed=0, row_seeds=None):
        out = real(weights, kind, seed, row_seeds)
        calls.append((weights.clone(), seed, row_seeds, out.clone()))
        return out

    monkeypatch.setattr(cmm_module, "vision_counterfactual_map", wrapper)
    return calls


@pytest.mark.parametrize("kind", ["shuffle", "random"])
def test_causalmm_each_image_draws_its_own_map_from_its_key(organism, ds, recorded_maps, kind):
    make = lambda: lh.CausalMM(vision=kind, llm=None, seed=2, sample=False)  # noqa: E731
    per_image: dict = {}
    for bs, rev in ((1, False), (3, True)):
        recorded_maps.clear()
        ids = ds.image_ids[::-1] if rev else ds.image_ids
        lh.caption(organism, ds, strategy=make(), batch_size=bs, image_ids=ids, max_new_tokens=2, progress=False)
        batches = [ids[i: i + bs] for i in range(0, len(ids), bs)]
        assert len(recorded_maps) == len(batches)  # one edit per batch, at the counterfactual prefill
        for keys, (weights, _, row_seeds, out) in zip(batches, recorded_maps):
            assert row_seeds == [row_seed(2, k) for k in keys]
            for b, k in enumerate(keys):
                want = reference_edit_one(weights[b: b + 1], kind, row_seed(2, k))
                assert torch.equal(out[b: b + 1], want)
                per_image.setdefault(k, []).append(out[b])
    for k, maps in per_image.items():
        assert torch.allclose(maps[0], maps[1], atol=1e-6)  # the same map batched or not, in any order
    first, second = (per_image[k][0] for k in ds.image_ids[:2])
    assert not torch.allclose(first, second)  # images get different draws (as the reference's per-image loop)


@pytest.mark.parametrize("kind", ["shuffle", "random"])
def test_causalmm_direct_decode_shares_one_map_as_before(organism, ds, recorded_maps, kind):
    ims = [Image.open(ds.image_path(i)).convert("RGB") for i in ds.image_ids[:3]]
    enc = organism.encode(ims, ["Please describe this image in detail."] * 3)
    decode(organism.model, enc, 2, strategy=lh.CausalMM(vision=kind, llm=None, seed=2, sample=False).bind(organism))
    ((weights, seed, row_seeds, out),) = recorded_maps
    assert seed == 2 and row_seeds is None
    # as before: one generator seeded with the seed, one draw shared by every image of the batch
    g = torch.Generator().manual_seed(2)
    b, h, n, m = weights.shape
    if kind == "random":
        want = (torch.rand((1, h, n, m), generator=g) * 2).expand(b, h, n, m)
    else:
        perms = torch.stack([torch.randperm(n * m, generator=g) for _ in range(h)])
        want = torch.gather(weights.reshape(b, h, n * m), 2, perms[None].expand(b, h, n * m)).view(b, h, n, m)
    assert torch.equal(out, want)


def test_causalmm_beams_share_their_images_map(organism, ds, recorded_maps):
    ims = [Image.open(ds.image_path(i)).convert("RGB") for i in ds.image_ids[:2]]
    enc = organism.encode(ims, ["Please describe this image in detail."] * 2)
    keys = ds.image_ids[:2]
    strategy = lh.CausalMM(vision="random", llm=None, seed=2).bind(organism)
    decode(organism.model, enc, 2, strategy=strategy, sampling=Beams(2), keys=keys)
    ((weights, _, row_seeds, out),) = recorded_maps
    # the images are encoded once per item, before the rows are expanded to beams (as model.generate does):
    # each image's map is drawn once, from its key, and its beams share it
    assert out.shape[0] == 2
    for r in range(2):
        assert torch.equal(out[r: r + 1], reference_edit_one(weights[r: r + 1], "random", row_seed(2, keys[r])))


def test_attention_mode_random_weights_are_per_row():
    w = torch.softmax(torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0)), -1)
    for kind in ("random", "shuffle"):
        got = cmm_module.vision_counterfactual_weights(w, kind, row_seeds=[11, 12, 13])
        for b, s in enumerate([11, 12, 13]):
            assert torch.equal(got[b: b + 1], cmm_module.vision_counterfactual_weights(w[b: b + 1], kind, s))
    # without row seeds: as before, one generator seeded with the seed for the whole batch
    g = torch.Generator().manual_seed(11)
    noise = torch.rand(w.shape, generator=g)
    assert torch.equal(cmm_module.vision_counterfactual_weights(w, "random", 11), noise / noise.sum(-1, keepdim=True))
    perm = torch.randperm(4, generator=torch.Generator().manual_seed(11))
    assert torch.equal(cmm_module.vision_counterfactual_weights(w, "shuffle", 11), w[..., perm])
