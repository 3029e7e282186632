"""OPERA: the penalty, candidate scores and rollback against a plain re-statement of the reference.

The re-statements below are written from the description of shikiw/OPERA's ``opera_beam_search``
(transformers-4.29.2/src/transformers/generation/utils.py) with Python loops and lists, not with
the vectorised code under test. The end-to-end check drives :class:`OperaController` and a
loop re-statement of the whole reference search on the same toy "model" (a deterministic function
from a token sequence to next-token logits and the last token's attention row) and compares tokens,
rollbacks and scores.
"""
from __future__ import annotations

import math
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lens_halluc.generation import Beams, decode
from lens_halluc.interventions.opera import (OPERA, OperaController, column_scores, over_trust_penalty,
                                             penalized_scores, rollback_position, rollback_scores,
                                             select_candidates, smallest_mode, step_location, window_matrix)


# ---------------------------------------------------------------------- plain re-statements
def plain_column_scores(w, scale, fp16):
    """score[j] = 1e-7 * prod_{i=j..n-1} scale*w[i][j]; through a float16 buffer when fp16."""
    n = len(w)
    out = []
    for j in range(n):
        p = 1.0
        for i in range(j, n):
            p *= scale * w[i][j]
        v = 1e-7 * p
        with np.errstate(over="ignore"):
            out.append(float(np.float16(v)) if fp16 else v)
    return out


def plain_penalty(w, img, scale, fp16):
    """(penalty, location) of one candidate: the max column (first on ties); -image mass while n <= 10."""
    sc = plain_column_scores(w, scale, fp16)
    best = max(sc)
    loc = sc.index(best)
    return (-img if len(w) <= 10 else best), loc


def plain_mode(values):
    c = Counter(values)
    top = max(c.values())
    return min(v for v in c if c[v] == top)


def plain_log_softmax(x):
    m = max(x)
    lse = m + math.log(sum(math.exp(v - m) for v in x))
    return [v - lse for v in x]


def plain_step_scores(logits_row, C, penalties, weight):
    order = sorted(range(len(logits_row)), key=lambda t: -logits_row[t])[:C]
    full = [-999.0] * len(logits_row)
    for c, t in enumerate(order):
        full[t] = logits_row[t] - weight * penalties[c]
    return plain_log_softmax(full)


def plain_rollback(history_rows, loc, threshold, times, C):
    for row in history_rows:
        if sum(1 for v in row if v == loc) <= threshold:
            return None
    if loc < 10:
        return None
    pos = loc + 1
    if times.get(pos, 0) >= C:
        pos = pos - 1
        if times.get(pos, 0) >= C:
            return None
    return pos


def plain_rollback_scores(logits, rejected_pairs):
    K, V = len(logits), len(logits[0])
    out = []
    for k in range(K):
        mn = min(logits[k])
        row = [v - (999.0 + mn) for v in logits[k]]
        for (p, t) in rejected_pairs:
            if p == k:
                row[t] = -999.0
        out.append(plain_log_softmax(row))
    return out


# ---------------------------------------------------------------------- hand-built maps
def lower_rows(n, rng, summary=None, weight=0.3):
    """An n×n lower-triangular row-stochastic matrix; rows after ``summary`` put ``weight`` on it."""
    w = np.zeros((n, n))
    for i in range(n):
        r = rng.uniform(0.1, 1.0, i + 1)
        r = r / r.sum()
        if summary is not None and i > summary:
            r = r * (1 - weight)
            r[summary] += weight
        w[i, : i + 1] = r
    return w


