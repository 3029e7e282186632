"""Re-training: TFHH touches only the listed heads' rows, each method lowers its loss and saves a loadable checkpoint."""
from __future__ import annotations

import json

import pytest
import torch

from lens_halluc.models import load_vlm
from lens_halluc.models.spec import TokenRole
from lens_halluc.training import (CausalConfig, ConfounderAttention, DistillConfig, TFHHConfig, TextAttentionRecorder,
                                  attach_causal_module, coco_caption_examples, collate, organism_examples, train_causal,
                                  train_seed_distillation, train_tfhh)
from lens_halluc.training.data import IGNORE, answer_query_mask


@pytest.fixture(scope="module")
def organism_examples8():
    from lens_halluc.organism.shipped import organism_path

    return organism_examples(organism_path(), n=8, seed=0)


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_collate_labels_only_the_answer(organism, organism_examples8):
    batch = collate(organism, organism_examples8[:3])
    tok = organism.tokenizer
    for r, ex in enumerate(organism_examples8[:3]):
        lab = batch["labels"][r]
        answer = lab[lab != IGNORE].tolist()
        assert answer == tok(ex.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        # the answer sits right after the prompt, and the prompt is what encode() gives at inference
        enc = organism.encode([ex.image], [ex.prompt])
        n_prompt = int(enc["attention_mask"][0].sum())
        assert batch["input_ids"][r, :n_prompt].tolist() == enc["input_ids"][0][-n_prompt:].tolist()
        assert bool((lab[:n_prompt] == IGNORE).all())
    where = answer_query_mask(batch["labels"])
    assert torch.equal(where[:, :-1], batch["labels"][:, 1:] != IGNORE)


def test_text_attention_recorder_equals_captured_weights(organism, organism_examples8):
    """The differentiable text mass TFHH trains on equals the plain capture of the same weights."""
    from lens_halluc.hooks.attention import capture_attention, edit_attention, editable_attention

    batch = collate(organism, organism_examples8[:2])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    heads = [(0, 3), (2, 1), (2, 5)]
    rec = TextAttentionRecorder()
    roles = organism.spec.token_roles(batch["input_ids"], batch["attention_mask"])
    with editable_attention(organism):
        with torch.no_grad(), edit_attention(organism, rec, heads):
            organism.model(**inputs, use_cache=False)
        att = capture_attention(organism, inputs, layers=[0, 2])  # [2, B, H, T, T]
    text = (roles == int(TokenRole.TEXT)).float()
    expect = [(att[0][:, [3]] * text[:, None, None]).sum(-1), (att[1][:, [1, 5]] * text[:, None, None]).sum(-1)]
    for got, want in zip(rec.records, expect):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_tfhh_changes_only_listed_rows_with_gqa(tiny_llava_dir, toy_coco):
    """Tiny random LLaVA with 4 heads on 2 kv heads: q rows of the listed heads, k rows of their kv heads, nothing else."""
    from lens_halluc.data.coco import CocoDataset

    vlm = load_vlm(tiny_llava_dir)
    spec = vlm.spec
    assert spec.n_kv_heads < spec.n_heads
    ds = CocoDataset.load(toy_coco / "instances.json", toy_coco / "captions.json", toy_coco / "images")
    ex = coco_caption_examples(ds, n=4)
    heads = [(0, 1), (1, 2), (1, 3)]
    before = _snapshot(vlm.model)
    res = train_tfhh(vlm, ex, heads, TFHHConfig(steps=2, batch_size=4, lr=1e-2), progress=False)
    after = vlm.model.state_dict()
    d, n_rep = spec.head_dim, spec.n_heads // spec.n_kv_heads
    expected = {}
    for layer, head in heads:
        pre = f"model.language_model.layers.{layer}.self_attn."
        expected.setdefault(pre + "q_proj.weight", set()).update(range(head * d, (head + 1) * d))
        expected.setdefault(pre + "k_proj.weight", set()).update(range(head // n_rep * d, (head // n_rep + 1) * d))
    for name, w0 in before.items():
        w1 = after[name]
        rows = expected.get(name, set())
        if not rows:
            assert torch.equal(w0, w1), f"{name} changed"
            continue
        changed = (w0 != w1).reshape(w0.shape[0], -1).any(1)
        frozen = torch.tensor([i not in rows for i in range(w0.shape[0])])
        assert torch.equal(w0[frozen], w1[frozen]), f"{name}: rows outside the listed heads changed"
        assert bool(changed[~frozen].all()), f"{name}: a listed row did not train"
    assert res.trained_params == sum(len(r) for r in expected.values()) * spec.hidden_size


def test_tfhh_two_steps_lowers_loss_and_saves_loadable_checkpoint(organism_examples8, tmp_path):
    from lens_halluc.organism.shipped import organism_path
    from lens_halluc.training import load_training_info

    vlm = load_vlm()
    # batch_size = number of examples: every step sees the same batch, so the loss is comparable
    res = train_tfhh(vlm, organism_examples8, [(0, 0), (1, 7)], TFHHConfig(steps=2, batch_size=8), progress=False)
    assert res.losses[1] < res.losses[0]
    assert res.parts["text_attention"][1] < res.parts["text_attention"][0]
    out = res.save(vlm, tmp_path / "tfhh", source=organism_path())
    again = load_vlm(out)
    batch = collate(vlm, organism_examples8[:2])
    with torch.no_grad():
        torch.testing.assert_close(again.model(**batch).logits, vlm.model(**batch).logits, atol=0, rtol=0)
    info = load_training_info(out)
    assert info["method"] == "tfhh" and info["steps"] == 2 and info["info"]["heads"] == [[0, 0], [1, 7]]
    assert (out / "organism.json").is_file() and (out / "losses.csv").read_text().count("\n") == 3


def test_tfhh_rejects_heads_out_of_range(organism):
    from lens_halluc.models.spec import SpecError

    with pytest.raises(SpecError, match="out of range|layer|head"):
        train_tfhh(organism, [], [(0, 99)], TFHHConfig(steps=1), progress=False)


def test_seed_distillation_two_steps(organism_examples8, tmp_path):
    from lens_halluc.training.distill import purified_logits

    vlm = load_vlm()
    vision0 = {k: v.clone() for k, v in vlm.model.model.vision_tower.state_dict().items()}
    res = train_seed_distillation(vlm, organism_examples8, DistillConfig(steps=2, batch_size=8), progress=False)
    assert res.losses[1] < res.losses[0]
    assert res.trained_params > 0 and set(res.parts) == {"kl", "ce", "beta"}
    assert type(vlm.model).__name__ == "LlavaForConditionalGeneration"  # adapters merged away
    assert all(torch.equal(vision0[k], v) for k, v in vlm.model.model.vision_tower.state_dict().items())
    out = res.save(vlm, tmp_path / "seed")
    again = load_vlm(out)
    batch = collate(vlm, organism_examples8[:2])
    with torch.no_grad():
        torch.testing.assert_close(again.model(**batch).logits, vlm.model(**batch).logits, atol=0, rtol=0)
    # the purified target: β = 0 for a one-hot-confident teacher, (1+β)·c − β·n otherwise
    c, n = torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 0.0]])
    torch.testing.assert_close(purified_logits(c, n, 0.8), 1.4 * c - 0.4 * n)


