"""The public attribution function accepts a user's own nnsight-wrapped or bare transformers model."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lens_halluc.attribution import influences
from lens_halluc.models.adapt import as_loaded_vlm, unwrap_model


def _case(vlm):
    rng = np.random.default_rng(0)
    enc = vlm.encode([Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))], ["describe this"])
    ids = torch.cat([enc["input_ids"][0], torch.tensor([14, 7, 23, 13])])
    return ids, enc["pixel_values"], [len(ids) - 3, len(ids) - 1]


def test_nnsight_wrapped_and_bare_models_give_the_same_influences(tiny_vlm):
    nnsight = pytest.importorskip("nnsight")
    ids, pix, targets = _case(tiny_vlm)
    ref = influences(tiny_vlm, ids, pix, targets).influence
    wrapped = nnsight.NNsight(tiny_vlm.model)
    assert unwrap_model(wrapped) is tiny_vlm.model
    via_nnsight = influences(wrapped, ids, pix, targets, processor=tiny_vlm.processor).influence
    via_hf = influences(tiny_vlm.model, ids, pix, targets, processor=tiny_vlm.processor).influence
    assert torch.equal(ref, via_nnsight) and torch.equal(ref, via_hf)
    assert ref.abs().max() > 0


def test_missing_processor_is_explained(tiny_vlm):
    with pytest.raises(ValueError, match="pass processor"):
        as_loaded_vlm(tiny_vlm.model)
    with pytest.raises(TypeError, match="expected a LoadedVLM"):
        as_loaded_vlm(object(), processor=tiny_vlm.processor)