@pytest.mark.parametrize("fp16", [True, False])
@pytest.mark.parametrize("n", [1, 4, 10, 11, 25])
def test_column_scores_and_penalty_equal_plain_restatement(n, fp16):
    rng = np.random.default_rng(n)
    w = lower_rows(n, rng, summary=min(3, n - 1), weight=0.4)
    got = column_scores(torch.tensor(w, dtype=torch.float64), 50.0, "float16" if fp16 else "float32")
    want = plain_column_scores(w.tolist(), 50.0, fp16)
    for g, e in zip(got.tolist(), want):
        if math.isinf(e):
            assert math.isinf(g)
        else:
            assert g == pytest.approx(e, rel=2e-3 if fp16 else 1e-5, abs=0 if not fp16 else 1e-10)
    img = 0.37
    pen, loc = over_trust_penalty(torch.tensor(w)[None, None], torch.tensor([[img]]), 50.0,
                                  "float16" if fp16 else "float32")
    p_want, l_want = plain_penalty(w.tolist(), img, 50.0, fp16)
    assert int(loc) == l_want
    if n <= 10:
        assert float(pen) == pytest.approx(-img)
    elif math.isinf(p_want):
        assert math.isinf(float(pen))
    else:
        assert float(pen) == pytest.approx(p_want, rel=2e-3 if fp16 else 1e-5)


def test_summary_column_wins_and_float16_buffer_saturates():
    """A column that every later row attends to strongly is the location; float16 makes it inf."""
    rng = np.random.default_rng(0)
    w = lower_rows(30, rng, summary=12, weight=0.5)
    w16 = column_scores(torch.tensor(w), 50.0, "float16")
    w32 = column_scores(torch.tensor(w), 50.0, "float32")
    assert int(w32.argmax()) == 12 and int(w16.argmax()) == 12
    assert math.isinf(float(w16[12])) and math.isfinite(float(w32[12])) and float(w32[12]) > 65504


def test_window_matrix_pads_past_and_appends_candidate_rows():
    past = torch.tensor([[[1.0, 0.0], [0.4, 0.6]]], dtype=torch.float64)             # K=1, s=2
    cand = torch.tensor([[[0.2, 0.3, 0.5], [0.1, 0.1, 0.8]]], dtype=torch.float64)   # C=2, rows of length s+1
    w = window_matrix(past, cand)
    assert w.shape == (1, 2, 3, 3)
    for c in range(2):
        assert w[0, c, :2].tolist() == [[1.0, 0.0, 0.0], [0.4, 0.6, 0.0]]
        assert w[0, c, 2].tolist() == cand[0, c].tolist()


def test_candidate_scores_equal_plain_restatement():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 11, generator=g) * 3
    C = 4
    vals, toks = select_candidates(logits, C)
    pen = torch.rand(3, C, generator=g) * 5
    got = penalized_scores(logits, toks, vals, pen, 0.7)
    for k in range(3):
        want = plain_step_scores(logits[k].tolist(), C, pen[k].tolist(), 0.7)
        assert got[k].tolist() == pytest.approx(want, rel=1e-5, abs=1e-4)


def test_modes_and_step_location():
    locs = torch.tensor([[3, 1, 1, 3, 2], [5, 4, 4, 5, 0], [2, 2, 7, 7, 1]])
    per, loc = step_location(locs)
    assert per.tolist() == [plain_mode(r) for r in locs.tolist()] == [1, 4, 2]
    assert loc == plain_mode([1, 4, 2]) == 1
    assert smallest_mode(torch.tensor([9, 9, 12, 12, 12])).item() == 12


@pytest.mark.parametrize("seed", range(6))
def test_rollback_position_equals_plain_restatement(seed):
    rng = np.random.default_rng(seed)
    K, steps = 3, 30
    hist = rng.choice([11, 12, 13], size=(K, steps), p=[0.7, 0.2, 0.1])
    times = {12: int(rng.integers(0, 4)), 11: int(rng.integers(0, 4))}
    for loc in (11, 12, 13):
        for thr in (5, 15, 25):
            got = rollback_position(torch.tensor(hist), loc, thr, times, 3)
            assert got == plain_rollback(hist.tolist(), loc, thr, times, 3)


