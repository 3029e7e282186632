"""Attribution and its consumers against the reference (TianyunYoung/Hallucination-Attribution).

Each test restates what the reference code computes, from its description (no reference code is
copied), and checks ours against it:

* ``LLaVA/eval_scripts/eval_utils/head_attribution.py``: the influence of a head on the greedy
  token, ``influence_score`` ∈ {``prob_diff``: ``p − p'``, ``abs_prob_diff``: ``(p − p').abs()``,
  ``log_prob_diff``: ``log p − log p'``}; ``identify_attention_head.py`` defaults to ``prob_diff``.
* ``identify_attention_head.py::get_constrative_influence``: stack every hallucinated token's
  ``[L, H]`` influence (over all captions), likewise the real ones; ``difference = mean(hal, 0) −
  mean(nonhal, 0)``; ``hal_heads`` = ``topk(difference, k, largest=True)``, ``non_hal_heads`` =
  ``topk(difference, k, largest=False)``, flat index → ``(i // n_heads, i % n_heads)``.
* the consumers' k: bias 20 vs ``non_hal_heads[:20]`` (and all heads), re-weighting 20 vs
  ``random.sample(all heads, 20)``, inheritance 1 vs ``non_hal_heads[:1]``, drift 3 vs
  ``non_hal_heads[:3]``, ADHH 20, TFHH 30 (see ``lens_halluc.models.heads.HA_K``).
"""
from __future__ import annotations

import contextlib
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from lens_halluc import analysis
from lens_halluc.analysis import _bias, _drift, _inheritance, _reweighting
from lens_halluc.analysis._attention import AttributionRun
from lens_halluc.attribution import METRICS, atp_influences, exact_influences, head_means, metric_diff, naive_influences
from lens_halluc.attribution.pipeline import head_scores
from lens_halluc.models import load_vlm
from lens_halluc.models.heads import HA_K, HeadsFileError, random_heads, read_heads
from lens_halluc.models.tiny import save_tiny_llava

ATOL = 1e-6  # float32


# ---------------------------------------------------------------------------- the influence metric
def reference_influence(score: str, p: float, p_ablated: float) -> float:
    """The reference's three ``influence_score`` formulas (head_attribution.py), on plain floats."""
    if score == "prob_diff":
        return p - p_ablated
    if score == "abs_prob_diff":
        return abs(p - p_ablated)
    if score == "log_prob_diff":
        return float(np.log(p) - np.log(p_ablated))
    raise KeyError(score)


def test_metrics_are_the_references_three_with_its_default_first():
    from lens_halluc.attribution import Attribution
    from lens_halluc.cli.attribute import METRIC_CHOICES, build_parser

    assert METRICS == ("prob_diff", "abs_prob_diff", "log_prob_diff") == METRIC_CHOICES
    assert Attribution().metric == "prob_diff"  # identify_attention_head.py: --influence_score default
    assert build_parser().parse_args([]).metric == "prob_diff"
    assert build_parser().parse_args(["--metric", "abs_prob_diff"]).metric == "abs_prob_diff"
    assert Attribution(metric="abs_prob_diff")._config().metric == "abs_prob_diff"


@pytest.mark.parametrize("metric", METRICS)
def test_metric_diff_is_the_reference_formula(metric):
    rng = np.random.default_rng(0)
    p, q = rng.uniform(1e-4, 1, 200), rng.uniform(1e-4, 1, 200)
    got = metric_diff(metric, torch.tensor(np.log(p)), torch.tensor(np.log(q))).numpy()
    want = [reference_influence(metric, a, b) for a, b in zip(p, q)]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    if metric == "abs_prob_diff":
        assert (got >= 0).all() and (np.asarray(want) != (p - q)).any()  # the sign is really dropped


def _case(vlm, seed=0, n_caption=8):
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))
    enc = vlm.encode([image], ["Please describe this image in detail."])
    special = {vlm.spec.image_token_id, *vlm.tokenizer.all_special_ids}
    words = [i for i in range(len(vlm.tokenizer)) if i not in special]
    ids = torch.cat([enc["input_ids"][0], torch.tensor(rng.choice(words, n_caption))])
    T0, T = enc["input_ids"].shape[1], len(ids)
    is_image = (ids == vlm.spec.image_token_id).nonzero().flatten()
    targets = sorted({2, int(is_image[3]), int(is_image[-1]) + 1, T0, T0 + 1, T0 + 3, T - 1})
    return ids, enc["pixel_values"], targets, T0


