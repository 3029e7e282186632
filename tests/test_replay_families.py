"""Exact and naive head attribution equal a plain per-head loop on every VLM family of the zoo.

For each family (a tiny random model from :mod:`lens_halluc.models.zoo`, float32, CPU) one prompt with
an image and a short teacher-forced caption, two caption targets, local and global scope, zero and mean
ablation. The reference is written here, independent of the library: a torch forward pre-hook on one
layer's ``o_proj`` replaces one head's slice of its input (at the predicting position, or everywhere),
one head at a time, through the model's own full forward with every processor input. The exact replay
has to reproduce each layer's own rotary embeddings and mask (Gemma 3's sliding windows and
bidirectional image block, M-RoPE), the steps between layers (Qwen3-VL's deepstack) and the model's
logits post-processing to pass.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image

from lens_halluc.attribution import head_means, influences
from lens_halluc.models.adapt import as_loaded_vlm
from lens_halluc.models.zoo import FAMILIES, make_tiny

ATOL = 1e-5
PROMPT = "please describe this image in detail ."
N_CAPTION = 4


_CASES: dict = {}


def _case(family: str):
    """``(vlm, inputs, targets, means)``: the model, every forward input of prompt + caption (``[1, T]``),
    two targets in the model's greedy caption (the first caption token, predicted by the prompt's last
    position, and the last),
    head means over the caption positions."""
    if family in _CASES:
        return _CASES[family]
    model, processor = make_tiny(family, seed=0)
    vlm = as_loaded_vlm(model, processor)
    adapter = vlm.spec.adapter
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
    text = adapter.format_prompt(processor, PROMPT)
    enc = processor(images=adapter.processor_images([image]), text=[text], return_tensors="pt")
    inputs = adapter.model_inputs(enc)
    T0 = inputs["input_ids"].shape[1]
    # The model's own greedy caption: its tokens are likely, so the heads move their probability by a lot.
    # Image, image-structure and special tokens are kept out of it (a random model may emit them; an image
    # token in the caption would have no image features).
    banned = sorted({*vlm.spec.image_token_ids, *vlm.spec.structure_token_ids, *processor.tokenizer.all_special_ids})
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=N_CAPTION, min_new_tokens=N_CAPTION, do_sample=False,
                             suppress_tokens=banned)
    caption = out[:, T0:]
    inputs = adapter.extend_inputs(inputs, caption)
    T = inputs["input_ids"].shape[1]
    assert T == T0 + caption.shape[1]
    targets = [T0, T - 1]
    means = head_means(vlm, [inputs], [torch.arange(T) >= T0])
    _CASES[family] = (vlm, inputs, targets, means)
    return _CASES[family]


@torch.no_grad()
def _plain_loop(vlm, inputs, targets, scope, means):
    """``p(y_t) - p_{-(l,h)}(y_t)`` ``[n, L, H]`` by one full forward per (target,) head, the head replaced
    by a hook on its ``o_proj`` input."""
    model, spec = vlm.model, vlm.spec
    L, H, D = spec.n_layers, spec.n_heads, spec.head_dim
    ids = inputs["input_ids"]
    t = torch.tensor(targets)
    q, y = t - 1, ids[0, t]

    def logp():
        return torch.log_softmax(model(**inputs, use_cache=False).logits[0].float(), dim=-1)

    clean = logp()[q, y].exp()
    out = torch.empty(len(targets), L, H)
    for layer in range(L):
        for head in range(H):
            fill = means[layer, head] if means is not None else torch.zeros(D)
            groups = [(list(range(len(targets))), None)] if scope == "global" else \
                [([i], int(q[i])) for i in range(len(targets))]
            for rows, pos in groups:
                def replace(module, args, head=head, fill=fill, pos=pos):
                    x = args[0].clone()
                    cols = slice(head * D, (head + 1) * D)
                    if pos is None:
                        x[..., cols] = fill.to(x)
                    else:
                        x[:, pos, cols] = fill.to(x)
                    return (x,)
                handle = spec.o_proj(model, layer).register_forward_pre_hook(replace)
                try:
                    lp = logp()
                finally:
                    handle.remove()
                for i in rows:
                    out[i, layer, head] = clean[i] - lp[q[i], y[i]].exp()
    return out


@pytest.mark.capability("attribution == loop")
@pytest.mark.parametrize("ablation", ["zero", "mean"])
@pytest.mark.parametrize("scope", ["local", "global"])
@pytest.mark.parametrize("family", FAMILIES)
def test_exact_and_naive_equal_the_plain_loop(family, scope, ablation):
    vlm, inputs, targets, means = _case(family)
    m = means if ablation == "mean" else None
    ref = _plain_loop(vlm, inputs, targets, scope, m)
    rest = dict(inputs)
    ids, pix = rest.pop("input_ids"), rest.pop("pixel_values", None)
    for method in ("exact", "naive"):
        got = influences(vlm, ids, pix, targets, scope=scope, ablation=ablation, means=m, method=method, **rest)
        assert got.influence.shape == ref.shape
        torch.testing.assert_close(got.influence, ref, atol=ATOL, rtol=0, msg=lambda s: f"{family} {method}: {s}")
        if method == "exact":
            assert got.control_gap < 1e-3
    assert float(ref.abs().max()) > 1e-3  # the heads matter: an ablation that did nothing would pass trivially


def _llava_case():
    return _case("llava")


@pytest.mark.parametrize("scope", ["local", "global"])
def test_a_step_between_layers_is_refused_unless_the_adapter_declares_it(scope, monkeypatch):
    """A text model that changes the hidden states between two layers (as Qwen3-VL's deepstack does;
    simulated here by a pre-hook on layer 1 that fires on the whole sequence only) is refused unless the
    adapter declares the step; declared additive, the replay equals the plain loop."""
    vlm, inputs, targets, _ = _llava_case()
    T, d = inputs["input_ids"].shape[1], vlm.spec.hidden_size
    delta = 0.5 * torch.randn(1, T, d, generator=torch.Generator().manual_seed(0))

    def add(module, args, kwargs):
        hs = args[0] if args else kwargs["hidden_states"]
        if hs.shape[1] != T:  # a replayed batch: the replay must reproduce the step itself
            return None
        hs = hs + delta
        return ((hs,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hs})

    rest = dict(inputs)
    ids, pix = rest.pop("input_ids"), rest.pop("pixel_values", None)
    handle = vlm.spec.layers(vlm.model)[1].register_forward_pre_hook(add, with_kwargs=True)
    try:
        with pytest.raises(Exception, match="between decoder layers 0 and 1"):
            influences(vlm, ids, pix, targets, scope=scope, **rest)
        monkeypatch.setattr(type(vlm.spec.adapter), "between_layer_steps", "additive")
        got = influences(vlm, ids, pix, targets, scope=scope, **rest)
        ref = _plain_loop(vlm, inputs, targets, scope, None)
    finally:
        handle.remove()
    torch.testing.assert_close(got.influence, ref, atol=ATOL, rtol=0)


def test_an_unknown_per_position_keyword_is_refused():
    """A layer input the replay does not know how to restrict to the replayed positions is named in the error."""
    vlm, inputs, targets, _ = _llava_case()
    T = inputs["input_ids"].shape[1]

    def inject(module, args, kwargs):
        return args, {**kwargs, "per_token_bias": torch.zeros(1, T)}

    layer0 = vlm.spec.layers(vlm.model)[0]
    rest = dict(inputs)
    ids, pix = rest.pop("input_ids"), rest.pop("pixel_values", None)
    orig = layer0.forward
    layer0.forward = lambda *a, per_token_bias=None, **k: orig(*a, **k)  # accept (and ignore) the keyword
    handle = layer0.register_forward_pre_hook(inject, with_kwargs=True)
    try:
        with pytest.raises(Exception, match="per_token_bias.*replay_kwarg_axes"):
            influences(vlm, ids, pix, targets, **rest)
    finally:
        handle.remove()
        del layer0.forward