def test_rollback_edge_cases():
    # window (history) shorter than the threshold: never a rollback
    short = torch.full((2, 15), 12)
    assert rollback_position(short, 12, 15, {}, 5) is None
    assert rollback_position(torch.full((2, 16), 12), 12, 15, {}, 5) == 13        # > threshold, not >=
    # one slot below the threshold blocks it (the condition is over every slot)
    mixed = torch.full((2, 20), 12)
    mixed[1, :10] = 3
    assert rollback_position(mixed, 12, 15, {}, 5) is None
    # summary locations below 10 never roll back
    assert rollback_position(torch.full((2, 20), 9), 9, 15, {}, 5) is None
    # rollback limit: num_attn_candidates per position, then one position earlier, then none
    h = torch.full((1, 20), 12)
    assert rollback_position(h, 12, 15, {13: 4}, 5) == 13
    assert rollback_position(h, 12, 15, {13: 5}, 5) == 12
    assert rollback_position(h, 12, 15, {13: 5, 12: 5}, 5) is None


def test_rollback_scores_equal_plain_restatement():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 6, generator=g)
    pairs = [(0, 2), (2, 5), (1, 0)]
    flat = torch.tensor([p * 6 + t for p, t in pairs])
    got = rollback_scores(logits, flat)
    want = plain_rollback_scores(logits.tolist(), pairs)
    for k in range(3):
        assert got[k].tolist() == pytest.approx(want[k], rel=1e-5, abs=1e-4)
    # a rejected token is exactly as unlikely as the least likely one
    assert float(got[0, 2]) == pytest.approx(float(got[0].min()))


# ---------------------------------------------------------------------- end to end on a toy model
V, T, H = 7, 3, 2
IMAGE = [1, 2]
SUMMARY = 11   # generated position every later token attends to


def toy(seq):
    """Deterministic (next-token logits [V], attention of seq[-1] over seq [H, len]) from the sequence."""
    g = torch.Generator().manual_seed(hash(tuple(seq)) % (2 ** 31))
    logits = torch.randn(V, generator=g, dtype=torch.float64) * 2
    n = len(seq)
    att = torch.rand(H, n, generator=g, dtype=torch.float64)
    att[:, 0] += 20.0                                   # a sink on the first prompt token
    if n - 1 > T + SUMMARY:
        att[:, T + SUMMARY] += 3.0
    return logits, att / att.sum(-1, keepdim=True)


