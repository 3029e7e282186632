"""Beam search in the one decoding loop: equal to model.generate(num_beams=k), batched == unbatched,
every branch's beams keep their own cache rows, and the BeamHook extension point (attention, adjust, rollback)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lens_halluc.generation import BeamHook, Beams, Branch, DecodingStrategy, caption, decode, generate

PROMPTS = ["Please describe this image in detail.", "is there a cat ?", "describe this", "is there a knife in the image ?"]


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)) for _ in range(n)]


def _ref_rows(ref, n_prompt, eos):
    """Each row of model.generate's output, cut after its first EOS (it pads with EOS)."""
    rows = []
    for r in ref[:, n_prompt:].tolist():
        cut = next((i + 1 for i, t in enumerate(r) if t in eos), len(r))
        rows.append(r[:cut])
    return rows


def _ours_rows(out, eos):
    rows = []
    for b in range(len(out.lengths)):
        n = out.lengths[b]
        end = [int(out.sequences[b, n])] if out.finished[b] else []
        assert not end or end[0] in eos
        rows.append(out.tokens(b) + end)
    return rows


@pytest.mark.parametrize("beams,eos", [(Beams(2), (9,)), (Beams(3), (18, 19)), (Beams(4, length_penalty=0.5), (8,)),
                                       (Beams(3, early_stopping=True), (27,)),
                                       (Beams(2, early_stopping="never", length_penalty=2.0), (28,))])
def test_beam_search_equals_transformers_generate(tiny_vlm, beams, eos):
    """Batched (left-padded) and one by one, with EOS ids that end some hypotheses inside the budget
    and not others (ids picked by looking at which tokens this random model's beams produce)."""
    ims, n_new = _images(4, seed=3), 12
    enc = tiny_vlm.encode(ims, PROMPTS)
    kw = dict(num_beams=beams.num_beams, do_sample=False, length_penalty=beams.length_penalty,
              early_stopping=beams.early_stopping, eos_token_id=list(eos), max_new_tokens=n_new)
    ref = _ref_rows(tiny_vlm.model.generate(**enc, **kw), enc["input_ids"].shape[1], eos)
    ours = decode(tiny_vlm.model, enc, n_new, eos_token_ids=eos, sampling=beams)
    assert _ours_rows(ours, eos) == ref
    assert any(ours.finished) and not all(ours.finished)  # EOS really ended some hypotheses in the budget
    for i in range(4):
        one = tiny_vlm.encode(ims[i: i + 1], PROMPTS[i: i + 1])
        ref_one = _ref_rows(tiny_vlm.model.generate(**one, **kw), one["input_ids"].shape[1], eos)
        ours_one = decode(tiny_vlm.model, one, n_new, eos_token_ids=eos, sampling=beams)
        assert _ours_rows(ours_one, eos) == ref_one == [ref[i]]


def test_beam_search_differs_from_greedy_and_one_beam_is_greedy(tiny_vlm):
    enc = tiny_vlm.encode(_images(4, seed=3), PROMPTS)
    eos = (10,)
    greedy = decode(tiny_vlm.model, enc, 12, eos_token_ids=eos)
    one = decode(tiny_vlm.model, enc, 12, eos_token_ids=eos, sampling=Beams(1))
    assert [one.tokens(b) for b in range(4)] == [greedy.tokens(b) for b in range(4)]
    three = decode(tiny_vlm.model, enc, 12, eos_token_ids=eos, sampling=Beams(3))
    assert [three.tokens(b) for b in range(4)] != [greedy.tokens(b) for b in range(4)]


class _SameInputsBranch(DecodingStrategy):
    """A branch on the same inputs whose logits are used: decodes exactly like the main branch iff it
    has its own cache rows, reordered with the beams."""

    def branches(self):
        return [Branch("other")]

    def combine(self, logits, branch_logits):
        assert logits.shape[0] == branch_logits["other"].shape[0]
        return branch_logits["other"]


class _FlippedBranch(_SameInputsBranch):
    def branches(self):
        return [Branch("other", lambda d: dict(d, pixel_values=torch.flip(d["pixel_values"], dims=[-1])))]


def test_branches_keep_their_own_beam_caches(tiny_vlm):
    ims = _images(3, seed=5)
    plain = generate(tiny_vlm, ims, PROMPTS[:3], 12, sampling=Beams(3))
    via = generate(tiny_vlm, ims, PROMPTS[:3], 12, strategy=_SameInputsBranch(), sampling=Beams(3))
    assert [r["token_ids"] for r in via] == [r["token_ids"] for r in plain]
    flipped = generate(tiny_vlm, ims, PROMPTS[:3], 12, strategy=_FlippedBranch(), sampling=Beams(3))
    assert [r["token_ids"] for r in flipped] != [r["token_ids"] for r in plain]


class _RowCounter(DecodingStrategy):
    def __init__(self):
        self.rows = set()

    def combine(self, logits, branch_logits):
        self.rows.add(logits.shape[0])
        return logits


