"""Qwen2-VL and Qwen2.5-VL (``Qwen2VLForConditionalGeneration`` / ``Qwen2_5_VLForConditionalGeneration``,
``model_type`` ``qwen2_vl`` / ``qwen2_5_vl``).

Layout: a ViT over 14 px patches (Qwen2.5-VL: windowed attention in most blocks, full attention in
``fullatt_block_indexes``), a merger that concatenates each ``spatial_merge_size**2`` (2x2) block of
neighbouring patches into one feature, and a Qwen2 decoder at ``model.model.language_model`` with
**M-RoPE**: three position axes (temporal, height, width) split over the rotary frequencies by
``rope_parameters["mrope_section"]``.

What the processor does and what the model takes
------------------------------------------------
* The chat template writes ``<|vision_start|><|image_pad|><|vision_end|>``; the processor expands the one
  ``<|image_pad|>`` into ``t*h*w / merge**2`` copies, ``image_grid_thw = [[t, h, w]]`` being the image's
  *patch* grid (before merging; ``t = 1`` for an image). ``<|vision_start|>``/``<|vision_end|>`` are
  image *structure* (``TokenRole.IMAGE_STRUCTURE``); the ``<|image_pad|>`` positions hold the merged
  image features (``config.image_token_id``).
* ``pixel_values`` is **flat**: ``[sum_i t_i*h_i*w_i, 3*temporal_patch*14*14]`` (the patches of all the batch's
  images concatenated, in merge-block order), so the batch dimension lives in ``image_grid_thw``
  ``[n_images, 3]``. A per-row split of a batch must split ``pixel_values`` by ``image_grid_thw.prod(-1)``.
* ``mm_token_type_ids`` ``[B, T]`` (transformers >= 5.x: 1 at image tokens, 2 at video tokens, 0 elsewhere)
  is a forward input: the model computes M-RoPE positions from it (``get_rope_index``). Without it (and
  without ``position_ids``) Qwen2-VL and Qwen3-VL raise, but **Qwen2.5-VL silently falls back to 1-D text
  positions** (wrong for any prompt with an image), so :meth:`Qwen2VLAdapter.model_inputs` refuses
  ``image_grid_thw`` without it. It is per-token: a caption appended extends it with 0.

Positions (M-RoPE), for the replay and generation
-------------------------------------------------
See :data:`MROPE_NOTES`. In short: never pass 1-D ``position_ids`` (``positions_by_model = True``); let the
model compute ``[3, B, T]`` (or pass the ``[4, B, T]`` that ``_prepare_position_ids_for_generation`` builds:
row 0 text positions, rows 1-3 the M-RoPE axes).

Patch grid
----------
Image token ``k`` of an image with ``image_grid_thw = [1, h, w]`` is merged cell
``(k // (w/m), k % (w/m))``, row-major, ``m = spatial_merge_size`` (checked against ``get_rope_index``'s
height/width positions in tests/test_family_qwen_chameleon.py); :meth:`Qwen2VLAdapter.patch_grid` returns
``(h/m, w/m)``.

Image-only processors (no torchvision)
--------------------------------------
``Qwen2VLProcessor`` / ``Qwen2_5_VLProcessor`` / ``Qwen3VLProcessor`` list a video processor, and the video
processors need torchvision, so without it the stock processor cannot be constructed (nor reloaded by
``AutoProcessor``). This module defines :data:`Qwen2VLImageOnlyProcessor`,
:data:`Qwen2_5_VLImageOnlyProcessor` and :data:`Qwen3VLImageOnlyProcessor`: the same processors without the
video processor (their ``__init__`` signature omits it, which is where ``ProcessorMixin`` reads the
sub-processors from). They save ``"processor_class": "<Name>ImageOnlyProcessor"`` and are registered with
``AutoProcessor`` on import of ``lens_halluc.models.adapters``, so ``AutoProcessor.from_pretrained(dir)``
reloads a tiny zoo model's directory offline. Images and text behave exactly as with the stock
processors; ``videos=`` is refused. A user with torchvision loading a real checkpoint gets the stock
processor (its ``processor_config.json`` names the stock class).

Example
-------
>>> from lens_halluc.models.adapters import ADAPTERS
>>> ADAPTERS["qwen2_vl"].image_input_keys
('pixel_values', 'image_grid_thw', 'mm_token_type_ids')
>>> ADAPTERS["qwen2_5_vl"].positions_by_model
True
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from . import register_adapter
from .base import Adapter, AdapterError, NotDefinedForArchitecture

__all__ = ["Qwen2VLAdapter", "Qwen2VLImageOnlyProcessor", "Qwen2_5_VLImageOnlyProcessor",
           "Qwen3VLImageOnlyProcessor", "image_only_processor", "MROPE_NOTES", "qwen_patch_grid"]

MROPE_NOTES = """\
M-RoPE in transformers 5.24 (Qwen2-VL, Qwen2.5-VL; Qwen3-VL differs where noted)

