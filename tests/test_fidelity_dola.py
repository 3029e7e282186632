"""DoLa against a plain re-statement of voidism/DoLa's ``dola_greedy_decode``.

The re-statement below is written from the reference's code (github.com/voidism/DoLa,
``transformers-4.28.1/src/transformers/generation/utils.py``: ``dola_greedy_decode`` and
``relative_top_filter``; ``.../models/llama/modeling_llama.py``: early exits
``lm_head(outputs.hidden_states[j])``, the final norm only on the last entry), on the reference's
own inputs: ``outputs.hidden_states`` of a full forward without a cache, recomputed for every step,
batch size 1, the repetition penalty by transformers' own ``RepetitionPenaltyLogitsProcessor``
(``repetition_penalty = 1.2`` in the DoLa scripts). lens_halluc reads the hidden states from hooks
on its cached decoding loop; both must give the same scores and tokens.

The one adaptation: the text-only reference had no image tokens, so the penalty is given the
prompt's ids without the image placeholders (as lens_halluc documents).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from lens_halluc.generation import greedy_decode
from lens_halluc.generation.decoding import DecodingStrategy
from lens_halluc.interventions import DoLa
from lens_halluc.interventions.dola import (default_candidate_layers, dola_divergence, jensen_shannon,
                                            relative_top_mask, repetition_penalty)

N_STEPS = 6


@pytest.fixture(scope="module")
def vlm6(tmp_path_factory):
    """A random tiny LLaVA with 6 decoder layers (reference candidates: 0, 2; corrected: 0, 1, 2)."""
    from lens_halluc.models import load_vlm
    from lens_halluc.models.tiny import save_tiny_llava

    return load_vlm(save_tiny_llava(tmp_path_factory.mktemp("tiny-llava-6"), seed=3, n_layers=6))


def _enc(vlm, prompt="Please describe this image in detail.", seed=0):
    rng = np.random.default_rng(seed)
    return vlm.encode([Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))], [prompt])


# ---------------------------------------------------------------- the reference, re-stated
def ref_relative_top_filter(scores, relative_top=0.1, filter_value=-float("Inf"), min_tokens_to_keep=1):
    scores_normalized = scores.log_softmax(dim=-1)
    sorted_logits, sorted_indices = torch.sort(scores_normalized, descending=True)
    min_thresh = sorted_logits[..., min_tokens_to_keep - 1]
    probs_max = torch.max(scores_normalized, dim=-1).values
    probs_thresh = probs_max + np.log(relative_top)
    probs_thresh = torch.min(min_thresh, probs_thresh)
    probs_thresh = probs_thresh.unsqueeze(-1)
    scores_normalized[scores_normalized < probs_thresh] = filter_value
    return scores_normalized


def ref_dola_scores(dict_outputs, candidate_premature_layers, mature_layer, relative_top):
    """One step of ``dola_greedy_decode`` (dynamic premature layer), before the logits processors."""
    stacked_premature_layers = torch.stack([dict_outputs[i][:, -1, :] for i in candidate_premature_layers], dim=0)
    softmax_mature_layer = F.softmax(dict_outputs[mature_layer][:, -1, :], dim=-1)
    softmax_premature_layers = F.softmax(stacked_premature_layers, dim=-1)
    M = 0.5 * (softmax_mature_layer[None, :, :] + softmax_premature_layers)
    log_softmax_mature_layer = F.log_softmax(dict_outputs[mature_layer][:, -1, :], dim=-1)
    log_softmax_premature_layers = F.log_softmax(stacked_premature_layers, dim=-1)
    kl1 = F.kl_div(log_softmax_mature_layer[None, :, :], M, reduction='none').mean(-1)
    kl2 = F.kl_div(log_softmax_premature_layers, M, reduction='none').mean(-1)
    js_divs = 0.5 * (kl1 + kl2)
    js_divs = js_divs.mean(-1)
    premature_layer = candidate_premature_layers[int(js_divs.argmax().cpu().item())]
    base_logits = dict_outputs[premature_layer][:, -1, :]
    final_logits = dict_outputs[mature_layer][:, -1, :]
    if relative_top > 0.0:
        final_logits = ref_relative_top_filter(final_logits, relative_top)
        base_logits = base_logits.log_softmax(dim=-1)
        mask = final_logits[0] < -1e3
        base_logits[0][mask] = -1e3
    return final_logits - base_logits, premature_layer


@torch.no_grad()
def ref_dola_decode(vlm, enc, candidate_layers, n_steps, relative_top=0.1, penalty=1.2):
    """The reference loop: a full forward per step (no cache), early exits lm_head(hidden_states[j])."""
    head = vlm.model.get_output_embeddings()
    n = vlm.spec.n_layers
    text_ids = enc["input_ids"][enc["input_ids"] != vlm.spec.image_token_id][None]
    processor = RepetitionPenaltyLogitsProcessor(penalty)
    ids, scores_all, picked = enc["input_ids"], [], []
    for _ in range(n_steps):
        out = vlm.model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=enc["pixel_values"],
                        output_hidden_states=True)
        dict_outputs = {j: head(out.hidden_states[j]) for j in candidate_layers}
        dict_outputs[n] = head(out.hidden_states[n])  # hidden_states[n] is the normed last layer: the model's logits
        logits, layer = ref_dola_scores(dict_outputs, candidate_layers, n, relative_top)
        scores = processor(text_ids, logits.clone())
        nxt = scores.argmax(-1)
        scores_all.append(scores[0])
        picked.append(layer)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        text_ids = torch.cat([text_ids, nxt[:, None]], dim=1)
    return ids[0, enc["input_ids"].shape[1]:], torch.stack(scores_all), picked


class _Recording(DecodingStrategy):
    """Delegates to a bound strategy and keeps the scores and the chosen layer of every step."""

    def __init__(self, inner):
        self.inner, self.scores, self.picked = inner, [], []

    def session(self):
        return self.inner.session()

    def context(self):
        return self.inner.context()

    def branches(self):
        return self.inner.branches()

    def begin(self, inputs):
        self.inner.begin(inputs)

    def combine(self, logits, branch_logits):
        s = self.inner.combine(logits, branch_logits)
        self.scores.append(s[0].clone())
        self.picked.append(int(self.inner.last_premature[0]))
        return s


def _ours(vlm, enc, iv, n=N_STEPS):
    rec = _Recording(iv.bind(vlm))
    out = greedy_decode(vlm.model, enc, max_new_tokens=n, strategy=rec)
    return out.sequences[0], torch.stack(rec.scores), rec.picked


def _same_scores(a, b):
    finite = torch.isfinite(b)
    assert torch.equal(torch.isfinite(a), finite)
    assert torch.allclose(a[finite], b[finite], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- reference flavour, end to end
def test_reference_flavour_equals_the_restated_reference_decode(vlm6):
    enc = _enc(vlm6)
    iv = DoLa()
    assert (iv.contrast, iv.final_norm, iv.divergence, iv.repetition_penalty, iv.cutoff) == ("plain", False, "dola", 1.2, 0.1)
    assert iv.bind(vlm6).candidate_layers == [0, 2]  # even layers of the first half of 6
    ref_tokens, ref_scores, ref_picked = ref_dola_decode(vlm6, enc, [0, 2], N_STEPS)
    tokens, scores, picked = _ours(vlm6, enc, iv)
    assert torch.equal(tokens, ref_tokens)
    assert picked == ref_picked
    _same_scores(scores, ref_scores)
    # the restatement can tell the flavours apart: the corrected one gives other scores
    _, corr, _ = _ours(vlm6, enc, DoLa(flavour="corrected"))
    assert not torch.allclose(torch.nan_to_num(corr, neginf=0.0), torch.nan_to_num(ref_scores, neginf=0.0), atol=1e-3)


@pytest.mark.parametrize("layers", [[0, 1, 3, 5], [4], [1, 2, 3, 4, 5]])
def test_reference_with_other_candidates_and_no_penalty(vlm6, layers):
    enc = _enc(vlm6, "is there a cat ?", seed=1)
    ref_tokens, ref_scores, ref_picked = ref_dola_decode(vlm6, enc, layers, N_STEPS, penalty=1.0)
    tokens, scores, picked = _ours(vlm6, enc, DoLa(candidate_layers=layers, repetition_penalty=1.0))
    assert torch.equal(tokens, ref_tokens) and picked == ref_picked
    _same_scores(scores, ref_scores)
    if layers == [1, 2, 3, 4, 5]:  # here the Jensen-Shannon divergence picks another layer at some step
        jsd = _ours(vlm6, enc, DoLa(candidate_layers=layers, repetition_penalty=1.0, divergence="jsd"))[2]
        assert jsd != ref_picked


def test_reference_without_relative_top_is_the_raw_logit_difference(vlm6):
    """relative_top = 0: the reference contrasts the raw logits (no log-softmax), before the penalty."""
    enc = _enc(vlm6)
    ref_tokens, ref_scores, _ = ref_dola_decode(vlm6, enc, [0, 2], N_STEPS, relative_top=0.0)
    tokens, scores, _ = _ours(vlm6, enc, DoLa(cutoff=None))
    assert torch.equal(tokens, ref_tokens)
    assert torch.allclose(scores, ref_scores, atol=1e-4, rtol=1e-4)
    tokens0, scores0, _ = _ours(vlm6, enc, DoLa(cutoff=0.0))
    assert torch.allclose(scores0, ref_scores, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- corrected flavour, re-stated
@torch.no_grad()
def test_corrected_flavour_equals_its_restatement(vlm6):
    """Corrected: lm_head(norm(h_j)), Jensen-Shannon selection, 2·log p − log q, relative top, no penalty."""
    enc = _enc(vlm6)
    head, norm = vlm6.model.get_output_embeddings(), vlm6.spec.language_model(vlm6.model).norm
    layers, ids, want, want_picked = [0, 1, 2], enc["input_ids"], [], []
    for _ in range(N_STEPS):
        out = vlm6.model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=enc["pixel_values"],
                         output_hidden_states=True)
        logp = F.log_softmax(out.logits[0, -1], -1)
        logq = torch.stack([F.log_softmax(head(norm(out.hidden_states[j][0, -1])), -1) for j in layers])
        m = 0.5 * (logp.exp() + logq.exp())
        js = 0.5 * (F.kl_div(m.log(), logp.exp(), reduction="sum") + F.kl_div(m.log(), logq.exp(), reduction="none").sum(-1))
        i = int(js.argmax())
        s = 2 * logp - logq[i]
        s[logp < logp.max() + math.log(0.1)] = -float("inf")
        want.append(s)
        want_picked.append(layers[i])
        ids = torch.cat([ids, s.argmax()[None, None]], dim=1)
    tokens, scores, picked = _ours(vlm6, enc, DoLa(flavour="corrected"))
    assert picked == want_picked
    assert torch.equal(tokens, ids[0, enc["input_ids"].shape[1]:])
    _same_scores(scores, torch.stack(want))


# ---------------------------------------------------------------- the pieces
@torch.no_grad()
def test_early_exit_is_lm_head_of_hidden_state_j_without_the_norm(vlm6):
    enc = _enc(vlm6)
    out = vlm6.model(**enc, output_hidden_states=True)
    head, norm = vlm6.model.get_output_embeddings(), vlm6.spec.language_model(vlm6.model).norm
    assert torch.allclose(head(out.hidden_states[vlm6.spec.n_layers]), out.logits, atol=1e-5)  # mature: already normed
    s = DoLa(candidate_layers=[0, 2, 5]).bind(vlm6)
    with s.context():
        vlm6.model(**enc)
    for j in (0, 2, 5):  # the hooks capture exactly hidden_states[j] at the last position (0 = embeddings)
        assert torch.allclose(s._hidden[j], out.hidden_states[j][:, -1], atol=1e-6)
        h = out.hidden_states[j][:, -1]
        assert torch.allclose(s.early_exit_logits(h), head(h), atol=1e-6)
        assert not torch.allclose(s.early_exit_logits(h), head(norm(h)), atol=1e-3)
    c = DoLa(flavour="corrected").bind(vlm6)
    h = out.hidden_states[2][:, -1]
    assert torch.allclose(c.early_exit_logits(h), head(norm(h)), atol=1e-6)


def test_candidate_layers_follow_the_reference_scripts():
    # README / *_eval.py: --early-exit-layers 0,2,...,14,32 (7B), 0,...,18,40 (13B), 0,...,18,60 (30B), 0,...,18,80 (65B)
    assert default_candidate_layers(32) == [0, 2, 4, 6, 8, 10, 12, 14]
    for n in (40, 60, 80):
        assert default_candidate_layers(n) == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18]
    assert default_candidate_layers(6) == [0, 2] and default_candidate_layers(2) == [0]
    assert default_candidate_layers(32, "corrected") == list(range(16))


def test_divergence_is_the_references_kl_div_not_the_jsd():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 50, generator=g) * 3
    logp, logq = F.log_softmax(logits[0], -1), F.log_softmax(logits[1:], -1)   # [5, V] vs [2, 5, V]
    m = 0.5 * (logp.exp()[None] + logq.exp())
    want = 0.5 * (F.kl_div(logp[None], m, reduction="none").mean(-1) + F.kl_div(logq, m, reduction="none").mean(-1))
    assert torch.allclose(dola_divergence(logp[None], logq), want, atol=1e-7)
    jsd = jensen_shannon(logp[None], logq)
    assert not torch.allclose(dola_divergence(logp[None], logq) * 50, jsd, atol=1e-3)
    # the two pick different layers on some rows: the choice matters
    pa = torch.randn(400, 20, generator=g).mul(4).log_softmax(-1)
    q = torch.randn(2, 400, 20, generator=g).mul(4).log_softmax(-1)
    assert (dola_divergence(pa[None], q).argmax(0) != jensen_shannon(pa[None], q).argmax(0)).any()


def test_relative_top_and_repetition_penalty_match_the_reference():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 30, generator=g) * 2
    want = ref_relative_top_filter(logits.clone(), 0.1)
    assert torch.equal(relative_top_mask(logits.log_softmax(-1), 0.1), torch.isinf(want))
    assert not relative_top_mask(logits.log_softmax(-1), None).any()
    ids = torch.randint(0, 30, (4, 7), generator=g)
    seen = torch.zeros(4, 30, dtype=torch.bool).scatter_(1, ids, True)
    want = RepetitionPenaltyLogitsProcessor(1.2)(ids, logits.clone())
    assert torch.allclose(repetition_penalty(logits, seen, 1.2), want)
    assert torch.equal(repetition_penalty(logits, seen, 1.0), logits)


def test_flavour_parameters_and_validation():
    ref, corr = DoLa(), DoLa(flavour="corrected")
    assert ref.get_params() == {"candidate_layers": None, "cutoff": 0.1, "strength": None, "contrast": "plain",
                                "final_norm": False, "divergence": "dola", "repetition_penalty": 1.2,
                                "flavour": "reference"}
    assert (corr.contrast, corr.strength, corr.final_norm, corr.divergence, corr.repetition_penalty) == \
        ("interpolated", 1.0, True, "jsd", 1.0)
    assert DoLa(strength=0.5).contrast == "interpolated" and DoLa(contrast="interpolated").strength == 1.0
    assert DoLa(flavour="corrected", contrast="plain").strength is None
    for iv in (ref, corr, DoLa(strength=0.5), DoLa(flavour="corrected", contrast="plain", final_norm=False)):
        assert DoLa(**iv.get_params()) == iv
    with pytest.raises(ValueError, match="interpolated"):
        DoLa(contrast="plain", strength=1.0)
    with pytest.raises(ValueError, match="divergence"):
        DoLa(divergence="kl")
    with pytest.raises(ValueError, match="repetition_penalty"):
        DoLa(repetition_penalty=0.0)
    with pytest.raises(ValueError, match="flavour"):
        DoLa(flavour="paper")


def test_zero_strength_is_exactly_greedy_even_in_the_reference_flavour(vlm6):
    enc = _enc(vlm6)
    plain = greedy_decode(vlm6.model, enc, max_new_tokens=N_STEPS).sequences
    assert torch.equal(greedy_decode(vlm6.model, enc, max_new_tokens=N_STEPS,
                                     strategy=DoLa(strength=0.0).bind(vlm6)).sequences, plain)
