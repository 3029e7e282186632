"""Greedy decoding, decoding strategies with separate caches, and resumable runners."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from lens_halluc.data import CocoDataset
from lens_halluc.generation import Branch, DecodingStrategy, caption_dataset, generate, greedy_decode, read_jsonl

PROMPTS = ["Please describe this image in detail.", "is there a cat ?", "describe this", "is there a knife in the image ?"]


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)) for _ in range(n)]


def test_batched_equals_unbatched_token_for_token(tiny_vlm):
    ims = _images(4)
    batched = generate(tiny_vlm, ims, PROMPTS, max_new_tokens=16)
    for im, p, b in zip(ims, PROMPTS, batched):
        single = generate(tiny_vlm, [im], [p], max_new_tokens=16)[0]
        assert single["token_ids"] == b["token_ids"]
        assert single["prompt_ids"] == b["prompt_ids"]
    assert len({tuple(b["token_ids"]) for b in batched}) > 1  # the inputs really differ


def test_matches_transformers_generate(tiny_vlm):
    ims = _images(1, seed=3)
    enc = tiny_vlm.encode(ims, PROMPTS[:1])
    ref = tiny_vlm.model.generate(**enc, max_new_tokens=10, do_sample=False)[0, enc["input_ids"].shape[1]:]
    ours = greedy_decode(tiny_vlm.model, enc, max_new_tokens=10, eos_token_ids=tiny_vlm.spec.eos_token_ids)
    n = ours.lengths[0]
    assert ours.sequences[0, :n].tolist() == ref[:n].tolist()


def test_eos_stops_and_is_excluded(tiny_vlm):
    enc = tiny_vlm.encode(_images(2), PROMPTS[:2])
    first = greedy_decode(tiny_vlm.model, enc, max_new_tokens=1).sequences[:, 0]
    # declare the first generated token of row 0 an EOS: row 0 stops at once with length 0
    out = greedy_decode(tiny_vlm.model, enc, max_new_tokens=8, eos_token_ids=[int(first[0])])
    assert out.lengths[0] == 0 and out.finished[0]
    assert int(first[0]) not in out.tokens(1)


class _Contrast(DecodingStrategy):
    """Scores = logits of one extra branch that sees the same inputs as the main branch."""

    def __init__(self, use_branch: bool, shuffle_image: bool = False):
        self.use_branch, self.shuffle_image = use_branch, shuffle_image

    def branches(self):
        def inputs(d):
            if self.shuffle_image:
                d = dict(d, pixel_values=torch.flip(d["pixel_values"], dims=[-1]))
            return d
        return [Branch("other", inputs)]

    def combine(self, logits, branch_logits):
        return branch_logits["other"] if self.use_branch else logits


def test_branches_keep_their_own_cache(tiny_vlm):
    """A branch fed the same inputs must decode exactly like the main branch; a shared cache would
    append every step twice and change the continuation."""
    ims = _images(2, seed=5)
    plain = generate(tiny_vlm, ims, PROMPTS[:2], max_new_tokens=12)
    via_branch = generate(tiny_vlm, ims, PROMPTS[:2], max_new_tokens=12, strategy=_Contrast(use_branch=True))
    assert [r["token_ids"] for r in plain] == [r["token_ids"] for r in via_branch]
    # and a branch with a different image really is a different forward
    flipped = generate(tiny_vlm, ims, PROMPTS[:2], max_new_tokens=12, strategy=_Contrast(True, shuffle_image=True))
    assert [r["token_ids"] for r in flipped] != [r["token_ids"] for r in plain]


class _Interrupt(DecodingStrategy):
    def __init__(self, after: int):
        self.calls, self.after = 0, after

    def begin(self, inputs):
        self.calls += 1
        if self.calls > self.after:
            raise KeyboardInterrupt


def test_caption_run_resumes_without_loss_or_duplicates(tiny_vlm, toy_coco, tmp_path):
    ds = CocoDataset.load(toy_coco / "instances.json", image_dir=toy_coco / "images")
    full = tmp_path / "full.jsonl"
    caption_dataset(tiny_vlm, ds, full, max_new_tokens=8, batch_size=2, progress=False)
    part = tmp_path / "part.jsonl"
    with pytest.raises(KeyboardInterrupt):
        caption_dataset(tiny_vlm, ds, part, max_new_tokens=8, batch_size=2, strategy=_Interrupt(after=1), progress=False)
    assert len(read_jsonl(part)) == 2
    with part.open("a") as f:  # a torn write from a crash
        f.write('{"image_id": 99, "capt')
    caption_dataset(tiny_vlm, ds, part, max_new_tokens=8, batch_size=2, progress=False)
    a, b = read_jsonl(full), read_jsonl(part)
    assert [r["image_id"] for r in b] == ds.image_ids
    assert a == b


def test_caption_cli_end_to_end(tiny_llava_dir, toy_coco, tmp_path):
    out = tmp_path / "c.jsonl"
    r = subprocess.run([sys.executable, "-m", "lens_halluc.caption", "--model", str(tiny_llava_dir),
                        "--instances", str(toy_coco / "instances.json"), "--image-dir", str(toy_coco / "images"),
                        "--out", str(out), "--max-new-tokens", "6", "--limit", "3"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rows = read_jsonl(out)
    assert [row["image_id"] for row in rows] == [1, 2, 3] and all(isinstance(row["caption"], str) for row in rows)


def test_caption_cli_missing_image_dir(tiny_llava_dir, toy_coco, tmp_path):
    r = subprocess.run([sys.executable, "-m", "lens_halluc.caption", "--model", str(tiny_llava_dir),
                        "--instances", str(toy_coco / "instances.json"), "--image-dir", str(tmp_path / "nope"),
                        "--out", str(tmp_path / "c.jsonl")], capture_output=True, text=True)
    assert r.returncode == 2 and "image directory not found" in r.stderr and "Traceback" not in r.stderr


class _Intervention:
    """Anything with bind(vlm) is a strategy; bind must run once per run, not once per batch."""

    def __init__(self):
        self.binds = 0

    def bind(self, vlm):
        self.binds += 1
        return _Contrast(use_branch=True, shuffle_image=True)


def test_interventions_are_bound_once_by_every_entry_point(tiny_vlm, toy_coco, tmp_path):
    from lens_halluc.generation import caption

    ims = _images(2, seed=5)
    iv = _Intervention()
    bound = generate(tiny_vlm, ims, PROMPTS[:2], max_new_tokens=8, strategy=iv)
    assert bound == generate(tiny_vlm, ims, PROMPTS[:2], max_new_tokens=8, strategy=_Contrast(True, shuffle_image=True))
    ds = CocoDataset.load(toy_coco / "instances.json", image_dir=toy_coco / "images")
    iv = _Intervention()
    caps = caption(tiny_vlm, ds, strategy=iv, max_new_tokens=6, batch_size=2, progress=False)
    assert iv.binds == 1 and len(caps) == len(ds.image_ids)
    out = caption_dataset(tiny_vlm, ds, tmp_path / "c.jsonl", strategy=iv, max_new_tokens=6, batch_size=4, progress=False)
    assert iv.binds == 2 and read_jsonl(out) == caps.rows
    with pytest.raises(TypeError, match="bind"):
        caption(tiny_vlm, ds, strategy="vcd", max_new_tokens=2, progress=False)


def test_greedy_is_the_default_token_choice(tiny_vlm):
    """decode is greedy_decode; without a sampling strategy the default ("strategy") is argmax, as sampling=None."""
    from lens_halluc.generation import decode

    enc = tiny_vlm.encode(_images(2, seed=7), PROMPTS[:2])
    default = greedy_decode(tiny_vlm.model, enc, max_new_tokens=10)
    explicit = decode(tiny_vlm.model, enc, max_new_tokens=10, sampling=None)
    assert torch.equal(default.sequences, explicit.sequences) and default.scores is None
    assert torch.equal(default.sequences,
                       decode(tiny_vlm.model, enc, 10, strategy=_Contrast(use_branch=True)).sequences)
