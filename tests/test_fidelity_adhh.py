"""ADHH and attention re-weighting against plain re-statements of the reference's attention code.

The reference (github.com/TianyunYoung/Hallucination-Attribution) edits the post-softmax weights in
its modified ``LlamaAttention.forward`` (``baselines/minigpt4/models/modeling_llama.py`` lines
433-439, ``LLaVA/llava/model/language_model/modeling_llama.py`` lines 575-593)::

    for head in head_list:
        aggre_attention = torch.sum(attn_weights[:, head, -1, img_start_pos + img_length:])
        if aggre_attention >= threshold:
            attn_weights[:, head, -1, img_start_pos + img_length:] = 0
    # re-weighting: attn_weights[:, head, :, text_start:] *= alpha  (or the image slice)

with ``img_start_pos`` / ``img_length`` hard-coded per model (34 or 35, and 576, for LLaVA-1.5).
The functions below re-state that on the same tensors; lens_halluc takes the positions from the
token roles. The end-to-end test runs the re-statement as a registered attention function (the
reference's route: the edit inside the attention forward, prefill and every cached step) and
compares every decoding step's logits with :class:`~lens_halluc.interventions.ADHH`.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from lens_halluc.generation import greedy_decode
from lens_halluc.generation.decoding import DecodingStrategy
from lens_halluc.hooks.attention import (EditContext, ScaleKeys, ThresholdZeroText, capture_attention,
                                         edit_attention, editable_attention, set_text_attn_implementation)
from lens_halluc.interventions import ADHH, Reweight
from lens_halluc.models.spec import TokenRole

HEADS = [(0, 1), (1, 0), (1, 3)]
N_STEPS = 8


# ---------------------------------------------------------------- the reference, re-stated
def ref_adhh(attn_weights, head_list, img_start_pos, img_length, threshold):
    attn_weights = attn_weights.clone()
    for head in head_list:
        aggre_attention = torch.sum(attn_weights[:, head, -1, img_start_pos + img_length:])
        if aggre_attention >= threshold:
            attn_weights[:, head, -1, img_start_pos + img_length:] = 0
    return attn_weights


def all_rows_adhh(attn_weights, head_list, img_start_pos, img_length, threshold):
    """The corrected flavour: the same test and edit on every query row."""
    attn_weights = attn_weights.clone()
    for head in head_list:
        for row in range(attn_weights.shape[2]):
            if torch.sum(attn_weights[:, head, row, img_start_pos + img_length:]) >= threshold:
                attn_weights[:, head, row, img_start_pos + img_length:] = 0
    return attn_weights


def ref_reweight(attn_weights, head_list, img_start_pos, img_length, alpha, text=True):
    attn_weights = attn_weights.clone()
    for head in head_list:
        if text:
            attn_weights[:, head, :, img_start_pos + img_length:] *= alpha
        else:
            attn_weights[:, head, :, img_start_pos:img_start_pos + img_length] *= alpha
    return attn_weights


# ---------------------------------------------------------------- small tensors
def _toy(q_len, k_len=12, n_heads=4, img=(3, 5), seed=0):
    """Causal softmax weights [1, H, Q, K] (queries are the last Q keys) and key roles with an image at img."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(1, n_heads, q_len, k_len, generator=g) * 2
    q_pos = torch.arange(k_len - q_len, k_len)
    allowed = torch.arange(k_len)[None, :] <= q_pos[:, None]                 # [Q, K]
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1)
    start, length = img
    roles = torch.full((1, k_len), int(TokenRole.TEXT))
    roles[0, :start] = int(TokenRole.SYSTEM)
    roles[0, start:start + length] = int(TokenRole.IMAGE)
    ctx = EditContext(0, tuple(range(n_heads)), q_pos[None], allowed[None, None], lambda: roles)
    return weights, ctx, start, length


