"""``lh.Attribution``: the API gives the CLI's files byte for byte; load/save round trip; explicit caching."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import lens_halluc as lh
from lens_halluc.attribution import pipeline
from lens_halluc.attribution.result import TIMINGS, Attribution
from lens_halluc.figures.io import find_browser
from lens_halluc.organism.shipped import SHIPPED_DIR

pytestmark = pytest.mark.skipif(not (SHIPPED_DIR / "base" / "config.json").is_file(),
                                reason="no organism shipped in this checkout")
N, MAX_NEW = 20, 30
PNG = find_browser() is not None  # heads.png is compared only where kaleido can render it


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("lh-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("LENS_HALLUC_CACHE", str(root))  # the CLI (a subprocess) and the API share the split export
    yield root
    mp.undo()


@pytest.fixture(scope="module")
def runs(cache_root, tmp_path_factory):
    """The organism's break split attributed twice: by ``python -m lens_halluc.attribute`` and by the API."""
    base = tmp_path_factory.mktemp("api-vs-cli")
    cli_dir, api_dir = base / "cli", base / "api"
    cmd = [sys.executable, "-m", "lens_halluc.attribute", "--n-images", str(N), "--max-new-tokens", str(MAX_NEW),
           "--out", str(cli_dir), "--no-progress"] + ([] if PNG else ["--no-png"])
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr

    vlm = lh.load_vlm()
    ds = lh.organism.split("break", n=N, seed=1)
    caps = lh.caption(vlm, ds, max_new_tokens=MAX_NEW, progress=False)
    attr = lh.Attribution(progress=False).fit(vlm, caps, ds)
    attr.save(api_dir, png=PNG)
    return {"cli": cli_dir, "api": api_dir, "attr": attr, "vlm": vlm, "ds": ds, "caps": caps}


def _files(d):
    return sorted(p.name for p in d.iterdir() if p.is_file() and p.name != TIMINGS)


def test_api_save_is_byte_identical_to_the_cli(runs):
    api, cli = runs["api"], runs["cli"]
    names = _files(api)
    expected = {"head_scores.csv", "top_heads.json", "tokens.csv", "influences.npz", "samples.jsonl", "heads.html",
                "plotly.min.js", "manifest.json"} | ({"heads.png"} if PNG else set())
    assert set(names) == expected
    assert (api / TIMINGS).is_file() and (cli / TIMINGS).is_file()
    for name in names:
        assert (api / name).read_bytes() == (cli / name).read_bytes(), name
    # the CLI's timings.json also says how it was run (world size, options)
    assert json.loads((cli / TIMINGS).read_text())["command"]["world_size"] == 1


def test_fitted_attributes(runs):
    attr, vlm = runs["attr"], runs["vlm"]
    L, H = vlm.spec.n_layers, vlm.spec.n_heads
    assert list(attr.scores_.columns) == ["layer", "head", "score", "mean_hal", "mean_nonhal", "ranked"]
    assert len(attr.scores_) == L * H and list(attr.scores_["ranked"]) == list(range(L * H))
    assert attr.scores_["score"].is_monotonic_decreasing
    assert list(attr.tokens_.columns) == list(pipeline.TOKEN_COLUMNS)
    assert attr.influence_.shape == (len(attr.tokens_), L, H) and attr.influence_.dtype == np.float32
    assert attr.top_k_ == 5  # min(20, 10 % of 48)
    assert attr.top_heads() == attr.top_heads(5) and len(attr.top_heads(3)) == 3
    assert attr.top_heads(3) == [(int(r.layer), int(r.head)) for r in attr.scores_.iloc[:3].itertuples()]
    # S = mean_Hal I − mean_NonHal I, recomputed from influence_ and tokens_
    hal = attr.tokens_["hallucinated"].to_numpy()
    s = attr.influence_[hal].astype(np.float64).mean(0) - attr.influence_[~hal].astype(np.float64).mean(0)
    l, h = attr.top_heads(1)[0]
    assert attr.scores_.iloc[0]["score"] == pytest.approx(s[l, h]) and s[l, h] == pytest.approx(s.max())
    # token positions index the teacher-forced sequences
    by_id = {x.sample_id: x for x in attr.samples_}
    for r in attr.tokens_.itertuples():
        assert by_id[r.sample_id].input_ids[r.position] == r.token_id
    fig = attr.figure()
    assert np.asarray(fig.data[0].z).shape == (L, H)