1. get_rope_index(input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw, attention_mask)
   -> (position_ids [3, B, T], rope_deltas [B, 1]). Per row, only the tokens with attention_mask == 1 are
   used (left padding is skipped; padded positions get position 0 on every axis). Text tokens: all three
   axes = running index. An image block of grid (t, h, w) merged to (t, h/m, w/m): axis0 = start + ti
   (Qwen2.5-VL: start + ti * tokens_per_second * second_per_grid_t; 0 for images), axis1 = start + row,
   axis2 = start + col, cells row-major; the next text token continues at start + max(t, h/m, w/m).
   So the max position is < T: rope_deltas = max_position + 1 - (number of unpadded tokens).
2. The VLM model (Qwen2VLModel.forward) computes position_ids itself when position_ids is None: at the
   prefill (no cache / cache length 0) with mm_token_type_ids and an image present, it calls
   get_rope_index and STORES self.rope_deltas on the module (state across calls!). Later calls (cached
   decoding, or inputs_embeds without input_ids) use (cumsum(attention_mask) - 1, or cache_length + arange(new)
   without a mask) + rope_deltas, the same on the three axes. Without images: the text model's own
   arange(T) + past (attention mask NOT honoured) expanded to the axes. image_grid_thw without
   mm_token_type_ids: Qwen2-VL / Qwen3-VL raise ValueError; Qwen2.5-VL silently uses 1-D positions.
3. When position_ids is passed: a [4, B, T] tensor is split into text_position_ids = [0] (1-D, used for the
   causal mask / packed-sequence detection) and the M-RoPE ids [1:4]; a [3, B, T] tensor is used as is;
   a 2-D [B, T] tensor is EXPANDED to the three axes (this is the silent bug: M-RoPE is lost; measured on
   the tiny zoo models, prefill logits off by 0.05 (Qwen2-VL), 0.08 (Qwen2.5-VL), 3.2 (Qwen3-VL)).
   generate() computes [4, B, T] once via model._prepare_position_ids_for_generation (row 0 = mask
   cumsum text positions, rows 1-3 = get_rope_index) and then steps every axis by +1 per new token
   (_update_model_kwargs_for_generation), so greedy decoding with the base-class generation hooks matches.
4. The decoder (Qwen2VLTextModel / Qwen3VLTextModel) computes position_embeddings = rotary_emb(h, position_ids
   [3, B, T]) ONCE -> (cos, sin) each [B, T, head_dim], the frequency bands taken from the three axes by
   mrope_section (Qwen2/2.5: contiguous sections [t|h|w] repeated for the two rotary halves; Qwen3-VL:
   interleaved t,h,w,t,h,w,... when mrope_interleaved). Every decoder layer receives the SAME
   position_embeddings (no per-layer rotary), position_ids = the text position ids (row 0, 1-D [B, T] or
   None) and the same causal mask (all layers full_attention unless use_sliding_window). Inside the layer
   the rotary is applied to q, k ([B, heads, T, head_dim]) with cos/sin unsqueezed at dim 1 -- ordinary
   RoPE once (cos, sin) are known, so a replay can reuse the clean forward's (cos, sin) per position.
5. Left padding: get_rope_index compacts each row over attention_mask == 1, so a left-padded row has the
   same positions for its real tokens as the unpadded prompt; rope_deltas differ per row.
6. Stateful module: model.model.rope_deltas persists between forwards. A forward with a cache whose length
   is > 0 and position_ids None uses the rope_deltas of the LAST prefill -- a replay or a second branch that
   does not first re-run the prefill (or pass explicit position_ids) reads another prompt's deltas.
   Safest: pass explicit [4, B, T] / [3, B, T] position_ids computed with get_rope_index (or
   _prepare_position_ids_for_generation) and slice/step them yourself.
