"""Loading vision-language models, their spec (heads, o_proj slices), token roles and head sets.

Example
-------
>>> from lens_halluc.models import load_vlm, random_heads                    # doctest: +SKIP
>>> vlm = load_vlm()                          # the shipped organism           # doctest: +SKIP
>>> random_heads(vlm, 5, seed=0)                                               # doctest: +SKIP
"""
from .addons import AddonError, register_addon
from .batching import right_padded_batch
from .heads import HeadsFileError, random_heads, read_heads
from .loading import LoadedLM, LoadedVLM, ModelLoadError, load_causal_lm, load_processor, load_vlm, resolve_model_path
from .prompts import CAPTION_PROMPT, PromptTemplate, get_template, register_template
from .spec import ModelSpec, SpecError, TokenRole

__all__ = [
    "AddonError", "CAPTION_PROMPT", "HeadsFileError", "LoadedLM", "LoadedVLM", "ModelLoadError", "ModelSpec",
    "PromptTemplate", "SpecError", "TokenRole", "get_template", "load_causal_lm", "load_processor", "load_vlm", "random_heads",
    "read_heads", "register_addon", "register_template", "resolve_model_path",
    "right_padded_batch",
]