@pytest.fixture(scope="module", params=[(11, 2, 4, "eager"), (12, 3, 4, "sdpa")], ids=["2x4-eager", "3x4-sdpa"])
def random_model(request, tmp_path_factory):
    """Two random tiny LLaVAs (seed, layers, heads, text attention), with a case and head means."""
    seed, layers, heads, impl = request.param
    d = save_tiny_llava(tmp_path_factory.mktemp(f"tiny-fid-{seed}"), seed=seed, n_layers=layers, n_heads=heads,
                        n_kv_heads=2)
    vlm = load_vlm(d, attn_implementation=impl)
    case = _case(vlm, seed=seed)
    seqs, masks = [], []
    for s in (seed + 1, seed + 2):
        ids, pix, _, T0 = _case(vlm, seed=s)
        seqs.append({"input_ids": ids[None], "pixel_values": pix})
        masks.append(torch.arange(len(ids)) >= T0)
    return vlm, case, head_means(vlm, seqs, masks)


@pytest.mark.parametrize("ablation", ["zero", "mean"])
@pytest.mark.parametrize("scope", ["local", "global"])
def test_abs_prob_diff_exact_equals_naive_loop(random_model, scope, ablation):
    vlm, (ids, pix, targets, _), means = random_model
    m = means if ablation == "mean" else None
    ref = naive_influences(vlm, ids, pix, targets, scope=scope, ablation=ablation, metric="abs_prob_diff", means=m)
    got = exact_influences(vlm, ids, pix, targets, scope=scope, ablation=ablation, metric="abs_prob_diff", means=m,
                           chunk_size=5, row_chunk=2)
    assert got.influence.dtype == torch.float32 and got.influence.shape == ref.influence.shape
    torch.testing.assert_close(got.influence, ref.influence, atol=ATOL, rtol=0)
    # the naive loop is the reference's formula on its own probabilities: |p - p_ablated|, never negative
    want = (ref.clean[:, None, None] - ref.ablated).abs()
    torch.testing.assert_close(ref.influence, want, atol=ATOL, rtol=0)
    assert float(ref.influence.min()) >= 0 and float(ref.influence.max()) > 1e-3  # not vacuous
    # and it is |prob_diff| of the same ablations (some of which lower p, some raise it)
    signed = naive_influences(vlm, ids, pix, targets, scope=scope, ablation=ablation, metric="prob_diff", means=m)
    torch.testing.assert_close(ref.influence, signed.influence.abs(), atol=ATOL, rtol=0)
    assert bool((signed.influence < -1e-6).any()) and bool((signed.influence > 1e-6).any())


def test_abs_prob_diff_atp_is_the_absolute_first_order_estimate(random_model):
    vlm, (ids, pix, targets, _), _ = random_model
    signed = atp_influences(vlm, ids, pix, targets, scope="global", metric="prob_diff")
    absolute = atp_influences(vlm, ids, pix, targets, scope="global", metric="abs_prob_diff")
    torch.testing.assert_close(absolute.influence, signed.influence.abs(), atol=1e-7, rtol=0)
    assert absolute.metric == "abs_prob_diff"


def test_influences_dispatch_accepts_abs_prob_diff(random_model):
    from lens_halluc.attribution import influences

    vlm, (ids, pix, targets, _), _ = random_model
    res = influences(vlm, ids, pix, targets[:2], metric="abs_prob_diff")
    assert res.metric == "abs_prob_diff" and float(res.influence.min()) >= 0
    with pytest.raises(ValueError, match="abs_prob_diff"):
        influences(vlm, ids, pix, targets[:2], metric="abs")


