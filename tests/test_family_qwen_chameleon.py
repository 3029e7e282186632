"""Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Chameleon: tiny zoo models, their adapters, and the facts the core relies on
(M-RoPE positions, the row-major merged grid, Qwen3-VL's deepstack, Chameleon's image-code logit suppression).

Each check compares against the model's own computation (its forward, ``get_rope_index``, hooks on the
decoder layers), never against stored numbers.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import last_layer_output

from lens_halluc.models.adapters import AdapterError, NotDefinedForArchitecture, adapter_for
from lens_halluc.models.spec import ModelSpec, TokenRole
from lens_halluc.models.zoo import make_tiny, save_tiny

QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
FAMILIES = (*QWEN, "chameleon")
PROMPTS = ("describe", "please describe this image in detail .")
_CACHE: dict = {}


def tiny(family):
    if family not in _CACHE:
        _CACHE[family] = make_tiny(family, seed=0)
    return _CACHE[family]


def images(family, n=2):
    """Random images: for Qwen one square and one 3:2 (different grids in one batch); Chameleon 32 px."""
    rng = np.random.default_rng(1)
    side = {"qwen3_vl": 64, "chameleon": 32}.get(family, 56)
    shapes = [(side, side, 3), (side * 3 // 2 if family != "chameleon" else side, side, 3)]
    return [Image.fromarray(rng.integers(0, 255, shapes[i % 2], dtype=np.uint8)) for i in range(n)]


def encode(family, n=2, left=True):
    model, proc = tiny(family)
    adapter = adapter_for(model)
    proc.tokenizer.padding_side = "left" if left else "right"
    texts = [adapter.format_prompt(proc, PROMPTS[i % 2]) for i in range(n)]
    return proc(images=adapter.processor_images(images(family, n)), text=texts, return_tensors="pt", padding=True)


# ---------------------------------------------------------------- zoo: save / reload offline, no torchvision
@pytest.mark.parametrize("family", FAMILIES)
def test_zoo_saves_and_reloads_without_torchvision(family, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    assert importlib.util.find_spec("torchvision") is None, "this check is about environments without torchvision"
    save_tiny(family, tmp_path)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    proc = AutoProcessor.from_pretrained(tmp_path)
    ref_model, ref_proc = tiny(family)
    assert type(model) is type(ref_model)
    assert type(proc).__name__ == type(ref_proc).__name__
    assert proc.chat_template == ref_proc.chat_template
    assert getattr(proc, "video_processor", None) is None  # image-only: nothing needed torchvision
    enc = encode(family)
    with torch.no_grad():
        assert torch.allclose(model(**enc).logits, ref_model(**enc).logits, atol=1e-5)


# ---------------------------------------------------------------- spec, tokens, template
@pytest.mark.parametrize("family", FAMILIES)
def test_spec_sizes_match_config(family):
    model, proc = tiny(family)
    spec = ModelSpec.from_model(model, proc)
    cfg = adapter_for(model).text_config(model.config)
    assert spec.n_layers == cfg.num_hidden_layers == len(adapter_for(model).layers(model))
    assert (spec.n_heads, spec.n_kv_heads) == (cfg.num_attention_heads, cfg.num_key_value_heads)
    assert spec.head_dim * spec.n_heads == adapter_for(model).o_proj(model, 0).in_features
    assert spec.vocab_size == model.get_output_embeddings().out_features
    assert spec.attention_kinds == ("self",) * spec.n_layers


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_template_uses_family_placeholder(family):
    model, proc = tiny(family)
    text = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe"}]}],
        add_generation_prompt=True, tokenize=False)
    placeholder = "<image>" if family == "chameleon" else "<|vision_start|><|image_pad|><|vision_end|>"
    assert text.count(placeholder) == 1
    assert text == adapter_for(model).format_prompt(proc, "describe")


@pytest.mark.parametrize("family", FAMILIES)
def test_token_roles_on_processor_output(family):
    model, proc = tiny(family)
    adapter = adapter_for(model)
    enc = encode(family)
    roles = ModelSpec.from_model(model, proc).token_roles(enc["input_ids"], enc["attention_mask"])
    tokens = [proc.tokenizer.convert_ids_to_tokens(row) for row in enc["input_ids"]]
    image = "<image>" if family == "chameleon" else "<|image_pad|>"
    structure = {"<racm3:break>", "<eoss>"} if family == "chameleon" else {"<|vision_start|>", "<|vision_end|>"}
    for r in range(2):
        for tok, role, m in zip(tokens[r], roles[r].tolist(), enc["attention_mask"][r].tolist()):
            if not m:
                assert role == TokenRole.PAD
            elif tok == image:
                assert role == TokenRole.IMAGE
            elif tok in structure:
                assert role == TokenRole.IMAGE_STRUCTURE
            else:
                assert role in (TokenRole.SYSTEM, TokenRole.TEXT)
        # the structure tokens wrap the image tokens exactly
        idx = [i for i, t in enumerate(tokens[r]) if t == image]
        assert tokens[r][idx[0] - 1] in structure and tokens[r][idx[-1] + 1] in structure
        assert idx == list(range(idx[0], idx[-1] + 1))
    assert set(adapter.structure_token_ids(model, proc)) == set(proc.tokenizer.convert_tokens_to_ids(sorted(structure)))


# ---------------------------------------------------------------- forward on processor output, batch 2
@pytest.mark.parametrize("family", FAMILIES)
def test_batched_forward_equals_single_rows(family):
    """Batch of 2 (different prompts; Qwen: different image grids), left padded, through adapter.model_inputs,
    equals each row alone -- so the whole processor output (grids, mm_token_type_ids) is carried correctly."""
    model, proc = tiny(family)
    adapter = adapter_for(model)
    enc = encode(family)
    inputs = adapter.model_inputs(enc)
    if family != "chameleon":
        assert set(inputs) == {"input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids"}
    if family == "chameleon":  # its forward ignores the mask for positions (arange): pass mask positions
        inputs["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        batched = model(**inputs).logits
        ims = images(family)
        for r in range(2):
            alone = proc(images=adapter.processor_images([ims[r]]), text=[adapter.format_prompt(proc, PROMPTS[r])],
                         return_tensors="pt")
            ref = model(**adapter.model_inputs(alone)).logits[0]
            keep = enc["attention_mask"][r].bool()
            assert torch.allclose(batched[r][keep], ref, atol=1e-5), (batched[r][keep] - ref).abs().max()


@pytest.mark.parametrize("family", QWEN)
def test_qwen_one_d_positions_change_logits_and_adapter_flags_it(family):
    """1-D position_ids override M-RoPE (the issue's bug): the adapter says positions_by_model."""
    model, _ = tiny(family)
    enc = encode(family)
    mask = enc["attention_mask"]
    with torch.no_grad():
        ref = model(**enc).logits
        bad = model(**enc, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    assert (bad - ref)[mask.bool()].abs().max() > 1e-3
    assert adapter_for(model).positions_by_model


@pytest.mark.parametrize("family", QWEN)
def test_qwen_generation_positions_are_mrope(family):
    """What generate() computes once ([4, B, T]: text row + the three M-RoPE axes) reproduces the forward."""
    model, _ = tiny(family)
    enc = encode(family)
    pos = model._prepare_position_ids_for_generation(enc["input_ids"], dict(enc))
    assert pos.shape == (4, *enc["input_ids"].shape)
    with torch.no_grad():
        ref = model(**enc).logits
        explicit = model(**enc, position_ids=pos).logits
    assert torch.allclose(ref, explicit, atol=1e-5)


@pytest.mark.parametrize("family", QWEN)
def test_qwen_inputs_refuse_grid_without_token_types(family):
    model, _ = tiny(family)
    enc = dict(encode(family))
    del enc["mm_token_type_ids"]
    with pytest.raises(AdapterError, match="mm_token_type_ids"):
        adapter_for(model).model_inputs(enc)


@pytest.mark.parametrize("family", QWEN)
def test_qwen_caption_extension_matches_processor(family):
    """extend_inputs over a caption gives the same inputs (mm_token_type_ids 0 on the caption) and logits as the
    processor on prompt + caption."""
    model, proc = tiny(family)
    adapter = adapter_for(model)
    ims = images(family, 1)
    prompt = adapter.format_prompt(proc, "describe")
    caption = "there is a dog ."
    enc = adapter.model_inputs(proc(images=ims, text=[prompt], return_tensors="pt"))
    full = adapter.model_inputs(proc(images=ims, text=[prompt + caption], return_tensors="pt"))
    new = torch.tensor(proc.tokenizer(caption, add_special_tokens=False)["input_ids"])[None]
    ext = adapter.extend_inputs(enc, new)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        assert torch.equal(ext[key], full[key]), key
    with torch.no_grad():
        assert torch.allclose(model(**ext).logits, model(**full).logits, atol=1e-5)


@pytest.mark.parametrize("family", QWEN)
def test_qwen_patch_grid_is_row_major_merged_grid(family):
    """patch_grid = (h/m, w/m), and get_rope_index's height/width positions of the image tokens walk it row-major."""
    model, _ = tiny(family)
    adapter = adapter_for(model)
    enc = encode(family)
    pos, _ = model.model.get_rope_index(enc["input_ids"], mm_token_type_ids=enc["mm_token_type_ids"],
                                        image_grid_thw=enc["image_grid_thw"], attention_mask=enc["attention_mask"])
    is_image = enc["input_ids"] == model.config.image_token_id
    grids = []
    for r in range(2):
        rows, cols = adapter.patch_grid(model, enc, r)
        grids.append((rows, cols))
        k = torch.arange(rows * cols)
        hp, wp = pos[1, r][is_image[r]], pos[2, r][is_image[r]]
        assert torch.equal(hp - hp.min(), k // cols) and torch.equal(wp - wp.min(), k % cols)
    assert grids[0] != grids[1]  # the 3:2 image has another grid: the per-row lookup matters


def test_qwen3_deepstack_adds_at_image_positions_after_early_layers():
    model, _ = tiny("qwen3_vl")
    adapter = adapter_for(model)
    enc = encode("qwen3_vl")
    layers = adapter.layers(model)
    ins, outs, hooks = {}, {}, []
    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_pre_hook(
            lambda mod, args, kw, i=i: ins.__setitem__(i, (args[0] if args else kw["hidden_states"]).clone()),
            with_kwargs=True))
        hooks.append(layer.register_forward_hook(
            lambda mod, args, out, i=i: outs.__setitem__(i, (out[0] if isinstance(out, tuple) else out).clone())))
    try:
        with torch.no_grad():
            model(**enc)
    finally:
        for h in hooks:
            h.remove()
    is_image = enc["input_ids"] == model.config.image_token_id
    deep = adapter.deepstack_layers(model)
    assert deep and len(deep) < len(layers)  # active, and (tiny model) not after every layer: both cases
    for i in range(len(layers) - 1):
        changed = (ins[i + 1] != outs[i]).any(-1)
        assert torch.equal(changed, is_image) if i in deep else not changed.any()
    assert adapter.between_layer_steps == "additive"


# ---------------------------------------------------------------- Chameleon
def test_chameleon_image_tokens_are_the_placeholders():
    model, proc = tiny("chameleon")
    adapter = adapter_for(model)
    enc = encode("chameleon")
    (image_id,) = adapter.image_token_ids(model, proc)
    assert image_id == proc.image_token_id
    codes = torch.tensor(adapter.image_code_ids(model))
    assert not torch.isin(enc["input_ids"], codes).any()  # codes enter as embeddings, never as ids
    assert int((enc["input_ids"] == image_id).sum(-1)[0]) == proc.image_seq_length
    # the forward's input embeddings at the placeholders are the VQ codes' embeddings
    seen = {}
    hook = adapter.layers(model)[0].register_forward_pre_hook(
        lambda mod, args, kw: seen.__setitem__("x", args[0] if args else kw["hidden_states"]), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**adapter.model_inputs(enc))
    finally:
        hook.remove()
    with torch.no_grad():
        code_ids = model.model.get_image_tokens(enc["pixel_values"])
        expected = model.model.embed_tokens(code_ids)
    mask = enc["input_ids"] == image_id
    assert torch.allclose(seen["x"][mask], expected.reshape(-1, expected.shape[-1]))
    assert torch.isin(code_ids, codes).all()
    rows, cols = adapter.patch_grid(model, enc, 0)
    assert rows * cols == proc.image_seq_length


def test_chameleon_logits_postprocess_equals_model_logits():
    model, _ = tiny("chameleon")
    adapter = adapter_for(model)
    enc = encode("chameleon")
    hidden, logits = last_layer_output(model, adapter, adapter.model_inputs(enc))
    mine = adapter.logits(model, hidden)
    assert torch.allclose(mine, logits, atol=1e-5, rtol=0)
    codes = adapter.image_code_ids(model)
    assert (mine[..., codes] == torch.finfo(mine.dtype).min).all()
    plain = adapter.lm_head(model)(adapter.final_norm(model)(hidden))
    assert not torch.allclose(plain, logits)  # the post-processing is not a no-op
    assert model.config.get_text_config() is model.config  # flat config (attn_implementation dict ignored)


def test_chameleon_vision_attention_not_defined():
    model, _ = tiny("chameleon")
    with pytest.raises(NotDefinedForArchitecture, match="VQ-VAE"):
        adapter_for(model).vision_attention(model)


@pytest.mark.parametrize("family", QWEN)
def test_qwen_vision_attention_lists_blocks(family):
    model, _ = tiny(family)
    attn = adapter_for(model).vision_attention(model)
    assert len(attn) == model.config.vision_config.depth and all(hasattr(a, "qkv") for a in attn)