@pytest.mark.parametrize("q_len", [12, 1], ids=["prefill", "decode-step"])
@pytest.mark.parametrize("tau", [0.0, 0.3, 0.5, 0.7, 1.0])
def test_adhh_edit_equals_the_reference(q_len, tau):
    weights, ctx, start, length = _toy(q_len, seed=q_len)
    heads = list(range(weights.shape[1]))
    got = ThresholdZeroText(tau, rows="last")(weights, ctx)
    assert torch.equal(got, ref_adhh(weights, heads, start, length, tau))
    got_all = ThresholdZeroText(tau, rows="all")(weights, ctx)
    assert torch.equal(got_all, all_rows_adhh(weights, heads, start, length, tau))
    if q_len == 1:  # a decoding step has one row: the flavours agree
        assert torch.equal(got, got_all)


def test_last_row_and_all_rows_differ_in_the_prefill():
    weights, ctx, start, length = _toy(12)
    last, every = ThresholdZeroText(0.3, rows="last")(weights, ctx), ThresholdZeroText(0.3, rows="all")(weights, ctx)
    assert torch.equal(last[:, :, :-1], weights[:, :, :-1])      # earlier prompt rows untouched
    assert not torch.equal(every[:, :, :-1], weights[:, :, :-1])  # the corrected flavour edits them
    assert torch.equal(last[:, :, -1], every[:, :, -1])


@pytest.mark.parametrize("q_len", [12, 1])
@pytest.mark.parametrize("group,alpha", [("text", 0.4), ("text", 0.0), ("image", 2.5)])
def test_reweight_equals_the_reference_on_every_row(q_len, group, alpha):
    weights, ctx, start, length = _toy(q_len, seed=3)
    heads = list(range(weights.shape[1]))
    want = ref_reweight(weights, heads, start, length, alpha, text=group == "text")
    assert torch.allclose(ScaleKeys(group, alpha)(weights, ctx), want, atol=0, rtol=1e-6)


def test_adhh_flavours():
    ref, corr = ADHH(HEADS), ADHH(HEADS, flavour="corrected")
    assert (ref.tau, ref.rows, ref.renormalize) == (0.5, "last", False)
    assert (corr.tau, corr.rows, corr.renormalize) == (0.5, "all", False)
    assert ADHH(HEADS, tau=0.4, flavour="corrected").tau == 0.4           # an explicit value wins
    assert ADHH(HEADS, rows="all") != ref and ADHH(HEADS, rows="all").flavour == "reference"
    for iv in (ref, corr, ADHH(HEADS, tau=0.4, rows="all")):
        assert ADHH(**iv.get_params()) == iv
    with pytest.raises(ValueError, match="rows"):
        ADHH(HEADS, rows="first")
    with pytest.raises(ValueError, match="flavour"):
        ADHH(HEADS, flavour="paper")
    assert "rows=" not in repr(ref) and "flavour='corrected'" in repr(corr)


# ---------------------------------------------------------------- end to end, against a hook-level reference
REF_NAME = "ha_reference_test"
_REF: dict = {}


def _ha_reference_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Eager attention + the reference's ADHH lines, with its hard-coded offsets (set in ``_REF``)."""
    n_rep = query.shape[1] // key.shape[1]
    key_states = key.repeat_interleave(n_rep, dim=1)
    value_states = value.repeat_interleave(n_rep, dim=1)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask[:, :, :, : key_states.shape[-2]]
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    head_list = _REF["heads"].get(module.layer_idx)
    if head_list is not None:
        attn_weights = ref_adhh(attn_weights, head_list, _REF["img_start_pos"], _REF["img_length"], _REF["threshold"])
    attn_output = torch.matmul(attn_weights, value_states).transpose(1, 2).contiguous()
    return attn_output, attn_weights