def test_combine_sees_batch_times_beams_and_runner_beams_are_batch_free(tiny_vlm, toy_coco):
    from lens_halluc.data import CocoDataset

    enc = tiny_vlm.encode(_images(2), PROMPTS[:2])
    s = _RowCounter()
    decode(tiny_vlm.model, enc, 4, strategy=s, sampling=Beams(3))
    assert s.rows == {6}
    ds = CocoDataset.load(toy_coco / "instances.json", image_dir=toy_coco / "images")
    a = caption(tiny_vlm, ds, max_new_tokens=8, batch_size=4, sampling=Beams(2), progress=False)
    b = caption(tiny_vlm, ds, max_new_tokens=8, batch_size=1, sampling=Beams(2), progress=False)
    assert a == b and a.config["decoding"]["kind"] == "beams"


class _Ban(BeamHook):
    """Bans ``token`` at step ``at`` (all beams); with ``rollback_from`` it first decodes without the ban,
    then at that step asks to go back to ``at`` and bans it there (OPERA-like retrospection)."""

    output_attentions = True

    def __init__(self, token, at, rollback_from=None):
        self.token, self.at, self.rollback_from = token, at, rollback_from
        self.active = rollback_from is None
        self.attn_shapes, self.rolled = [], 0

    def adjust(self, scores, state):
        self.attn_shapes.append((state.step, tuple(state.attentions[-1].shape)))
        if self.active and state.step == self.at:
            scores = scores.clone()
            scores[:, self.token] = float("-inf")
        return scores

    def rollback(self, state):
        if not self.active and state.step == self.rollback_from:
            self.active, self.rolled = True, self.rolled + 1
            return self.at
        return None


class _Hooked(DecodingStrategy):
    def __init__(self, hook):
        self.hook = hook

    def beam_hook(self):
        return self.hook


def test_beam_hook_attention_adjust_and_rollback(tiny_vlm):
    enc = tiny_vlm.encode(_images(2, seed=8), PROMPTS[:2])
    n_prompt, beams = enc["input_ids"].shape[1], Beams(3)
    plain = decode(tiny_vlm.model, enc, 10, sampling=beams)
    token = plain.sequences[0, 2].item()
    banned = decode(tiny_vlm.model, enc, 10, strategy=_Hooked(_Ban(token, at=2)), sampling=beams)
    assert banned.sequences[0, 2].item() != token and not torch.equal(banned.sequences, plain.sequences)
    hook = _Ban(token, at=2, rollback_from=6)
    rolled = decode(tiny_vlm.model, enc, 10, strategy=_Hooked(hook), sampling=beams)
    assert hook.rolled == 1 and torch.equal(rolled.sequences, banned.sequences)
    # the newest token's attention of every beam: [rows, heads, q, keys], q = the prompt at prefill, then 1
    shapes = dict(hook.attn_shapes[:3])
    assert shapes[0] == (6, tiny_vlm.spec.n_heads, n_prompt, n_prompt)
    assert shapes[1] == (6, tiny_vlm.spec.n_heads, 1, n_prompt + 1)
    # after the rollback to step 2 the caches were rebuilt from the prompt and 2 tokens per beam
    after = [s for s in hook.attn_shapes if s[0] == 2][-1][1]
    assert after == (6, tiny_vlm.spec.n_heads, n_prompt + 2, n_prompt + 2)


class _Probe(BeamHook):
    def __init__(self):
        self.expected, self.seen = {}, []

    def adjust(self, scores, state):
        if state.step in self.expected:
            self.seen.append(torch.allclose(self.expected[state.step], state.logits["main"], atol=1e-5))
        best = scores.argmax(-1, keepdim=True)
        self.expected[state.step + 1] = state.probe(best)[0].logits[:, -1].float()
        return scores


def test_probe_looks_ahead_without_touching_the_caches(tiny_vlm):
    enc = tiny_vlm.encode(_images(1, seed=2), PROMPTS[:1])
    hook = _Probe()
    out = decode(tiny_vlm.model, enc, 8, strategy=_Hooked(hook), sampling=Beams(1))
    assert len(hook.seen) == 7 and all(hook.seen)
    assert out.tokens(0) == decode(tiny_vlm.model, enc, 8, sampling=Beams(1)).tokens(0)


class _Forever(BeamHook):
    def __init__(self):
        self.calls = 0

    def rollback(self, state):
        self.calls += 1
        return 0 if state.step == 3 else None


def test_endless_rollbacks_stop_at_the_step_budget(tiny_vlm):
    enc = tiny_vlm.encode(_images(1, seed=2), PROMPTS[:1])
    hook = _Forever()
    out = decode(tiny_vlm.model, enc, 5, strategy=_Hooked(hook), sampling=Beams(2))
    # 13 rounds of steps 0-2, then step 0 once more: the best running beam holds one token
    assert hook.calls == 8 * 5 and out.lengths == [1] and not out.finished[0]
