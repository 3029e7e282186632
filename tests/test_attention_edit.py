"""Editable attention: equals eager without edits, edits match hand computations, and it refuses to no-op."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lens_halluc.generation import greedy_decode
from lens_halluc.hooks import InterventionNotAppliedError
from lens_halluc.hooks.attention import (
    ATTN_IMPLEMENTATION, AttentionEditing, Counterfactual, Identity, ScaleKeys, ThresholdZeroText,
    capture_attention, edit_attention, editable_attention, register_editable_attention,
    set_text_attn_implementation, text_attn_implementation, use_editable_attention,
)
from lens_halluc.models.spec import SpecError, TokenRole

# Two prompts of different lengths: the batch is left-padded, so the padding mask matters.
PROMPTS = ["Please describe this image in detail.", "is there a cat ?"]


@pytest.fixture(scope="module")
def vlm(tiny_llava_dir):
    """A private copy of the tiny LLaVA: these tests switch its attention, the session fixture stays eager."""
    from lens_halluc.models import load_vlm

    return load_vlm(tiny_llava_dir)


@pytest.fixture()
def editable(vlm):
    """The private model on 'lens_halluc' for one test, restored afterwards."""
    with editable_attention(vlm):
        yield vlm


def _enc(vlm, n=2, seed=0):
    rng = np.random.default_rng(seed)
    ims = [Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)) for _ in range(n)]
    return vlm.encode(ims, PROMPTS[:n])


def _roles(vlm, enc):
    return vlm.spec.token_roles(enc["input_ids"], enc["attention_mask"])


@torch.no_grad()
def test_no_edit_equals_eager_on_left_padded_batch(vlm):
    enc = _enc(vlm)
    assert (enc["attention_mask"] == 0).any()  # really padded
    assert text_attn_implementation(vlm) == "eager"
    ref = vlm.model(**enc).logits
    ref_tokens = greedy_decode(vlm.model, enc, max_new_tokens=8)
    previous = use_editable_attention(vlm)
    try:
        assert previous == "eager"
        assert text_attn_implementation(vlm) == ATTN_IMPLEMENTATION
        assert vlm.model.config.vision_config._attn_implementation != ATTN_IMPLEMENTATION  # vision tower untouched
        assert torch.allclose(vlm.model(**enc).logits, ref, atol=1e-6)
        all_heads = [(l, h) for l in range(vlm.spec.n_layers) for h in range(vlm.spec.n_heads)]
        with edit_attention(vlm, Identity(), all_heads):
            assert torch.allclose(vlm.model(**enc).logits, ref, atol=1e-6)
        assert torch.equal(greedy_decode(vlm.model, enc, max_new_tokens=8).sequences, ref_tokens.sequences)
        ident = greedy_decode(vlm.model, enc, max_new_tokens=8, strategy=AttentionEditing(vlm, Identity(), all_heads))
        assert torch.equal(ident.sequences, ref_tokens.sequences)
    finally:
        set_text_attn_implementation(vlm, previous)
    assert text_attn_implementation(vlm) == "eager"


@torch.no_grad()
def test_mask_registration_keeps_causal_and_padding_mask(editable):
    """Without the mask function under the same name, transformers builds no mask: outputs change."""
    from transformers.masking_utils import AttentionMaskInterface

    enc = _enc(editable)
    with_mask = editable.model(**enc).logits
    removed = AttentionMaskInterface._global_mapping.pop(ATTN_IMPLEMENTATION)
    try:
        without_mask = editable.model(**enc).logits
    finally:
        register_editable_attention()
    assert AttentionMaskInterface._global_mapping[ATTN_IMPLEMENTATION] is removed
    assert not torch.allclose(with_mask, without_mask, atol=1e-3)
    # and the registered function with its mask is exactly eager (checked above), so the mask is the one that matters
    att = capture_attention(editable, enc, layers=[0])[0]                      # [B, H, T, T]
    real_q = (enc["attention_mask"] == 1)[:, None, :, None]                   # fully masked padding rows are uniform, as in eager
    assert torch.all(att.triu(diagonal=1)[real_q.expand_as(att)] == 0)        # no weight on future keys
    pad = enc["attention_mask"][1] == 0                                        # the padded row
    assert pad.any()
    assert torch.all(att[1][:, ~pad][:, :, pad] == 0)  # real queries give padding keys no weight


def _value_states(vlm, enc, layer):
    """Per-query-head value vectors ``[B, H, T, d]`` of ``layer`` (no rotary on values), computed by hand."""
    got = {}
    attn = vlm.spec.attention(vlm.model, layer)
    h = attn.register_forward_pre_hook(lambda m, a, kw: got.update(x=kw["hidden_states"]), with_kwargs=True)
    try:
        vlm.model(**enc)
    finally:
        h.remove()
    x = got["x"]
    B, T, _ = x.shape
    v = attn.v_proj(x).view(B, T, vlm.spec.n_kv_heads, vlm.spec.head_dim).transpose(1, 2)
    return v.repeat_interleave(vlm.spec.n_heads // vlm.spec.n_kv_heads, dim=1)


def _o_proj_input(vlm, enc, layer):
    got = {}
    h = vlm.spec.o_proj(vlm.model, layer).register_forward_pre_hook(lambda m, a: got.update(x=a[0].clone()))
    try:
        vlm.model(**enc)
    finally:
        h.remove()
    return got["x"]


@torch.no_grad()
@pytest.mark.parametrize("group,alpha", [("image", 2.5), ("text", 0.3)])
def test_scale_keys_equals_hand_computation(editable, group, alpha):
    vlm, layer, head = editable, 1, 2
    enc = _enc(vlm)
    roles = _roles(vlm, enc)
    clean = capture_attention(vlm, enc, layers=[layer])[0]                      # [B, H, T, T]
    values = _value_states(vlm, enc, layer)                                    # [B, H, T, d]
    in_group = (roles == int(TokenRole.IMAGE if group == "image" else TokenRole.TEXT))[:, None, :]
    expected = clean.clone()
    expected[:, head] = clean[:, head] * torch.where(in_group, alpha, 1.0)
    with edit_attention(vlm, ScaleKeys(group, alpha), [(layer, head)]):
        edited = capture_attention(vlm, enc, layers=[layer])[0]
        o_in = _o_proj_input(vlm, enc, layer)
    assert torch.allclose(edited, expected, atol=1e-6)
    others = [h for h in range(vlm.spec.n_heads) if h != head]
    assert torch.equal(edited[:, others], clean[:, others])
    # the layer really used the edited weights: o_proj input = (edited weights @ V) per head, by hand
    hand = torch.einsum("bhqk,bhkd->bqhd", expected, values).flatten(2)
    assert torch.allclose(o_in, hand, atol=1e-5)
    assert not torch.allclose(edited[:, head], clean[:, head], atol=1e-4)

    with edit_attention(vlm, ScaleKeys(group, alpha, renormalize=True), [(layer, head)]):
        renorm = capture_attention(vlm, enc, layers=[layer])[0]
    assert torch.allclose(renorm[:, head].sum(-1), torch.ones_like(renorm[:, head, :, 0]), atol=1e-5)
    assert torch.allclose(renorm[:, head], expected[:, head] / expected[:, head].sum(-1, keepdim=True), atol=1e-6)


@torch.no_grad()
def test_threshold_zero_text_edits_only_rows_above_tau_and_listed_heads(editable):
    vlm, layer, head = editable, 0, 1
    enc = _enc(vlm)
    text = (_roles(vlm, enc) == int(TokenRole.TEXT))[:, None, None, :]          # [B,1,1,T]
    clean = capture_attention(vlm, enc, layers=[layer])[0]
    mass = (clean * text).sum(-1)                                              # [B, H, T]
    candidates = mass[:, head][mass[:, head] > 0]
    tau = float(candidates.median())  # some rows pass, some do not
    with edit_attention(vlm, ThresholdZeroText(tau, rows="all"), [(layer, head)]):
        edited = capture_attention(vlm, enc, layers=[layer])[0]
    hit = mass[:, head] >= tau                                                 # [B, T]
    assert hit.any() and (~hit & (mass[:, head] > 0)).any()
    e, c = edited[:, head], clean[:, head]
    assert torch.equal(e[~hit], c[~hit])                                       # rows below tau untouched
    assert torch.all((e[hit] * text[:, 0, 0][:, None].expand_as(e)[hit]) == 0)  # text keys zeroed on hit rows
    non_text = ~text[:, 0, 0][:, None].expand_as(e)
    assert torch.equal(e[hit][non_text[hit]], c[hit][non_text[hit]])           # other keys kept, not renormalised
    others = [h for h in range(vlm.spec.n_heads) if h != head]
    assert torch.equal(edited[:, others], clean[:, others])

    with edit_attention(vlm, ThresholdZeroText(tau, renormalize=True, rows="all"), [(layer, head)]):
        renorm = capture_attention(vlm, enc, layers=[layer])[0][:, head]
    sums = renorm.sum(-1)
    assert torch.allclose(sums[hit & (renorm.sum(-1) > 0)], torch.ones(()), atol=1e-5)
    assert torch.equal(renorm[~hit], c[~hit])


@torch.no_grad()
@pytest.mark.parametrize("kind", ["reverse", "reverse_normalize", "uniform", "random"])
def test_counterfactual_keeps_causal_mask(editable, kind):
    vlm, layer, heads = editable, 0, [0, 3]
    enc = _enc(vlm)
    clean = capture_attention(vlm, enc, layers=[layer])[0]
    with edit_attention(vlm, Counterfactual(kind, seed=1), [(layer, h) for h in heads]):
        edited = capture_attention(vlm, enc, layers=[layer])[0]
    T = clean.shape[-1]
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    pad_key = (enc["attention_mask"] == 0)[:, None, None, :]
    allowed = ~future & ~pad_key                                               # [B,1,T,T]
    e = edited[:, heads]
    assert torch.all(e[:, :, future] == 0)
    assert torch.all(e.masked_select(pad_key.expand_as(e)) == 0)
    rows = allowed.any(-1).expand(-1, len(heads), -1)                          # query rows that see something
    if kind == "reverse":
        peak = clean[:, heads].amax(-1, keepdim=True)
        assert torch.allclose(e, torch.where(allowed, peak - clean[:, heads], 0.0), atol=1e-6)
    else:
        if kind == "reverse_normalize":
            # a row whose allowed weights are all equal (e.g. the first query: one key) reverses to 0 and stays 0
            flat = (torch.where(allowed, clean[:, heads], -1.0).amax(-1) - torch.where(allowed, clean[:, heads], 2.0).amin(-1)) <= 0
            assert torch.all(e.sum(-1)[rows & flat] == 0)
            rows = rows & ~flat
        assert rows.float().mean() > 0.5
        assert torch.allclose(e.sum(-1)[rows], torch.ones(()), atol=1e-5)
    others = [h for h in range(vlm.spec.n_heads) if h not in heads]
    assert torch.equal(edited[:, others], clean[:, others])


def test_refuses_when_it_would_do_nothing(vlm):
    enc = _enc(vlm, 1)
    for impl in ("eager", "sdpa"):
        previous = set_text_attn_implementation(vlm, impl)
        try:
            with pytest.raises(InterventionNotAppliedError, match="use_editable_attention"):
                with edit_attention(vlm, ScaleKeys("text", 0.0), [(0, 0)]):
                    vlm.model(**enc)
            with pytest.raises(InterventionNotAppliedError, match="use_editable_attention"):
                capture_attention(vlm, enc)
        finally:
            set_text_attn_implementation(vlm, previous)
    with editable_attention(vlm):
        with pytest.raises(InterventionNotAppliedError, match="never ran"):
            with edit_attention(vlm, ScaleKeys("text", 0.0), [(1, 0)]):
                pass  # no forward inside the context
        for bad in ([(7, 0)], [(0, 9)]):
            with pytest.raises(SpecError, match="out of range"):
                with edit_attention(vlm, Identity(), bad):
                    pass
        with pytest.raises(SpecError, match="out of range"):
            AttentionEditing(vlm, Identity(), [(0, 4)])


@torch.no_grad()
def test_attention_editing_strategy_in_greedy_decode(editable):
    vlm = editable
    enc = _enc(vlm)
    plain = greedy_decode(vlm.model, enc, max_new_tokens=8)
    all_heads = [(l, h) for l in range(vlm.spec.n_layers) for h in range(vlm.spec.n_heads)]
    strong = greedy_decode(vlm.model, enc, max_new_tokens=8, strategy=AttentionEditing(vlm, ScaleKeys("text", 0.0), all_heads))
    assert not torch.equal(strong.sequences, plain.sequences)
    ident = greedy_decode(vlm.model, enc, max_new_tokens=8, strategy=AttentionEditing(vlm, Identity(), all_heads))
    assert torch.equal(ident.sequences, plain.sequences)


class _Recording(AttentionEditing):
    """AttentionEditing that keeps the next-token logits of every step."""

    def __init__(self, *args):
        super().__init__(*args)
        self.logits = []

    def combine(self, logits, branch_logits):
        self.logits.append(logits.clone())
        return logits


@torch.no_grad()
def test_cached_steps_track_key_roles(editable):
    """Decoding with a role-dependent edit (prefill + cached steps) = one full forward under the same edit.

    Generated tokens must be TEXT keys in cached steps; labelling them otherwise changes these logits.
    """
    vlm = editable
    enc = _enc(vlm, 1, seed=2)
    edit, heads = ScaleKeys("text", 0.0), [(0, 0), (0, 3), (1, 1), (1, 2)]
    strategy = _Recording(vlm, edit, heads)
    out = greedy_decode(vlm.model, enc, max_new_tokens=6, strategy=strategy)
    gen = out.sequences[0]
    ids = torch.cat([enc["input_ids"], gen[None, :-1]], dim=1)
    full = dict(enc, input_ids=ids, attention_mask=torch.ones_like(ids))
    with edit_attention(vlm, edit, heads):
        logits = vlm.model(**full).logits[0, enc["input_ids"].shape[1] - 1:]
    stepped = torch.cat(strategy.logits)
    assert stepped.shape == logits.shape
    assert torch.allclose(stepped, logits, atol=1e-4)
    assert not torch.allclose(vlm.model(**full).logits[0, enc["input_ids"].shape[1] - 1:], logits, atol=1e-3)
