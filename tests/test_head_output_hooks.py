"""The one o_proj-input hook primitive: read-only functions change nothing, returned tensors replace
the input, calls are counted per layer, and the hooks are gone on exit (also after an error)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lens_halluc.hooks import head_output_hooks
from lens_halluc.models.spec import SpecError


def _enc(vlm):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8))
    return vlm.encode([img], ["Please describe this image in detail."])


def _n_hooks(vlm):
    return sum(len(vlm.spec.o_proj(vlm.model, l)._forward_pre_hooks) for l in range(vlm.spec.n_layers))


@torch.no_grad()
def test_read_only_function_sees_the_input_and_changes_nothing(tiny_vlm):
    enc, spec = _enc(tiny_vlm), tiny_vlm.spec
    clean = tiny_vlm.model(**enc).logits
    seen = {}

    def keep(x):
        seen["x"] = x.clone()  # returns None: the input stays as it is

    with head_output_hooks(tiny_vlm.model, spec, {1: keep}) as calls:
        same = tiny_vlm.model(**enc).logits
        tiny_vlm.model(**enc)
    assert calls == {1: 2}
    assert torch.equal(same, clean)
    assert seen["x"].shape[-1] == spec.n_heads * spec.head_dim


@torch.no_grad()
def test_returned_tensor_replaces_the_input(tiny_vlm):
    """Zeroing the whole input of the last layer's o_proj = zeroing that o_proj's weight."""
    enc, spec = _enc(tiny_vlm), tiny_vlm.spec
    last = spec.n_layers - 1
    with head_output_hooks(tiny_vlm.model, spec, {last: torch.zeros_like}) as calls:
        hooked = tiny_vlm.model(**enc).logits
    assert calls == {last: 1}
    o_proj = spec.o_proj(tiny_vlm.model, last)
    saved = o_proj.weight.clone()
    try:
        o_proj.weight.zero_()
        ref = tiny_vlm.model(**enc).logits
    finally:
        o_proj.weight.copy_(saved)
    torch.testing.assert_close(hooked, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(hooked, tiny_vlm.model(**enc).logits, atol=1e-3)  # the replacement mattered


def test_hooks_are_removed_on_exit_and_on_error(tiny_vlm):
    before = _n_hooks(tiny_vlm)
    with head_output_hooks(tiny_vlm.model, tiny_vlm.spec, {0: lambda x: None, 1: lambda x: None}):
        assert _n_hooks(tiny_vlm) == before + 2
    assert _n_hooks(tiny_vlm) == before
    with pytest.raises(KeyError):
        with head_output_hooks(tiny_vlm.model, tiny_vlm.spec, {0: lambda x: None}):
            raise KeyError("boom")
    assert _n_hooks(tiny_vlm) == before


def test_out_of_range_layer_raises_and_leaves_no_hook(tiny_vlm):
    before = _n_hooks(tiny_vlm)
    with pytest.raises(SpecError, match="out of range"):
        with head_output_hooks(tiny_vlm.model, tiny_vlm.spec, {0: lambda x: None, 99: lambda x: None}):
            pass
    assert _n_hooks(tiny_vlm) == before
