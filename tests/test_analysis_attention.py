"""Attention analyses: JS divergence, block cosine, role masses (by hand) and bias/inheritance/drift on the organism."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import pandas as pd

from lens_halluc import analysis
from lens_halluc.analysis import (AlignmentError, block_cosine, head_groups, js_divergence, role_masses, row_js,
                                  text_only_ids)
from lens_halluc.models.spec import TokenRole


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def _js(p, q):
    m = [(a + b) / 2 for a, b in zip(p, q)]
    return 0.5 * _kl(p, m) + 0.5 * _kl(q, m)


def _t(values):
    return torch.tensor(values, dtype=torch.float64)  # exact decimal inputs for the hand computations


# ---------------------------------------------------------------------------- JS divergence by hand
def test_js_identical_rows_is_zero():
    p = _t([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])
    assert torch.equal(js_divergence(p, p.clone()), torch.zeros(2, dtype=torch.float64))


def test_js_matches_hand_computation():
    p, q = [0.5, 0.5], [0.9, 0.1]
    assert float(js_divergence(_t(p), _t(q), eps=0.0)) == pytest.approx(_js(p, q), rel=1e-12)
    # ε = 1e-8 barely moves a well-supported pair
    assert float(js_divergence(_t(p), _t(q))) == pytest.approx(_js(p, q), rel=1e-6)
    # symmetric
    assert float(js_divergence(_t(q), _t(p))) == pytest.approx(_js(p, q), rel=1e-6)


def test_js_disjoint_support_is_ln2_with_smoothing():
    eps = 1e-8
    got = float(js_divergence(_t([1.0, 0.0]), _t([0.0, 1.0]), eps=eps))
    a, b = (1 + eps) / (1 + 2 * eps), eps / (1 + 2 * eps)  # smoothed, renormalised
    assert got == pytest.approx(_js([a, b], [b, a]), rel=1e-9)
    assert got == pytest.approx(math.log(2), abs=1e-6) and got <= math.log(2)


def test_js_renormalises_and_respects_mask():
    # unnormalised weights are renormalised: [2, 2] is the uniform distribution
    assert float(js_divergence(_t([2.0, 2.0]), _t([0.5, 0.5]))) == pytest.approx(0.0, abs=1e-12)
    # keys outside the shared mask are dropped before renormalising: both become [0.5, 0.5]
    p, q = _t([0.5, 0.5, 0.0]), _t([0.25, 0.25, 0.5])
    assert float(js_divergence(p, q, mask=torch.tensor([True, True, False]))) == pytest.approx(0.0, abs=1e-12)
    assert float(js_divergence(p, q)) > 0.1
    # hand case after renormalisation over the kept keys: [0.6, 0.2, 0.2] → [0.75, 0.25] vs [0.5, 0.5]
    got = js_divergence(_t([0.6, 0.2, 0.2]), _t([0.1, 0.1, 0.8]), eps=0.0,
                        mask=torch.tensor([True, True, False]))
    assert float(got) == pytest.approx(_js([0.75, 0.25], [0.5, 0.5]), rel=1e-12)


def test_row_js_uses_causal_prefix_per_row():
    a = _t([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    b = _t([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.2, 0.3, 0.5]])
    got = row_js(a, b, eps=0.0)
    assert got.shape == (3,)
    assert got[0] == 0 and got[2] == pytest.approx(0.0, abs=1e-12)
    assert float(got[1]) == pytest.approx(_js([0.5, 0.5], [0.9, 0.1]), rel=1e-12)


# ---------------------------------------------------------------------------- cosine and masses by hand
def test_block_cosine_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    b = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    stack_a = torch.stack([a, a, torch.zeros(2, 2)])[None]  # [1 layer, 3 heads, 2, 2]
    stack_b = torch.stack([a, b, b])[None]
    cos = block_cosine(stack_a, stack_b)
    assert cos.shape == (1, 3)
    assert float(cos[0, 0]) == pytest.approx(1.0)
    assert float(cos[0, 1]) == pytest.approx(1.5 / (math.sqrt(1.5) * math.sqrt(2.0)))
    assert math.isnan(float(cos[0, 2]))  # an all-zero block has no direction


def test_role_masses_exclude_system_and_future_keys():
    S, I, T = int(TokenRole.SYSTEM), int(TokenRole.IMAGE), int(TokenRole.TEXT)
    roles = torch.tensor([S, S, I, I, T, T, T])
    q = 5
    # heads × keys; key 6 is after q (would be masked in a real causal model) and must not count
    rows = torch.tensor([[0.1, 0.1, 0.2, 0.1, 0.3, 0.2, 0.7],
                         [0.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.0]])
    image, text = role_masses(rows, roles, q)
    assert torch.allclose(image, torch.tensor([0.3, 0.0]))
    assert torch.allclose(text, torch.tensor([0.5, 1.0]))  # system mass (0.2 on head 0) excluded


def test_head_groups():
    scores = [{"layer": l, "head": h, "score": float(l * 2 + h)} for l in range(2) for h in range(2)]
    g = head_groups(scores, 1)
    assert g == {"hallucination": [(1, 1)], "lowest": [(0, 0)], "all": [(0, 0), (0, 1), (1, 0), (1, 1)]}
    with pytest.raises(ValueError):
        head_groups(scores, 5)


def test_js_is_the_one_jensen_shannon():
    # drift's masked, smoothed JS is the package's one JS (interventions.dola) on the kept keys
    from lens_halluc.interventions.dola import jensen_shannon

    p, q = _t([[0.2, 0.3, 0.5], [0.6, 0.4, 0.0]]), _t([[0.1, 0.1, 0.8], [0.3, 0.7, 0.0]])
    assert torch.allclose(js_divergence(p[:1], q[:1], eps=0.0), jensen_shannon(p[:1].log(), q[:1].log()), rtol=1e-12)
    got = js_divergence(p[1:], q[1:], eps=0.0, mask=torch.tensor([True, True, False]))
    assert float(got) == pytest.approx(_js([0.6, 0.4], [0.3, 0.7]), rel=1e-12)


# ---------------------------------------------------------------------------- the shipped organism
@pytest.fixture(scope="module")
def bias_result(attr_run, organism):
    # the organism has 48 heads: its own k (the attribution's), not the reference's 20 for LLaVA-1.5-7B
    return analysis.bias(organism, attr_run, k=attr_run.k)


def test_bias_hallucination_heads_are_textual(attr_run, organism, bias_result):
    table = bias_result.table.to_dict("records")
    n_heads = organism.spec.n_total_heads
    assert len(table) == len(attr_run.tokens) * n_heads
    for r in table:
        assert 0 <= r["image_mass"] <= 1 + 1e-6 and 0 <= r["text_mass"] <= 1 + 1e-6
        assert r["image_mass"] + r["text_mass"] <= 1 + 1e-5  # the system prompt takes the rest
    summary = {(r["group"], r["hallucinated"]): r for r in bias_result.summary.to_dict("records")}
    assert bias_result.params["hallucination_heads"] == head_groups(attr_run.head_scores, attr_run.k)["hallucination"]
    # the organism's hallucination comes from its language prior: at hallucinated-partner positions
    # the hallucination heads read more text than the average head does
    assert summary[("hallucination", True)]["text_share"] > summary[("all", True)]["text_share"]
    assert summary[("hallucination", True)]["n_tokens"] == sum(t["hallucinated"] for t in attr_run.tokens)


def test_bias_result_object(bias_result, tmp_path):
    from lens_halluc.analysis._bias import COLUMNS, SUMMARY_COLUMNS

    assert list(bias_result.table.columns) == list(COLUMNS)
    assert list(bias_result.summary.columns) == list(SUMMARY_COLUMNS)
    assert set(bias_result.summary["group"]) == {"hallucination", "lowest", "all"}
    fig = bias_result.figure()
    assert len(fig.data) == 4  # hallucinated / real × image / text panels
    assert list(fig.data[0].x) == ["hallucination heads", "lowest-scoring heads", "all heads"]
    written = {p.name for p in bias_result.save(tmp_path, png=False)}
    assert written == {"bias.csv", "bias_summary.csv", "bias.html"}
    back = pd.read_csv(tmp_path / "bias_summary.csv")
    pd.testing.assert_series_equal(back["text_share"], bias_result.summary["text_share"], check_exact=True)
    assert len(pd.read_csv(tmp_path / "bias.csv")) == len(bias_result.table)
    assert "BiasResult(table=<" in repr(bias_result)


def test_attribution_adapter_accepts_a_run_directory(attr_run, organism):
    # the path goes through Attribution.load: the same samples, tokens and groups as the file reader
    a = analysis.bias(organism, attr_run.path, n_samples=3, k=3)
    b = analysis.bias(organism, attr_run, n_samples=3, k=3)
    pd.testing.assert_frame_equal(a.table, b.table)
    pd.testing.assert_frame_equal(a.summary, b.summary)
    run = analysis.as_attribution(attr_run.path)
    assert run.heads() == attr_run.top_heads and run.k == attr_run.k
    with pytest.raises(TypeError):
        analysis.as_attribution(42)


def test_inheritance_end_to_end(attr_run, organism, tmp_path):
    from lens_halluc.models.default import organism_path

    res = analysis.inheritance(organism, organism_path("base"), attr_run, n_samples=4, k=attr_run.k, against="others")
    table = res.table.to_dict("records")
    assert len(table) == 4 * organism.spec.n_total_heads
    assert all(math.isfinite(r["cosine"]) and -1e-9 <= r["cosine"] <= 1 + 1e-9 for r in table)
    summary = res.summary.to_dict("records")
    assert [r["group"] for r in summary] == ["hallucination", "other"]
    assert summary[0]["n_heads"] == len(attr_run.top_heads)
    assert all(math.isfinite(r["mean_cosine"]) for r in summary)
    # the per-head table is the mean over samples of the tidy table
    mean = res.table.groupby(["layer", "head"])["cosine"].mean().reset_index()
    assert list(res.heads["cosine"]) == pytest.approx(list(mean["cosine"]), rel=1e-12)
    assert res.figure().data[0].z.shape == (organism.spec.n_layers, organism.spec.n_heads)
    written = {p.name for p in res.save(tmp_path, png=False)}
    assert written == {"inheritance.csv", "inheritance_heads.csv", "inheritance_summary.csv", "inheritance.html"}
    # the reference's default: the top head against the lowest-scoring one (k = 1)
    ref = analysis.inheritance(organism, organism_path("base"), attr_run, n_samples=2)
    groups = analysis.comparison_groups(attr_run.head_scores, 1)
    assert ref.params["k"] == 1 and ref.params["hallucination_heads"] == groups["hallucination"]
    assert [(r["group"], r["n_heads"]) for r in ref.summary.to_dict("records")] == [("hallucination", 1), ("lowest", 1)]
    per_head = {(r["layer"], r["head"]): r["cosine"] for r in ref.heads.to_dict("records")}
    assert ref.summary["mean_cosine"].tolist() == pytest.approx([per_head[groups["hallucination"][0]],
                                                                 per_head[groups["lowest"][0]]], rel=1e-12)


def test_inheritance_alignment_error_is_clear(attr_run, organism):
    # a base tokenizer that encodes the prompt differently cannot line up with the VLM's text tokens
    class ShortTokenizer:
        def __call__(self, text):
            return {"input_ids": [1]}

        def convert_ids_to_tokens(self, ids):
            return organism.tokenizer.convert_ids_to_tokens(ids)

    fake = SimpleNamespace(tokenizer=ShortTokenizer())
    with pytest.raises(AlignmentError, match="differ between the VLM"):
        text_only_ids(organism, fake, attr_run.samples[0])


def test_drift_end_to_end(attr_run, tmp_path):
    from lens_halluc.models.default import list_checkpoints, organism_path

    ckpts = list_checkpoints()
    res = analysis.drift(organism_path("projector"), ckpts, attr_run, n_samples=2, k=attr_run.k, against="others")
    table = res.table.to_dict("records")
    n = 6 * 8
    assert len(table) == len(ckpts) * n
    assert all(math.isfinite(r["js"]) and 0 <= r["js"] <= math.log(2) for r in table)
    curve = res.summary.to_dict("records")
    assert [(r["step"], r["group"]) for r in curve] == [(s, g) for s in range(1, len(ckpts) + 1)
                                                       for g in ("hallucination", "other")]
    assert [r["checkpoint"] for r in curve[::2]] == [p.name for p in ckpts]
    assert all(r["js"] > 0 for r in curve)  # instruction tuning moved the attention
    assert len(res.last) == n and set(res.last["group"]) == {"hallucination", "other"}
    assert (res.last["group"] == "hallucination").sum() == attr_run.k
    fig = res.figure()
    assert [t.name for t in fig.data[:2]] == ["hallucination heads", "other heads"]
    written = {p.name for p in res.save(tmp_path, png=False)}
    assert written == {"drift.csv", "drift_curve.csv", "drift_last.csv", "drift.html"}
    # the reference's default: the top 3 heads against the 3 lowest-scoring ones (one checkpoint, one sample)
    ref = analysis.drift(organism_path("projector"), ckpts[-1:], attr_run, n_samples=1, progress=False)
    groups = analysis.comparison_groups(attr_run.head_scores, 3)
    assert ref.params["k"] == 3 and ref.params["comparison_heads"] == groups["lowest"]
    assert [(r["group"], r["n_heads"]) for r in ref.summary.to_dict("records")] == [("hallucination", 3), ("lowest", 3)]
    js = {(r["layer"], r["head"]): r["js"] for r in ref.last.to_dict("records")}
    assert ref.summary["js"].tolist() == pytest.approx([np.mean([js[h] for h in groups[g]])
                                                        for g in ("hallucination", "lowest")], rel=1e-12)


def test_cli_help_and_bias_run(attr_run, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "lens_halluc.analysis", "--help"], env=env, capture_output=True, text=True)
    assert res.returncode == 0 and "bias" in res.stdout and "drift" in res.stdout and "inheritance" in res.stdout
    from lens_halluc.cli.analysis import main

    main(["bias", "--attribution", str(attr_run.path), "--out", str(tmp_path), "--n-samples", "3", "--no-png"])
    assert (tmp_path / "bias.csv").is_file() and (tmp_path / "bias_summary.csv").is_file()
    assert (tmp_path / "bias.html").is_file()
    with pytest.raises(SystemExit):
        main(["bias", "--attribution", str(tmp_path / "missing"), "--out", str(tmp_path)])