def plain_opera(K, C, scale, thr, weight, n_steps, fp16, lineage=False, rollback=True):
    """A loop re-statement of the reference search (batch 1, no EOS) on ``toy``."""
    prompt = [0, 1, 2]
    seqs = [list(prompt) for _ in range(K)]
    bscores = [0.0] + [-1e9] * (K - 1)
    rows = [[] for _ in range(K)]          # per beam: normalised rows of the generated tokens (lists)
    hist = []                              # per step: [K] per-slot locations
    times, rejected, states, log = {}, {}, {}, []
    parents = None
    s = 0
    while s < n_steps:
        if s > 0:
            rows = [[list(r) for r in rows[p]] for p in parents]
            for k in range(K):
                a = toy(seqs[k])[1].max(0).values
                a = (a / a.sum()).tolist()
                rows[k].append(a[T:])
        states[s] = {"seqs": [list(x) for x in seqs], "bscores": list(bscores), "rows": [[list(r) for r in b] for b in rows]}
        step_logits, step_pen, step_tok, beam_locs = [], [], [], []
        for k in range(K):
            lg = toy(seqs[k])[0].tolist()
            cands = sorted(range(V), key=lambda t: -lg[t])[:C]
            pens, locs = [], []
            for c in cands:
                a = toy(seqs[k] + [c])[1].max(0).values
                a = (a / a.sum()).tolist()
                img = sum(a[i] for i in IMAGE)
                n = s + 1
                w = [[0.0] * n for _ in range(n)]
                for i, r in enumerate(rows[k]):
                    for j, v in enumerate(r):
                        w[i][j] = v
                w[n - 1] = a[T:]
                p, l = plain_penalty(w, img, scale, fp16)
                pens.append(p)
                locs.append(l)
            step_logits.append(lg)
            step_pen.append(pens)
            beam_locs.append(plain_mode(locs))
        hist.append(beam_locs)
        states[s]["hist"] = [list(h) for h in hist]
        loc = plain_mode(beam_locs)
        pos = plain_rollback([[h[k] for h in hist] for k in range(K)], loc, thr, times, C) if rollback else None
        if pos is not None:
            target = pos
            times[pos] = times.get(pos, 0) + 1
            rejected[target] = rejected.get(target, []) + states[target]["chosen"]
            for p in [p for p in rejected if p > target]:
                del rejected[p]
            log.append((s, target, loc))
            st = states[target]
            seqs, bscores, rows = st["seqs"], st["bscores"], st["rows"]
            hist = [list(h) for h in st["hist"]]
            s = target
            scores = plain_rollback_scores([toy(x)[0].tolist() for x in seqs], rejected[target])
        else:
            scores = [plain_step_scores(step_logits[k], C, step_pen[k], weight) for k in range(K)]
        flat = [(bscores[k] + scores[k][t], k * V + t) for k in range(K) for t in range(V)]
        flat.sort(key=lambda x: -x[0])
        top = flat[:K]
        parents = [i // V for _, i in top]
        toks = [i % V for _, i in top]
        states[s]["chosen"] = [(parents[k], toks[k]) for k in range(K)]
        bscores = [sc for sc, _ in top]
        seqs = [seqs[parents[k]] + [toks[k]] for k in range(K)]
        if lineage:
            hist = [[h[p] for p in parents] for h in hist]
        s += 1
    return seqs, bscores, log


def drive(ctl, K, n_steps):
    """A minimal beam loop (no EOS) that drives the controller by its documented protocol."""
    prompt = [0, 1, 2]
    seqs = [list(prompt) for _ in range(K)]
    bscores = torch.tensor([0.0] + [-1e9] * (K - 1), dtype=torch.float64)
    saved = {}
    s = 0
    while s < n_steps:
        saved[s] = ([list(x) for x in seqs], bscores.clone())
        logits = torch.stack([toy(x)[0] for x in seqs])
        newest = torch.stack([toy(x)[1] for x in seqs]) if s > 0 else None

        def lookahead(tokens, seqs=seqs):
            return torch.stack([torch.stack([toy(seqs[k] + [int(c)])[1] for c in tokens[k]]) for k in range(K)])

        out = ctl.step(s, logits, newest, lookahead)
        if out.rollback_to is not None:
            s = out.rollback_to
            seqs, bscores = [list(x) for x in saved[s][0]], saved[s][1].clone()
            scores = ctl.rollback(torch.stack([toy(x)[0] for x in seqs]))
        else:
            scores = out.scores
        total = (bscores[:, None] + scores.double()).reshape(-1)
        top_scores, top_idx = total.topk(K)
        parents, toks = top_idx // V, top_idx % V
        ctl.selected(parents, toks, V)
        bscores = top_scores
        seqs = [seqs[int(parents[k])] + [int(toks[k])] for k in range(K)]
        s += 1
    return seqs, bscores


@pytest.mark.parametrize("score_dtype,history", [("float32", "slot"), ("float16", "slot"), ("float32", "lineage")])
def test_controller_equals_plain_reference_search_with_rollbacks(score_dtype, history):
    K, C, thr, n = 3, 3, 3, 24
    want_seqs, want_scores, want_log = plain_opera(K, C, 50.0, thr, 1.0, n, fp16=score_dtype == "float16",
                                                   lineage=history == "lineage")
    assert len(want_log) >= 2, "the toy must exercise the rollback"
    ctl = OperaController(num_beams=K, prompt_len=T, image_mask=torch.tensor([False, True, True]),
                          scale_factor=50.0, threshold=thr, num_attn_candidates=C, penalty_weights=1.0,
                          score_dtype=score_dtype, history_kind=history)
    seqs, scores = drive(ctl, K, n)
    assert ctl.rollbacks == want_log
    assert seqs == want_seqs
    assert scores.tolist() == pytest.approx(want_scores, rel=1e-5)


def test_rollback_limit_per_position_in_the_search():
    K, C, thr = 3, 2, 3
    _, _, log = plain_opera(K, C, 50.0, thr, 1.0, 40, fp16=False)
    ctl = OperaController(num_beams=K, prompt_len=T, image_mask=torch.tensor([False, True, True]),
                          threshold=thr, num_attn_candidates=C, score_dtype="float32")
    drive(ctl, K, 40)
    assert ctl.rollbacks == log
    per_pos = Counter(t for _, t, _ in ctl.rollbacks)
    assert per_pos and max(per_pos.values()) <= C


def test_penalty_off_one_beam_is_greedy_on_the_toy():
    ctl = OperaController(num_beams=1, prompt_len=T, image_mask=torch.tensor([False, True, True]),
                          penalty_weights=0.0, rollback_enabled=False)
    seqs, _ = drive(ctl, 1, 20)
    greedy = [0, 1, 2]
    for _ in range(20):
        greedy.append(int(toy(greedy)[0].argmax()))
    assert seqs[0] == greedy


# ---------------------------------------------------------------------- the intervention
def test_opera_parameters_and_flavours():
    o = OPERA()
    assert o.get_params() == {"num_beams": 5, "scale_factor": 50.0, "threshold": 15, "num_attn_candidates": 5,
                              "penalty_weights": 1.0, "window_size": 512, "layer": -1, "rollback": True,
                              "flavour": "reference", "score_dtype": "float16", "history": "slot"}
    c = OPERA(flavour="corrected")
    assert (c.score_dtype, c.history) == ("float32", "lineage")
    assert OPERA(**c.get_params()) == c and repr(c) == "OPERA(flavour='corrected')"
    assert OPERA(flavour="corrected", history="slot").history == "slot"
    with pytest.raises(ValueError):
        OPERA(flavour="nope")
    with pytest.raises(ValueError):
        OPERA(num_attn_candidates=0)
    strat = OPERA(num_beams=2).strategy()
    assert strat.num_beams == 2 and strat.intervention == OPERA(num_beams=2)
    assert strat.sampling == Beams(2)
    assert strat.controller(3, torch.tensor([False, True, True])).num_beams == 2


def test_rollback_clears_rejections_of_later_positions():
    """After a rollback to t, rejections recorded at positions > t belong to a discarded prefix."""
    ctl = OperaController(num_beams=2, prompt_len=T, image_mask=torch.tensor([False, True, True]))
    from lens_halluc.interventions.opera import _Saved
    for s in range(14):
        ctl.saved[s] = _Saved(window=torch.zeros(2, s, s), chosen=torch.tensor([s, s + V]), history=[])
    ctl.rejected = {12: torch.tensor([1]), 13: torch.tensor([2]), 14: torch.tensor([3])}
    ctl._restore(12)
    assert sorted(ctl.rejected) == [12]
    assert ctl.rejected[12].tolist() == [1, 12, 12 + V]
    assert sorted(ctl.saved) == list(range(13)) and ctl.step_no == 12


# ---------------------------------------------------------------------- the decoding loop drives OPERA
class ToyLM(torch.nn.Module):
    """A "model" for the decoding loop whose logits and last-row attention are ``toy(sequence)``.

    The sequence lives in the loop's own KV cache (token ids as keys), so the loop's cache
    reordering, look-ahead cropping and rebuilds after a rollback are what decide what it sees.
    """

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=True,
                output_attentions=False, **kw):
        keys = input_ids.to(torch.float64)[:, None, :, None]
        full, _ = past_key_values.update(keys, keys, 0)
        seqs = full[:, 0, :, 0].long().tolist()
        rows, q, n = len(seqs), input_ids.shape[1], len(seqs[0])
        logits = torch.zeros(rows, q, V, dtype=torch.float64)
        att = torch.zeros(rows, H, q, n, dtype=torch.float64)
        for r, seq in enumerate(seqs):
            lg, a = toy(seq)
            logits[r, -1], att[r, :, -1] = lg, a
        return SimpleNamespace(logits=logits, attentions=(att,) if output_attentions else None)


