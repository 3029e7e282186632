"""Prompt templates: where the system text, the image token and the user prompt go.

Templates (``--template NAME``):

* ``"vicuna-v1"`` -- LLaVA's conv-mode ``vicuna_v1`` (``llava/conversation.py``,
  ``SeparatorStyle.TWO``, ``sep=" "``): the system text, a space, ``"USER: <image>\\n{prompt}"``,
  a space, ``"ASSISTANT:"``. Every script of the head-attribution paper (Hallucination-Attribution,
  ``--conv-mode vicuna_v1``) uses it; LLaVA's scripts put ``DEFAULT_IMAGE_TOKEN + "\\n"`` before the
  question (``mm_use_im_start_end`` is off for LLaVA-1.5).
* ``"llava-v1"`` -- LLaVA's conv-mode ``llava_v1``: the same with the "curious human" system text
  (the default ``--conv-mode`` of VCD's and CausalMM's LLaVA scripts, their POPE runs included).
* ``"ha-baselines"`` -- the prompt of Hallucination-Attribution's ``baselines/`` folder (its
  evaluation of ADHH and the decoding baselines, from HALC's code): ``eval_configs/llava-1.5_eval.yaml``
  ``system_message`` (the vicuna_v1 text) concatenated *without a space* to
  ``INSTRUCTION_TEMPLATE["llava-1.5"]`` = ``"USER: <ImageHere>\n<question> ASSISTANT:"``
  (``minigpt4/models/llava.py``: ``self.system_message + p``).
* ``"llava-1.5"`` -- the llava-hf chat format, no system text (``"USER: <image>\\n{prompt} ASSISTANT:"``);
  what the shipped model organism was trained with.
* ``"plain"`` -- ``"<image>\\n{prompt}"``.

Default (``template=None`` in :func:`~lens_halluc.models.load_vlm`, ``as_loaded_vlm`` and the
CLIs), by :func:`default_template`: the template the checkpoint records (an organism checkpoint:
its recipe's, ``"llava-1.5"``); else ``"vicuna-v1"`` for a LLaVA-1.5 checkpoint (``model_type``
``llava`` with a Llama text tower, as ``llava-hf/llava-1.5-7b-hf``), to reproduce the papers;
else ``"llava-1.5"``.

The system text lies before the image token, so :meth:`ModelSpec.token_roles` gives it the
``SYSTEM`` role and the attention-bias analysis leaves it out of the text attention.

Example
-------
>>> get_template("llava-1.5").format("Please describe this image in detail.")
'USER: <image>\\nPlease describe this image in detail. ASSISTANT:'
>>> get_template("llava-1.5").format_text_only("Is there a cat?")
'USER: \\nIs there a cat? ASSISTANT:'
>>> get_template("vicuna-v1").format("Hi.").endswith("the user's questions. USER: <image>\\nHi. ASSISTANT:")
True
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

CAPTION_PROMPT = "Please describe this image in detail."

#: ``conv_vicuna_v1.system`` in LLaVA's ``llava/conversation.py`` (conv-mode ``vicuna_v1`` / ``v1``).
VICUNA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the user's questions.")
#: ``conv_llava_v1.system`` (conv-mode ``llava_v1``).
LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's questions.")

#: The template of a checkpoint that records none and is not LLaVA-1.5 (the llava-hf chat format).
FALLBACK_TEMPLATE = "llava-1.5"
#: The template of LLaVA-1.5 checkpoints (the papers' conv-mode).
LLAVA15_TEMPLATE = "vicuna-v1"


@dataclass(frozen=True)
class PromptTemplate:
    """A single-turn prompt template.

    ``text`` holds ``{image}`` where the image token goes and ``{prompt}`` for the user prompt.
    ``image_placeholder`` replaces the image token in text-only runs (the base language model of
    the inheritance analysis sees the prompt with the image replaced by this text).
    """

    name: str
    text: str
    image_token: str = "<image>"
    image_placeholder: str = ""

    def format(self, prompt: str) -> str:
        """The full prompt with the image token, ready for the processor."""
        return self.text.format(image=self.image_token, prompt=prompt)

    def format_text_only(self, prompt: str) -> str:
        """The prompt with the image token replaced by ``image_placeholder`` (no image)."""
        return self.text.format(image=self.image_placeholder, prompt=prompt)


def _sep_two(system: str) -> str:
    """LLaVA's ``SeparatorStyle.TWO`` prompt for one user turn and an open assistant turn.

    ``get_prompt``: ``system + sep``, then ``role + ": " + message + sep`` for the user and
    ``role + ":"`` for the empty assistant message (``sep=" "``; ``sep2="</s>"`` ends only assistant
    messages, so it does not appear in a prompt). The message is ``"<image>\\n" + question``.
    """
    sep = " "
    return system + sep + "USER" + ": " + "{image}\n{prompt}" + sep + "ASSISTANT" + ":"


TEMPLATES: dict[str, PromptTemplate] = {
    "llava-1.5": PromptTemplate("llava-1.5", "USER: {image}\n{prompt} ASSISTANT:"),
    "vicuna-v1": PromptTemplate("vicuna-v1", _sep_two(VICUNA_V1_SYSTEM)),
    "llava-v1": PromptTemplate("llava-v1", _sep_two(LLAVA_V1_SYSTEM)),
    "ha-baselines": PromptTemplate("ha-baselines", VICUNA_V1_SYSTEM + "USER: {image}\n{prompt} ASSISTANT:"),
    "plain": PromptTemplate("plain", "{image}\n{prompt}"),
}


def register_template(template: PromptTemplate) -> None:
    """Add a template usable by name everywhere (``--template NAME`` on the CLIs)."""
    TEMPLATES[template.name] = template


def get_template(name: str | PromptTemplate) -> PromptTemplate:
    """Look a template up by name; an unknown name lists the known ones."""
    if isinstance(name, PromptTemplate):
        return name
    if name not in TEMPLATES:
        raise KeyError(f"unknown prompt template {name!r}; known: {sorted(TEMPLATES)}. "
                       "Register others with lens_halluc.models.prompts.register_template().")
    return TEMPLATES[name]


# ----------------------------------------------------------------------------- defaults
#: Metadata lens_halluc writes beside the weights of the checkpoints it trains (the organism recipe).
CHECKPOINT_META = "organism.json"
RECIPE_FILE = "recipe.json"


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def recorded_template(path: str | Path | None) -> str | None:
    """The template a checkpoint directory records, or ``None``.

    A checkpoint trained by lens_halluc carries ``organism.json``; its ``"template"`` key, else the
    ``config.template`` of the training run's ``recipe.json`` (beside ``final/``, ``projector/``,
    ``base/``, or above ``checkpoints/checkpoint-K/``), else ``"llava-1.5"`` (the recipe's template
    for every organism trained before the key was written).
    """
    if path is None or str(path) == "":
        return None
    p = Path(path)
    if not p.is_dir():
        return None
    meta = _read_json(p / CHECKPOINT_META)
    if meta is None:
        return None
    if isinstance(meta.get("template"), str):
        return meta["template"]
    candidates = [p / RECIPE_FILE]
    if p.name in ("final", "projector", "base"):
        candidates.append(p.parent / RECIPE_FILE)
    if p.parent.name == "checkpoints":
        candidates.append(p.parent.parent / RECIPE_FILE)
    for c in candidates:
        recipe = _read_json(c)
        template = ((recipe or {}).get("config") or {}).get("template")
        if isinstance(template, str):
            return template
    return FALLBACK_TEMPLATE


def is_llava15(config) -> bool:
    """A LLaVA-1.5 checkpoint: ``model_type`` ``llava`` with a Llama (Vicuna) text tower."""
    if getattr(config, "model_type", None) != "llava":
        return False
    return getattr(getattr(config, "text_config", None), "model_type", None) == "llama"


def default_template(path: str | Path | None = None, config=None) -> str:
    """The name of the template a checkpoint is prompted with when none is asked for.

    The one it records (:func:`recorded_template`), else ``"vicuna-v1"`` for LLaVA-1.5
    (:func:`is_llava15`), else ``"llava-1.5"``.

    Example
    -------
    >>> from transformers import LlavaConfig
    >>> default_template(None, LlavaConfig())
    'vicuna-v1'
    """
    recorded = recorded_template(path)
    if recorded is not None:
        return recorded
    if config is not None and is_llava15(config):
        return LLAVA15_TEMPLATE
    return FALLBACK_TEMPLATE


def resolve_template(template: str | PromptTemplate | None, path: str | Path | None = None, config=None) -> PromptTemplate:
    """``template`` looked up, or (``None``) the checkpoint's default (:func:`default_template`)."""
    if template is None:
        template = default_template(path, config)
    return get_template(template)