def test_load_restores_an_equal_object(runs, tmp_path):
    attr = runs["attr"]
    back = Attribution.load(runs["api"])
    assert back.get_params() | {"progress": False} == attr.get_params() | {"top_k": 5}
    pd.testing.assert_frame_equal(back.scores_, attr.scores_, check_exact=True)
    pd.testing.assert_frame_equal(back.tokens_, attr.tokens_, check_exact=True)
    np.testing.assert_array_equal(back.influence_, attr.influence_)
    assert back.samples_ == attr.samples_
    for name in ("top_k_", "model_", "spec_", "data_", "n_captions_", "prompt_", "cache_key_", "versions_"):
        assert getattr(back, name) == getattr(attr, name), name
    back.save(tmp_path / "again", png=PNG)
    for name in _files(runs["api"]):
        assert (tmp_path / "again" / name).read_bytes() == (runs["api"] / name).read_bytes(), name


def test_cache_dir_resumes_and_is_keyed_by_every_input(runs, tmp_path, monkeypatch):
    vlm, ds, caps, attr = runs["vlm"], runs["ds"], runs["caps"], runs["attr"]
    calls = []
    real = pipeline.sample_influence
    monkeypatch.setattr(pipeline, "sample_influence", lambda *a, **k: calls.append(a[1].sample_id) or real(*a, **k))
    cache = tmp_path / "cache"
    first = Attribution(progress=False).fit(vlm, caps, ds, cache_dir=cache)
    parts = sorted((cache / first.cache_key_).glob("*.npz"))
    assert len(parts) == len(first.samples_) == len(calls)
    np.testing.assert_array_equal(first.influence_, attr.influence_)  # cached or in memory: the same numbers
    # interrupted half way: only the missing parts are recomputed
    for p in parts[len(parts) // 2:]:
        p.unlink()
    calls.clear()
    again = Attribution(progress=False).fit(vlm, caps, ds, cache_dir=cache)
    assert sorted(calls) == [int(p.stem) for p in parts[len(parts) // 2:]]
    np.testing.assert_array_equal(again.influence_, first.influence_)
    # other options, other captions: another key, nothing reused
    calls.clear()
    other = Attribution(metric="log_prob_diff", progress=False).fit(vlm, caps, ds, cache_dir=cache)
    assert other.cache_key_ != first.cache_key_ and len(calls) == len(other.samples_)
    assert not np.array_equal(other.influence_, first.influence_)
    rows = [dict(r) for r in caps]
    rows[0]["token_ids"] = rows[0]["token_ids"][:-1]
    cfg = pipeline.AttributionConfig()
    assert pipeline.cache_key(vlm, rows, ds, cfg)["key"] != first.cache_key_
    assert pipeline.cache_key(vlm, list(caps), ds, cfg)["key"] == first.cache_key_
    assert pipeline.cache_key(vlm, list(caps), ds, pipeline.AttributionConfig(top_k=7))["key"] == first.cache_key_


def test_mean_ablation_caches_its_means(runs, tmp_path):
    vlm, ds, caps = runs["vlm"], runs["ds"], runs["caps"]
    rows = list(caps)[:8]
    try:
        mean = Attribution(ablation="mean", progress=False).fit(vlm, rows, ds, cache_dir=tmp_path)
    except pipeline.NoTargetsError:
        pytest.skip("no hallucination in the first 8 captions")
    means = np.load(tmp_path / mean.cache_key_ / "means.npy")
    assert means.shape == (vlm.spec.n_layers, vlm.spec.n_heads, vlm.spec.head_dim)
    zero = Attribution(progress=False).fit(vlm, rows, ds, cache_dir=tmp_path)
    assert zero.cache_key_ != mean.cache_key_ and not np.array_equal(zero.influence_, mean.influence_)


def test_captions_from_a_jsonl_path_and_bad_options(runs, tmp_path):
    vlm, ds, caps, attr = runs["vlm"], runs["ds"], runs["caps"], runs["attr"]
    path = tmp_path / "caps.jsonl"
    path.write_text("".join(json.dumps(dict(r)) + "\n" for r in caps))
    from_file = Attribution(progress=False).fit(vlm, path, ds)
    pd.testing.assert_frame_equal(from_file.scores_, attr.scores_)
    with pytest.raises(ValueError, match="scope"):
        Attribution(scope="everywhere").fit(vlm, caps, ds)
    with pytest.raises(ValueError, match="token_ids"):
        Attribution().fit(vlm, [{"image_id": 1, "caption": "a cat"}], ds)
    with pytest.raises(AttributeError, match="not fitted"):
        Attribution().top_heads()
    with pytest.raises(FileNotFoundError, match="lacks"):
        Attribution.load(tmp_path)
