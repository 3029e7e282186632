"""Prompt templates: exact strings (LLaVA's conversation.py), default resolution, token roles."""
from __future__ import annotations

import argparse
import json

import pytest
import torch
from PIL import Image

from lens_halluc.models import TokenRole, load_vlm
from lens_halluc.models.adapt import as_loaded_vlm
from lens_halluc.models.default import organism_path
from lens_halluc.models.prompts import (
    TEMPLATES,
    default_template,
    get_template,
    recorded_template,
    resolve_template,
)

# Verbatim from LLaVA llava/conversation.py (as vendored in TianyunYoung/Hallucination-Attribution):
# conv_vicuna_v1.system and conv_llava_v1.system.
VICUNA_V1 = ("A chat between a curious user and an artificial intelligence assistant. "
             "The assistant gives helpful, detailed, and polite answers to the user's questions.")
LLAVA_V1 = ("A chat between a curious human and an artificial intelligence assistant. "
            "The assistant gives helpful, detailed, and polite answers to the human's questions.")


def llava_get_prompt_two(system: str, question: str) -> str:
    """LLaVA's Conversation.get_prompt for SeparatorStyle.TWO (sep=" ", sep2="</s>"), re-stated.

    The HA scripts do ``qs = DEFAULT_IMAGE_TOKEN + '\\n' + qs``, append (USER, qs), (ASSISTANT, None):
    ``ret = system + seps[0]``; a message: ``role + ": " + message + seps[i % 2]``; None: ``role + ":"``.
    """
    seps = [" ", "</s>"]
    messages = [("USER", "<image>" + "\n" + question), ("ASSISTANT", None)]
    ret = system + seps[0]
    for i, (role, message) in enumerate(messages):
        ret += role + ": " + message + seps[i % 2] if message else role + ":"
    return ret


PROMPTS = ["Please describe this image in detail.", "Is there a dog in the image? Please answer this question with one word."]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_vicuna_v1_and_llava_v1_are_llava_conv_modes(prompt):
    assert get_template("vicuna-v1").format(prompt) == llava_get_prompt_two(VICUNA_V1, prompt)
    assert get_template("llava-v1").format(prompt) == llava_get_prompt_two(LLAVA_V1, prompt)


def test_exact_template_strings():
    assert get_template("vicuna-v1").format("Hi.") == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nHi. ASSISTANT:")
    assert get_template("llava-v1").format("Hi.") == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions. USER: <image>\nHi. ASSISTANT:")
    # unchanged: the llava-hf chat format the organism was trained with, and plain
    assert get_template("llava-1.5").text == "USER: {image}\n{prompt} ASSISTANT:"
    assert get_template("llava-1.5").format("Hi.") == "USER: <image>\nHi. ASSISTANT:"
    assert get_template("plain").format("Hi.") == "<image>\nHi."
    # text-only (inheritance: the base LM sees the prompt without the image)
    assert get_template("vicuna-v1").format_text_only("Hi.") == VICUNA_V1 + " USER: \nHi. ASSISTANT:"
    # HA baselines/: system_message + INSTRUCTION_TEMPLATE["llava-1.5"], no space in between
    assert get_template("ha-baselines").format("Hi.") == VICUNA_V1 + "USER: <image>\nHi. ASSISTANT:"
    assert set(TEMPLATES) >= {"vicuna-v1", "llava-v1", "ha-baselines", "llava-1.5", "plain"}


def test_default_resolution_from_config():
    from transformers import LlamaConfig, LlavaConfig, MistralConfig

    assert default_template(None, LlavaConfig(text_config=LlamaConfig())) == "vicuna-v1"   # LLaVA-1.5
    assert default_template(None, LlavaConfig(text_config=MistralConfig())) == "chat"  # not LLaVA-1.5: its chat template
    assert default_template(None, LlamaConfig()) == "llava-1.5"                             # a text LM
    assert default_template(None, None) == "llava-1.5"
    assert resolve_template("plain", None, LlavaConfig()).name == "plain"                   # explicit wins


