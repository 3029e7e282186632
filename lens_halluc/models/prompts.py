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
* ``"chat"`` -- the processor's own chat template (one user turn: the image, then the prompt; with
  the generation prompt) and its own image placeholder (:meth:`Adapter.format_prompt`).

Templates write ``{image}`` where the image goes; a loaded model fills in its processor's
placeholder (:meth:`Adapter.image_placeholder`: ``<image>``, ``<|image_pad|>``, ``<start_of_image>``,
``<|image|>``, ``[IMG]`` ...), so every template serves every family (:func:`render_prompt`).

Default (``template=None`` in :func:`~lens_halluc.models.load_vlm`, ``as_loaded_vlm`` and the
CLIs), by :func:`default_template`: the template the checkpoint records (an organism checkpoint:
its recipe's, ``"llava-1.5"``); else ``"vicuna-v1"`` for a LLaVA-1.5 checkpoint (``model_type``
``llava`` with a Llama text tower, as ``llava-hf/llava-1.5-7b-hf``), to reproduce the papers;
else ``"chat"`` for a VLM (the processor's chat template), ``"llava-1.5"`` for a text-only LM.

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

#: The template of an organism checkpoint that records none, and of a text-only LM (the llava-hf chat format).
FALLBACK_TEMPLATE = "llava-1.5"
#: The template of a VLM checkpoint that records none and is not LLaVA-1.5: the processor's own chat template.
CHAT_TEMPLATE = "chat"
#: The template of LLaVA-1.5 checkpoints (the papers' conv-mode).
LLAVA15_TEMPLATE = "vicuna-v1"


@dataclass(frozen=True)
class PromptTemplate:
    """A single-turn prompt template.

    ``text`` holds ``{image}`` where the image token goes and ``{prompt}`` for the user prompt.
    ``image_placeholder`` replaces the image token in text-only runs (the base language model of
    the inheritance analysis sees the prompt with the image replaced by this text).

    ``chat``: the template is the processor's own chat template (``text`` unused): it needs the
    processor, see :func:`render_prompt`.
    """

    name: str
    text: str
    image_token: str = "<image>"
    image_placeholder: str = ""
    chat: bool = False

    def format(self, prompt: str, image_token: str | None = None) -> str:
        """The full prompt with the image token (``image_token``, default ``self.image_token``), ready for the processor."""
        if self.chat:
            raise ValueError(f"template {self.name!r} is the processor's chat template; format it with "
                             "render_prompt(template, prompt, processor, adapter) or LoadedVLM.format_prompt().")
        return self.text.format(image=self.image_token if image_token is None else image_token, prompt=prompt)

    def format_text_only(self, prompt: str) -> str:
        """The prompt with the image token replaced by ``image_placeholder`` (no image)."""
        if self.chat:
            raise ValueError(f"template {self.name!r} is the processor's chat template; format it with "
                             "render_text_only(template, prompt, tokenizer_or_processor).")
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
    "chat": PromptTemplate("chat", "", chat=True),
}


def render_prompt(template: PromptTemplate, prompt: str, processor=None, adapter=None) -> str:
    """``prompt`` in ``template`` for a model whose processor is ``processor`` (family ``adapter``).

    The ``"chat"`` template is the processor's chat template (:meth:`Adapter.format_prompt`); any
    other fills ``{image}`` with the processor's image placeholder (:meth:`Adapter.image_placeholder`),
    or the template's own ``image_token`` without a processor.

    Example
    -------
    >>> render_prompt(get_template("plain"), "Hi.")
    '<image>\\nHi.'
    >>> render_prompt(get_template("llava-1.5"), "Hi.", qwen_processor, qwen_adapter)   # doctest: +SKIP
    'USER: <|image_pad|>\\nHi. ASSISTANT:'
    """
    if template.chat:
        if processor is None or adapter is None:
            raise ValueError(f"template {template.name!r} needs the model's processor (its chat template).")
        return adapter.format_prompt(processor, prompt)
    token = adapter.image_placeholder(processor) if processor is not None and adapter is not None else None
    return template.format(prompt, image_token=token)


def render_text_only(template: PromptTemplate, prompt: str, processor=None, adapter=None) -> str:
    """``prompt`` in ``template`` without an image (the base language model's input).

    ``"chat"``: the family's text-only turn (:meth:`Adapter.format_text_only` of ``adapter``: by default
    the chat template of ``processor``, a processor or a tokenizer with one, on one text-only user turn);
    other templates: :meth:`PromptTemplate.format_text_only`.

    Example
    -------
    >>> render_text_only(get_template("llava-1.5"), "Hi.")
    'USER: \\nHi. ASSISTANT:'
    """
    if not template.chat:
        return template.format_text_only(prompt)
    from .adapters import Adapter, AdapterError

    try:
        return (adapter or Adapter()).format_text_only(processor, prompt)
    except AdapterError as e:
        raise ValueError(f"template {template.name!r}: {e}") from None


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
    (:func:`is_llava15`), else ``"chat"`` (the processor's chat template) for a VLM, else (a
    text-only LM, or no config) ``"llava-1.5"``.

    Example
    -------
    >>> from transformers import LlavaConfig, Qwen2VLConfig
    >>> default_template(None, LlavaConfig()), default_template(None, Qwen2VLConfig())
    ('vicuna-v1', 'chat')
    """
    recorded = recorded_template(path)
    if recorded is not None:
        return recorded
    if config is not None and is_llava15(config):
        return LLAVA15_TEMPLATE
    if config is not None and _is_vlm_config(config):
        return CHAT_TEMPLATE
    return FALLBACK_TEMPLATE


def _is_vlm_config(config) -> bool:
    # a vision tower (or Chameleon's VQ image tokenizer) or an image token: not a text-only LM
    return any(getattr(config, k, None) is not None
               for k in ("vision_config", "vq_config", "image_token_id", "image_token_index"))


def resolve_template(template: str | PromptTemplate | None, path: str | Path | None = None, config=None) -> PromptTemplate:
    """``template`` looked up, or (``None``) the checkpoint's default (:func:`default_template`)."""
    if template is None:
        template = default_template(path, config)
    return get_template(template)
