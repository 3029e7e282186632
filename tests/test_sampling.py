"""Sampling in the one decoding loop: equal to model.generate(do_sample=True), seeded, per-row generators."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from lens_halluc.data import CocoDataset
from lens_halluc.generation import (Beams, DecodingStrategy, Sampling, caption, choice_label, decode, generate,
                                    greedy_decode, resolve_choice, row_seed)
from lens_halluc.generation.cache import caption_identity

PROMPTS = ["Please describe this image in detail.", "is there a cat ?", "describe this", "is there a knife in the image ?"]


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.mark.parametrize("s", [Sampling(seed=3), Sampling(temperature=0.7, seed=11),
                               Sampling(temperature=1.3, top_k=5, seed=5), Sampling(top_p=0.8, seed=2),
                               Sampling(temperature=0.8, top_k=7, top_p=0.9, seed=0)])
def test_sampling_equals_transformers_generate(tiny_vlm, s):
    """One generator for a batch of one == torch.manual_seed(seed); model.generate(do_sample=True).

    transformers' generation config defaults top_k to 50, so the reference gets explicit values
    (top_k=0 and top_p=1.0 switch its filters off, as None does ours)."""
    enc = tiny_vlm.encode(_images(1, seed=4), PROMPTS[:1])
    n_prompt = enc["input_ids"].shape[1]
    eos = tiny_vlm.spec.eos_token_ids
    torch.manual_seed(s.seed)
    ref = tiny_vlm.model.generate(**enc, max_new_tokens=14, do_sample=True, temperature=s.temperature,
                                  top_k=s.top_k or 0, top_p=s.top_p or 1.0, eos_token_id=list(eos))[0, n_prompt:]
    ours = decode(tiny_vlm.model, enc, max_new_tokens=14, eos_token_ids=eos, sampling=s)
    n = ours.lengths[0]
    assert ours.tokens(0) == ref[:n].tolist()
    assert ref.shape[0] == n + int(ours.finished[0])  # the same stopping point (EOS or the budget)
    greedy = decode(tiny_vlm.model, enc, max_new_tokens=14, eos_token_ids=eos)
    assert ours.tokens(0) != greedy.tokens(0)  # it really samples


def test_same_seed_same_tokens_other_seed_other_tokens(tiny_vlm):
    enc = tiny_vlm.encode(_images(2, seed=1), PROMPTS[:2])
    a = decode(tiny_vlm.model, enc, 12, sampling=Sampling(seed=7)).sequences
    b = decode(tiny_vlm.model, enc, 12, sampling=Sampling(seed=7)).sequences
    c = decode(tiny_vlm.model, enc, 12, sampling=Sampling(seed=8)).sequences
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_warp_is_transformers_order():
    """temperature, then top-k (ties with the k-th kept), then top-p — a plain re-statement."""
    torch.manual_seed(0)
    scores = torch.randn(3, 40)
    scores[0, :5] = float("-inf")  # cut-off tokens of a contrastive strategy
    scores[1, 3] = scores[1, 4]  # a tie
    s = Sampling(temperature=0.5, top_k=6, top_p=0.7)
    out = s.warp(scores)
    for r in range(3):
        x = scores[r] / 0.5
        kth = sorted(x.tolist(), reverse=True)[5]
        keep = [v >= kth for v in x.tolist()]
        p = torch.softmax(torch.where(torch.tensor(keep), x, torch.tensor(float("-inf"))), -1)
        order = sorted(range(40), key=lambda i: float(p[i]))  # ascending
        cum, removed = 0.0, set()
        for i in order[:-1]:
            cum += float(p[i])
            if cum <= 0.3 + 1e-7:
                removed.add(i)
        expected = [float(x[i]) if keep[i] and i not in removed else float("-inf") for i in range(40)]
        assert out[r].tolist() == pytest.approx(expected)
    assert torch.isinf(out[0, :5]).all()


class _OnlyTwo(DecodingStrategy):
    """Combined scores with -inf everywhere but two tokens (like a contrastive cut-off)."""

    def __init__(self, allowed):
        self.allowed = allowed

    def combine(self, logits, branch_logits):
        out = torch.full_like(logits, float("-inf"))
        out[:, self.allowed] = logits[:, self.allowed]
        return out


def test_sampling_never_picks_cut_off_tokens(tiny_vlm):
    enc = tiny_vlm.encode(_images(3, seed=2), PROMPTS[:3])
    out = decode(tiny_vlm.model, enc, 20, strategy=_OnlyTwo([5, 9]), sampling=Sampling(temperature=2.0, seed=1))
    assert set(out.sequences.flatten().tolist()) == {5, 9}  # both drawn, nothing else


class _Sampled(DecodingStrategy):
    sampling = Sampling(seed=4)


def test_strategy_default_sampling_is_honoured_and_none_overrides(tiny_vlm):
    enc = tiny_vlm.encode(_images(2, seed=6), PROMPTS[:2])
    plain = decode(tiny_vlm.model, enc, 12).sequences
    by_default = decode(tiny_vlm.model, enc, 12, strategy=_Sampled()).sequences
    assert torch.equal(by_default, decode(tiny_vlm.model, enc, 12, sampling=Sampling(seed=4)).sequences)
    assert not torch.equal(by_default, plain)
    assert torch.equal(decode(tiny_vlm.model, enc, 12, strategy=_Sampled(), sampling=None).sequences, plain)
    assert greedy_decode is decode
    assert resolve_choice("strategy", _Sampled()) == Sampling(seed=4)
    with pytest.raises(TypeError, match="Sampling"):
        decode(tiny_vlm.model, enc, 2, sampling="sample")


def test_per_row_generators_batched_equals_unbatched_and_order_free(tiny_vlm):
    ims, keys, s = _images(4, seed=9), [11, 12, 13, 14], Sampling(temperature=1.2, seed=3)
    batched = generate(tiny_vlm, ims, PROMPTS, 12, sampling=s, keys=keys)
    for i in range(4):
        single = generate(tiny_vlm, [ims[i]], [PROMPTS[i]], 12, sampling=s, keys=[keys[i]])[0]
        assert single["token_ids"] == batched[i]["token_ids"]
    rev = generate(tiny_vlm, ims[::-1], PROMPTS[::-1], 12, sampling=s, keys=keys[::-1])
    assert [r["token_ids"] for r in rev[::-1]] == [r["token_ids"] for r in batched]
    # the row's stream is its own: row_seed(seed, key) in a fresh generator, batch of one
    enc = tiny_vlm.encode(ims[:1], PROMPTS[:1])
    g = torch.Generator().manual_seed(row_seed(3, 11))
    assert decode(tiny_vlm.model, enc, 12, sampling=s, generators=[g],
                  eos_token_ids=tiny_vlm.spec.eos_token_ids).tokens(0) == batched[0]["token_ids"]


def test_caption_sampling_independent_of_batch_and_cache_keys_differ(tiny_vlm, toy_coco, tmp_path):
    ds = CocoDataset.load(toy_coco / "instances.json", image_dir=toy_coco / "images")
    s = Sampling(seed=5)
    a = caption(tiny_vlm, ds, max_new_tokens=8, batch_size=4, sampling=s, progress=False)
    b = caption(tiny_vlm, ds, max_new_tokens=8, batch_size=1, sampling=s, image_ids=ds.image_ids[::-1],
                progress=False)
    assert {r["image_id"]: r["caption"] for r in a} == {r["image_id"]: r["caption"] for r in b}
    greedy = caption(tiny_vlm, ds, max_new_tokens=8, progress=False)
    assert a.config["decoding"] == choice_label(s) and greedy.config["decoding"] == {"kind": "greedy"}
    assert [r["caption"] for r in a] != [r["caption"] for r in greedy]

    cache = tmp_path / "cache"
    for choice in (None, s, Sampling(seed=6), Beams(2)):
        caption(tiny_vlm, ds, max_new_tokens=8, sampling=choice, cache_dir=cache, progress=False)
    files = sorted(cache.glob("captions-*.jsonl"))
    assert len(files) == 4
    kinds = sorted(json.dumps(json.loads(f.with_suffix(".config.json").read_text())["decoding"], sort_keys=True)
                   for f in files)
    assert len(set(kinds)) == 4
    again = caption(tiny_vlm, ds, max_new_tokens=8, sampling=Sampling(seed=5), cache_dir=cache, progress=False)
    assert again.generated == 0 and again == a
    ident = {c: json.dumps(caption_identity(tiny_vlm, ds, "p", 8, None, c), sort_keys=True)
             for c in (None, s, Beams(2))}
    assert len(set(ident.values())) == 3


def test_sampling_validation():
    for bad in (dict(temperature=0), dict(top_k=0), dict(top_p=0), dict(top_p=1.5), dict(seed=-1)):
        with pytest.raises(ValueError):
            Sampling(**bad)
    for bad in (dict(num_beams=0), dict(early_stopping="sometimes"), dict(length_penalty=float("nan"))):
        with pytest.raises(ValueError):
            Beams(**bad)


def test_cli_token_choice_flags_are_validated():
    from lens_halluc.cli import answer as answer_cli, caption as caption_cli
    from lens_halluc.cli.token_choice import token_choice

    base = ["--instances", "i.json", "--image-dir", "d", "--out", "o.jsonl"]
    p = caption_cli.build_parser()
    assert token_choice(p, p.parse_args(base)) is None
    assert token_choice(p, p.parse_args(base + ["--sample", "--temperature", "0.7", "--top-k", "5", "--top-p", "0.9",
                                                "--seed", "4"])) == Sampling(0.7, 5, 0.9, 4)
    assert token_choice(p, p.parse_args(base + ["--num-beams", "3"])) == Beams(3)
    for bad in (["--temperature", "0.5"], ["--seed", "1"], ["--sample", "--num-beams", "2"], ["--sample", "--top-p", "0"],
                ["--sample", "--temperature", "0"], ["--num-beams", "0"], ["--sample", "--top-k", "0"]):
        with pytest.raises(SystemExit) as e:
            token_choice(p, p.parse_args(base + bad))
        assert e.value.code == 2
    q = answer_cli.build_parser()
    args = q.parse_args(["--questions", "q", "--image-dir", "d", "--out", "o", "--sample", "--seed", "2"])
    assert token_choice(q, args) == Sampling(seed=2) and not hasattr(args, "top_k")  # never read as a head count


def test_caption_cli_sample_records_and_refuses_other_choice(tiny_llava_dir, toy_coco, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "c.jsonl"
    cmd = [sys.executable, "-m", "lens_halluc.caption", "--model", str(tiny_llava_dir), "--instances",
           str(toy_coco / "instances.json"), "--image-dir", str(toy_coco / "images"), "--out", str(out),
           "--max-new-tokens", "6", "--limit", "3", "--batch-size", "2"]
    r = subprocess.run(cmd + ["--sample", "--seed", "3"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    meta = json.loads(out.with_name(out.name + ".config.json").read_text())
    assert meta["decoding"]["kind"] == "sample" and meta["decoding"]["seed"] == 3
    r = subprocess.run(cmd + ["--num-beams", "2"], capture_output=True, text=True)
    assert r.returncode == 2 and "decoding" in r.stderr
