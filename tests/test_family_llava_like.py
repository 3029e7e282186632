"""LLaVA-like families (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Mistral3, InternVL, Idefics3, SmolVLM):
tiny zoo models and their adapters.

Each check compares the adapter against the model itself: the positions labelled IMAGE must be
exactly the positions whose input embedding the model replaced with image features (a hook on the
text decoder's ``inputs_embeds``), the structure tokens must be the family's markers as the
processor wrote them, batch-2 logits must equal each sample's own forward.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch
from PIL import Image

from lens_halluc.models.adapters import NotDefinedForArchitecture, adapter_for
from lens_halluc.models.spec import ModelSpec, TokenRole
from lens_halluc.models.zoo import make_tiny, save_tiny

FAMILIES = ("llava", "llava_next", "llava_onevision", "mistral3", "internvl", "idefics3", "smolvlm")

#: family -> (model class, the placeholder its chat template writes, the image-structure tokens the
#: processor writes for the test images; each of them must be labelled IMAGE_STRUCTURE).
EXPECTED = {
    "llava": ("LlavaForConditionalGeneration", "<image>", ()),
    "llava_next": ("LlavaNextForConditionalGeneration", "<image>", ()),
    "llava_onevision": ("LlavaOnevisionForConditionalGeneration", "<image>", ()),
    "mistral3": ("Mistral3ForConditionalGeneration", "[IMG]", ("[IMG_BREAK]", "[IMG_END]")),
    "internvl": ("InternVLForConditionalGeneration", "<IMG_CONTEXT>", ("<img>", "</img>")),
    "idefics3": ("Idefics3ForConditionalGeneration", "<image>",
                 ("<fake_token_around_image>", "<global-img>", "<row_1_col_1>", "<row_2_col_2>")),
    "smolvlm": ("SmolVLMForConditionalGeneration", "<image>",
                ("<fake_token_around_image>", "<global-img>", "<row_1_col_1>", "<row_2_col_2>")),
}

PROMPT = "please describe this image in detail ."
_CACHE: dict = {}


def _zoo(family):
    if family not in _CACHE:
        _CACHE[family] = make_tiny(family, seed=0)
    return _CACHE[family]


def _images():
    # Two shapes (tall, wide) so anyres/tiling/splitting give different token counts per sample.
    return [Image.new("RGB", (40, 56), (200, 30, 30)), Image.new("RGB", (64, 48), (20, 120, 40))]


def _encode(adapter, processor, images, prompt=PROMPT):
    text = adapter.format_prompt(processor, prompt)
    return processor(images=adapter.processor_images(images), text=[text] * len(images), return_tensors="pt",
                     padding=True, padding_side="right")


def _replaced_positions(model, adapter, inputs):
    """Positions whose input embedding the model replaced (image features), from the decoder's inputs_embeds."""
    seen = {}

    def hook(module, args, kwargs):
        seen["embeds"] = kwargs.get("inputs_embeds")

    handle = adapter.language_model(model).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    plain = model.get_input_embeddings()(inputs["input_ids"])
    return (seen["embeds"] != plain).any(-1)


