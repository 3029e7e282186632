"""Loading every VLM family the zoo builds: offline, without torchvision, the whole processor output,
the default prompt template, the hub download path, ``device_map``, and the attribution CLI end to end.

Each family's tiny model is saved with ``save_pretrained`` (model + processor) and reloaded with
``load_vlm(dir)`` under ``HF_HUB_OFFLINE=1``, as a user's checkpoint directory would be.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_toy_coco

from lens_halluc.models import ModelLoadError, load_vlm
from lens_halluc.models.loading import (HUB_ALLOW_PATTERNS, image_only_processor_class, load_processor,
                                        resolve_model_path, text_attn_request)
from lens_halluc.models.prompts import get_template, render_prompt
from lens_halluc.models.spec import SpecError
from lens_halluc.models.zoo import FAMILIES, save_tiny

NO_TORCHVISION = importlib.util.find_spec("torchvision") is None


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``saved(family)`` -> the directory of the family's tiny model (built once per module)."""
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = save_tiny(family, tmp_path_factory.mktemp(f"tiny-{family}"))
        return cache[family]

    return get


@pytest.fixture(scope="module")
def loaded(saved):
    """``loaded(family)`` -> ``load_vlm(dir)`` offline (one load per family and module)."""
    cache: dict = {}

    def get(family: str):
        if family not in cache:
            mp = pytest.MonkeyPatch()
            mp.setenv("HF_HUB_OFFLINE", "1")
            try:
                cache[family] = load_vlm(saved(family))
            finally:
                mp.undo()
        return cache[family]

    return get


def _images():
    # two sizes and aspect ratios: processors that tile or resize by aspect see different inputs
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)),
            Image.fromarray(rng.integers(0, 255, (48, 32, 3), dtype=np.uint8))]


PROMPTS = ["Please describe this image in detail.", "Is there a cat?"]


@pytest.mark.capability("load offline")
@pytest.mark.parametrize("family", FAMILIES)
def test_loads_offline_without_torchvision(family, loaded):
    if not NO_TORCHVISION:
        pytest.skip("torchvision is installed here: the image-only path is not exercised")
    vlm = loaded(family)
    assert vlm.adapter is vlm.spec.adapter and vlm.adapter.name != "causal_lm"
    assert not hasattr(vlm.processor, "video_processor") or vlm.processor.video_processor is None
    # the text tower really runs eager attention (flat configs such as Chameleon's: the whole model)
    impls = {vlm.spec.attention(vlm.model, layer).config._attn_implementation for layer in range(vlm.spec.n_layers)}
    assert impls == {"eager"}
    assert vlm.device == vlm.model.get_input_embeddings().weight.device


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_batch_of_two_carries_the_whole_processor_output(family, loaded):
    vlm = loaded(family)
    images = _images()
    enc = vlm.encode(images, PROMPTS)
    texts = [vlm.format_prompt(p) for p in PROMPTS]
    direct = vlm.processor(images=vlm.adapter.processor_images(images), text=texts, return_tensors="pt", padding=True)
    assert set(enc) == set(direct)  # nothing dropped, nothing invented
    assert "pixel_values" in enc and set(vlm.adapter.image_input_keys) & set(enc) >= {"pixel_values"}
    B, T = enc["input_ids"].shape
    assert B == 2 and bool(enc["attention_mask"][:, -1].all())  # left padding: the last column is real
    for key, value in enc.items():  # per-token inputs have the ids' shape, image inputs one entry per image
        if key in vlm.adapter.per_token_inputs:
            assert tuple(value.shape[:2]) == (B, T), key
    inputs = vlm.model_inputs(enc)
    assert {"input_ids", "attention_mask", "pixel_values"} <= set(inputs)
    with torch.no_grad():
        logits = vlm.model(**inputs).logits
    assert tuple(logits.shape[:2]) == (B, T)


@pytest.mark.parametrize("family", FAMILIES)
def test_pixel_inputs_take_the_model_dtype_and_nothing_else_does(family, loaded, saved):
    loaded(family)  # skips a family without an adapter yet
    vlm = load_vlm(saved(family), dtype="bfloat16")
    enc = vlm.encode(_images(), PROMPTS)
    assert enc["pixel_values"].dtype == torch.bfloat16
    assert enc["input_ids"].dtype == torch.long and enc["attention_mask"].dtype in (torch.long, torch.int64)
    for key, value in enc.items():
        if isinstance(value, torch.Tensor) and not key.startswith("pixel_values") and key not in vlm.adapter.image_input_keys:
            assert not value.is_floating_point() or value.dtype == torch.float32, key