def test_default_resolution_organism():
    # the organism records its recipe's template (recipe.json config.template = "llava-1.5")
    for d in (organism_path("final"), organism_path("projector"), organism_path("base")):
        assert recorded_template(d) == "llava-1.5", d
    vlm = load_vlm()
    assert vlm.template.name == "llava-1.5" and vlm.template == TEMPLATES["llava-1.5"]
    assert as_loaded_vlm(vlm.model, vlm.processor).template.name == "llava-1.5"  # via config._name_or_path
    assert vlm.model.config.model_type == "llava"  # so without the record it would be vicuna-v1


def test_recorded_template_sources(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    assert recorded_template(plain) is None                      # not a lens_halluc checkpoint
    (plain / "organism.json").write_text(json.dumps({"world": {}}))
    assert recorded_template(plain) == "llava-1.5"               # organism without a record: the recipe default
    (plain / "organism.json").write_text(json.dumps({"world": {}, "template": "vicuna-v1"}))
    assert recorded_template(plain) == "vicuna-v1"               # an explicit record wins
    ck = tmp_path / "run" / "checkpoints" / "checkpoint-2"
    ck.mkdir(parents=True)
    (ck / "organism.json").write_text(json.dumps({"world": {}}))
    (tmp_path / "run" / "recipe.json").write_text(json.dumps({"config": {"template": "plain"}}))
    assert recorded_template(ck) == "plain"                      # the training run's recipe
    assert recorded_template(tmp_path / "missing") is None and recorded_template("") is None


def test_default_resolution_tiny_llava(tiny_llava_dir, tiny_vlm):
    assert tiny_vlm.template.name == "vicuna-v1"                 # llava + llama, records nothing
    assert load_vlm(tiny_llava_dir, template="llava-1.5").template.name == "llava-1.5"
    assert as_loaded_vlm(tiny_vlm.model, tiny_vlm.processor).template.name == "vicuna-v1"
    assert as_loaded_vlm(tiny_vlm.model, tiny_vlm.processor, template="llava-v1").template.name == "llava-v1"


def test_cli_template_default_is_none():
    from lens_halluc.cli.common import add_model_args

    p = argparse.ArgumentParser()
    add_model_args(p)
    assert p.parse_args([]).template is None
    assert p.parse_args(["--template", "vicuna-v1"]).template == "vicuna-v1"


@pytest.mark.parametrize("name", ["vicuna-v1", "llava-v1"])
def test_system_prompt_tokens_get_system_role(tiny_vlm, name):
    vlm = load_vlm(tiny_vlm.path, template=name)
    prompt = "describe this image in detail ."
    enc = vlm.encode([Image.new("RGB", (48, 48), (120, 30, 200))] * 2, [prompt, prompt + " there is a dog ."])
    roles = vlm.spec.token_roles(enc["input_ids"], enc["attention_mask"])
    prefix = vlm.template.format(prompt).split("<image>")[0]      # system text + " USER: "
    n_sys = len(vlm.tokenizer(prefix).input_ids)                  # with BOS
    assert n_sys > 10                                             # the system text is really there
    for row in range(2):
        r = roles[row][enc["attention_mask"][row].bool()]
        assert (r[:n_sys] == int(TokenRole.SYSTEM)).all()
        assert r[n_sys] == int(TokenRole.IMAGE)
        assert not (r[n_sys:] == int(TokenRole.SYSTEM)).any()     # nothing after the image is SYSTEM
    # the llava-1.5 template has only BOS + "user :" before the image
    plain = load_vlm(tiny_vlm.path, template="llava-1.5")
    enc = plain.encode([Image.new("RGB", (48, 48))], [prompt])
    r = plain.spec.token_roles(enc["input_ids"], enc["attention_mask"])[0]
    assert int((r == int(TokenRole.SYSTEM)).sum()) == len(plain.tokenizer("USER: ").input_ids) < n_sys
    assert torch.is_tensor(r)
