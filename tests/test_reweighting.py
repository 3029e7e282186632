"""Attention re-weighting curves on a tiny organism break split, and the findings summary script."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from lens_halluc.analysis import ReweightingResult, reweighting
from lens_halluc.analysis._reweighting import COLUMNS, SUMMARY_COLUMNS
from lens_halluc.models.heads import random_heads

ROOT = Path(__file__).resolve().parents[1]
HAL = [(0, 0), (0, 4), (1, 7), (2, 6), (1, 0)]
OPTS = dict(alphas_text=(1.0, 0.0), alphas_image=(1.0, 3.5), n_random=2, seed=0, max_new_tokens=20, batch_size=12)


@pytest.fixture(scope="module")
def break_split(tmp_path_factory):
    from lens_halluc.organism import split

    return split("break", n=12, seed=1002, cache_dir=tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def result(organism, break_split, tmp_path_factory):
    out = tmp_path_factory.mktemp("rw")
    return reweighting(organism, break_split, HAL, cache_dir=out, **OPTS), out


@pytest.fixture(scope="module")
def curves(result):
    res, out = result
    return res.table.to_dict("records"), out


def test_curve_table_rows(curves, result, organism):
    rows, out = curves
    # (hallucination + 2 random draws) × 2 key groups × 2 α × 2 renormalisations
    assert len(rows) == 3 * 2 * 2 * 2
    assert all(set(COLUMNS) == set(r) for r in rows)
    keys = {(r["group"], r["draw"], r["key_group"], r["alpha"], r["renormalize"]) for r in rows}
    assert len(keys) == len(rows)
    assert {r["alpha"] for r in rows if r["key_group"] == "text"} == {1.0, 0.0}
    assert {r["alpha"] for r in rows if r["key_group"] == "image"} == {1.0, 3.5}
    assert all(r["n"] == 12 and r["n_heads"] == len(HAL) and r["partner_rate"] == r["partner_rate"] for r in rows)
    # every edited configuration has its own resumable file; the baseline is captioned once
    files = sorted(p.name for p in out.glob("*.jsonl"))
    assert len(files) == 1 + 3 * 2 * 2 and "baseline.jsonl" in files
    summary = result[0].summary.to_dict("records")
    assert len(summary) == 2 * 2 * 2 * 2 and all(set(SUMMARY_COLUMNS) == set(s) for s in summary)
    rnd = [s for s in summary if s["group"] == "random"]
    assert all(s["n_draws"] == 2 and s["CHAIR_i_min"] <= s["CHAIR_i"] <= s["CHAIR_i_max"] for s in rnd)
    # the random heads are the control draws of the one owner, models.heads.random_heads; the reference
    # (HA's --random_heads) samples among all heads, the attributed ones included
    draws = random_heads(organism, len(HAL), exclude=(), seed=0, draws=2)
    for d, heads in enumerate(draws):
        assert {r["heads"] for r in rows if r["group"] == "random" and r["draw"] == d} == {
            " ".join(f"{l}:{h}" for l, h in heads)}


def test_alpha_one_is_plain_greedy(curves, organism, break_split):
    from lens_halluc.data.chair import chair
    from lens_halluc.generation import caption

    rows, out = curves
    plain_caps = caption(organism, break_split, max_new_tokens=20, batch_size=12, progress=False)
    plain = chair(plain_caps, break_split).summary
    base = [r for r in rows if r["alpha"] == 1.0]
    assert len(base) == 3 * 2 * 2
    for r in base:
        for m in ("CHAIR_s", "CHAIR_i", "Recall", "Len", "partner_rate"):
            assert r[m] == plain[m], m
    # and the captions themselves are identical
    baseline = [json.loads(line)["token_ids"] for line in (out / "baseline.jsonl").read_text().splitlines()]
    assert baseline == [r["token_ids"] for r in plain_caps.rows]


def test_renormalize_changes_results_at_alpha_zero(curves):
    rows, out = curves
    raw = (out / "hallucination0-text-a0-raw.jsonl").read_text()
    ren = (out / "hallucination0-text-a0-renorm.jsonl").read_text()
    base = (out / "baseline.jsonl").read_text()
    assert raw != ren            # zeroed text mass vs redistributed to the image/system keys
    assert raw != base and ren != base


def test_random_heads_exclude_and_reproducible():
    a = random_heads((6, 8), 5, exclude=HAL, seed=3, draws=4)
    b = random_heads((6, 8), 5, exclude=HAL, seed=3, draws=4)
    c = random_heads((6, 8), 5, exclude=HAL, seed=4, draws=4)
    assert a == b and a != c
    assert all(len(d) == 5 == len(set(d)) and not set(d) & set(HAL) for d in a)
    assert random_heads((6, 8), 5, exclude=HAL, seed=3, draws=2) == a[:2]  # more draws keep the earlier ones
    with pytest.raises(ValueError):
        random_heads((1, 4), 4, exclude=[(0, 0)], draws=1)


def test_cache_resumes_and_refuses_other_heads(result, organism, break_split):
    res, out = result
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.jsonl")}
    again = reweighting(organism, break_split, HAL, cache_dir=out, **OPTS)  # same run: every caption reused
    pd.testing.assert_frame_equal(again.table, res.table)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.jsonl")} == mtimes
    with pytest.raises(ValueError, match="another re-weighting run"):
        reweighting(organism, break_split, [(0, 1)], cache_dir=out, **OPTS)


def test_result_object(result, tmp_path):
    res, _ = result
    assert isinstance(res, ReweightingResult)
    assert list(res.table.columns) == list(COLUMNS) and list(res.summary.columns) == list(SUMMARY_COLUMNS)
    fig = res.figure()
    # CHAIR_i, partner rate and Recall rows × text and image columns
    assert len(fig.layout.annotations) == 3 * 2
    assert {t.name for t in fig.data} >= {"hallucination heads", "random heads"}
    written = res.save(tmp_path, png=False)
    assert {p.name for p in written} >= {"reweighting.csv", "reweighting_summary.csv", "reweighting.html"}
    back = pd.read_csv(tmp_path / "reweighting_summary.csv")
    assert len(back) == len(res.summary)
    pd.testing.assert_series_equal(back["CHAIR_i"], res.summary["CHAIR_i"], check_exact=True)


def test_cli_registered():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "lens_halluc.analysis", "reweighting", "--help"], env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0 and "--n-random" in res.stdout and "--n-images" in res.stdout


# ---------------------------------------------------------------------------- summary script
def _write(folder: Path, name: str, text: str) -> None:
    (folder / name).write_text(text.strip() + "\n")


def test_summary_from_hand_made_files(tmp_path):
    _write(tmp_path, "bias_summary.csv", """