@pytest.mark.parametrize("family", FAMILIES)
def test_default_template_and_image_placeholder(family, loaded):
    vlm = loaded(family)
    assert vlm.template.name == ("vicuna-v1" if family == "llava" else "chat")
    placeholder = vlm.image_placeholder()
    assert all(placeholder in vlm.format_prompt(p) for p in PROMPTS)
    # a lens_halluc template writes {image}: it gets this processor's placeholder, not a literal "<image>"
    text = render_prompt(get_template("llava-1.5"), "Hi.", vlm.processor, vlm.adapter)
    assert text == f"USER: {placeholder}\nHi. ASSISTANT:"
    with pytest.raises(ValueError, match="lack the image token"):
        vlm.encode(_images()[:1], ["no image here"], apply_template=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_caption_batch_is_right_padded_and_equals_each_row_alone(family, loaded):
    vlm = loaded(family)
    tok = vlm.tokenizer
    caps = [tok("there is a dog .", add_special_tokens=False)["input_ids"], tok("a cat", add_special_tokens=False)["input_ids"]]
    rows = [vlm.caption_inputs(im, p, c) for im, p, c in zip(_images(), PROMPTS, caps)]
    for r, c in zip(rows, caps):  # one row: the caption appended, per-token inputs extended over it
        T = r["input_ids"].shape[-1]
        assert r["input_ids"][0, -len(c):].tolist() == list(c)
        for key in vlm.adapter.per_token_inputs:
            if key in r:
                assert r[key].shape[1] == T, key
    batch = vlm.caption_batch(_images(), PROMPTS, caps)
    lengths = [r["input_ids"].shape[-1] for r in rows]
    assert tuple(batch["input_ids"].shape) == (2, max(lengths))
    assert batch["attention_mask"].sum(-1).tolist() == lengths and bool(batch["attention_mask"][:, 0].all())
    with torch.no_grad():
        batched = vlm.model(**batch).logits
        for i, r in enumerate(rows):  # a right-padded row's logits equal its own forward's
            assert batch["input_ids"][i, :lengths[i]].tolist() == r["input_ids"][0].tolist()
            alone = vlm.model(**r).logits[0]
            assert torch.allclose(batched[i, :lengths[i]], alone, atol=1e-4), (family, i)


def test_attn_request_is_placed_by_config_layout():
    from transformers import ChameleonConfig, LlavaConfig

    assert text_attn_request(LlavaConfig(), "eager") == {"text_config": "eager"}
    assert text_attn_request(ChameleonConfig(), "eager") == "eager"  # flat: the text tower reads the top config


# ----------------------------------------------------------------------------- hub and device_map
class _NotCached(Exception):
    pass


def _fake_hub(monkeypatch, target: Path, calls: list):
    import huggingface_hub

    def snapshot_download(repo_id, local_files_only=False, allow_patterns=None, **kw):
        calls.append({"repo_id": repo_id, "local_files_only": local_files_only, "allow_patterns": allow_patterns})
        if local_files_only:
            raise _NotCached(f"{repo_id} not cached")
        return str(target)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)


def test_repo_id_is_downloaded_when_the_hub_is_allowed(monkeypatch, saved):
    target = saved("llava")
    calls: list = []
    _fake_hub(monkeypatch, target, calls)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert resolve_model_path("someone/tiny-llava") == target
    assert [c["local_files_only"] for c in calls] == [True, False]  # the cache first, then the hub
    patterns = calls[-1]["allow_patterns"]
    assert patterns == list(HUB_ALLOW_PATTERNS) and "*.safetensors" in patterns
    assert not any(p.endswith((".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")) for p in patterns)
    vlm = load_vlm("someone/tiny-llava")
    assert vlm.path == target and vlm.spec.adapter.name == "llava"


def test_offline_repo_id_gives_the_clear_error(monkeypatch, saved):
    calls: list = []
    _fake_hub(monkeypatch, saved("llava"), calls)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE is set.*hf download someone/tiny-llava"):
        resolve_model_path("someone/tiny-llava")
    assert [c["local_files_only"] for c in calls] == [True]  # nothing downloaded


