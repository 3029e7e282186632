"""Every supported VLM family end to end: the attribution job runs from the command line on a tiny random
model of each family (built from configs, saved with its processor, loaded from the directory offline), and
the analyses run on its result or say why they are not defined for the family.

The per-method exactness checks live beside the methods (tests/test_replay_families.py,
test_generation_families.py, test_attention_families.py, test_loading_families.py); every test marked
``capability`` is a cell of the README's architecture × capability table (bench/capability_table.py).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import write_toy_coco

from lens_halluc.models.adapters import NotDefinedForArchitecture
from lens_halluc.models.zoo import FAMILIES, save_tiny


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return write_toy_coco(tmp_path_factory.mktemp("coco"), n_images=3, seed=0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, coco):
    """family -> (model dir, attribution run dir), made on first use by the attribute CLI (in process)."""
    from lens_halluc.cli.attribute import main

    root = tmp_path_factory.mktemp("families")
    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            model_dir = save_tiny(family, root / family / "model", seed=0)
            out = root / family / "run"
            main(["--model", str(model_dir), "--instances", str(coco / "instances.json"),
                  "--references", str(coco / "captions.json"), "--image-dir", str(coco / "images"),
                  "--n-images", "3", "--max-new-tokens", "12", "--keep", "all", "--out", str(out),
                  "--no-png", "--no-progress"])
            cache[family] = (model_dir, out)
        return cache[family]

    return get


@pytest.fixture(scope="module")
def vlms():
    from lens_halluc.models import load_vlm

    cache: dict = {}

    def get(model_dir):
        if model_dir not in cache:
            cache[model_dir] = load_vlm(model_dir)
        return cache[model_dir]

    return get


@pytest.mark.capability("attribute CLI")
@pytest.mark.parametrize("family", FAMILIES)
def test_attribute_cli_runs(family, runs):
    """``python -m lens_halluc.attribute --model DIR --instances I --references R --image-dir D``."""
    _, out = runs(family)
    manifest = json.loads((out / "manifest.json").read_text())
    inf = np.load(out / "influences.npz")["influence"]
    assert inf.ndim == 3 and inf.shape[0] > 0
    assert inf.shape[1:] == (manifest["spec"]["n_layers"], manifest["spec"]["n_heads"])
    assert manifest["spec"]["adapter"] is not None
    assert np.isfinite(inf).all() and np.abs(inf).max() > 0


def _runs_or_refuses(cell, fn):
    try:
        return fn()
    except NotDefinedForArchitecture as e:
        cell.refused(str(e))
        return None


@pytest.mark.capability("bias")
@pytest.mark.parametrize("family", FAMILIES)
def test_bias_runs_or_says_why(family, runs, vlms, cell):
    from lens_halluc.analysis import bias

    model_dir, out = runs(family)
    res = _runs_or_refuses(cell, lambda: bias(vlms(model_dir), out, k=2))
    if res is not None:
        table = res.table
        assert len(table) > 0
        mass = table["image_mass"] + table["text_mass"]
        assert ((mass >= 0) & (mass <= 1 + 1e-5)).all()


@pytest.mark.capability("inheritance")
@pytest.mark.parametrize("family", FAMILIES)
def test_inheritance_runs_or_says_why(family, runs, vlms, cell):
    """Against a base LM of the text tower's architecture (random weights: the analysis runs; values are not the point)."""
    from transformers import AutoModelForCausalLM

    from lens_halluc.analysis import inheritance
    from lens_halluc.models import LoadedLM, ModelSpec

    model_dir, out = runs(family)
    vlm = vlms(model_dir)

    def run():
        vlm.adapter.require("inheritance")
        base = AutoModelForCausalLM.from_config(vlm.adapter.base_lm_config(vlm.model),
                                                attn_implementation="eager").eval()
        tokenizer = vlm.processor.tokenizer  # the VLM's own, with its turn format (a tiny word-level one)
        tokenizer.chat_template = tokenizer.chat_template or vlm.processor.chat_template
        lm = LoadedLM(model=base, tokenizer=tokenizer, spec=ModelSpec.from_model(base), template=vlm.template)
        return inheritance(vlm, lm, out, k=1)

    res = _runs_or_refuses(cell, run)
    if res is not None:
        assert len(res.table) > 0 and res.table["cosine"].between(-1 - 1e-5, 1 + 1e-5).all()


@pytest.mark.capability("drift")
@pytest.mark.parametrize("family", FAMILIES)
def test_drift_runs_or_says_why(family, runs, vlms, cell):
    """The same weights as initial model and checkpoint: every head's divergence is 0."""
    from lens_halluc.analysis import drift

    model_dir, out = runs(family)
    vlm = vlms(model_dir)
    res = _runs_or_refuses(cell, lambda: drift(vlm, {"checkpoint-1": vlm}, out, k=1, progress=False))
    if res is not None:
        assert len(res.table) > 0 and res.table["js"].abs().max() < 1e-5


@pytest.mark.capability("confounders")
@pytest.mark.parametrize("family", FAMILIES)
def test_confounders_run_or_say_why(family, runs, vlms, coco, cell):
    from lens_halluc.analysis import collect_representations
    from lens_halluc.data.coco import CocoDataset

    model_dir, _ = runs(family)
    vlm = vlms(model_dir)
    ds = CocoDataset.load(coco / "instances.json", coco / "captions.json", coco / "images")
    objects = {i: [{"category_id": ds.category_ids(i)[0], "patches": [0], "drawn": True}] for i in ds.image_ids}
    reps = _runs_or_refuses(cell, lambda: collect_representations(vlm, ds, objects, batch_size=2))
    if reps is not None:
        assert len(reps.visual) > 0
