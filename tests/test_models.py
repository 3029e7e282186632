"""Model layer: offline loading, spec, token roles, prompt templates, bad inputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lens_halluc.models import (ModelLoadError, ModelSpec, SpecError, TokenRole, get_template, load_vlm,
                                resolve_model_path)
from lens_halluc.models.tiny import make_tiny_llava


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)) for _ in range(n)]


def test_module_names_match_llava_1_5(tiny_vlm):
    names = {n for n, _ in tiny_vlm.model.named_modules()}
    for expected in ["model.vision_tower", "model.multi_modal_projector", "model.language_model.layers.0.self_attn.o_proj",
                     "model.language_model.layers.1.self_attn.q_proj", "lm_head"]:
        assert expected in names


def test_spec_sizes_and_attention_implementation(tiny_vlm):
    spec = tiny_vlm.spec
    assert (spec.n_layers, spec.n_heads, spec.n_kv_heads, spec.head_dim) == (2, 4, 2, 16)
    assert spec.o_proj(tiny_vlm.model, 1) is tiny_vlm.model.model.language_model.layers[1].self_attn.o_proj
    assert spec.head_slice(2) == slice(32, 48)
    assert tiny_vlm.model.config.text_config._attn_implementation == "eager"
    # the vision tower keeps transformers' default (sdpa), only the text tower is switched
    assert tiny_vlm.model.config.vision_config._attn_implementation == "sdpa"


def test_token_roles_left_padded_batch(tiny_llava_dir):
    # the llava-hf chat format (a tiny llama-llava's own default is HA's vicuna-v1, tested in test_prompts)
    tiny_vlm = load_vlm(tiny_llava_dir, template="llava-1.5")
    enc = tiny_vlm.encode(_images(2), ["Please describe this image in detail.", "is there a cat ?"])
    roles = tiny_vlm.spec.token_roles(enc["input_ids"], enc["attention_mask"])
    ids = enc["input_ids"]
    n_img = (48 // 8) ** 2
    for row in range(2):
        r, t = roles[row], ids[row]
        assert (r == TokenRole.IMAGE).sum() == n_img
        assert torch.equal(r == TokenRole.IMAGE, t == tiny_vlm.spec.image_token_id)
        assert torch.equal(r == TokenRole.PAD, enc["attention_mask"][row] == 0)
        first_img = int((t == tiny_vlm.spec.image_token_id).nonzero()[0])
        # system = "<s> user :" before the image; everything after the image is text
        toks = tiny_vlm.tokenizer.convert_ids_to_tokens(t[r == TokenRole.SYSTEM].tolist())
        assert toks == ["<s>", "user", ":"]
        assert bool((r[first_img + n_img:] == TokenRole.TEXT).all())
    # the shorter prompt is left-padded
    assert enc["attention_mask"][1, 0] == 0 and enc["attention_mask"][1, -1] == 1


def test_token_roles_depend_on_inputs_not_offsets(tiny_vlm):
    """A longer system prompt shifts the image; roles follow it (no hard-coded offsets)."""
    im = _images(1)
    enc = tiny_vlm.encode(im, ["the the the <image> this"], apply_template=False)
    roles = tiny_vlm.spec.token_roles(enc["input_ids"], enc["attention_mask"])[0]
    assert roles[:4].tolist() == [TokenRole.SYSTEM] * 4  # <s> the the the


def test_prompt_without_image_token_is_rejected(tiny_vlm):
    with pytest.raises(ValueError, match="image token"):
        tiny_vlm.encode(_images(1), ["describe this"], apply_template=False)
    ids = torch.tensor([[1, 4, 5, 9]])
    with pytest.raises(SpecError, match="no image token"):
        tiny_vlm.spec.token_roles(ids)


def test_heads_out_of_range(tiny_vlm):
    spec = tiny_vlm.spec
    with pytest.raises(SpecError, match="layer 5 out of range"):
        spec.check_head(5, 0)
    with pytest.raises(SpecError, match="head 4 out of range"):
        spec.check_heads([(0, 1), (1, 4)])
    assert spec.check_heads([[1, 3]]) == [(1, 3)]


def test_missing_model_paths_give_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        resolve_model_path(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="config.json"):
        resolve_model_path(tmp_path)
    with pytest.raises(ModelLoadError, match="local Hugging Face cache"):
        resolve_model_path("someone/not-a-cached-model-xyz")


def test_checkpoint_without_safetensors_refused(tmp_path):
    model, _ = make_tiny_llava(seed=0)
    (tmp_path / "config.json").write_text(model.config.to_json_string())
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_vlm(tmp_path)


def test_spec_of_text_only_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    lm = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=4, vocab_size=50))
    spec = ModelSpec.from_model(lm)
    assert (spec.n_layers, spec.n_heads, spec.head_dim, spec.image_token_id) == (3, 4, 8, None)


def test_unknown_architecture_error():
    from transformers import LlamaConfig

    class Weird(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = LlamaConfig(hidden_size=32, num_attention_heads=4, vocab_size=10)
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2)])

    with pytest.raises(SpecError, match="found no text decoder layers"):
        ModelSpec.from_model(Weird())


def test_templates():
    t = get_template("llava-1.5")
    assert t.format("Hi.") == "USER: <image>\nHi. ASSISTANT:"
    assert "<image>" not in t.format_text_only("Hi.")
    with pytest.raises(KeyError, match="unknown prompt template"):
        get_template("nope")


def test_unknown_vlm_names_the_adapter_to_write():
    from transformers import LlavaConfig

    class Unknown(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = LlavaConfig()
            self.config.model_type = "brand_new_vlm"

    with pytest.raises(SpecError, match=r"lens_halluc/models/adapters/brand_new_vlm\.py"):
        ModelSpec.from_model(Unknown())
