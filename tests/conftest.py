"""Shared fixtures: a tiny random LLaVA saved to disk, and a tiny COCO-format dataset with images."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    """A random tiny LLaVA (2 layers × 4 heads, GQA 2 kv heads) saved with save_pretrained."""
    from lens_halluc.models.tiny import save_tiny_llava

    return save_tiny_llava(tmp_path_factory.mktemp("tiny-llava"), seed=1)


@pytest.fixture(scope="session")
def tiny_vlm(tiny_llava_dir):
    from lens_halluc.models import load_vlm

    return load_vlm(tiny_llava_dir)


def last_layer_output(model, adapter, inputs):
    """(the last decoder layer's output, the model's logits) from one forward: what ``adapter.logits`` maps
    to the logits (``out.hidden_states[-1]`` is after the final norm)."""
    seen = {}
    hook = adapter.layers(model)[-1].register_forward_hook(
        lambda mod, args, out: seen.__setitem__("h", out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
    finally:
        hook.remove()
    return seen["h"], logits


def write_toy_coco(root, n_images: int = 6, seed: int = 0):
    """A COCO-format dataset (instances, captions, random 48×48 images) under ``root``."""
    rng = np.random.default_rng(seed)
    cats = [{"id": 48, "name": "fork"}, {"id": 49, "name": "knife"}, {"id": 47, "name": "cup"},
            {"id": 18, "name": "dog"}, {"id": 17, "name": "cat"}]
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, anns, caps = [], [], []
    for i in range(1, n_images + 1):
        name = f"{i:06d}.png"
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(root / "images" / name)
        images.append({"id": i, "file_name": name, "width": 48, "height": 48})
        chosen = rng.choice(len(cats), size=3, replace=False)
        for c in chosen:
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cats[c]["id"], "bbox": [0, 0, 8, 8]})
        caps.append({"id": i, "image_id": i, "caption": "there is a " + " , a ".join(cats[c]["name"] for c in chosen) + " ."})
    (root / "instances.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    (root / "captions.json").write_text(json.dumps({"images": images, "annotations": caps}))
    return root


@pytest.fixture()
def toy_coco(tmp_path):
    return write_toy_coco(tmp_path / "coco")


@pytest.fixture(scope="session")
def attr_run(tmp_path_factory):
    """One attribution run on the shipped organism (40 images), shared by the analysis tests."""
    import subprocess
    import sys

    from lens_halluc.analysis import load_attribution_run

    out = tmp_path_factory.mktemp("attr")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "lens_halluc.attribute", "--out", str(out), "--n-images", "40",
                    "--no-png", "--no-progress"], check=True, env=env, capture_output=True)
    return load_attribution_run(out)


@pytest.fixture(scope="session")
def organism():
    """The shipped organism, loaded once."""
    from lens_halluc.models import load_vlm

    return load_vlm()


# ------------------------------------------------------------------ the README's architecture × capability table
# A test marked ``@pytest.mark.capability("name")`` and parametrized by ``family`` is one cell of the table
# (bench/capability_table.py runs the marked tests with LH_CAPABILITIES=out.json and renders the cells).
# A test that checks a method refuses on a family with NotDefinedForArchitecture records the reason
# with the ``cell`` fixture: ``cell.refused(str(err))``.
_CELLS: list[dict] = []


def pytest_configure(config):
    config.addinivalue_line("markers", "capability(name): a cell of the README's architecture x capability table")


class _Cell:
    def __init__(self, node):
        self.node = node

    def refused(self, reason: str) -> None:
        """The method is not defined for this family; ``reason`` goes to the table's notes."""
        self.node.user_properties.append(("refused", str(reason)))


@pytest.fixture()
def cell(request):
    return _Cell(request.node)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    marker = item.get_closest_marker("capability")
    if marker is None or not os.environ.get("LH_CAPABILITIES"):
        return
    family = getattr(item, "callspec", None) and item.callspec.params.get("family")
    if family is None or not (rep.when == "call" or (rep.when == "setup" and not rep.passed)):
        return
    refused = dict(item.user_properties).get("refused")
    status = "failed" if rep.failed else "skipped" if rep.skipped else ("refused" if refused else "passed")
    reason = refused or (str(rep.longrepr[-1]) if rep.skipped and isinstance(rep.longrepr, tuple) else None)
    name = marker.args[0].format(**item.callspec.params)  # e.g. "{method}" -> the parametrized method
    _CELLS.append({"family": family, "capability": name, "status": status, "reason": reason,
                   "test": item.nodeid})


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("LH_CAPABILITIES")
    if path and _CELLS:
        with open(path, "w") as f:
            json.dump(_CELLS, f, indent=1)
