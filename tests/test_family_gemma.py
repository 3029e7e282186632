"""Gemma-family adapters and tiny models: Gemma 3, PaliGemma (Gemma text), PaliGemma 2 (Gemma 2 text).

Every check compares against the model itself (its forward, ``model.generate``, its own processor
output), never against stored numbers.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import last_layer_output

from lens_halluc.models.adapters import NotDefinedForArchitecture, adapter_for
from lens_halluc.models.spec import ModelSpec, TokenRole
from lens_halluc.models.zoo import make_tiny, save_tiny

FAMILIES = ("gemma3", "paligemma", "paligemma2")
PROMPTS = ("please describe this image in detail .", "is there a dog ?")
_CACHE: dict = {}


def tiny(family):
    if family not in _CACHE:
        _CACHE[family] = make_tiny(family, seed=0)
    return _CACHE[family]


def images(n=2):
    rng = np.random.RandomState(0)
    return [Image.fromarray(rng.randint(0, 255, (40 + 8 * i, 30, 3), dtype=np.uint8)) for i in range(n)]


def encode(family, prompts=PROMPTS, padding_side="left"):
    model, processor = tiny(family)
    adapter = adapter_for(model)
    processor.tokenizer.padding_side = padding_side
    texts = [adapter.format_prompt(processor, p) for p in prompts]
    enc = processor(images=adapter.processor_images(images(len(prompts))), text=texts, return_tensors="pt",
                    padding=True)
    return model, processor, adapter, enc


@pytest.mark.parametrize("family", FAMILIES)
def test_save_reload_without_torchvision(family, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    save_tiny(family, tmp_path)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert type(processor.image_processor).__name__.endswith("Pil")  # the PIL backend: no torchvision needed
    ref_model, ref_processor, adapter, ref_enc = encode(family)
    assert type(model) is type(ref_model) and adapter_for(model) is adapter
    processor.tokenizer.padding_side = "left"
    texts = [adapter.format_prompt(processor, p) for p in PROMPTS]
    enc = processor(images=adapter.processor_images(images()), text=texts, return_tensors="pt", padding=True)
    assert torch.equal(enc["input_ids"], ref_enc["input_ids"])
    with torch.no_grad():
        got = model(**adapter.model_inputs(enc)).logits
        want = ref_model(**adapter.model_inputs(ref_enc)).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_spec(family):
    model, processor = tiny(family)
    spec = ModelSpec.from_model(model, processor)
    text = model.config.get_text_config()
    assert spec.adapter.name == ("gemma3" if family == "gemma3" else "paligemma")
    assert (spec.n_layers, spec.n_heads, spec.n_kv_heads, spec.head_dim) == (
        text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads, text.head_dim)
    assert spec.attention_kinds == ("self",) * text.num_hidden_layers
    assert spec.image_token_ids == (processor.tokenizer.convert_tokens_to_ids(
        "<image_soft_token>" if family == "gemma3" else "<image>"),)
    if family == "gemma3":
        assert spec.structure_token_ids == tuple(processor.tokenizer.convert_tokens_to_ids(
            ["<start_of_image>", "<end_of_image>"]))
        assert set(text.layer_types) == {"sliding_attention", "full_attention"}
    else:
        assert spec.structure_token_ids == ()
        assert spec.adapter.family(model) == family
    assert spec.eos_token_ids == (processor.tokenizer.eos_token_id,)


@pytest.mark.parametrize("family", FAMILIES)
def test_token_roles(family):
    model, processor, adapter, enc = encode(family)
    spec = ModelSpec.from_model(model, processor)
    roles = spec.token_roles(enc["input_ids"], enc["attention_mask"])
    ids, mask = enc["input_ids"], enc["attention_mask"]
    n_image = (model.config.mm_tokens_per_image if family == "gemma3"
               else (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2)
    assert ((roles == TokenRole.IMAGE).sum(-1) == n_image).all()
    assert torch.equal(roles == TokenRole.PAD, mask == 0)
    is_structure = torch.isin(ids, torch.tensor(spec.structure_token_ids or [-1]))
    assert torch.equal(roles == TokenRole.IMAGE_STRUCTURE, is_structure)
    if family == "gemma3":
        assert ((roles == TokenRole.IMAGE_STRUCTURE).sum(-1) == 2).all()
        assert ((roles == TokenRole.SYSTEM).sum(-1) > 0).all()  # <bos><start_of_turn>user\n... before the image
        # the processor's token_type_ids mark exactly the image tokens
        assert torch.equal(enc["token_type_ids"] == 1, roles == TokenRole.IMAGE)
    else:
        # PaliGemma starts with the image: no system segment; <bos>, the prompt and "\n" follow it
        assert ((roles == TokenRole.SYSTEM).sum(-1) == 0).all()
        assert (enc["token_type_ids"][mask == 1] == 0).all()  # no suffix: everything is prefix


@pytest.mark.parametrize("family", FAMILIES)
def test_format_prompt(family):
    model, processor, adapter, enc = encode(family, padding_side="right")
    tok = processor.tokenizer
    text = adapter.format_prompt(processor, PROMPTS[0])
    assert processor.image_token in text
    row = enc["input_ids"][0][enc["attention_mask"][0] == 1].tolist()
    assert row.count(tok.bos_token_id) == 1
    if family == "gemma3":
        assert row[0] == tok.bos_token_id
        rendered = processor.apply_chat_template(adapter.chat_messages(PROMPTS[0]), add_generation_prompt=True,
                                                 tokenize=False)
        assert rendered.startswith(tok.bos_token) and not text.startswith(tok.bos_token)
        assert tok.convert_ids_to_tokens(row[-3:]) == ["<start_of_turn>", "model", "\n"]
    else:
        n_image = row.count(model.config.image_token_id)
        assert row[:n_image] == [model.config.image_token_id] * n_image
        assert row[n_image] == tok.bos_token_id
        assert row[n_image + 1:] == tok(PROMPTS[0] + "\n", add_special_tokens=False).input_ids


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_batch2_matches_single_rows(family):
    model, processor, adapter, enc = encode(family)
    inputs = adapter.model_inputs(enc)
    assert "token_type_ids" in inputs and "labels" not in inputs
    with torch.no_grad():
        batch = model(**inputs).logits
    padded = [b for b in range(len(PROMPTS)) if not bool(enc["attention_mask"][b].all())]
    assert padded, "the prompts should have different lengths so that one row is padded"
    for b in padded:
        _, _, _, one = encode(family, prompts=[PROMPTS[b]])
        one_enc = dict(one)
        one_enc["pixel_values"] = enc["pixel_values"][b:b + 1]  # the same image as row b of the batch
        with torch.no_grad():
            single = model(**adapter.model_inputs(one_enc)).logits[0]
        keep = enc["attention_mask"][b] == 1
        torch.testing.assert_close(batch[b][keep], single, rtol=0, atol=1e-4)
    # token_type_ids change the attention (image / prefix blocks): dropping them changes the logits
    without = {k: v for k, v in inputs.items() if k != "token_type_ids"}
    with torch.no_grad():
        assert (model(**without).logits - batch).abs().max() > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_postprocess_equals_model(family):
    model, processor, adapter, enc = encode(family)
    hidden, logits = last_layer_output(model, adapter, adapter.model_inputs(enc))
    with torch.no_grad():
        torch.testing.assert_close(adapter.logits(model, hidden), logits, rtol=0, atol=1e-5)
        raw = adapter.lm_head(model)(adapter.final_norm(model)(hidden))
    if family == "paligemma2":  # Gemma 2's final soft-capping is active, and the adapter applies it
        assert (raw - logits).abs().max() > 1e-2
    else:
        torch.testing.assert_close(raw, logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_caption_extension_matches_generate(family):
    """A caption appended with adapter.extend_inputs gives the logits model.generate computed for it
    (batched, left-padded); the other token-type value does not."""
    model, processor, adapter, enc = encode(family)
    inputs = adapter.model_inputs(enc)
    T = inputs["input_ids"].shape[1]
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    new = out.sequences[:, T:]
    gen_logits = torch.stack(out.logits, 1)[:, :new.shape[1]]
    extended = adapter.extend_inputs(inputs, new)
    with torch.no_grad():
        got = model(**extended).logits[:, T - 1:-1]
    torch.testing.assert_close(got, gen_logits, rtol=0, atol=1e-4)
    value = adapter.per_token_inputs["token_type_ids"]
    wrong = dict(extended)
    wrong["token_type_ids"] = extended["token_type_ids"].clone()
    wrong["token_type_ids"][:, T:] = 1 - value
    with torch.no_grad():
        assert (model(**wrong).logits[:, T - 1:-1] - gen_logits).abs().max() > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_patch_grid_and_vision_attention(family):
    model, processor, adapter, enc = encode(family)
    rows, cols = adapter.patch_grid(model, enc, 1)
    n_image = int((enc["input_ids"][1] == model.config.image_token_id).sum())
    assert rows == cols and rows * cols == n_image
    attn = adapter.vision_attention(model)
    assert len(attn) == model.config.vision_config.num_hidden_layers
    assert all(isinstance(a, torch.nn.Module) and hasattr(a, "out_proj") for a in attn)
    doubled = {"input_ids": torch.cat([enc["input_ids"], enc["input_ids"]], -1)}  # two images in one row
    with pytest.raises(NotDefinedForArchitecture):
        adapter.patch_grid(model, doubled, 0)


@pytest.mark.parametrize("family", ("gemma3", "paligemma2"))
def test_sliding_window_is_active(family):
    """The tiny configs exercise the sliding window: it is shorter than the prompt and widening it
    changes the logits (a replay with one causal mask for all layers would be caught)."""
    model, processor, adapter, enc = encode(family)
    text = model.config.get_text_config()
    # a caption longer than the window: PaliGemma 2's prefix is bidirectional across the window in
    # sliding layers too, so there the window acts only on the suffix
    caption = torch.tensor(processor.tokenizer("there is a dog and a cat on the table .",
                                               add_special_tokens=False).input_ids)
    assert text.sliding_window < caption.numel() < enc["input_ids"].shape[1]
    inputs = adapter.extend_inputs(adapter.model_inputs(enc), caption)
    with torch.no_grad():
        base = model(**inputs).logits
        window = text.sliding_window
        try:
            text.sliding_window = 10 * enc["input_ids"].shape[1]
            wide = model(**inputs).logits
        finally:
            text.sliding_window = window
    assert (wide - base).abs().max() > 1e-2


def test_paligemma2_attention_softcap_is_active():
    """Gemma 2's attention soft-capping changes the tiny model's outputs (an attention function that
    ignores ``softcap`` would be caught)."""
    model, processor, adapter, enc = encode("paligemma2")
    inputs = adapter.model_inputs(enc)
    mods = [adapter.attention(model, i) for i in range(len(adapter.layers(model)))]
    caps = [m.attn_logit_softcapping for m in mods]
    assert all(c is not None for c in caps)
    with torch.no_grad():
        base = model(**inputs).logits
        try:
            for m in mods:
                m.attn_logit_softcapping = None
            uncapped = model(**inputs).logits
        finally:
            for m, c in zip(mods, caps):
                m.attn_logit_softcapping = c
    assert (uncapped - base).abs().max() > 1e-2