@pytest.mark.parametrize("family", FAMILIES)
def test_zoo_saves_and_reloads_offline(family, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = save_tiny(family, tmp_path / family)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    ref_model, ref_processor = _zoo(family)
    assert type(model).__name__ == EXPECTED[family][0]
    assert type(processor) is type(ref_processor)
    if importlib.util.find_spec("torchvision") is None:
        assert type(processor.image_processor).__name__.endswith("Pil")
    adapter = adapter_for(model)
    enc = _encode(adapter, processor, _images()[:1])
    ref = _encode(adapter, ref_processor, _images()[:1])
    assert torch.equal(enc["input_ids"], ref["input_ids"])
    with torch.no_grad():
        got = model(**adapter.model_inputs(enc)).logits
        want = ref_model(**adapter.model_inputs(ref)).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_spec_sizes(family):
    model, processor = _zoo(family)
    spec = ModelSpec.from_model(model, processor)
    text = model.config.get_text_config()
    assert spec.adapter.name == family
    assert spec.architecture == EXPECTED[family][0]
    assert spec.n_layers == text.num_hidden_layers == len(spec.layers(model))
    assert (spec.n_heads, spec.n_kv_heads) == (text.num_attention_heads, text.num_key_value_heads)
    assert spec.head_dim * spec.n_heads == spec.o_proj(model, 0).in_features
    assert spec.attention_kinds == ("self",) * spec.n_layers
    assert spec.image_token_ids == (model.config.image_token_id,)
    assert spec.vocab_size == model.get_output_embeddings().out_features
    assert len(spec.adapter.vision_attention(model)) == model.config.vision_config.num_hidden_layers


@pytest.mark.parametrize("family", FAMILIES)
def test_token_roles_match_model_image_features(family):
    model, processor = _zoo(family)
    spec = ModelSpec.from_model(model, processor)
    enc = _encode(spec.adapter, processor, _images())
    inputs = spec.adapter.model_inputs(enc)
    roles = spec.token_roles(inputs["input_ids"], inputs["attention_mask"])
    replaced = _replaced_positions(model, spec.adapter, inputs)
    assert replaced.any(-1).all()
    assert torch.equal(roles == TokenRole.IMAGE, replaced)
    structure = roles == TokenRole.IMAGE_STRUCTURE
    tok = processor.tokenizer
    for name in EXPECTED[family][2]:
        tid = tok.convert_tokens_to_ids(name)
        at = inputs["input_ids"] == tid
        assert at.any(), f"{name} not written by the {family} processor"
        assert structure[at].all(), f"{name} not labelled IMAGE_STRUCTURE"
    if not EXPECTED[family][2]:
        assert not structure.any()
    # Nothing else is structure; the prompt words stay TEXT.
    written = {tok.convert_tokens_to_ids(n) for n in EXPECTED[family][2]}
    assert set(inputs["input_ids"][structure].tolist()) <= set(spec.structure_token_ids)
    assert written <= set(inputs["input_ids"][structure].tolist())
    describe = inputs["input_ids"] == tok.convert_tokens_to_ids("describe")
    assert (roles[describe] == TokenRole.TEXT).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_template_writes_the_family_placeholder(family):
    model, processor = _zoo(family)
    adapter = adapter_for(model)
    placeholder = adapter.image_placeholder(processor)
    assert placeholder == EXPECTED[family][1]
    text = adapter.format_prompt(processor, PROMPT)
    assert text.count(placeholder) == 1 and PROMPT in text
    assert text.index(placeholder) < text.index(PROMPT)
    assert processor.tokenizer.convert_tokens_to_ids(placeholder) != processor.tokenizer.unk_token_id


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_batch2_equals_each_sample(family):
    model, processor = _zoo(family)
    adapter = adapter_for(model)
    images = _images()
    inputs = adapter.model_inputs(_encode(adapter, processor, images))
    with torch.no_grad():
        batched = model(**inputs).logits
    assert batched.shape[:2] == inputs["input_ids"].shape
    for row, image in enumerate(images):
        single = adapter.model_inputs(_encode(adapter, processor, [image]))
        n = single["input_ids"].shape[1]
        assert torch.equal(inputs["input_ids"][row, :n], single["input_ids"][0])
        with torch.no_grad():
            alone = model(**single).logits
        torch.testing.assert_close(batched[row, :n], alone[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_patch_grid_or_reason(family):
    model, processor = _zoo(family)
    adapter = adapter_for(model)
    enc = _encode(adapter, processor, _images())
    ids = enc["input_ids"]
    for row in range(ids.shape[0]):
        n_image = int(torch.isin(ids[row], torch.tensor(adapter.image_token_ids(model))).sum())
        try:
            rows, cols = adapter.patch_grid(model, enc, row)
        except NotDefinedForArchitecture as e:
            assert family in ("llava_next", "llava_onevision", "internvl", "idefics3", "smolvlm")
            assert str(e)
            continue
        assert rows * cols == n_image
        if family == "mistral3":
            # One [IMG_BREAK] per row but the last ([IMG_END]), cols [IMG] tokens before each.
            tok = processor.tokenizer
            brk = (ids[row] == tok.convert_tokens_to_ids("[IMG_BREAK]")).nonzero().flatten()
            assert len(brk) == rows - 1
            first = int((ids[row] == adapter.image_token_ids(model)[0]).nonzero()[0])
            assert int(brk[0]) - first == cols


@pytest.mark.parametrize("family", FAMILIES)
def test_structure_ids_without_processor(family, tmp_path):
    """A bare zoo model (no processor) knows its structure ids from its config, also after a reload."""
    from transformers import AutoModelForImageTextToText

    model, processor = _zoo(family)
    with_proc = ModelSpec.from_model(model, processor).structure_token_ids
    assert ModelSpec.from_model(model).structure_token_ids == with_proc
    assert bool(with_proc) == bool(EXPECTED[family][2])
    model.config.save_pretrained(tmp_path)
    reloaded = AutoModelForImageTextToText.from_config(type(model.config).from_pretrained(tmp_path))
    assert ModelSpec.from_model(reloaded).structure_token_ids == with_proc


def test_missing_structure_ids_raise():
    """A real-checkpoint-like Mistral3 (no ids in its config) without a processor raises, naming the fix."""
    from lens_halluc.models.adapters import AdapterError

    model, _ = _zoo("mistral3")
    adapter = adapter_for(model)
    config = type(model.config).from_dict(model.config.to_dict())
    del config.image_break_token_id

    class Bare:
        pass
    bare = Bare()
    bare.config = config
    with pytest.raises(AdapterError, match="pass the processor"):
        adapter.structure_token_ids(bare)