def _toy_mask(ids, mask):
    return torch.tensor([[False, True, True]] * ids.shape[0])


def _toy_decode(prompts, n, **opts):
    ids = torch.tensor(prompts)
    strat = OPERA(**opts).strategy(image_mask=_toy_mask)
    out = decode(ToyLM(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, n, strategy=strat)
    return out, strat.last_hook


@pytest.mark.parametrize("score_dtype,history", [("float32", "slot"), ("float16", "slot"), ("float32", "lineage")])
def test_decode_loop_equals_plain_reference_search_with_rollbacks(score_dtype, history):
    """decode() with OPERA's hook on the toy model == the loop re-statement of the reference search."""
    K, C, thr, n = 3, 3, 3, 24
    want_seqs, want_scores, want_log = plain_opera(K, C, 50.0, thr, 1.0, n, fp16=score_dtype == "float16",
                                                   lineage=history == "lineage")
    assert len(want_log) >= 2
    out, hook = _toy_decode([[0, 1, 2]], n, num_beams=K, num_attn_candidates=C, threshold=thr,
                            score_dtype=score_dtype, history=history)
    assert [r[1:] for r in hook.rollbacks] == want_log
    assert out.tokens(0) == want_seqs[0][T:]
    assert out.scores[0] == pytest.approx(want_scores[0] / n, rel=1e-5)


def test_decode_loop_batched_equals_unbatched_with_rollbacks():
    """A rollback rewinds the whole batch; the other item replays to the same result as alone."""
    prompts = [[0, 1, 2], [3, 1, 2], [5, 1, 2]]
    opts = dict(num_beams=3, num_attn_candidates=3, threshold=3, score_dtype="float32")
    together, hook = _toy_decode(prompts, 24, **opts)
    alone = [_toy_decode([p], 24, **opts) for p in prompts]
    assert [together.tokens(b) for b in range(3)] == [o.tokens(0) for o, _ in alone]
    for b, (_, h) in enumerate(alone):
        assert [r[1:] for r in hook.rollbacks if r[0] == b] == [r[1:] for r in h.rollbacks]
        assert h.rollbacks  # every item rolls back on its own
    assert len({r[1:3] for r in hook.rollbacks}) > 1  # ...and not all at the same steps


def test_decode_loop_penalty_off_one_beam_is_greedy_on_the_toy():
    out, hook = _toy_decode([[0, 1, 2]], 20, num_beams=1, penalty_weights=0.0, rollback=False)
    greedy = [0, 1, 2]
    for _ in range(20):
        greedy.append(int(toy(greedy)[0].argmax()))
    assert out.tokens(0) == greedy[T:] and not hook.rollbacks


def test_opera_refuses_argmax_and_sampling():
    ids = torch.tensor([[0, 1, 2]])
    strat = OPERA().strategy(image_mask=_toy_mask)
    with pytest.raises(ValueError, match="beam search"):
        decode(ToyLM(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, 4, strategy=strat, sampling=None)


# ---------------------------------------------------------------------- on real models
def _greedy_vs_off(vlm, ims, prompts, n):
    from lens_halluc.hooks.attention import text_attn_implementation

    enc = vlm.encode(ims, prompts)
    eos = vlm.spec.eos_token_ids
    before = text_attn_implementation(vlm)
    greedy = decode(vlm.model, enc, n, eos_token_ids=eos)
    off = OPERA(num_beams=1, penalty_weights=0.0, rollback=False).bind(vlm)
    seen = {}

    class Spy(type(off)):
        def begin(self, inputs):
            seen["impl"] = text_attn_implementation(vlm)
            super().begin(inputs)

    off.__class__ = Spy
    got = decode(vlm.model, enc, n, strategy=off, eos_token_ids=eos)
    assert text_attn_implementation(vlm) == before  # session() restored it
    assert seen["impl"] in ("eager", "lens_halluc")
    from lens_halluc.models import TokenRole

    image = vlm.spec.token_roles(enc["input_ids"], enc["attention_mask"]) == TokenRole.IMAGE
    assert torch.equal(off._masks, image) and torch.equal(image, enc["input_ids"] == vlm.spec.image_token_id)
    return [greedy.tokens(b) for b in range(len(ims))], [got.tokens(b) for b in range(len(ims))]


def test_penalty_off_one_beam_is_greedy_on_the_tiny_model(tiny_vlm):
    from PIL import Image

    rng = np.random.default_rng(3)
    ims = [Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)) for _ in range(3)]
    greedy, got = _greedy_vs_off(tiny_vlm, ims, ["describe this", "is there a cat ?", "describe"], 16)
    assert got == greedy


