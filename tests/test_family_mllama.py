"""Mllama (Llama-3.2-Vision): the tiny zoo model, its processor and its adapter.

Every expectation is computed from the model itself (its forward, ``model.generate``, a decoder layer
called with the kwargs the plain forward gave it), never hard-coded.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from lens_halluc.models.adapters import NotDefinedForArchitecture, adapter_for
from lens_halluc.models.spec import ModelSpec, TokenRole
from lens_halluc.models.zoo import make_tiny, save_tiny


@pytest.fixture(scope="module")
def tiny():
    model, processor = make_tiny("mllama", seed=0)
    return model, processor, adapter_for(model)


def _images(seed: int = 0):
    rng = np.random.default_rng(seed)
    # a wide image (2 tiles) and a square one (1 tile of 2): the batch has a padding tile
    return [Image.fromarray(rng.integers(0, 255, (20, 40, 3), dtype=np.uint8)),
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))]


def _batch(processor, adapter, prompts=("please describe this image in detail.", "is there a cat ?")):
    texts = [adapter.format_prompt(processor, p) for p in prompts]
    tok = processor.tokenizer
    side, tok.padding_side = tok.padding_side, "left"
    try:
        enc = processor(images=adapter.processor_images(_images()), text=texts, padding=True, return_tensors="pt",
                        **adapter.processor_call_kwargs(processor))
    finally:
        tok.padding_side = side
    return adapter.model_inputs(enc)


def _layer_io(model, adapter, layer: int, inputs):
    """Input hidden states, keyword arguments and output of decoder layer ``layer`` in a plain forward."""
    got = {}

    def pre(mod, args, kw):
        got["x"], got["kw"] = (args[0] if args else kw["hidden_states"]), dict(kw)

    def post(mod, args, kw, out):
        got["y"] = out[0] if isinstance(out, tuple) else out
    mod = adapter.layers(model)[layer]
    hs = [mod.register_forward_pre_hook(pre, with_kwargs=True), mod.register_forward_hook(post, with_kwargs=True)]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in hs:
            h.remove()
    return got


def test_save_reload_offline_without_torchvision(tmp_path):
    out = save_tiny("mllama", tmp_path / "mllama", seed=0)
    code = (
        "import sys, importlib.util\n"
        "sys.modules['torchvision'] = None  # absent, even where it is installed: import fails, find_spec is None\n"
        "assert importlib.util.find_spec('torchvision') is None\n"
        "import numpy as np, torch\n"
        "from PIL import Image\n"
        "from transformers import AutoModelForImageTextToText, AutoProcessor\n"
        f"d = {str(out)!r}\n"
        "proc = AutoProcessor.from_pretrained(d)\n"
        "model = AutoModelForImageTextToText.from_pretrained(d).eval()\n"
        "im = Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8))\n"
        "msgs = [{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': 'describe this image .'}]}]\n"
        "text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)\n"
        "enc = proc(images=[[im]], text=[text], return_tensors='pt')\n"
        "assert type(proc.image_processor).__name__ == 'MllamaImageProcessorPil'\n"
        "print(type(model).__name__, type(proc).__name__, tuple(model(**enc).logits.shape))\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    name, proc_name = res.stdout.split()[:2]
    assert (name, proc_name) == ("MllamaForConditionalGeneration", "MllamaProcessor")
    # the reloaded model is the saved one
    from transformers import AutoModelForImageTextToText
    model, _ = make_tiny("mllama", seed=0)
    loaded = AutoModelForImageTextToText.from_pretrained(out).eval()
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n


def test_spec_has_cross_attention_layers(tiny):
    model, processor, adapter = tiny
    spec = ModelSpec.from_model(model, processor)
    cross = list(model.config.text_config.cross_attention_layers)
    assert cross and 0 not in cross
    assert [i for i, k in enumerate(spec.attention_kinds) if k == "cross"] == cross
    assert "self" in spec.attention_kinds
    for layer in range(spec.n_layers):
        attn = adapter.attention(model, layer)
        assert type(attn).__name__ == ("MllamaTextCrossAttention" if layer in cross else "MllamaTextSelfAttention")
        n_heads, n_kv, head_dim = adapter.attention_heads(model, layer)
        assert (n_heads, head_dim) == (spec.n_heads, spec.head_dim) and n_kv < n_heads
        assert adapter.o_proj(model, layer).in_features == n_heads * head_dim
    assert spec.image_token_ids == (processor.tokenizer.convert_tokens_to_ids("<|image|>"),)
    # like the real checkpoint: the image token is one past the LM head
    assert spec.image_token_ids[0] == model.config.text_config.vocab_size == model.lm_head.out_features
    base = [adapter.base_lm_layer(model, i) for i in range(spec.n_layers)]
    assert [b for b in base if b is not None] == list(range(spec.n_layers - len(cross)))
    assert all((b is None) == (i in cross) for i, b in enumerate(base))
    assert len(adapter.vision_attention(model)) == (model.config.vision_config.num_hidden_layers
                                                    + model.config.vision_config.num_global_layers)


def test_token_roles_one_image_token_per_row(tiny):
    model, processor, adapter = tiny
    spec = ModelSpec.from_model(model, processor)
    inputs = _batch(processor, adapter)
    roles = spec.token_roles(inputs["input_ids"], inputs["attention_mask"])
    ids = inputs["input_ids"]
    image_id = spec.image_token_ids[0]
    for row in range(ids.shape[0]):
        pos = (ids[row] == image_id).nonzero().flatten().tolist()
        assert len(pos) == 1 and (roles[row] == TokenRole.IMAGE).nonzero().flatten().tolist() == pos
        real = inputs["attention_mask"][row].bool()
        assert bool((roles[row][~real] == TokenRole.PAD).all())
        before = torch.arange(ids.shape[1]) < pos[0]
        assert bool((roles[row][before & real] == TokenRole.SYSTEM).all())
        assert bool((roles[row][pos[0] + 1:] == TokenRole.TEXT).all())
        # the processor's cross-attention mask starts at the image token: the image token is the image's
        # position in the text stream
        cam = inputs["cross_attention_mask"][row, :, 0].amax(-1)
        assert cam.nonzero().flatten().min().item() == pos[0]


def test_forward_batch2_nested_images_and_image_matters(tiny):
    model, processor, adapter = tiny
    inputs = _batch(processor, adapter)
    assert inputs["pixel_values"].shape[:3] == (2, 1, model.config.vision_config.max_num_tiles)
    assert inputs["cross_attention_mask"].shape[:2] == inputs["input_ids"].shape
    with torch.no_grad():
        batch = model(**inputs).logits
        for row in range(2):
            one = {k: v[row:row + 1] for k, v in inputs.items()}
            keep = one["attention_mask"][0].bool()
            one = {k: (v[:, keep] if k in ("input_ids", "attention_mask", "cross_attention_mask") else v)
                   for k, v in one.items()}
            single = model(**one).logits[0]
            assert torch.allclose(batch[row][keep], single, atol=1e-4), row
        other = dict(inputs, pixel_values=torch.randn_like(inputs["pixel_values"]))
        changed = (model(**other).logits - batch).abs().amax(-1)
    real = inputs["attention_mask"].bool()
    image_pos = inputs["input_ids"] == model.config.image_token_index
    after = image_pos.long().cumsum(-1).bool()
    assert bool((changed[after & real] > 1e-3).all())        # the gates are non-zero: the image reaches the text
    # the documented quirk: rows before <|image|> still cross-attend (uniformly) to the vision tokens
    assert bool((changed[~after & real] > 1e-4).all())


def test_adapter_logits_equal_model_logits(tiny):
    model, processor, adapter = tiny
    inputs = _batch(processor, adapter)
    last = len(adapter.layers(model)) - 1
    got = _layer_io(model, adapter, last, inputs)
    with torch.no_grad():
        expected = model(**inputs).logits
    assert torch.allclose(adapter.logits(model, got["y"]), expected, atol=1e-5)


def test_extend_inputs_matches_generate(tiny):
    model, processor, adapter = tiny
    inputs = _batch(processor, adapter)
    with torch.no_grad():
        gen = model.generate(**inputs, max_new_tokens=5, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    T = inputs["input_ids"].shape[1]
    new = gen.sequences[:, T:]
    ext = adapter.extend_inputs(inputs, new)
    cam = ext["cross_attention_mask"]
    assert cam.shape[1] == ext["input_ids"].shape[1]
    assert torch.equal(cam[:, T:], inputs["cross_attention_mask"][:, -1:].expand(-1, new.shape[1], -1, -1))
    with torch.no_grad():
        full = model(**ext).logits
    assert torch.allclose(full[:, T - 1:-1], torch.stack(gen.logits, 1), atol=1e-4)
    assert torch.equal(full[:, T - 1:-1].argmax(-1), new)


def test_cross_layer_replay_on_rows_equals_plain_forward(tiny):
    model, processor, adapter = tiny
    inputs = _batch(processor, adapter)
    ca = adapter.cross_attention_inputs(model, inputs)
    for layer in adapter.cross_attention_layers(model):
        got = _layer_io(model, adapter, layer, inputs)
        clean = adapter.replay_clean_kwargs(model, layer, got["kw"])
        for name, (b_axis, p_axis) in adapter.replay_kwarg_axes(model, layer).items():
            value = clean[name]
            assert value.shape[b_axis] == inputs["input_ids"].shape[0], name
            if p_axis is not None:
                assert value.shape[p_axis] == inputs["input_ids"].shape[1], name
            assert torch.allclose(value, ca[name]), name
        pos = torch.tensor([1, 4, inputs["input_ids"].shape[1] - 1])
        kw = adapter.cross_layer_kwargs(model, layer, ca, pos)
        with torch.no_grad():
            rows = adapter.layers(model)[layer](got["x"][:, pos], **kw)
        assert torch.allclose(rows, got["y"][:, pos], atol=1e-5)
        # one sample's inputs expanded to a replay batch of 3 copies of its rows
        one = {k: v[1:2] for k, v in ca.items()}
        kw = adapter.cross_layer_kwargs(model, layer, one, pos, batch=3)
        with torch.no_grad():
            rows = adapter.layers(model)[layer](got["x"][1:2, pos].expand(3, -1, -1), **kw)
        assert torch.allclose(rows, got["y"][1:2, pos].expand(3, -1, -1), atol=1e-5)
    with pytest.raises(Exception, match="self-attention layer"):
        adapter.cross_layer_kwargs(model, 0, ca)


def test_not_defined_and_refusals(tiny):
    model, processor, adapter = tiny
    inputs = _batch(processor, adapter)
    for method in ("bias", "adhh", "confounders"):
        with pytest.raises(NotDefinedForArchitecture, match="cross-attention|tiles"):
            adapter.require(method)
    adapter.require("vcd")  # defined
    with pytest.raises(NotDefinedForArchitecture):
        adapter.patch_grid(model, inputs, 0)
    with pytest.raises(ValueError, match="cross_attention_mask"):
        adapter.model_inputs({k: v for k, v in inputs.items() if k != "cross_attention_mask"})
