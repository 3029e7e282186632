"""The attribution job: scores, outputs, resume, sharding, bad inputs."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import write_toy_coco

from lens_halluc.attribution.pipeline import head_scores
from lens_halluc.data.tables import table_text
from lens_halluc.organism.shipped import SHIPPED_DIR

shipped = pytest.mark.skipif(not (SHIPPED_DIR / "base" / "config.json").is_file(),
                             reason="no organism shipped in this checkout")


def test_head_scores_by_hand():
    # 3 tokens, 1 layer, 2 heads; tokens 0 and 2 hallucinated
    inf = np.array([[[0.5, 0.0]], [[0.1, 0.2]], [[0.3, 0.4]]], dtype=np.float32)
    rows = head_scores(inf, [True, False, True])
    by = {(r["layer"], r["head"]): r for r in rows}
    assert by[(0, 0)]["mean_hal"] == pytest.approx(0.4) and by[(0, 0)]["mean_nonhal"] == pytest.approx(0.1)
    assert by[(0, 0)]["score"] == pytest.approx(0.3) and by[(0, 1)]["score"] == pytest.approx(0.0)
    assert [(r["layer"], r["head"]) for r in rows] == [(0, 0), (0, 1)]  # ranked by score
    text = table_text(rows, ("layer", "head", "score", "mean_hal", "mean_nonhal"))
    assert text.splitlines()[0] == "layer,head,score,mean_hal,mean_nonhal"


def _attribute(out, *extra, runner=None):
    cmd = (runner or [sys.executable, "-m"]) + ["lens_halluc.attribute", "--n-images", "40", "--max-new-tokens", "30",
                                                "--out", str(out), "--no-progress", *map(str, extra)]
    return subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("attr") / "run"
    r = _attribute(out, "--no-png")
    assert r.returncode == 0, r.stderr
    return out, r.stdout


@shipped
def test_outputs(default_run):
    out, stdout = default_run
    assert "top heads" in stdout and "figure:" in stdout
    for f in ["head_scores.csv", "top_heads.json", "tokens.csv", "influences.npz", "samples.jsonl", "heads.html",
              "manifest.json"]:
        assert (out / f).is_file(), f
    tokens = (out / "tokens.csv").read_text().splitlines()
    assert tokens[0] == "index,sample_id,image_id,position,token_id,token,word,hallucinated"
    inf = np.load(out / "influences.npz")["influence"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert inf.shape == (len(tokens) - 1, manifest["spec"]["n_layers"], manifest["spec"]["n_heads"])
    top = json.loads((out / "top_heads.json").read_text())
    assert top["k"] == len(top["heads"]) == 5
    # tokens.csv positions index the teacher-forced sequences of samples.jsonl
    samples = [json.loads(l) for l in (out / "samples.jsonl").read_text().splitlines()]
    row = tokens[1].split(",")
    ids = samples[int(row[1])]["input_ids"]
    assert ids[int(row[3])] == int(row[4])


@shipped
def test_resume_gives_identical_scores(default_run, tmp_path):
    out, _ = default_run
    copy = tmp_path / "resumed"
    shutil.copytree(out, copy)
    parts = sorted((copy / "parts").glob("*/*.npz"))  # parts/<hash of the inputs>/<sample>.npz
    assert parts
    for p in parts[len(parts) // 2:]:  # as if interrupted half way through attribution
        p.unlink()
    for f in ["head_scores.csv", "tokens.csv", "influences.npz", "top_heads.json"]:
        (copy / f).unlink()
    lines = (copy / "captions.rank0.jsonl").read_text().splitlines(keepends=True)
    (copy / "captions.rank0.jsonl").write_text("".join(lines[:25]) + lines[25][:10])  # and mid-captioning
    r = _attribute(copy, "--no-png")
    assert r.returncode == 0, r.stderr
    assert (copy / "head_scores.csv").read_bytes() == (out / "head_scores.csv").read_bytes()
    assert (copy / "tokens.csv").read_bytes() == (out / "tokens.csv").read_bytes()
    assert sorted(p.name for p in (copy / "parts").iterdir()) == sorted(p.name for p in (out / "parts").iterdir())


@shipped
def test_other_options_never_reuse_parts(default_run, tmp_path):
    out, _ = default_run
    copy = tmp_path / "other"
    shutil.copytree(out, copy)
    r = _attribute(copy, "--no-png", "--metric", "log_prob_diff")
    assert r.returncode == 0, r.stderr
    keys = sorted(p.name for p in (copy / "parts").iterdir())
    assert len(keys) == 2  # the prob_diff parts and new log_prob_diff ones, side by side
    manifest = json.loads((copy / "manifest.json").read_text())
    assert manifest["config"]["metric"] == "log_prob_diff" and manifest["cache_key"] in keys
    assert (copy / "head_scores.csv").read_bytes() != (out / "head_scores.csv").read_bytes()


@shipped
def test_torchrun_sharding_matches_one_process(default_run, tmp_path):
    out, _ = default_run
    r = _attribute(tmp_path / "sharded", "--no-png",
                   runner=[sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m"])
    assert r.returncode == 0, r.stderr
    assert sorted((tmp_path / "sharded").glob("captions.rank*.jsonl"))[1].stat().st_size > 0
    a = np.loadtxt(out / "head_scores.csv", delimiter=",", skiprows=1)
    b = np.loadtxt(tmp_path / "sharded" / "head_scores.csv", delimiter=",", skiprows=1)
    np.testing.assert_allclose(a, b, atol=1e-6)


@shipped
def test_no_hallucinated_tokens_is_a_clear_error(tmp_path):
    from lens_halluc.organism.export import export_split
    from lens_halluc.organism.recipe import read_organism_meta
    from lens_halluc.organism.shipped import organism_path

    world, _ = read_organism_meta(organism_path("final"))
    d = export_split(world, "control", 6, 3, tmp_path / "control")
    r = _attribute(tmp_path / "o", "--instances", d / "instances.json", "--references", d / "captions.json",
                   "--image-dir", d / "images")
    if r.returncode == 0:  # the organism happened to hallucinate on control images: nothing to check
        pytest.skip("control captions contained a hallucination")
    assert r.returncode == 2 and "nothing to attribute" in r.stderr and "Traceback" not in r.stderr


def test_missing_images_and_unknown_architecture(toy_coco, tiny_llava_dir, tmp_path):
    (toy_coco / "images" / "000002.png").unlink()
    r = _attribute(tmp_path / "o", "--model", tiny_llava_dir, "--instances", toy_coco / "instances.json",
                   "--references", toy_coco / "captions.json", "--image-dir", toy_coco / "images")
    assert r.returncode == 2 and "missing" in r.stderr and "000002.png" in r.stderr
    write_toy_coco(toy_coco)  # images back: the model error must show on its own
    bad = tmp_path / "bert"
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)).save_pretrained(bad)
    r = _attribute(tmp_path / "o2", "--model", bad, "--instances", toy_coco / "instances.json",
                   "--references", toy_coco / "captions.json", "--image-dir", toy_coco / "images")
    assert r.returncode == 2 and "could not be loaded" in r.stderr and "Traceback" not in r.stderr


def test_rank_agreement_takes_files_frames_and_dicts(tmp_path):
    import pandas as pd

    from lens_halluc.attribution.compare import rank_agreement
    from lens_halluc.data.tables import write_table

    a = [{"layer": 0, "head": h, "score": s} for h, s in enumerate([0.9, 0.5, 0.1, -0.2])]
    b = [{"layer": 0, "head": h, "score": s} for h, s in enumerate([0.8, 0.1, 0.6, -0.1])]
    write_table(a, tmp_path / "a.csv")
    res = rank_agreement(tmp_path / "a.csv", pd.DataFrame(b), top_k=2)
    assert res["spearman"] == pytest.approx(0.8) and res["top_k_overlap"] == 0.5 and res["n_heads"] == 4
    assert rank_agreement({(r["layer"], r["head"]): r["score"] for r in a}, pd.DataFrame(a), top_k=2)["kendall"] == 1.0
    with pytest.raises(ValueError, match="different heads"):
        rank_agreement(pd.DataFrame(a), pd.DataFrame(b[:3]))
