"""Qwen3-VL (``Qwen3VLForConditionalGeneration``, ``model_type`` ``qwen3_vl``).

As Qwen2-VL (:mod:`lens_halluc.models.adapters.qwen2_vl`: the same processor layout, ``image_grid_thw``,
``mm_token_type_ids``, ``<|vision_start|>``/``<|vision_end|>`` structure tokens, row-major merged grid,
M-RoPE computed by the model -- here *interleaved* over the frequencies, ``mrope_interleaved``), with:

* a Qwen3 text decoder (QK-norm; explicit ``head_dim``) at ``model.model.language_model``;
* a ViT over 16 px patches with learned, interpolated position embeddings;
* **deepstack**: the vision tower also returns the merged features of the blocks in
  ``vision_config.deepstack_visual_indexes`` (one list entry per index, through ``deepstack_merger_list``);
  ``Qwen3VLTextModel.forward`` *adds* entry ``i`` to the hidden states at the image-token positions
  (``visual_pos_masks``) right after decoder layer ``i`` (``_deepstack_process``: ``h[mask] += embeds[i]``),
  for ``i < len(deepstack_visual_indexes)``. The term does not depend on the hidden state, so the exact
  replay reproduces it by adding the clean forward's difference ``input(i + 1) - output(i)``
  (``between_layer_steps = "additive"``). The decoder layers receive ``visual_pos_masks`` /
  ``deepstack_visual_embeds`` only through the text model, not as layer keywords. In cached decoding
  (new tokens are text) nothing is added: the deepstack embeds are only passed at the prefill.

Example
-------
>>> from lens_halluc.models.adapters import ADAPTERS
>>> ADAPTERS["qwen3_vl"].between_layer_steps
'additive'
"""
from __future__ import annotations

from torch import nn

from . import register_adapter
from .qwen2_vl import Qwen2VLAdapter

__all__ = ["Qwen3VLAdapter"]


class Qwen3VLAdapter(Qwen2VLAdapter):
    """Qwen3-VL (see the module doc)."""

    name = "qwen3_vl"
    model_types = ("qwen3_vl",)
    between_layer_steps = "additive"
    base_lm_config_class = "Qwen3Config"

    def deepstack_layers(self, model: nn.Module) -> tuple[int, ...]:
        """The decoder layers after which visual features are added (``range(len(deepstack_visual_indexes))``)."""
        indexes = getattr(model.config.vision_config, "deepstack_visual_indexes", None) or ()
        return tuple(range(min(len(indexes), len(self.layers(model)))))


register_adapter(Qwen3VLAdapter)