"""


# ---------------------------------------------------------------- image-only processors
def image_only_processor(stock: type) -> type:
    """``stock`` (a Qwen-VL processor class) without its video processor, registered with ``AutoProcessor``.

    ``ProcessorMixin`` reads the sub-processors off ``__init__``'s signature; this one omits
    ``video_processor`` and passes ``None`` on, so nothing imports torchvision."""
    from .common import register_image_only

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        stock.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    name = f"{stock.__name__[:-len('Processor')]}ImageOnlyProcessor"
    cls = type(name, (stock,), {
        "__init__": __init__, "__module__": __name__,
        "__doc__": f"``{stock.__name__}`` for images only: constructible (and reloadable) without torchvision; "
                   "``videos=`` is refused.",
    })
    return register_image_only(cls)


def _stock(module: str, name: str) -> type:
    import importlib

    return getattr(importlib.import_module(f"transformers.models.{module}.processing_{module}"), name)


Qwen2VLImageOnlyProcessor = image_only_processor(_stock("qwen2_vl", "Qwen2VLProcessor"))
Qwen2_5_VLImageOnlyProcessor = image_only_processor(_stock("qwen2_5_vl", "Qwen2_5_VLProcessor"))
Qwen3VLImageOnlyProcessor = image_only_processor(_stock("qwen3_vl", "Qwen3VLProcessor"))


# ---------------------------------------------------------------- helpers shared with qwen3_vl.py
def qwen_patch_grid(model: nn.Module, encoding: Mapping[str, Any], row: int, name: str) -> tuple[int, int]:
    """``(h/m, w/m)`` of the image of sample ``row`` (one image per sample, ``t == 1``)."""
    grid = encoding.get("image_grid_thw")
    if grid is None:
        raise AdapterError(f"{name}: the encoding has no image_grid_thw (pass the whole processor output).")
    grid = torch.as_tensor(grid)
    ids = encoding["input_ids"]
    image_id = int(model.config.image_token_id)
    counts = (torch.as_tensor(ids) == image_id).sum(-1).tolist()
    merge = int(model.config.vision_config.spatial_merge_size)
    # the images of the batch are in image_grid_thw in row order; find those of `row`
    per_image = (grid.prod(-1) // merge ** 2).tolist()
    start, acc = 0, 0
    while acc < sum(counts[:row]) and start < len(per_image):
        acc += per_image[start]
        start += 1
    mine, total = [], 0
    while total < counts[row] and start < len(per_image):
        mine.append(start)
        total += per_image[start]
        start += 1
    if len(mine) != 1:
        raise NotDefinedForArchitecture(f"{name}: sample {row} has {len(mine)} images; the patch grid is defined "
                                        "for one image per sample.")
    t, h, w = grid[mine[0]].tolist()
    if t != 1:
        raise NotDefinedForArchitecture(f"{name}: image {mine[0]} has {t} temporal patches (a video); the patch "
                                        "grid is defined for a still image (t == 1).")
    return h // merge, w // merge


class Qwen2VLAdapter(Adapter):
    """Qwen2-VL and Qwen2.5-VL (see the module doc)."""

    name = "qwen2_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl")
    language_model_paths = ("model.language_model",)
    #: ``image_grid_thw`` ``[n_images, 3]`` decides how the flat ``pixel_values`` split into images and the
    #: M-RoPE positions; ``mm_token_type_ids`` ``[B, T]`` marks the image tokens for ``get_rope_index``.
    image_input_keys = ("pixel_values", "image_grid_thw", "mm_token_type_ids")
    per_token_inputs = {"mm_token_type_ids": 0}
    positions_by_model = True

    #: the base LM's config class (transformers name) for :meth:`base_lm_config`
    base_lm_config_class = "Qwen2Config"

    def base_lm_config(self, model: nn.Module):
        """The Qwen2 (Qwen3 for Qwen3-VL) config of the text tower's sizes: the LM the family starts from
        (1-D rotary with the same theta; the M-RoPE sections are dropped)."""
        import transformers

        text = self.text_config(model.config).to_dict()
        rope = dict(text.get("rope_parameters") or {})
        for key in ("mrope_section", "mrope_interleaved"):
            rope.pop(key, None)
        text["rope_parameters"] = rope or None
        for key in ("model_type", "architectures", "transformers_version"):
            text.pop(key, None)
        return getattr(transformers, self.base_lm_config_class)(**text)

    def structure_token_ids(self, model: nn.Module, processor=None) -> tuple[int, ...]:
        cfg = model.config
        return tuple(int(getattr(cfg, k)) for k in ("vision_start_token_id", "vision_end_token_id")
                     if getattr(cfg, k, None) is not None)

    def image_token_ids(self, model: nn.Module, processor=None) -> tuple[int, ...]:
        return (int(model.config.image_token_id),)

    def model_inputs(self, encoding: Mapping[str, Any]) -> dict[str, Any]:
        out = super().model_inputs(encoding)
        if "pixel_values" in out and "image_grid_thw" not in out:
            raise AdapterError(f"{self.name}: pixel_values without image_grid_thw; pass the whole processor output "
                               "(the flat pixel_values cannot be split into images without it).")
        if "image_grid_thw" in out and "mm_token_type_ids" not in out:
            # Qwen2-VL/Qwen3-VL raise on this; Qwen2.5-VL silently falls back to 1-D positions (M-RoPE lost)
            raise AdapterError(f"{self.name}: image_grid_thw without mm_token_type_ids; the model needs both to "
                               "compute its M-RoPE positions. Pass the whole processor output (transformers >= 5 "
                               "processors return mm_token_type_ids).")
        return out

    def vision_attention(self, model: nn.Module) -> list[nn.Module]:
        """The ``attn`` of each vision block (``model.model.visual.blocks[i].attn``; fused ``qkv`` Linear, its
        ``proj`` Linear's input holds the heads side by side; the attention runs on the flat patch sequence
        with ``cu_seqlens`` separating images -- Qwen2.5-VL: windows -- not on a ``[B, N, d]`` batch)."""
        visual = getattr(getattr(model, "model", model), "visual", None)
        blocks = getattr(visual, "blocks", None)
        if blocks is None:
            raise AdapterError(f"{type(model).__name__}: no vision blocks at model.visual.blocks.")
        return [block.attn for block in blocks]

    def patch_grid(self, model: nn.Module, encoding: Mapping[str, Any], row: int = 0) -> tuple[int, int]:
        """``(h/m, w/m)``: the merged grid of sample ``row``'s image; image token ``k`` is cell ``(k // cols, k % cols)``."""
        return qwen_patch_grid(model, encoding, row, self.name)


register_adapter(Qwen2VLAdapter)