def test_causal_module_identity_at_init_then_trains_and_reloads(organism_examples8, tmp_path):
    from lens_halluc.training.causal import attached_modules

    vlm = load_vlm()
    batch = collate(vlm, organism_examples8[:2])
    with torch.no_grad():
        plain = vlm.model(**batch).logits
    base = _snapshot(vlm.model)
    D = torch.randn(12, vlm.spec.hidden_size, generator=torch.Generator().manual_seed(0))
    attach_causal_module(vlm, ConfounderAttention(D, n_heads=4), "lm")
    attach_causal_module(vlm, ConfounderAttention(D, n_heads=4), "projector")
    with torch.no_grad():
        assert torch.equal(vlm.model(**batch).logits, plain)  # zero-initialised output projection
    res = train_causal(vlm, organism_examples8, CausalConfig(steps=2, batch_size=8, sites=("lm", "projector")),
                       progress=False)
    assert res.losses[1] < res.losses[0]
    after = vlm.model.state_dict()
    assert all(torch.equal(base[k], after[k]) for k in base)  # the model itself stayed frozen
    with torch.no_grad():
        trained = vlm.model(**batch).logits
    assert not torch.equal(trained, plain)
    out = res.save(vlm, tmp_path / "causal")
    again = load_vlm(out)
    assert set(attached_modules(again.model)) == {"lm", "projector"}
    with torch.no_grad():
        torch.testing.assert_close(again.model(**batch).logits, trained, atol=0, rtol=0)


