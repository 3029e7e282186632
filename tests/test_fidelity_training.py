"""Re-training fidelity (issue #13): each flavour's loss / schedule / module equals a plain re-statement of
its reference, written here from the reference's code (HA ``modeling_llama.py::calculate_attention_statistics``
and ``llava_trainer.py``; Causal-LLaVA ``modification/transformers/modeling_llama.py``; the SEED
reproduction as specified in issue #13), and the reference flavour trains what the reference trains."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from lens_halluc.hooks.attention import EditContext
from lens_halluc.models import load_vlm
from lens_halluc.models.spec import TokenRole
from lens_halluc.training import (FLAVOURS_CAUSAL, FLAVOURS_DISTILL, FLAVOURS_TFHH, CausalConfig, CausalIntervention,
                                  ConfounderAttention, DistillConfig, TextAttentionRecorder, TFHHConfig, causal_module,
                                  collate, seed_distill, tfhh)
from lens_halluc.training._tfhh import loss_rows, text_attention_term
from lens_halluc.training.data import IGNORE, example_batches
from lens_halluc.training.distill import QuantileBeta, noised_pixels, purified_logits, sample_confidence

S, I, X = int(TokenRole.SYSTEM), int(TokenRole.IMAGE), int(TokenRole.TEXT)


@pytest.fixture(scope="module")
def organism_examples8():
    from lens_halluc.organism.examples import training_examples
    from lens_halluc.organism.shipped import organism_path

    return training_examples(organism_path(), n=8, seed=0)


# ----------------------------------------------------------------------------------------- TFHH
def _toy_attention(seed=0, B=2, H=4, T=9):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, H, T, T, generator=g)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    return torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)


# BOS + system (0, 1), image (2-4), instruction (5), answer tokens (6-8): labels mark the answer
ROLES = torch.tensor([[S, S, I, I, I, X, X, X, X], [S, S, I, I, I, X, X, X, X]])
LABELS = torch.tensor([[IGNORE] * 6 + [11, 12, 2], [IGNORE] * 7 + [13, 2]])
IMG_START, IMG_LEN = 2, 3


def _record(layers: dict[int, torch.Tensor], heads: dict[int, list[int]], mass: str) -> TextAttentionRecorder:
    rec = TextAttentionRecorder(mass)
    T = ROLES.shape[1]
    for layer, A in layers.items():
        ctx = EditContext(layer, tuple(heads[layer]), torch.arange(T).expand(2, T), torch.ones(2, 1, T, T, dtype=torch.bool),
                          lambda: ROLES)
        rec(A[:, heads[layer]], ctx)
    return rec


def _reference_term(layers, heads, labels, eps=1e-8):
    """HA calculate_attention_statistics + trainer: per layer, rows where labels != -100 (unshifted), txt =
    sum of weights outside [img_start, img_start + img_len), mean of log(txt + 1e-8); then mean over layers."""
    per_layer, masses = [], []
    for layer, A in layers.items():
        vals, raw = [], []
        for b in range(A.shape[0]):
            for h in heads[layer]:
                for q in range(A.shape[2]):
                    if int(labels[b, q]) == IGNORE:
                        continue
                    txt = sum(float(A[b, h, q, k]) for k in range(A.shape[3]) if not IMG_START <= k < IMG_START + IMG_LEN)
                    vals.append(math.log(txt + eps))
                    raw.append(txt)
        per_layer.append(sum(vals) / len(vals))
        masses.append(sum(raw) / len(raw))
    return sum(per_layer) / len(per_layer), sum(masses) / len(masses)


def _corrected_term(layers, heads, labels, roles, eps=1e-8):
    """Ours: rows q with labels[q + 1] != -100, mass on TEXT-role keys, one mean over all (layer, head, row)."""
    vals, raw = [], []
    for layer, A in layers.items():
        for b in range(A.shape[0]):
            for h in heads[layer]:
                for q in range(A.shape[2] - 1):
                    if int(labels[b, q + 1]) == IGNORE:
                        continue
                    txt = sum(float(A[b, h, q, k]) for k in range(A.shape[3]) if int(roles[b, k]) == X)
                    vals.append(math.log(txt + eps))
                    raw.append(txt)
    return sum(vals) / len(vals), sum(raw) / len(raw)


def test_tfhh_reference_term_equals_ha_statement():
    layers = {0: _toy_attention(0), 3: _toy_attention(1)}
    heads = {0: [1], 3: [0, 2, 3]}  # unequal head counts: per-layer means differ from one pooled mean
    rec = _record(layers, heads, "not-image")
    got, mass = text_attention_term(rec.records, loss_rows(LABELS, "answer"), "per-layer")
    want, want_mass = _reference_term(layers, heads, LABELS)
    assert float(got) == pytest.approx(want, rel=1e-6) and float(mass) == pytest.approx(want_mass, rel=1e-6)
    pooled, _ = text_attention_term(rec.records, loss_rows(LABELS, "answer"), "pooled")
    assert abs(float(pooled) - want) > 1e-4  # the per-layer mean is a real choice here


def test_tfhh_corrected_term_equals_our_statement():
    layers = {0: _toy_attention(2), 3: _toy_attention(3)}
    heads = {0: [1], 3: [0, 2, 3]}
    rec = _record(layers, heads, "text")
    got, mass = text_attention_term(rec.records, loss_rows(LABELS, "predicting"), "pooled")
    want, want_mass = _corrected_term(layers, heads, LABELS, ROLES)
    assert float(got) == pytest.approx(want, rel=1e-6) and float(mass) == pytest.approx(want_mass, rel=1e-6)
    ref, _ = _reference_term(layers, heads, LABELS)
    assert abs(want - ref) > 1e-3  # the flavours really differ on this input


def test_tfhh_flavour_tables_and_config_resolution():
    assert FLAVOURS_TFHH["reference"] == {"text_mass": "not-image", "rows": "answer", "train_lm_head": True, "k": 30,
                                          "loss_mean": "per-layer", "lr": 2e-5}
    assert FLAVOURS_TFHH["corrected"] == {"text_mass": "text", "rows": "predicting", "train_lm_head": False, "k": None,
                                          "loss_mean": "pooled", "lr": 1e-3}
    assert TFHHConfig().lam == 2.0 == TFHHConfig(flavour="corrected").lam  # λ = 2 (--attention_loss_coeff 2.0)
    c = TFHHConfig(flavour="corrected", rows="answer", k=5)  # an explicit value wins
    assert (c.rows, c.k, c.text_mass) == ("answer", 5, "text")
    with pytest.raises(ValueError, match="flavour"):
        TFHHConfig(flavour="paper")
    with pytest.raises(ValueError, match="rows"):
        TFHHConfig(rows="all")


def test_tfhh_reference_term_on_the_organism_equals_captured_weights(organism, organism_examples8):
    """The recorder's differentiable term on a real forward equals HA's statement over the captured weights."""
    from lens_halluc.hooks.attention import capture_attention, edit_attention, editable_attention

    batch = collate(organism, organism_examples8[:3])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    pairs = [(0, 3), (2, 1), (2, 5)]
    heads = {0: [3], 2: [1, 5]}
    rec = TextAttentionRecorder("not-image")
    with editable_attention(organism):
        with torch.no_grad(), edit_attention(organism, rec, pairs):
            organism.model(**inputs, use_cache=False)
        att = capture_attention(organism, inputs, layers=[0, 2])
    got, _ = text_attention_term(rec.records, loss_rows(batch["labels"], "answer"), "per-layer")
    roles = organism.spec.token_roles(batch["input_ids"], batch["attention_mask"])
    image = roles == I
    per_layer = []
    for li, layer in enumerate((0, 2)):
        vals = []
        for b in range(att.shape[1]):
            for h in heads[layer]:
                for q in torch.nonzero(batch["labels"][b] != IGNORE).flatten().tolist():
                    txt = float(att[li, b, h, q][~image[b]].sum())
                    vals.append(math.log(txt + 1e-8))
        per_layer.append(np.mean(vals))
    assert float(got) == pytest.approx(float(np.mean(per_layer)), rel=1e-5)


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_tfhh_reference_trains_exactly_the_listed_heads_and_the_lm_head(tiny_llava_dir, toy_coco):
    """GQA model: q rows of the first k listed heads, k rows of their kv heads and the whole LM head change;
    every other element is bit-identical (the reference's one-head-per-layer accident is not reproduced)."""
    from lens_halluc.data.coco import CocoDataset
    from lens_halluc.training import coco_caption_examples

    vlm = load_vlm(tiny_llava_dir)
    spec = vlm.spec
    ds = CocoDataset.load(toy_coco / "instances.json", toy_coco / "captions.json", toy_coco / "images")
    ex = coco_caption_examples(ds, n=4)
    listed = [(1, 2), (1, 3), (0, 1)]  # two heads in layer 1 (the reference would train only (1, 2))
    before = _snapshot(vlm.model)
    res = tfhh(vlm, listed, ex, k=2, steps=2, batch_size=4, lr=1e-2, progress=False)  # reference flavour
    after = vlm.model.state_dict()
    d, n_rep = spec.head_dim, spec.n_heads // spec.n_kv_heads
    expected = {}
    for layer, head in listed[:2]:
        pre = f"model.language_model.layers.{layer}.self_attn."
        expected.setdefault(pre + "q_proj.weight", set()).update(range(head * d, (head + 1) * d))
        expected.setdefault(pre + "k_proj.weight", set()).update(range(head // n_rep * d, (head // n_rep + 1) * d))
    lm_head = [k for k in before if k.endswith("lm_head.weight")]
    assert len(lm_head) == 1
    for name, w0 in before.items():
        w1 = after[name]
        if name == lm_head[0]:
            assert (w0 != w1).any(), "the LM head did not train"
            continue
        rows = expected.get(name, set())
        if not rows:
            assert torch.equal(w0, w1), f"{name} changed"
            continue
        frozen = torch.tensor([i not in rows for i in range(w0.shape[0])])
        assert torch.equal(w0[frozen], w1[frozen]), f"{name}: rows outside the listed heads changed"
        assert bool((w0 != w1).reshape(w0.shape[0], -1).any(1)[~frozen].all()), f"{name}: a listed row did not train"
    assert res.info["heads"] == [[1, 2], [1, 3]] and res.config["k"] == 2 and res.config["train_lm_head"] is True
    assert res.trained_params == sum(len(r) for r in expected.values()) * spec.hidden_size + before[lm_head[0]].numel()


def test_tfhh_k_defaults_to_30_in_the_reference(tiny_llava_dir, toy_coco):
    from lens_halluc.data.coco import CocoDataset
    from lens_halluc.training import coco_caption_examples

    vlm = load_vlm(tiny_llava_dir)
    ds = CocoDataset.load(toy_coco / "instances.json", toy_coco / "captions.json", toy_coco / "images")
    every = [(layer, head) for layer in range(vlm.spec.n_layers) for head in range(vlm.spec.n_heads)]
    assert len(every) < 30  # hal_heads[:30] of a shorter list: all of them
    res = tfhh(vlm, every, coco_caption_examples(ds, n=2), steps=1, batch_size=2, progress=False)
    assert res.config["k"] == 30 and res.info["n_heads"] == len(every)


# ----------------------------------------------------------------------------------------- SEED distillation
def _plain_quantile_beta(history, batch, levels=(1.1, 0.8, 0.6, 0.4), qs=(0.25, 0.5, 0.75), window=1000):
    """Issue #13's rule: the history (last 1000 confidences, current batch included), its 0.25/0.5/0.75 quantiles;
    below q25 → 1.1, [q25, q50) → 0.8, [q50, q75) → 0.6, ≥ q75 → 0.4."""
    hist = (list(history) + list(batch))[-window:]
    q1, q2, q3 = (float(np.quantile(hist, q)) for q in qs)
    out = []
    for c in batch:
        out.append(levels[0] if c < q1 else levels[1] if c < q2 else levels[2] if c < q3 else levels[3])
    return out


def test_quantile_beta_on_a_hand_built_history():
    rng = np.random.default_rng(0)
    history = (-rng.gamma(2.0, 0.5, size=1200)).tolist()  # log max softmax ≤ 0
    qb = QuantileBeta()
    fed = []
    for start in range(0, 1200, 16):  # batches of 16 fill the window and then slide it
        batch = history[start:start + 16]
        got = qb.update(batch).tolist()
        assert got == _plain_quantile_beta(fed, batch)
        fed += batch
    assert len(qb.history) == 1000
    # hand-built: the lowest confidence gets the largest β, the highest the smallest
    qb = QuantileBeta()
    qb.update([-1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0, -8.0])
    assert qb.update([-9.0, -0.5]).tolist() == [1.1, 0.4]


def test_sample_confidence_and_purification():
    clean = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    p = torch.softmax(clean, -1)
    assert float(sample_confidence(clean)) == pytest.approx(float(torch.log(p.max(-1).values).mean()), rel=1e-6)
    noisy = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    beta = torch.tensor([[1.1], [0.4]])
    torch.testing.assert_close(purified_logits(clean, noisy, beta), torch.stack([2.1 * clean[0] - 1.1 * noisy[0],
                                                                                 1.4 * clean[1] - 0.4 * noisy[1]]))


def test_noised_pixels_signal_share():
    x = torch.linspace(-1, 1, 12).reshape(1, 3, 2, 2)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    got = noised_pixels(x, DistillConfig().signal, torch.Generator().manual_seed(7))
    torch.testing.assert_close(got, math.sqrt(0.3) * x + math.sqrt(0.7) * eps)  # reference: α = 0.3 of the signal
    got = noised_pixels(x, DistillConfig(flavour="corrected").signal, torch.Generator().manual_seed(7))
    torch.testing.assert_close(got, math.sqrt(0.7) * x + math.sqrt(0.3) * eps)


def test_distill_flavour_tables():
    assert FLAVOURS_DISTILL["reference"] == {"signal": 0.3, "beta_schedule": "quantile", "rank": 64, "lora_alpha": 128,
                                             "lora_dropout": 0.05, "lr": 2e-6}
    assert FLAVOURS_DISTILL["corrected"] == {"signal": 0.7, "beta_schedule": "continuous", "rank": 8, "lora_alpha": 16,
                                             "lora_dropout": 0.0, "lr": 5e-4}
    for f in ("reference", "corrected"):
        c = DistillConfig(flavour=f)
        assert (c.temperature, c.w, c.targets) == (2.0, 0.7, ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert DistillConfig().beta_levels == (1.1, 0.8, 0.6, 0.4) and DistillConfig().beta_quantiles == (0.25, 0.5, 0.75)
    assert DistillConfig().beta_history == 1000


def test_seed_reference_lora_config_and_first_step_beta(organism_examples8):
    """The adapters are r 64 / α 128 / dropout 0.05 on q/k/v/o of the text tower, and the first step's β is
    the quantile rule applied to the clean teacher's per-sample confidences."""
    from lens_halluc.training.distill import _lora_model

    vlm = load_vlm()
    peft_model = _lora_model(vlm, DistillConfig())
    cfg = peft_model.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (64, 128, 0.05)
    targeted = {n.rsplit(".", 1)[-1] for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert targeted == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert not any("vision_tower" in n for n, m in peft_model.named_modules() if hasattr(m, "lora_A"))

    vlm = load_vlm()
    batch_ex = next(example_batches(organism_examples8, 4, 1, 0))
    batch = collate(vlm, batch_ex)
    with torch.no_grad():
        logits = vlm.model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    conf, n_pos = [], []
    for b in range(logits.shape[0]):
        rows = [q for q in range(logits.shape[1] - 1) if int(batch["labels"][b, q + 1]) != IGNORE]
        lp = torch.log_softmax(logits[b, rows].float(), -1).max(-1).values
        conf.append(float(lp.mean()))
        n_pos.append(len(rows))
    beta = _plain_quantile_beta([], conf)
    want = sum(bt * n for bt, n in zip(beta, n_pos)) / sum(n_pos)
    res = seed_distill(vlm, organism_examples8, steps=1, batch_size=4, progress=False)
    assert res.losses["beta"][0] == pytest.approx(want, rel=1e-5)
    assert res.config["lr"] == 2e-6 and res.config["signal"] == 0.3 and res.info["lora_rank"] == 64


# ----------------------------------------------------------------------------------------- Causal-LLaVA module
def _plain_causal(h, dicts, kv, norm_w, n_heads, eps):
    """Causal-LLaVA: residual + Σ_m ConfounderCrossAttention_m(RMSNorm(h)); q = the normed input split in heads,
    key = value = kv_proj(D_m), softmax(q kᵀ / √d_h) v, heads concatenated, no output projection."""
    B, T, d = h.shape
    dh = d // n_heads
    x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * norm_w if norm_w is not None else h
    total = torch.zeros_like(h)
    for m, D in dicts.items():
        W, b = kv[m]
        k = D @ W.T + b  # [C, d]
        for bi in range(B):
            for hi in range(n_heads):
                sl = slice(hi * dh, (hi + 1) * dh)
                scores = x[bi, :, sl] @ k[:, sl].T / math.sqrt(dh)  # [T, C]
                total[bi, :, sl] += torch.softmax(scores, -1) @ k[:, sl]
    return h + total


def test_causal_reference_module_equals_plain_statement():
    g = torch.Generator().manual_seed(0)
    d, H = 8, 4
    dicts = {"visual": torch.randn(5, d, generator=g), "text": torch.randn(3, d, generator=g)}
    m = CausalIntervention(dicts, n_heads=H, eps=1e-5)
    h = torch.randn(2, 6, d, generator=g)
    assert torch.equal(m(h), h)  # zero-initialised shared k/v projection: identity at the start
    assert {n for n, _ in m.named_parameters()} == {"kv.visual.weight", "kv.visual.bias", "kv.text.weight",
                                                     "kv.text.bias", "norm_weight"}  # no q, no o projection
    with torch.no_grad():
        for lin in m.kv.values():
            lin.weight.copy_(torch.randn(d, d, generator=g))
            lin.bias.copy_(torch.randn(d, generator=g))
        m.norm_weight.copy_(torch.rand(d, generator=g) + 0.5)
    kv = {k: (lin.weight.detach(), lin.bias.detach()) for k, lin in m.kv.items()}
    want = _plain_causal(h, dicts, kv, m.norm_weight.detach(), H, 1e-5)
    got = m(h)
    assert got.shape == h.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    proj = CausalIntervention({"visual": dicts["visual"]}, n_heads=H, pre_norm=False)  # projector site: no norm
    with torch.no_grad():
        proj.kv["visual"].weight.copy_(kv["visual"][0])
        proj.kv["visual"].bias.copy_(kv["visual"][1])
    torch.testing.assert_close(proj(h), _plain_causal(h, {"visual": dicts["visual"]}, kv, None, H, 0.0),
                               atol=1e-5, rtol=1e-5)


def test_causal_flavour_tables():
    assert FLAVOURS_CAUSAL["reference"] == {"module": "reference", "n_heads": "model", "trainable": "model", "lr": 2e-5}
    assert FLAVOURS_CAUSAL["corrected"] == {"module": "corrected", "n_heads": 4, "trainable": "module", "lr": 1e-3}
    assert CausalConfig(flavour="corrected", module="reference").module == "reference"


@pytest.fixture(scope="module")
def causal_reference_run(organism_examples8, tmp_path_factory):
    vlm = load_vlm()
    batch = collate(vlm, organism_examples8[:2])
    with torch.no_grad():
        plain = vlm.model(**batch).logits
    base = _snapshot(vlm.model)
    g = torch.Generator().manual_seed(0)
    d = vlm.spec.hidden_size
    dicts = {"lm": {"visual": torch.randn(6, d, generator=g), "text": torch.randn(6, d, generator=g)},
             "projector": {"visual": torch.randn(6, d, generator=g)}}
    res = causal_module(vlm, organism_examples8, dictionaries=dicts, sites=("lm", "projector"), steps=2, batch_size=8,
                        lr=1e-3, progress=False)
    with torch.no_grad():
        trained = vlm.model(**batch).logits
    out = res.save(tmp_path_factory.mktemp("causal-ref") / "causal")
    return dict(vlm=vlm, res=res, batch=batch, plain=plain, trained=trained, base=base, out=out, dicts=dicts)


def test_causal_reference_trains_the_model_but_not_the_vision_tower(causal_reference_run):
    from lens_halluc.training.causal import attached_modules

    r = causal_reference_run
    mods = attached_modules(r["vlm"].model)
    assert isinstance(mods["lm"], CausalIntervention) and mods["lm"].n_heads == r["vlm"].spec.n_heads
    assert mods["lm"].pre_norm and not mods["projector"].pre_norm and mods["projector"].modalities == ("visual",)
    assert r["res"].config["n_heads"] == r["vlm"].spec.n_heads and r["res"].info["trainable"] == "model"
    after = r["vlm"].model.state_dict()
    vision = [k for k in r["base"] if "vision_tower" in k]
    assert vision and all(torch.equal(r["base"][k], after[k]) for k in vision)
    lm = [k for k in r["base"] if "language_model" in k or "multi_modal_projector" in k or "lm_head" in k]
    assert any(not torch.equal(r["base"][k], after[k]) for k in lm)  # the language model trained with the module
    for site, dicts in r["dicts"].items():  # the dictionaries are frozen
        for m, D in dicts.items():
            assert torch.equal(mods[site].dictionary(m), D)
    assert r["res"].losses["loss"][1] < r["res"].losses["loss"][0]


def test_causal_reference_checkpoint_reloads(causal_reference_run):
    from lens_halluc.training.causal import attached_modules

    r = causal_reference_run
    meta = json.loads((r["out"] / "causal_intervention.json").read_text())
    assert meta["sites"]["lm"]["kind"] == "reference" and meta["sites"]["lm"]["modalities"] == ["visual", "text"]
    again = load_vlm(r["out"])
    assert {k: type(v) for k, v in attached_modules(again.model).items()} == {"lm": CausalIntervention,
                                                                              "projector": CausalIntervention}
    with torch.no_grad():
        torch.testing.assert_close(again.model(**r["batch"]).logits, r["trained"], atol=0, rtol=0)


def test_causal_checkpoint_without_kind_loads_the_old_module(organism_examples8, tmp_path):
    """Checkpoints saved before the reference module existed (no "kind") re-attach ConfounderAttention."""
    from lens_halluc.training.causal import attached_modules

    vlm = load_vlm()
    D = torch.randn(5, vlm.spec.hidden_size, generator=torch.Generator().manual_seed(1))
    res = causal_module(vlm, organism_examples8, dictionaries={"lm": D}, steps=1, batch_size=4, flavour="corrected",
                        progress=False)
    out = res.save(tmp_path / "old")
    meta = json.loads((out / "causal_intervention.json").read_text())
    assert meta["sites"]["lm"]["kind"] == "corrected"
    meta["sites"]["lm"].pop("kind")
    (out / "causal_intervention.json").write_text(json.dumps(meta))
    again = load_vlm(out)
    assert isinstance(attached_modules(again.model)["lm"], ConfounderAttention)
    batch = collate(vlm, organism_examples8[:2])
    with torch.no_grad():
        torch.testing.assert_close(again.model(**batch).logits, vlm.model(**batch).logits, atol=0, rtol=0)


def test_causal_reference_needs_per_modality_dictionaries(organism):
    with pytest.raises(ValueError, match="one dictionary per modality"):
        causal_module(organism, [], dictionaries={"lm": torch.zeros(2, organism.spec.hidden_size)}, steps=1)


def test_reference_dictionaries_keep_every_category_with_zeros(monkeypatch):
    """Causal-LLaVA keeps all categories (sorted ids) and a zero vector where a category has no instance."""
    from types import SimpleNamespace

    from lens_halluc.training import causal

    nan = float("nan")
    d = {"category_ids": np.array([3, 7]), "visual": np.array([[[1.0, 2.0], [nan, nan]]], dtype=np.float32),
         "text": np.array([[[nan, nan], [5.0, 6.0]]], dtype=np.float32)}
    ds = SimpleNamespace(categories={7: "b", 1: "a", 3: "c"})
    monkeypatch.setattr(causal, "_site_means", lambda *a, **k: (d, ds, 4))
    out = causal.build_confounder_dictionaries(None, "unused", "lm")
    assert out["visual"].tolist() == [[0.0, 0.0], [1.0, 2.0], [0.0, 0.0]]  # ids 1, 3, 7
    assert out["text"].tolist() == [[0.0, 0.0], [0.0, 0.0], [5.0, 6.0]]
    assert list(causal.build_confounder_dictionaries(None, "unused", "projector")) == ["visual"]
    # corrected: rows stacked, categories without instances dropped
    assert causal.build_confounder_dictionary(None, "unused", "lm").tolist() == [[1.0, 2.0], [5.0, 6.0]]


# ----------------------------------------------------------------------------------------- CLI
def test_retrain_cli_flavour_flags(tmp_path):
    from lens_halluc.cli.retrain import _tfhh_k, build_parser

    heads = tmp_path / "top_heads.json"
    heads.write_text(json.dumps({"heads": [[0, 0], [1, 7]], "k": 2}))
    args = build_parser().parse_args(["--method", "tfhh", "--heads", str(heads), "--out", "x"])
    assert args.flavour == "reference" and args.lr is None and args.train_lm_head is None and args.rows is None
    assert _tfhh_k(args) == 2  # hal_heads[:30] of a 2-head list, no ranking beside it
    (tmp_path / "head_scores.csv").write_text("layer,head,score\n0,0,1\n1,7,0.5\n")
    assert _tfhh_k(args) == 30  # the ranking beside it supplies the first 30
    args = build_parser().parse_args(["--method", "tfhh", "--heads", str(heads), "--out", "x", "--flavour", "corrected"])
    assert _tfhh_k(args) is None
    args = build_parser().parse_args(["--method", "tfhh", "--heads", str(heads), "--out", "x", "--k", "1",
                                      "--no-train-lm-head"])
    assert _tfhh_k(args) == 1 and args.train_lm_head is False
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--method", "seed", "--out", "x", "--flavour", "paper"])
    with pytest.raises(SystemExit):  # --noise (the old flag, 1 − α) and --signal name one parameter
        build_parser().parse_args(["--method", "seed", "--out", "x", "--noise", "0.3", "--signal", "0.7"])
