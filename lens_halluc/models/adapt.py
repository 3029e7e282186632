"""Accept the model objects researchers already hold: LoadedVLM, a Hugging Face model, or nnsight's wrapper.

Example
-------
>>> from nnsight import NNsight                                                  # doctest: +SKIP
>>> vlm = as_loaded_vlm(NNsight(hf_model), processor=processor)                  # doctest: +SKIP
>>> influences(NNsight(hf_model), ids, pixels, targets, processor=processor)     # doctest: +SKIP
"""
from __future__ import annotations

from torch import nn

from .loading import LoadedVLM
from .prompts import PromptTemplate, resolve_template
from .spec import ModelSpec


def unwrap_model(model) -> nn.Module:
    """The ``torch.nn.Module`` inside an nnsight wrapper (``NNsight``, ``TransformersModel``; 0.8 keeps it
    at ``._module``), or the model itself."""
    inner = getattr(model, "_module", None)
    return inner if isinstance(inner, nn.Module) else model


def as_loaded_vlm(model, processor=None, template: str | PromptTemplate | None = None) -> LoadedVLM:
    """A :class:`LoadedVLM` view of ``model`` (returned unchanged if it already is one).

    ``processor`` is required unless the wrapper carries one (nnsight's ``TransformersModel`` does).
    ``template``: ``None`` (default) resolves as in :func:`~lens_halluc.models.load_vlm`, from the
    model's ``config`` and the directory it was loaded from (``config._name_or_path``).
    """
    if isinstance(model, LoadedVLM):
        return model
    module = unwrap_model(model)
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected a LoadedVLM, a transformers model or an nnsight-wrapped one, got {type(model).__name__}.")
    processor = processor or getattr(model, "processor", None)
    if processor is None:
        raise ValueError("pass processor=... (the model's AutoProcessor) along with a bare or nnsight-wrapped model.")
    config = getattr(module, "config", None)
    path = getattr(config, "_name_or_path", None)
    return LoadedVLM(model=module, processor=processor, spec=ModelSpec.from_model(module, processor),
                     template=resolve_template(template, path, config), path=path)