def test_confounder_attention_rejects_bad_dictionary():
    with pytest.raises(ValueError, match="dictionary"):
        ConfounderAttention(torch.full((3, 8), float("nan")))
    with pytest.raises(ValueError, match="divisible"):
        ConfounderAttention(torch.zeros(3, 10), n_heads=4)


def test_retrain_cli_resumes_and_reports_bad_input(tmp_path, capsys):
    from lens_halluc.retrain import main

    heads = tmp_path / "top_heads.json"
    heads.write_text(json.dumps({"heads": [[0, 0], [1, 7]], "k": 2}))
    out = tmp_path / "tfhh"
    summary = main(["--method", "tfhh", "--heads", str(heads), "--out", str(out), "--steps", "2", "--n-train", "8",
                    "--batch-size", "4", "--separability-images", "0", "--no-progress"])
    assert summary["trained_params"] == 2 * 2 * 16 * 128 and (out / "model.safetensors").is_file()
    main(["--method", "tfhh", "--heads", str(heads), "--out", str(out), "--steps", "2", "--no-progress"])
    assert "already holds a finished tfhh run" in capsys.readouterr().out
    heads.write_text(json.dumps({"heads": [[0, 99]], "k": 1}))
    with pytest.raises(SystemExit) as e:
        main(["--method", "tfhh", "--heads", str(heads), "--out", str(tmp_path / "bad"), "--steps", "1"])
    assert e.value.code == 2 and "out of range" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--method", "tfhh", "--out", str(tmp_path / "bad"), "--steps", "1"])
    assert "needs --heads" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--method", "tfhh", "--heads", str(tmp_path / "missing.json"), "--out", str(tmp_path / "bad")])
    assert "heads file not found" in capsys.readouterr().err


def test_summary_table_labels_and_groups_retrained_models():
    from lens_halluc.figures.interventions import markdown_table, separability_markdown, summary_table

    def row(model, control, cut, sep=None):
        return {"method": "greedy", "options": "{}", "control": "none", "model": model, "n": 10, "break_CHAIR_i": cut,
                "retrained": {"method": "tfhh", "steps": 5, "seconds": 3.0, "trained_params": 100, "control": control,
                              "n_heads": 2, "separability": sep}}

    sep = {"before": {"visual": {"silhouette": 0.1, "scatter_ratio": 1.0, "pair_distance_ratio": 0.7}},
           "after": {"visual": {"silhouette": 0.2, "scatter_ratio": 1.5, "pair_distance_ratio": 0.9}}}
    rows = [{"method": "greedy", "options": "{}", "control": "none", "model": "base", "n": 10, "break_CHAIR_i": 0.2},
            row("a", "none", 0.05, sep), row("r0", "random", 0.1), row("r1", "random", 0.2)]
    table = summary_table(rows)
    assert [r["label"] for r in table] == ["greedy", "retrained: tfhh (k=2, 5 steps)",
                                           "retrained: tfhh (k=2, 5 steps) — random heads"]
    assert table[2]["n_draws"] == 2 and table[2]["break_CHAIR_i"] == pytest.approx(0.15)
    assert "trained params" in markdown_table(table)
    assert "0.100 → 0.200" in separability_markdown(table)