def test_download_failure_gives_the_clear_error(monkeypatch):
    import huggingface_hub

    def snapshot_download(repo_id, local_files_only=False, **kw):
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with pytest.raises(ModelLoadError, match="could not be downloaded.*no network"):
        resolve_model_path("someone/tiny-llava")


def test_device_map_places_the_model_and_device_is_the_input_device(saved):
    if importlib.util.find_spec("accelerate") is None:
        pytest.skip("accelerate is not installed")
    vlm = load_vlm(saved("llava"), device_map={"": "cpu"})
    assert vlm.device == vlm.model.get_input_embeddings().weight.device == torch.device("cpu")
    enc = vlm.encode(_images()[:1], PROMPTS[:1])
    assert enc["input_ids"].device == vlm.device


def test_device_map_without_accelerate_says_so(monkeypatch, saved):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a))
    with pytest.raises(ModelLoadError, match="accelerate"):
        load_vlm(saved("llava"), device_map="auto")


def test_architecture_without_adapter_names_the_adapter_to_write(tmp_path):
    from transformers import Idefics2Config

    Idefics2Config().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")  # never read: the adapter check comes before the weights
    with pytest.raises(SpecError, match="adapters/idefics2.py"):
        load_vlm(tmp_path)


@pytest.mark.skipif(not NO_TORCHVISION, reason="torchvision is installed: stock processors load as they are")
@pytest.mark.parametrize("family", [f for f in ("llava_onevision", "smolvlm", "qwen2_vl", "internvl") if f in FAMILIES])
def test_checkpoint_naming_the_stock_processor_loads_image_only(family, saved, tmp_path):
    """A hub checkpoint records the stock processor class (which lists a video processor): it loads image-only."""
    import shutil

    from transformers import AutoProcessor

    d = tmp_path / family
    shutil.copytree(saved(family), d)
    stock = None
    for f in d.glob("*.json"):
        text = f.read_text()
        data = json.loads(text)
        name = data.get("processor_class") if isinstance(data, dict) else None
        if isinstance(name, str) and "ImageOnly" in name:
            stock = name.replace("ImageOnlyProcessor", "Processor")
            f.write_text(text.replace(name, stock))
    if stock is None:
        pytest.skip(f"{family}'s zoo processor is saved under its stock class already")
    with pytest.raises(Exception):
        AutoProcessor.from_pretrained(d)  # what a user without torchvision gets from transformers alone
    processor = load_processor(d)
    assert type(processor).__mro__[1].__name__ == stock or type(processor).__name__ == stock
    assert "video_processor" not in processor.get_attributes()
    vlm = load_vlm(d)
    assert set(vlm.encode(_images(), PROMPTS)) >= {"input_ids", "pixel_values"}


def test_image_only_class_of_a_processor_without_video_is_itself():
    from transformers import LlavaProcessor

    assert image_only_processor_class(LlavaProcessor) is LlavaProcessor


# ----------------------------------------------------------------------------- the attribution CLI
CLI_FAMILIES = [f for f in ("llava", "gemma3", "llava_next") if f in FAMILIES]


@pytest.mark.slow
@pytest.mark.parametrize("family", CLI_FAMILIES)
def test_attribute_cli_end_to_end(family, saved, tmp_path):
    coco = write_toy_coco(tmp_path / "coco", n_images=4)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lens_halluc.attribute", "--model", str(saved(family)),
           "--instances", str(coco / "instances.json"), "--references", str(coco / "captions.json"),
           "--image-dir", str(coco / "images"), "--n-images", "4", "--max-new-tokens", "12", "--out", str(out),
           "--no-progress", "--no-png"]
    r = subprocess.run(cmd, capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"))
    if r.returncode == 2 and "nothing to attribute" in r.stderr:
        pytest.skip(f"{family}: the random model hallucinated nothing CHAIR can align")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    inf = np.load(out / "influences.npz")["influence"]
    tokens = (out / "tokens.csv").read_text().splitlines()
    assert inf.shape == (len(tokens) - 1, manifest["spec"]["n_layers"], manifest["spec"]["n_heads"])
    assert np.isfinite(inf).all() and len(tokens) > 1
    image_ids = set(manifest["spec"]["image_token_ids"])
    for line in (out / "samples.jsonl").read_text().splitlines():  # the sequences hold the family's image tokens
        assert image_ids & set(json.loads(line)["input_ids"])
