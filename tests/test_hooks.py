"""Head ablation hooks against an independent computation, and the 'did it apply' check."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from lens_halluc.hooks import InterventionNotAppliedError, ablate_heads
from lens_halluc.models.spec import SpecError


def _enc(vlm, n=2):
    rng = np.random.default_rng(0)
    ims = [Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)) for _ in range(n)]
    return vlm.encode(ims, ["Please describe this image in detail.", "is there a cat ?"][:n])


@torch.no_grad()
def test_zero_ablation_equals_zeroed_o_proj_columns(tiny_vlm):
    enc = _enc(tiny_vlm)
    heads = [(0, 1), (1, 3), (1, 0)]
    with ablate_heads(tiny_vlm.model, tiny_vlm.spec, heads):
        hooked = tiny_vlm.model(**enc).logits
    ref_model = copy.deepcopy(tiny_vlm.model)
    for l, h in heads:
        tiny_vlm.spec.o_proj(ref_model, l).weight[:, tiny_vlm.spec.head_slice(h)] = 0
    ref = ref_model(**enc).logits
    assert torch.allclose(hooked, ref, atol=1e-5)
    assert not torch.allclose(hooked, tiny_vlm.model(**enc).logits, atol=1e-3)  # the ablation matters


@torch.no_grad()
def test_mean_ablation_and_position_mask(tiny_vlm):
    enc = _enc(tiny_vlm, 1)
    spec = tiny_vlm.spec
    value = torch.randn(spec.head_dim)
    T = enc["input_ids"].shape[1]
    only_last = torch.zeros(T, dtype=torch.bool)
    only_last[-1] = True
    clean = tiny_vlm.model(**enc).logits
    with ablate_heads(tiny_vlm.model, spec, [(1, 2)], values={(1, 2): value}, positions=only_last):
        edited = tiny_vlm.model(**enc).logits
    # earlier positions untouched, the last one changed (layer 1 is the last layer: no later mixing)
    assert torch.allclose(edited[:, :-1], clean[:, :-1], atol=1e-6)
    assert not torch.allclose(edited[:, -1], clean[:, -1], atol=1e-4)
    # replacing the slice by its own clean value is a no-op: the values path writes exactly there
    captured = {}
    h = spec.o_proj(tiny_vlm.model, 1).register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0].clone()))
    tiny_vlm.model(**enc)
    h.remove()
    own = captured["x"][0, -1, spec.head_slice(2)]
    with ablate_heads(tiny_vlm.model, spec, [(1, 2)], values={(1, 2): own}, positions=only_last):
        same = tiny_vlm.model(**enc).logits
    assert torch.allclose(same, clean, atol=1e-6)


def test_out_of_range_heads_raise(tiny_vlm):
    with pytest.raises(SpecError, match="out of range"):
        with ablate_heads(tiny_vlm.model, tiny_vlm.spec, [(7, 0)]):
            pass


def test_hooks_that_never_run_raise(tiny_vlm):
    with pytest.raises(InterventionNotAppliedError, match="never ran"):
        with ablate_heads(tiny_vlm.model, tiny_vlm.spec, [(0, 0)]):
            pass  # no forward inside the context