def _organism_images(n):
    import lens_halluc

    from PIL import Image

    ds = lens_halluc.organism.split("break", n=n, seed=1)
    return ds, [Image.open(ds.image_path(i)).convert("RGB") for i in ds.image_ids[:n]]


def test_penalty_off_one_beam_is_greedy_on_the_organism(organism):
    from lens_halluc.models.prompts import CAPTION_PROMPT

    _, ims = _organism_images(3)
    greedy, got = _greedy_vs_off(organism, ims, [CAPTION_PROMPT] * 3, 24)
    assert got == greedy and all(len(g) > 3 for g in greedy)


def test_opera_defaults_decode_the_organism_reproducibly(organism):
    import lens_halluc as lh

    ds, _ = _organism_images(4)
    a = lh.caption(organism, ds, strategy=OPERA(), max_new_tokens=48, batch_size=2, progress=False)
    b = lh.caption(organism, ds, strategy=OPERA(), max_new_tokens=48, batch_size=4, progress=False)
    greedy = lh.caption(organism, ds, max_new_tokens=48, progress=False)
    ta, tb, tg = ([r["caption"] for r in c] for c in (a, b, greedy))
    assert ta == tb and len(ta) == 4 and all(ta)
    assert len(tg) == 4
    # the hook really ran: one location per generated step and beam, penalties on the candidates
    _, ims = _organism_images(1)
    from lens_halluc.models.prompts import CAPTION_PROMPT

    strat = OPERA().bind(organism)
    out = decode(organism.model, organism.encode(ims, [CAPTION_PROMPT]), 24, strategy=strat,
                 eos_token_ids=organism.spec.eos_token_ids)
    ctl = strat.last_hook.controllers[0]
    assert ctl.num_beams == 5 and len(ctl.history) >= out.lengths[0] > 3
    assert all(h.shape == (5,) for h in ctl.history)


def test_intervene_cli_lists_opera_options_and_no_rollback():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "lens_halluc.intervene", "--method", "opera", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for flag in ("--num-beams", "--scale-factor", "--threshold", "--num-attn-candidates", "--penalty-weights",
                 "--no-rollback", "--flavour"):
        assert flag in out
    from lens_halluc.interventions.registry import build_intervention

    assert build_intervention("opera", rollback=False) == OPERA(rollback=False)
    assert not OPERA(rollback=False).rollback and OPERA().rollback