group,hallucinated,n_tokens,n_heads,image_mass,text_mass,text_share
hallucination,True,10,2,0.2,0.7,0.777
all,True,10,8,0.4,0.5,0.555
""")
    _write(tmp_path, "inheritance_summary.csv", """
group,n_heads,n_samples,mean_cosine,min_head_cosine,max_head_cosine
hallucination,2,10,0.9,0.8,0.95
other,6,10,0.4,0.1,0.6
""")
    _write(tmp_path, "drift_curve.csv", """
checkpoint,step,group,n_heads,js
checkpoint-1,1,hallucination,2,0.5
checkpoint-1,1,other,6,0.1
checkpoint-2,2,hallucination,2,0.05
checkpoint-2,2,other,6,0.2
""")
    _write(tmp_path, "confounders_separability.csv", """
modality,layer,pair_distance_ratio
visual,0,0.8
visual,1,0.6
text,0,1.2
text,1,1.4
""")
    _write(tmp_path, "reweighting_summary.csv", """
group,key_group,alpha,renormalize,n_draws,CHAIR_s,CHAIR_i,Recall,Len,partner_rate
hallucination,text,1.0,False,1,0.5,0.2,0.9,10,0.6
hallucination,text,0.0,False,1,0.1,0.05,0.8,10,0.1
random,text,1.0,False,3,0.5,0.2,0.9,10,0.6
random,text,0.0,False,3,0.45,0.19,0.9,10,0.55
""")
    (tmp_path / "top_heads.json").write_text(json.dumps({"heads": [[0, 1], [2, 3]], "k": 2}))
    out = tmp_path / "summary.md"
    res = subprocess.run([sys.executable, str(ROOT / "analyses" / "summary.py"), "--figures", str(tmp_path)],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    text = out.read_text()
    assert "L0H1, L2H3" in text
    assert "text share 0.777 (hallucination heads) vs 0.555 (all heads)" in text
    assert "mean cosine to the base LM 0.900 (hallucination) vs 0.400 (other heads)" in text
    assert "JS at checkpoint-2 0.050 (hallucination) vs 0.200 (other heads)" in text  # the last checkpoint
    assert "visual: **yes** / text: **no**" in text
    assert "visual: layers 0–0 mean 0.800, layers 1–1 mean 0.600" in text
    assert "CHAIR_i 0.200 → 0.050 (hallucination heads) vs 0.190 (random, mean of 3)" in text
    assert "partner mentioned 0.600 → 0.100 vs 0.550" in text
    assert "(α = 0, no renormalisation) reduce hallucination more than for random heads? | **yes**" in text
    # inputs that are absent or lack rows are named, not invented
    assert "atp_agreement.json is missing" in text
    assert "reweighting_summary.csv has no image-key rows" in text
    assert text.count("| — | missing |") == 2


def test_summary_with_no_files(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "analyses" / "summary.py"), "--figures", str(tmp_path),
                          "--out", str(tmp_path / "s.md")], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    text = (tmp_path / "s.md").read_text()
    for name in ("bias_summary.csv", "inheritance_summary.csv", "drift_curve.csv", "confounders_separability.csv",
                 "reweighting_summary.csv", "top_heads.json", "atp_agreement.json"):
        assert f"{name} is missing" in text
