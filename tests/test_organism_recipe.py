"""The organism's training recipe (reduced, end to end) and the shipped checkpoints."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from lens_halluc.models import load_causal_lm, load_vlm
from lens_halluc.organism.recipe import RecipeConfig, read_organism_meta, train_organism
from lens_halluc.organism.shipped import SHIPPED_DIR, list_checkpoints, organism_path


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("organism")
    summary = train_organism(out, RecipeConfig.quick(), progress=False)
    return out, summary


def test_quick_recipe_saves_every_stage_loadable(quick_run):
    out, summary = quick_run
    for d in ["projector", "final"] + summary["checkpoints"]:
        vlm = load_vlm(out / d)
        assert vlm.spec.n_layers == 2 and vlm.spec.n_heads == 4
        assert vlm.model.config.text_config._attn_implementation == "eager"
        world, meta = read_organism_meta(out / d)
        assert meta["recipe_seed"] == 0 and world.config == RecipeConfig().world
    assert len(summary["checkpoints"]) == 5
    lm = load_causal_lm(out / "base")
    assert lm.spec.image_token_id is None and lm.spec.n_layers == 2
    assert json.loads((out / "recipe.json").read_text())["timings_s"]


def test_quick_recipe_trains_and_is_deterministic(quick_run, tmp_path):
    out, summary = quick_run
    again = train_organism(tmp_path, RecipeConfig.quick(), progress=False)
    assert summary["final_loss"] == again["final_loss"]
    a = load_vlm(out / "final").model.state_dict()
    b = load_vlm(tmp_path / "final").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # stage 2 trains only the projector: the language model is the base LM's, untouched
    proj = load_vlm(out / "projector").model
    base = load_causal_lm(out / "base").model
    assert torch.equal(proj.model.language_model.layers[0].self_attn.q_proj.weight,
                       base.model.layers[0].self_attn.q_proj.weight)


def test_recipe_lowers_every_stage_loss(tmp_path):
    s = train_organism(tmp_path, RecipeConfig.quick(base_steps=40, vision_steps=40, projector_steps=20, tune_steps=40),
                       progress=False)
    for stage in ("base", "vision", "projector", "tune"):
        assert s["final_loss"][stage] < s["initial_loss"][stage], (stage, s)


shipped = pytest.mark.skipif(not (SHIPPED_DIR / "base" / "config.json").is_file(),
                             reason="no organism shipped in this checkout")


@shipped
def test_shipped_checkpoints_load_with_documented_config():
    vlm = load_vlm(organism_path("final"))
    s = vlm.spec
    assert (s.n_layers, s.n_heads, s.n_kv_heads, s.head_dim, s.hidden_size) == (6, 8, 8, 16, 128)
    assert vlm.model.config.vision_config.image_size == 48 and vlm.model.config.vision_config.patch_size == 8
    assert vlm.dtype == torch.float32
    assert len(list_checkpoints()) >= 5
    for ck in list_checkpoints():
        assert load_vlm(ck).spec == s
    assert load_vlm(organism_path("projector")).spec == s
    assert load_causal_lm(organism_path("base")).spec.n_layers == 6


@shipped
def test_shipped_final_model_is_grounded_on_a_sample(tmp_path):
    from lens_halluc.organism.evaluate import EvalConfig, caption_and_score, export_eval_splits

    cfg = EvalConfig(n=60)
    splits = export_eval_splits(organism_path("final"), tmp_path, cfg.n)
    res = caption_and_score(load_vlm(organism_path("final")), splits["normal"], tmp_path / "c.jsonl", cfg)
    assert res["CHAIR_i"] <= 0.10 and res["Recall"] >= 0.85, res


def test_path_cli(tmp_path):
    r = subprocess.run([sys.executable, "-m", "lens_halluc.organism", "path", "--stage", "nope"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "invalid choice" in r.stderr
    if (SHIPPED_DIR / "base" / "config.json").is_file():
        r = subprocess.run([sys.executable, "-m", "lens_halluc.organism", "path"], capture_output=True, text=True)
        assert r.returncode == 0 and (organism_path("final") == __import__("pathlib").Path(r.stdout.strip()))
        r = subprocess.run([sys.executable, "-m", "lens_halluc.organism", "path", "--checkpoint", "99"],
                           capture_output=True, text=True)
        assert r.returncode == 2 and "no checkpoints/checkpoint-99" in r.stderr


def test_train_cli_keeps_the_recipes_world(tmp_path):
    """Regression: the CLI used to replace the recipe's world with a bare WorldConfig()."""
    r = subprocess.run([sys.executable, "-m", "lens_halluc.organism", "train", "--quick", "--no-progress",
                        "--out", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    world, _ = read_organism_meta(tmp_path / "final")
    assert world.config == RecipeConfig().world
    custom = tmp_path / "w.json"
    custom.write_text(json.dumps({"p_hidden": 0.0}))
    r = subprocess.run([sys.executable, "-m", "lens_halluc.organism", "train", "--quick", "--no-progress",
                        "--world-config", str(custom), "--out", str(tmp_path / "b")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert read_organism_meta(tmp_path / "b" / "final")[0].config.p_hidden == 0.0
