"""Prompt templates: where the image token and the user prompt go, per model family.

Example
-------
>>> get_template("llava-1.5").format("Please describe this image in detail.")
'USER: <image>\\nPlease describe this image in detail. ASSISTANT:'
>>> get_template("llava-1.5").format_text_only("Is there a cat?")
'USER: \\nIs there a cat? ASSISTANT:'
"""
from __future__ import annotations

from dataclasses import dataclass

CAPTION_PROMPT = "Please describe this image in detail."


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


TEMPLATES: dict[str, PromptTemplate] = {
    "llava-1.5": PromptTemplate("llava-1.5", "USER: {image}\n{prompt} ASSISTANT:"),
    "vicuna-v1": PromptTemplate(
        "vicuna-v1",
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the human's questions. USER: {image}\n{prompt} ASSISTANT:",
    ),
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