# ---------------------------------------------------------------------------- the score and its top-k
def reference_contrastive(hal: list[torch.Tensor], nonhal: list[torch.Tensor], topk: int, n_heads: int):
    """``get_constrative_influence`` restated: float32 means, difference, topk both ways, flat → (layer, head).

    (The reference writes ``// 32`` and ``% 32``: LLaVA-1.5-7B's 32 heads per layer; restated with ``n_heads``.)
    """
    difference = torch.mean(torch.stack(hal), 0).float() - torch.mean(torch.stack(nonhal), 0).float()
    _, top = torch.topk(difference.flatten(), topk, largest=True)
    _, low = torch.topk(difference.flatten(), topk, largest=False)
    as_heads = lambda idx: [(int(i) // n_heads, int(i) % n_heads) for i in idx]  # noqa: E731
    return difference, as_heads(top), as_heads(low)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_score_and_ranking_equal_the_references_aggregation(seed):
    rng = np.random.default_rng(seed)
    L, H = 4, 6
    n_tok = 37
    # tokens from several "captions", hallucinated and real interleaved (the reference pools over captions)
    influence = rng.normal(0, 0.01, (n_tok, L, H)).astype(np.float32)
    hallucinated = rng.random(n_tok) < 0.4
    rows = head_scores(influence, hallucinated)
    hal = [torch.from_numpy(influence[i]) for i in range(n_tok) if hallucinated[i]]
    non = [torch.from_numpy(influence[i]) for i in range(n_tok) if not hallucinated[i]]
    k = 10
    difference, ref_top, ref_low = reference_contrastive(hal, non, k, H)
    score = {(r["layer"], r["head"]): r["score"] for r in rows}
    np.testing.assert_allclose([score[(l, h)] for l in range(L) for h in range(H)], difference.flatten().numpy(),
                               rtol=0, atol=1e-8)  # float64 here vs the reference's float32 means
    ranked = [(r["layer"], r["head"]) for r in rows]
    assert ranked[:k] == ref_top  # hal_heads, best first
    groups = analysis.comparison_groups(rows, k)
    assert groups["hallucination"] == ref_top
    assert sorted(groups["lowest"]) == sorted(ref_low)  # non_hal_heads (same heads; we list them by rank)
    assert groups["lowest"][::-1] == ref_low  # ... lowest last; the reference lists the lowest first
    for k1 in (HA_K["inheritance"], HA_K["drift"]):  # the consumers' prefixes non_hal_heads[:k]
        assert set(analysis.comparison_groups(rows, k1)["lowest"]) == set(ref_low[:k1])


# ---------------------------------------------------------------------------- the consumers' k
def test_ha_k_table():
    assert HA_K == {"attribution": 30, "adhh": 20, "reweight": 20, "bias": 20, "tfhh": 30, "inheritance": 1,
                    "drift": 3}


def _run(n_layers=6, n_heads=8, seed=0) -> AttributionRun:
    rng = np.random.default_rng(seed)
    scores = [{"layer": l, "head": h, "score": float(rng.normal()), "mean_hal": 0.0, "mean_nonhal": 0.0}
              for l in range(n_layers) for h in range(n_heads)]
    scores.sort(key=lambda r: (-r["score"], r["layer"], r["head"]))
    top = [(r["layer"], r["head"]) for r in scores[:5]]
    samples = [{"sample_id": 0, "image": "x.png", "prompt": "p", "input_ids": [1, 2, 3]}]
    return AttributionRun(path=None, samples=samples, tokens=[], head_scores=scores, top_heads=top, k=5)


def _ranked(run):
    return [(r["layer"], r["head"]) for r in run.head_scores]


def _vlm(n_layers=6, n_heads=8):
    spec = SimpleNamespace(n_layers=n_layers, n_heads=n_heads, check_heads=lambda hs: [tuple(h) for h in hs])
    return SimpleNamespace(spec=spec, device="cpu")


def test_bias_default_k_is_20_against_the_20_lowest_and_all(monkeypatch):
    run = _run()
    table = [{"sample_id": 0, "index": 0, "position": 2, "hallucinated": True, "layer": l, "head": h,
              "image_mass": 0.5, "text_mass": 0.25, "text_share": 1 / 3} for l in range(6) for h in range(8)]
    monkeypatch.setattr(_bias, "attention_bias", lambda *a, **kw: table)
    res = analysis.bias(_vlm(), run)
    ranked = _ranked(run)
    assert res.params["k"] == 20 and res.params["hallucination_heads"] == ranked[:20]
    summary = {(r["group"], r["hallucinated"]): r for r in res.summary.to_dict("records")}
    assert summary[("hallucination", True)]["n_heads"] == 20
    assert summary[("lowest", True)]["n_heads"] == 20 and summary[("all", True)]["n_heads"] == 48
    assert analysis.bias(_vlm(), run, k=5).params["hallucination_heads"] == ranked[:5]


@pytest.mark.parametrize("fn", ["bias", "inheritance", "drift"])
def test_a_default_k_above_the_models_heads_is_a_clear_error(fn, monkeypatch):
    run = _run(n_layers=1, n_heads=2)  # 2 heads: bias' 20 and drift's 3 do not fit
    monkeypatch.setattr(_drift, "_load", lambda *a: pytest.fail("loaded a model before checking k"))
    call = {"bias": lambda **kw: analysis.bias(_vlm(1, 2), run, **kw),
            "inheritance": lambda **kw: analysis.inheritance(_vlm(1, 2), "not-loaded", run, **kw),
            "drift": lambda **kw: analysis.drift("not-loaded", ["c1"], run, **kw)}[fn]
    if HA_K[fn] > 2:
        with pytest.raises(ValueError, match=rf"HA_K\['{fn}'\] = {HA_K[fn]}.*between 1 and 2"):
            call()
    with pytest.raises(ValueError, match="k = 3 does not fit the 2 heads"):
        call(k=3)


def test_inheritance_default_k_1_against_the_lowest_head(monkeypatch):
    run = _run()
    seen = {}

    def rows(vlm, base_lm, samples, heads=None, hallucination_heads=(), config=None, lowest_heads=()):
        seen.update(hal=list(hallucination_heads), low=list(lowest_heads))
        return [{"sample_id": s, "layer": l, "head": h, "n_text": 3, "cosine": float(l * 8 + h + s) / 100,
                 "group": analysis.group_of((l, h), hallucination_heads, lowest_heads)}
                for s in range(2) for l in range(6) for h in range(8)]

    monkeypatch.setattr(_inheritance, "inheritance_rows", rows)
    base = SimpleNamespace(spec=SimpleNamespace(n_layers=6, n_heads=8))
    ranked = _ranked(run)
    res = analysis.inheritance(_vlm(), base, run)
    assert res.params["k"] == 1 and res.params["against"] == "lowest" and res.params["flavour"] == "reference"
    assert seen == {"hal": ranked[:1], "low": ranked[-1:]}
    summary = res.summary.to_dict("records")
    assert [r["group"] for r in summary] == ["hallucination", "lowest"]
    # the reference: per sample the mean over the group's heads, then the mean over samples
    (lh, hh), (ll, hl) = ranked[0], ranked[-1]
    want = lambda l, h: np.mean([float(l * 8 + h + s) / 100 for s in range(2)])  # noqa: E731
    assert summary[0]["mean_cosine"] == pytest.approx(want(lh, hh)) and summary[0]["n_heads"] == 1
    assert summary[1]["mean_cosine"] == pytest.approx(want(ll, hl)) and summary[1]["n_heads"] == 1
    # "all other heads" is the option, and the corrected flavour's default
    for res in (analysis.inheritance(_vlm(), base, run, against="others"),
                analysis.inheritance(_vlm(), base, run, flavour="corrected")):
        summary = res.summary.to_dict("records")
        assert [r["group"] for r in summary] == ["hallucination", "other"] and summary[1]["n_heads"] == 47
        assert res.params["against"] == "others"
    with pytest.raises(ValueError, match="against"):
        analysis.inheritance(_vlm(), base, run, against="random")
    with pytest.raises(ValueError, match="flavour"):
        analysis.inheritance(_vlm(), base, run, flavour="paper")


def test_drift_default_k_3_against_the_3_lowest(monkeypatch):
    run = _run()
    seen = {}
    stub = SimpleNamespace(spec=SimpleNamespace(n_layers=6, n_heads=8))
    monkeypatch.setattr(_drift, "_load", lambda m, *a: stub)

    def table(initial, checkpoints, samples, heads=None, hallucination_heads=(), config=None, device="cpu",
              dtype=None, progress=True, lowest_heads=()):
        seen.update(hal=list(hallucination_heads), low=list(lowest_heads))
        return [{"checkpoint": c, "step": i, "layer": l, "head": h, "js": 0.01 * (l * 8 + h) + i,
                 "group": analysis.group_of((l, h), hallucination_heads, lowest_heads)}
                for i, c in enumerate(checkpoints, start=1) for l in range(6) for h in range(8)]

    monkeypatch.setattr(_drift, "attention_drift", table)
    ranked = _ranked(run)
    res = analysis.drift("initial", ["c1", "c2"], run)
    assert res.params["k"] == 3 and res.params["against"] == "lowest"
    assert seen == {"hal": ranked[:3], "low": ranked[-3:]}
    curve = res.summary.to_dict("records")
    assert [(r["step"], r["group"], r["n_heads"]) for r in curve] == [
        (1, "hallucination", 3), (1, "lowest", 3), (2, "hallucination", 3), (2, "lowest", 3)]
    want = np.mean([0.01 * (l * 8 + h) + 1 for l, h in ranked[-3:]])
    assert curve[1]["js"] == pytest.approx(want)
    res = analysis.drift("initial", ["c1"], run, flavour="corrected")
    assert [(r["group"], r["n_heads"]) for r in res.summary.to_dict("records")] == [("hallucination", 3), ("other", 45)]


def test_overlapping_groups_count_a_head_in_both():
    # 2k > heads: the reference's hal_heads[:k] and non_hal_heads[:k] share heads; so do ours
    rows = [{"layer": 0, "head": h, "score": float(-h)} for h in range(3)]
    g = analysis.comparison_groups(rows, 2)
    assert g == {"hallucination": [(0, 0), (0, 1)], "lowest": [(0, 1), (0, 2)]}
    table = [{"checkpoint": "c", "step": 1, "layer": 0, "head": h, "js": float(h), "group": "x"} for h in range(3)]
    curve = _drift.drift_curve(table, g)
    assert [(r["group"], r["js"]) for r in curve] == [("hallucination", 0.5), ("lowest", 1.5)]


def _reweight_rows(monkeypatch, tmp_path, **kw):
    from lens_halluc.hooks import attention

    from conftest import write_toy_coco

    monkeypatch.setattr(attention, "editable_attention", lambda vlm: contextlib.nullcontext())
    scorer = lambda vlm, ds, out, strategy, mnt, bs: {"CHAIR_s": 0.0, "CHAIR_i": 0.0, "Recall": 1.0, "n": 1}  # noqa: E731
    data = write_toy_coco(tmp_path / "coco", n_images=2)
    vlm = SimpleNamespace(spec=SimpleNamespace(n_layers=6, n_heads=8, check_heads=lambda hs: [tuple(h) for h in hs]))
    return analysis.reweighting(vlm, data, alphas_text=(0.0,), alphas_image=(), renormalize=(False,), scorer=scorer,
                                progress=False, cache_dir=tmp_path / "w", **kw)


def test_reweighting_default_k_20_vs_random_heads_among_all(monkeypatch, tmp_path):
    run = _run()
    ranked = _ranked(run)
    res = _reweight_rows(monkeypatch, tmp_path / "a", heads=run, n_random=4, seed=3)
    assert res.params["k"] == 20 and res.params["heads"] == ranked[:20] and res.params["random_pool"] == "all"
    drawn = [[tuple(int(x) for x in p.split(":")) for p in r["heads"].split()]
             for r in res.table.to_dict("records") if r["group"] == "random" and r["alpha"] == 0.0]
    # the reference: random.sample(all heads, 20) — a draw may hold hallucination heads
    assert drawn == random_heads((6, 8), 20, exclude=(), seed=3, draws=4)
    assert any(set(d) & set(ranked[:20]) for d in drawn)
    res = _reweight_rows(monkeypatch, tmp_path / "b", heads=run, n_random=4, seed=3, flavour="corrected")
    drawn = [[tuple(int(x) for x in p.split(":")) for p in r["heads"].split()]
             for r in res.table.to_dict("records") if r["group"] == "random" and r["alpha"] == 0.0]
    assert res.params["random_pool"] == "others"
    assert drawn == random_heads((6, 8), 20, exclude=ranked[:20], seed=3, draws=4)
    assert not any(set(d) & set(ranked[:20]) for d in drawn)
    # a list of heads is used as given (k = its length), or its first k
    assert _reweight_rows(monkeypatch, tmp_path / "c", heads=[(0, 1), (2, 3)], n_random=0).params["k"] == 2
    assert _reweight_rows(monkeypatch, tmp_path / "d", heads=[(0, 1), (2, 3)], k=1, n_random=0).params["heads"] == [(0, 1)]
    with pytest.raises(ValueError, match="HA_K\\['reweight'\\] = 20"):
        _reweight_rows(monkeypatch, tmp_path / "e", heads=_run(2, 4))


def test_cli_defaults_and_choices():
    from lens_halluc.cli.analysis import build_parser

    p = build_parser()
    for cmd in ("bias", "inheritance", "drift", "reweighting"):
        assert p.parse_args([cmd, "--attribution", "a", "--out", "o"]).k is None  # → HA_K in the library
    for cmd in ("inheritance", "drift"):
        args = p.parse_args([cmd, "--attribution", "a", "--out", "o", "--against", "others", "--flavour", "corrected"])
        assert (args.against, args.flavour) == ("others", "corrected")
    args = p.parse_args(["reweighting", "--attribution", "a", "--out", "o", "--random-pool", "others"])
    assert (args.random_pool, args.flavour) == ("others", "reference")


def test_cli_refuses_a_default_k_that_does_not_fit_before_loading(tmp_path, capsys):
    from lens_halluc.cli.analysis import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "samples.jsonl").write_text(json.dumps({"sample_id": 0, "image_id": 1, "image": "x.png", "prompt": "p",
                                                   "caption": "c", "input_ids": [1, 2]}) + "\n")
    (run / "tokens.csv").write_text("index,sample_id,image_id,position,token_id,token,word,hallucinated\n")
    (run / "head_scores.csv").write_text("layer,head,score,mean_hal,mean_nonhal\n"
                                         + "".join(f"0,{h},{-h},0,0\n" for h in range(4)))
    (run / "top_heads.json").write_text(json.dumps({"heads": [[0, 0]], "k": 1}))
    with pytest.raises(SystemExit):
        main(["bias", "--attribution", str(run), "--out", str(tmp_path / "out"), "--model", str(tmp_path / "none")])
    assert "HA_K['bias'] = 20" in capsys.readouterr().err


# ---------------------------------------------------------------------------- heads files
def test_read_heads_takes_a_larger_k_from_the_ranking_beside_the_file(tmp_path):
    (tmp_path / "head_scores.csv").write_text("layer,head,score,mean_hal,mean_nonhal\n"
                                              "0,1,0.5,0,0\n1,0,0.25,0,0\n0,0,0.25,0,0\n1,1,-1.0,0,0\n")
    (tmp_path / "top_heads.json").write_text(json.dumps({"heads": [[0, 1]], "k": 1}))
    assert read_heads(tmp_path) == [(0, 1)]
    assert read_heads(tmp_path, k=3) == [(0, 1), (0, 0), (1, 0)]  # ties by (layer, head), as head_scores ranks
    with pytest.raises(HeadsFileError, match="scores 4 heads; cannot take the first 5"):
        read_heads(tmp_path, k=5)
    (tmp_path / "top_heads.json").write_text(json.dumps({"heads": [[1, 1]], "k": 1}))
    with pytest.raises(HeadsFileError, match="rank the heads differently"):
        read_heads(tmp_path, k=2)
    (tmp_path / "head_scores.csv").unlink()
    with pytest.raises(HeadsFileError, match="lists 1 heads; cannot take the first 2"):
        read_heads(tmp_path, k=2)
