"""Re-training (``lh.train``): TFHH touches only the listed heads' rows, each method lowers its loss and saves a
checkpoint ``load_vlm`` loads (add-ons re-attached through the registry), one loop and one batch builder.

These tests pin the ``corrected`` flavours (the defaults before issue #13); tests/test_fidelity_training.py
pins the ``reference`` ones."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

import lens_halluc as lh
from lens_halluc.models import load_vlm
from lens_halluc.models.addons import AddonError
from lens_halluc.models.batching import right_padded_batch
from lens_halluc.models.spec import TokenRole
from lens_halluc.organism.examples import training_examples
from lens_halluc.training import (ConfounderAttention, Retrained, TextAttentionRecorder, attach_causal_module,
                                  causal_module, coco_caption_examples, collate, load_training_info, run_training,
                                  seed_distill, tfhh)
from lens_halluc.training.data import IGNORE, answer_query_mask


@pytest.fixture(scope="module")
def organism_examples8():
    from lens_halluc.organism.shipped import organism_path

    return training_examples(organism_path(), n=8, seed=0)


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
    rec = TextAttentionRecorder("text")
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
    res = tfhh(vlm, heads, ex, steps=2, batch_size=4, lr=1e-2, flavour="corrected", progress=False)
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

    vlm = load_vlm()
    # batch_size = number of examples: every step sees the same batch, so the loss is comparable
    res = tfhh(vlm, [(0, 0), (1, 7)], organism_examples8, steps=2, batch_size=8, flavour="corrected", progress=False)
    assert isinstance(res, Retrained) and res.vlm is vlm and res.method == "tfhh"
    losses = res.losses
    assert isinstance(losses, pd.DataFrame) and list(losses.columns[:2]) == ["step", "loss"]
    assert losses["loss"][1] < losses["loss"][0]
    assert losses["text_attention"][1] < losses["text_attention"][0]
    assert res.config["steps"] == 2 and res.config["lam"] == 2.0 and res.seconds > 0
    assert res.trained_params == 2 * 2 * 16 * 128 and res.info["n_examples"] == 8 and res.separability is None
    out = res.save(tmp_path / "tfhh", source=organism_path())
    again = load_vlm(out)
    batch = collate(vlm, organism_examples8[:2])
    with torch.no_grad():
        torch.testing.assert_close(again.model(**batch).logits, vlm.model(**batch).logits, atol=0, rtol=0)
    info = load_training_info(out)
    assert info["method"] == "tfhh" and info["steps"] == 2 and info["info"]["heads"] == [[0, 0], [1, 7]]
    assert info["trained_params"] == res.trained_params and info["final_loss"] == res.summary["final_loss"]
    assert (out / "organism.json").is_file() and (out / "losses.csv").read_text().count("\n") == 3
    pd.testing.assert_frame_equal(pd.read_csv(out / "losses.csv"), losses)


def test_training_options_are_the_configs_fields(organism):
    with pytest.raises(TypeError, match="unknown option.*'lamda'"):
        tfhh(organism, [(0, 0)], [], lamda=2.0)
    with pytest.raises(TypeError, match="unknown option.*'heads'"):
        seed_distill(organism, [], heads=[(0, 0)])
    with pytest.raises(ValueError, match="confounder export"):
        causal_module(organism, [], steps=1)
    with pytest.raises(ValueError, match="site"):
        causal_module(organism, [], dictionaries={"lm": torch.zeros(2, 128)}, sites=("lm", "projector"))
    assert lh.train.tfhh is tfhh and lh.train.seed_distill is seed_distill and lh.train.causal_module is causal_module


def test_tfhh_rejects_heads_out_of_range(organism):
    from lens_halluc.models.spec import SpecError

    with pytest.raises(SpecError, match="out of range|layer|head"):
        tfhh(organism, [(0, 99)], [], steps=1, progress=False)


def test_seed_distillation_two_steps(organism_examples8, tmp_path):
    from lens_halluc.training.distill import continuous_beta, purified_logits

    vlm = load_vlm()
    vision0 = {k: v.clone() for k, v in vlm.model.model.vision_tower.state_dict().items()}
    res = seed_distill(vlm, organism_examples8, steps=2, batch_size=8, flavour="corrected", progress=False)
    assert res.losses["loss"][1] < res.losses["loss"][0]
    assert res.trained_params > 0 and list(res.losses.columns) == ["step", "loss", "kl", "ce", "beta"]
    assert res.vlm is vlm and type(vlm.model).__name__ == "LlavaForConditionalGeneration"  # adapters merged away
    assert all(torch.equal(vision0[k], v) for k, v in vlm.model.model.vision_tower.state_dict().items())
    out = res.save(tmp_path / "seed")
    assert load_training_info(out)["source"] == str(vlm.path)  # the checkpoint it was trained from, by default
    again = load_vlm(out)
    batch = collate(vlm, organism_examples8[:2])
    with torch.no_grad():
        torch.testing.assert_close(again.model(**batch).logits, vlm.model(**batch).logits, atol=0, rtol=0)
    # the purified target: β = 0 for a one-hot-confident teacher, (1+β)·c − β·n otherwise
    c, n = torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 0.0]])
    torch.testing.assert_close(purified_logits(c, n, continuous_beta(c, 0.8)), 1.4 * c - 0.4 * n)
    torch.testing.assert_close(continuous_beta(torch.tensor([[50.0, 0.0]]), 0.8), torch.tensor([[0.0]]))


@pytest.fixture(scope="module")
def causal_run(organism_examples8, tmp_path_factory):
    """A causal module trained 2 steps on both sites, saved: (vlm, batch, logits before, logits after, checkpoint)."""
    vlm = load_vlm()
    batch = collate(vlm, organism_examples8[:2])
    with torch.no_grad():
        plain = vlm.model(**batch).logits
    base = {k: v.detach().clone() for k, v in vlm.model.state_dict().items()}
    D = torch.randn(12, vlm.spec.hidden_size, generator=torch.Generator().manual_seed(0))
    attach_causal_module(vlm, ConfounderAttention(D, n_heads=4), "lm")
    with torch.no_grad():
        identity = vlm.model(**batch).logits  # zero-initialised output projection
    res = causal_module(vlm, organism_examples8, dictionaries={"lm": D, "projector": D}, steps=2, batch_size=8,
                        sites=("lm", "projector"), flavour="corrected", progress=False)
    with torch.no_grad():
        trained = vlm.model(**batch).logits
    out = res.save(tmp_path_factory.mktemp("causal") / "causal")
    return dict(vlm=vlm, res=res, batch=batch, plain=plain, identity=identity, trained=trained, base=base, out=out)


def test_causal_module_identity_at_init_then_trains_and_reloads(causal_run):
    from lens_halluc.training.causal import attached_modules

    r = causal_run
    assert torch.equal(r["identity"], r["plain"])
    assert r["res"].losses["loss"][1] < r["res"].losses["loss"][0]
    assert r["res"].info["sites"] == ["lm", "projector"] and r["res"].info["dictionary_rows"] == {"lm": 12, "projector": 12}
    after = r["vlm"].model.state_dict()
    assert all(torch.equal(r["base"][k], after[k]) for k in r["base"])  # the model itself stayed frozen
    assert not torch.equal(r["trained"], r["plain"])
    meta = json.loads((r["out"] / "causal_intervention.json").read_text())
    assert meta["loader"] == "lens_halluc.training.causal:load_attached" and set(meta["sites"]) == {"lm", "projector"}
    again = load_vlm(r["out"])  # re-attached through the add-on registry
    assert set(attached_modules(again.model)) == {"lm", "projector"}
    with torch.no_grad():
        torch.testing.assert_close(again.model(**r["batch"]).logits, r["trained"], atol=0, rtol=0)


def _copy_checkpoint(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_causal_checkpoint_of_the_old_format_still_loads(causal_run, tmp_path):
    """Checkpoints saved before the loader field ({site: {...}} at the top level) re-attach by file name."""
    from lens_halluc.training.causal import attached_modules

    out = _copy_checkpoint(causal_run["out"], tmp_path / "old")
    meta = json.loads((out / "causal_intervention.json").read_text())
    (out / "causal_intervention.json").write_text(json.dumps(meta["sites"]))
    again = load_vlm(out)
    assert set(attached_modules(again.model)) == {"lm", "projector"}
    with torch.no_grad():
        torch.testing.assert_close(again.model(**causal_run["batch"]).logits, causal_run["trained"], atol=0, rtol=0)


@pytest.mark.parametrize("loader, match", [
    ("lens_halluc.no_such_module:load_attached", "lens_halluc.no_such_module:load_attached.*cannot be imported"),
    ("lens_halluc.training.causal:no_such_function", "no_such_function.*cannot be imported"),
    ("os:system", "'os:system', outside lens_halluc and not registered"),
    ("not a loader", "'module:function'"),
])
def test_checkpoint_with_an_unloadable_addon_raises_naming_it(causal_run, tmp_path, loader, match):
    out = _copy_checkpoint(causal_run["out"], tmp_path / "bad")
    meta = json.loads((out / "causal_intervention.json").read_text())
    (out / "causal_intervention.json").write_text(json.dumps(meta | {"loader": loader}))
    with pytest.raises(AddonError, match=match) as e:
        load_vlm(out)
    assert "causal_intervention.json" in str(e.value)


def test_registered_addon_is_called_and_failures_name_it(causal_run, tmp_path, monkeypatch):
    from lens_halluc.models import addons

    (tmp_path / "probe_addon.py").write_text(
        "CALLS = []\n"
        "def attach(vlm, meta):\n    CALLS.append(meta.name)\n    return 'attached'\n"
        "def broken(vlm, meta):\n    raise RuntimeError('no probe weights')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(addons, "_ADDONS", dict(addons._ADDONS))
    monkeypatch.setattr(addons, "_TRUSTED", set(addons._TRUSTED))
    out = _copy_checkpoint(causal_run["out"], tmp_path / "probe")
    (out / "probe.json").write_text(json.dumps({"layer": 3}))  # names no loader: the registered one is used
    addons.register_addon("probe.json", "probe_addon:attach")
    vlm = load_vlm(out)
    import probe_addon

    assert probe_addon.CALLS == ["probe.json"] and addons.attach_addons(vlm)["probe.json"] == "attached"
    (out / "probe.json").write_text(json.dumps({"loader": "probe_addon:broken"}))
    with pytest.raises(AddonError, match="probe.json.*'probe_addon:broken', outside lens_halluc and not registered"):
        load_vlm(out)
    addons.register_addon("probe.json", "probe_addon:broken")
    with pytest.raises(AddonError, match="probe.json: the add-on loader 'probe_addon:broken' failed.*no probe weights"):
        load_vlm(out)
    (out / "probe.json").unlink()
    (out / "causal_intervention.safetensors").unlink()
    with pytest.raises(AddonError, match="causal_intervention.safetensors is missing"):
        load_vlm(out)


def test_one_training_loop_and_one_batch_builder():
    w = torch.nn.Parameter(torch.tensor([2.0, -1.0]))
    seen = []
    res = run_training("toy", 5, lambda s: (w ** 2).sum(), [w], lr=0.1, progress=False, after_step=seen.append)
    assert seen == list(range(5)) and len(res.losses) == 5 and res.losses[-1] < res.losses[0] and res.parts == {}
    with pytest.raises(FloatingPointError, match="step 0"):
        run_training("toy", 2, lambda s: w.sum() * float("nan"), [w], lr=0.1, progress=False)
    b = right_padded_batch([[4, 5, 6], [7]], pad_token_id=None, labels=[[IGNORE, 5, 6], [7]])
    assert b["input_ids"].tolist() == [[4, 5, 6], [7, 0, 0]] and b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[IGNORE, 5, 6], [7, IGNORE, IGNORE]]
    with pytest.raises(ValueError, match="row 1"):
        right_padded_batch([[1], [2]], labels=[[1], [2, 3]])


def test_confounder_attention_rejects_bad_dictionary():
    with pytest.raises(ValueError, match="dictionary"):
        ConfounderAttention(torch.full((3, 8), float("nan")))
    with pytest.raises(ValueError, match="divisible"):
        ConfounderAttention(torch.zeros(3, 10), n_heads=4)


def test_retrain_cli_writes_what_the_api_writes(organism_examples8, tmp_path, capsys):
    """The CLI is flags → lh.train.tfhh → save: same checkpoint record and losses as the API on the same inputs."""
    from lens_halluc.cli.retrain import main

    heads = tmp_path / "top_heads.json"
    heads.write_text(json.dumps({"heads": [[0, 0], [1, 7]], "k": 2}))
    cli_out = tmp_path / "cli"
    main(["--method", "tfhh", "--heads", str(heads), "--out", str(cli_out), "--steps", "2", "--n-train", "8",
          "--batch-size", "4", "--separability-images", "0", "--no-progress"])
    vlm = load_vlm()
    res = tfhh(vlm, lh.read_heads(heads), training_examples(vlm.path, 8), steps=2, batch_size=4, k=2, progress=False,
               info={"control": "none", "heads_source": str(heads)})  # the reference flavour, as the CLI's default
    api_out = res.save(tmp_path / "api")
    assert (cli_out / "losses.csv").read_bytes() == (api_out / "losses.csv").read_bytes()
    a, b = load_training_info(cli_out), load_training_info(api_out)
    assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    assert json.loads(capsys.readouterr().out.splitlines()[0])["trained_params"] == res.trained_params


def test_retrain_cli_resumes_and_reports_bad_input(tmp_path, capsys):
    from lens_halluc.retrain import main

    heads = tmp_path / "top_heads.json"
    heads.write_text(json.dumps({"heads": [[0, 0], [1, 7]], "k": 2}))
    out = tmp_path / "tfhh"
    summary = main(["--method", "tfhh", "--heads", str(heads), "--out", str(out), "--steps", "2", "--n-train", "8",
                    "--batch-size", "4", "--separability-images", "0", "--no-progress", "--flavour", "corrected"])
    assert summary["trained_params"] == 2 * 2 * 16 * 128 and (out / "model.safetensors").is_file()
    main(["--method", "tfhh", "--heads", str(heads), "--out", str(out), "--steps", "2", "--n-train", "8",
          "--batch-size", "4", "--separability-images", "0", "--no-progress", "--flavour", "corrected"])
    assert "already holds a finished tfhh run" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:  # the same --out with other options is refused, never returned
        main(["--method", "tfhh", "--heads", str(heads), "--out", str(out), "--steps", "3", "--n-train", "8",
              "--batch-size", "4", "--separability-images", "0", "--no-progress", "--flavour", "corrected"])
    assert e.value.code == 2 and "use a new --out or --overwrite" in capsys.readouterr().err
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