@pytest.fixture(scope="module")
def vlm(tiny_llava_dir):
    """A private tiny LLaVA: these tests switch its attention implementation."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    from lens_halluc.models import load_vlm

    AttentionInterface.register(REF_NAME, _ha_reference_attention)
    AttentionMaskInterface.register(REF_NAME, eager_mask)
    return load_vlm(tiny_llava_dir)


def _enc(vlm, seed=0):
    rng = np.random.default_rng(seed)
    return vlm.encode([Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))],
                      ["Please describe this image in detail."])


class _Recording(DecodingStrategy):
    """Plain greedy, or a delegate bound strategy, keeping each step's next-token logits."""

    def __init__(self, inner=None):
        self.inner, self.logits = inner or DecodingStrategy(), []

    def session(self):
        return self.inner.session()

    def context(self):
        return self.inner.context()

    def combine(self, logits, branch_logits):
        self.logits.append(logits[0].clone())
        return self.inner.combine(logits, branch_logits)


def _decode(vlm, enc, strategy):
    out = greedy_decode(vlm.model, enc, max_new_tokens=N_STEPS, strategy=strategy)
    return out.sequences[0], torch.stack(strategy.logits)


def _reference_decode(vlm, enc, heads, tau):
    ids = enc["input_ids"][0]
    image = (ids == vlm.spec.image_token_id).nonzero().flatten()
    assert torch.equal(image, torch.arange(int(image[0]), int(image[-1]) + 1))  # one contiguous image
    by_layer: dict = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    _REF.update(heads=by_layer, img_start_pos=int(image[0]), img_length=len(image), threshold=tau)
    previous = set_text_attn_implementation(vlm, REF_NAME)
    try:
        return _decode(vlm, enc, _Recording())
    finally:
        set_text_attn_implementation(vlm, previous)


@torch.no_grad()
@pytest.mark.parametrize("tau", [0.0, 0.2, 0.5])
def test_adhh_decoding_equals_the_hook_level_reference(vlm, tau):
    enc = _enc(vlm)
    heads = HEADS if tau else [(l, h) for l in range(vlm.spec.n_layers) for h in range(vlm.spec.n_heads)]
    ref_tokens, ref_logits = _reference_decode(vlm, enc, heads, tau)
    tokens, logits = _decode(vlm, enc, _Recording(ADHH(heads, tau=tau).bind(vlm)))
    assert torch.equal(tokens, ref_tokens)
    assert torch.allclose(logits, ref_logits, atol=1e-6)
    if tau == 0.0:  # every last row is edited: the edit acts, and editing all prompt rows is something else
        plain_tokens, plain_logits = _decode(vlm, enc, _Recording())
        assert not torch.allclose(plain_logits, ref_logits, atol=1e-3)
        _, all_rows = _decode(vlm, enc, _Recording(ADHH(heads, tau=tau, flavour="corrected").bind(vlm)))
        assert (all_rows - ref_logits).abs().max() > 1e-4  # (small on a 2-layer random model, but far above 1e-6)


@torch.no_grad()
def test_prefill_edits_only_the_last_prompt_row(vlm):
    enc = _enc(vlm, seed=1)
    layer, head = 1, 2
    with editable_attention(vlm):
        clean = capture_attention(vlm, enc, layers=[layer])[0][:, head]
        with edit_attention(vlm, ThresholdZeroText(0.0, rows="last"), [(layer, head)]):
            last = capture_attention(vlm, enc, layers=[layer])[0][:, head]
        with edit_attention(vlm, ThresholdZeroText(0.0, rows="all"), [(layer, head)]):
            every = capture_attention(vlm, enc, layers=[layer])[0][:, head]
    roles = vlm.spec.token_roles(enc["input_ids"], enc["attention_mask"])[0]
    text = roles == int(TokenRole.TEXT)
    assert torch.equal(last[:, :-1], clean[:, :-1])
    assert torch.all(last[:, -1, text] == 0) and torch.equal(last[:, -1, ~text], clean[:, -1, ~text])
    first_text = int(text.nonzero()[0])
    assert torch.all(every[:, first_text:, text] == 0)
    assert not torch.equal(every[:, :-1], clean[:, :-1])
