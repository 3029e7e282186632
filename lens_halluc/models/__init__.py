"""Loading LLaVA-family models offline, their spec (heads, o_proj slices) and token roles."""
from .loading import LoadedLM, LoadedVLM, ModelLoadError, load_causal_lm, load_vlm, resolve_model_path
from .prompts import CAPTION_PROMPT, PromptTemplate, get_template, register_template
from .spec import ModelSpec, SpecError, TokenRole, register_architecture

__all__ = [
    "CAPTION_PROMPT", "LoadedLM", "LoadedVLM", "ModelLoadError", "ModelSpec", "PromptTemplate", "SpecError",
    "TokenRole", "get_template", "load_causal_lm", "load_vlm", "register_architecture", "register_template",
    "resolve_model_path",
]
