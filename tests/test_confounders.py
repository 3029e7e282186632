"""Confounder analysis: numeric units on hand-made data, then the shipped organism (ground truth known)."""
from __future__ import annotations

import csv
import json

import numpy as np
import pandas as pd
import pytest
import torch

from lens_halluc.analysis import (
    ConfoundersResult, Representations, collect_representations, confounder_dictionary, confounders,
    cooccurrence_counts, load_dictionary, load_export, most_cooccurring, pair_distances, patch_positions,
    image_positions, pca_views, save_dictionary, scatter_ratio, separability, top_cooccurring_pairs)
from lens_halluc.cli.analysis import build_parser


def main(argv):
    from lens_halluc.cli.analysis import main as cli

    return cli(["confounders", *argv])


# ----------------------------------------------------------------------------- hand-made data
def _toy_reps(seed=0, n_layers=2, d=4, shuffle=False):
    """Three well-separated categories (ids 30, 10, 20) with 5 instances each, plus noise."""
    rng = np.random.default_rng(seed)
    centres = {30: np.full(d, 5.0), 10: np.zeros(d), 20: np.full(d, -5.0)}
    items = []
    for cid, c in centres.items():
        for i in range(5):
            items.append((cid, 100 + i, c + rng.normal(size=(n_layers, d))))
    text = items[:9]  # categories 30 (5 instances) and 10 (4): category 20 has no text instance
    if shuffle:
        perm = np.random.default_rng(seed + 1)
        items = [items[i] for i in perm.permutation(len(items))]
        text = [text[i] for i in perm.permutation(len(text))]
    cats = {10: "fork", 20: "knife", 30: "dog"}
    return Representations.from_instances(list(range(n_layers)), cats, visual=items, text=text)


def test_silhouette_matches_sklearn():
    from sklearn.metrics import silhouette_score

    reps = _toy_reps()
    rows = separability(reps, pairs=[(10, 20)])
    for layer in reps.layers:
        x = np.concatenate([reps.visual[c][:, layer] for c in sorted(reps.visual)]).astype(np.float64)
        y = np.concatenate([[c] * len(reps.visual[c]) for c in sorted(reps.visual)])
        got = next(r for r in rows if r["modality"] == "visual" and r["layer"] == layer)
        assert got["silhouette"] == pytest.approx(silhouette_score(x, y), abs=1e-12)
        assert got["n_instances"] == 15 and got["n_categories"] == 3


def test_scatter_ratio_by_hand():
    x = np.array([[0.0, 0.0], [2.0, 0.0], [10.0, 1.0], [12.0, 1.0], [11.0, 4.0]])
    y = np.array([7, 7, 3, 3, 3])
    mu = x.mean(0)
    m7, m3 = x[:2].mean(0), x[2:].mean(0)
    sb = 2 * ((m7 - mu) ** 2).sum() + 3 * ((m3 - mu) ** 2).sum()
    sw = ((x[:2] - m7) ** 2).sum() + ((x[2:] - m3) ** 2).sum()
    assert scatter_ratio(x, y) == pytest.approx(sb / sw)
    # equals trace(S_B) / trace(S_W) with the matrices written out
    SB = sum(n * np.outer(m - mu, m - mu) for n, m in ((2, m7), (3, m3)))
    SW = sum(np.outer(v - (m7 if c == 7 else m3), v - (m7 if c == 7 else m3)) for v, c in zip(x, y))
    assert scatter_ratio(x, y) == pytest.approx(np.trace(SB) / np.trace(SW))
    # no within-class spread: infinitely separated, not NaN
    assert scatter_ratio(np.array([[0.0], [0.0], [1.0]]), np.array([1, 1, 2])) == np.inf


def test_pair_distance_ratio_known_answer():
    # pairs (1,2) and (3,4) at distance 1; other pairs 1-3: 5, 1-4: 6, 2-3: 4, 2-4: 5 → mean 5
    means = {1: np.array([0.0]), 2: np.array([1.0]), 3: np.array([5.0]), 4: np.array([6.0])}
    pd = pair_distances(means, [(2, 1), (3, 4)])
    assert pd["pair"] == pytest.approx(1.0) and pd["other"] == pytest.approx(5.0)
    assert pd["ratio"] == pytest.approx(0.2) and pd["rank"] == pytest.approx(1.0) and pd["n_pairs"] == 2
    # the pair set of the farthest points: ratio > 1, partner never nearest
    far = pair_distances(means, [(1, 4)])
    assert far["ratio"] == pytest.approx(6.0 / np.mean([1, 5, 4, 5, 1])) and far["rank"] == 0.0
    # a pair with a missing category is skipped, not an error
    assert pair_distances(means, [(1, 99)])["n_pairs"] == 0


def test_dictionary_keyed_by_category_id_not_order(tmp_path):
    a = confounder_dictionary(_toy_reps(shuffle=False))
    b = confounder_dictionary(_toy_reps(shuffle=True))
    assert a["category_ids"].tolist() == [10, 20, 30] == b["category_ids"].tolist()
    for mod in ("visual", "text"):
        np.testing.assert_allclose(a[mod], b[mod], rtol=1e-6, equal_nan=True)
    # row k is category_ids[k]: category 30 sits around +5, 20 around −5
    assert a["visual"][0, 2].mean() > 3 and a["visual"][0, 1].mean() < -3
    assert a["names"].tolist() == ["fork", "knife", "dog"]
    # text saw 4 instances of 10 and 5 of 30: 20's text row is NaN, its count 0
    assert np.isnan(a["text"][:, 1]).all() and a["n_text"].tolist() == [4, 0, 5]
    path = save_dictionary(a, tmp_path / "c.npz")
    back = load_dictionary(path)
    with np.load(path) as z:
        np.testing.assert_array_equal(z["visual_30"], a["visual"][:, 2])
    np.testing.assert_array_equal(back["visual"], a["visual"])


def test_pca_views_and_cooccurrence():
    d = confounder_dictionary(_toy_reps())
    rows = pca_views(d, "visual", 1, 3)
    assert [r["category_id"] for r in rows] == [10, 20, 30] and {"pc1", "pc2", "pc3", "name"} <= set(rows[0])
    two = pca_views(d, "visual", 1, 2)
    assert "pc3" not in two[0]
    coo = {18: {34: 9, 1: 2, 17: 2, 5: 0}}
    assert most_cooccurring(18, coo, 2) == [34, 1] and most_cooccurring(18, coo, 9) == [34, 1, 17]
    assert top_cooccurring_pairs({1: {2: 5, 3: 1}, 2: {1: 5}, 3: {1: 1}}, 1) == [(1, 2)]


def test_image_positions_from_input_ids():
    assert image_positions([1, 2, 9, 9, 9, 9, 4], 9).tolist() == [2, 3, 4, 5]
    assert patch_positions([1, 2, 3, 3, 9, 9, 9, 9, 4], 9, [0, 3]).tolist() == [4, 7]
    with pytest.raises(ValueError):
        patch_positions([1, 9, 9, 4], 9, [2])
    with pytest.raises(ValueError):
        image_positions([1, 2, 3], 9)


def test_figures_build_from_tables():
    from lens_halluc.figures.confounders import pca_scatter_2d, pca_scatter_3d, separability_lines

    reps = _toy_reps()
    d = confounder_dictionary(reps)
    rows = pca_views(d, "visual", 0, 3)
    fig = pca_scatter_3d(rows, highlight=20, partners=[10])
    names = {t.name: list(t.customdata) for t in fig.data}
    assert names["knife (highlighted)"] == [[20]] and names["co-occurring partners"] == [[10]]
    assert len(pca_scatter_2d(rows, 30, [20]).data) == 3
    assert len(separability_lines(separability(reps, [(10, 20)])).data) == 6


# ----------------------------------------------------------------------------- the organism
N_IMAGES = 60


@pytest.fixture(scope="module")
def normal_split(organism, tmp_path_factory):
    from lens_halluc.organism.export import export_split
    from lens_halluc.organism.recipe import read_organism_meta

    world, _ = read_organism_meta(organism.path)
    return export_split(world, "normal", N_IMAGES, 1, tmp_path_factory.mktemp("normal"))


@pytest.fixture(scope="module")
def confounders_result(organism, normal_split):
    return confounders(organism, normal_split)


@pytest.fixture(scope="module")
def organism_result(normal_split, confounders_result):
    ds, objects, pairs = load_export(normal_split)
    res = confounders_result
    return ds, objects, pairs, res.representations, res.table.to_dict("records")


def test_positions_follow_the_prompt(organism, normal_split):
    """A longer system prompt moves the image tokens; layer 0 must still be the projector output."""
    from lens_halluc.generation.runner import load_image
    from lens_halluc.models.loading import LoadedVLM
    from lens_halluc.models.prompts import get_template

    ds, objects, _ = load_export(normal_split)
    ids = ds.image_ids[:3]
    long = LoadedVLM(organism.model, organism.processor, organism.spec, get_template("vicuna-v1"), organism.path)
    short_enc = organism.encode([load_image(ds.image_path(ids[0]))], ["x"])
    long_enc = long.encode([load_image(ds.image_path(ids[0]))], ["x"])
    first = lambda e: int(image_positions(e["input_ids"][0], organism.spec.image_token_id)[0])  # noqa: E731
    assert first(long_enc) > first(short_enc) + 10
    a = collect_representations(organism, ds, objects, layers=[0, 3], image_ids=ids)
    b = collect_representations(long, ds, objects, layers=[0, 3], image_ids=ids)
    assert set(a.visual) == set(b.visual) and a.visual
    for c in a.visual:
        np.testing.assert_allclose(a.visual[c][:, 0], b.visual[c][:, 0], atol=1e-5)  # projector output: prompt-free
    # and it is the mean of the projected patch features over the object's patches
    with torch.no_grad():
        feats = organism.model.model.get_image_features(organism.encode([load_image(ds.image_path(ids[0]))], ["x"])["pixel_values"])
    feats = (feats.pooler_output[0] if hasattr(feats, "pooler_output") else feats[0]).float().numpy()  # [36, d]
    obj = next(o for o in objects[ids[0]] if o["drawn"])
    k = int(np.flatnonzero(a.visual_images[obj["category_id"]] == ids[0])[0])
    np.testing.assert_allclose(a.visual[obj["category_id"]][k, 0], feats[obj["patches"]].mean(0), atol=1e-5)
    # text layer 0 = the name token's embedding, whatever the prompt
    emb = organism.model.get_input_embeddings().weight.detach().float().numpy()
    for c in a.text:
        tid = organism.tokenizer(ds.categories[c], add_special_tokens=False)["input_ids"]
        np.testing.assert_allclose(a.text[c][:, 0], np.broadcast_to(emb[tid].mean(0), a.text[c][:, 0].shape), atol=1e-6)
        np.testing.assert_allclose(b.text[c][:, 0], a.text[c][:, 0], atol=1e-6)


def test_organism_numbers_finite(organism, organism_result):
    ds, objects, pairs, reps, rows = organism_result
    L = organism.spec.n_layers
    assert reps.layers == list(range(L + 1))
    assert len(rows) == 2 * (L + 1)
    for r in rows:
        for key in ("silhouette", "pair_distance_ratio", "pair_rank", "mean_pair_distance", "mean_other_distance"):
            assert np.isfinite(r[key]), (r["modality"], r["layer"], key)
        if (r["modality"], r["layer"]) == ("text", 0):
            # one-token names: every instance is the same embedding, within-class scatter is 0
            assert r["scatter_ratio"] == np.inf
        else:
            assert np.isfinite(r["scatter_ratio"]) and r["scatter_ratio"] > 0
        assert r["n_pairs"] == 6 and r["n_categories"] >= 12
    # every category id of the dictionary is a dataset category, never a row index
    d = confounder_dictionary(reps)
    assert set(d["category_ids"].tolist()) <= set(ds.categories)
    assert all(ds.categories[c] == n for c, n in zip(d["category_ids"].tolist(), d["names"].tolist()))


def test_organism_partner_text_confounders_closer(organism_result):
    """Ground truth: the language prior ties B to A, so B's text confounder sits nearer A's than
    other pairs do in at least one layer (pair_distance_ratio < 1)."""
    *_, rows = organism_result
    text = {r["layer"]: r["pair_distance_ratio"] for r in rows if r["modality"] == "text"}
    closer = [layer for layer, v in text.items() if v < 1.0]
    print("text pair/other distance ratio per layer:", {k: round(v, 3) for k, v in text.items()}, "closer:", closer)
    assert closer, text


def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert isinstance(main(["--out", str(out), "--n-images", "12", "--no-png", "--no-progress", "--highlight", "mouse",
                            "--layers", "0", "2", "6"]), ConfoundersResult)
    for name in ("separability.csv", "confounders.npz", "pca_visual_2d.csv", "pca_text_3d.csv", "manifest.json",
                 "confounders_separability.html", "confounders_pca_visual_2d.html", "confounders_pca_text_3d.html"):
        assert (out / name).is_file(), name
    data = sorted((out / "data").glob("normal-n12-seed1-*"))  # default data: the organism's normal split, seed 1
    assert len(data) == 1 and (data[0] / "objects.json").is_file()
    rows = list(csv.DictReader((out / "separability.csv").open()))
    assert [(r["modality"], r["layer"]) for r in rows][:3] == [("visual", "0"), ("visual", "2"), ("visual", "6")]
    man = json.loads((out / "manifest.json").read_text())
    ds, *_ = load_export(data[0])
    assert man["highlight"] == [74, "mouse"]
    assert [c for c, _ in man["partners"]] == most_cooccurring(74, cooccurrence_counts(ds), 3)
    assert [76, "keyboard"] in man["partners"]
    d = load_dictionary(out / "confounders.npz")
    assert d["layers"].tolist() == [0, 2, 6]
    # a highlight with no instance in the images is a clear error (exit 2), not a wrong picture
    with pytest.raises(SystemExit) as e:
        main(["--out", str(out), "--n-images", "12", "--no-png", "--no-progress", "--highlight", "fork", "--layers", "0"])
    assert e.value.code == 2 and "no instance" in capsys.readouterr().err


def test_cli_registers_subcommand():
    args = build_parser().parse_args(["confounders", "--n-images", "5", "--highlight", "dog"])
    assert args.command == "confounders" and args.n_images == 5 and callable(args.func)


def test_result_object(confounders_result, normal_split, organism, tmp_path):
    res = confounders_result
    ds, objects, pairs = load_export(normal_split)
    # the same numbers as the building blocks called by hand
    by_hand = separability(res.representations, pairs, cooccurrence_counts(ds))
    pd.testing.assert_frame_equal(res.table, pd.DataFrame(by_hand, columns=list(res.table.columns)))
    summary = res.summary.set_index("modality")
    for mod in ("visual", "text"):
        mine = res.table[res.table["modality"] == mod]
        assert summary.loc[mod, "min_pair_distance_ratio"] == mine["pair_distance_ratio"].min()
        assert summary.loc[mod, "n_layers_pairs_closer"] == int((mine["pair_distance_ratio"] < 1).sum())
    # the default highlight is the first planted pair's A, and its partners are the most co-occurring
    hid = pairs[0][0]
    assert res.params["highlight"] == [hid, ds.categories[hid]]
    assert [c for c, _ in res.params["partners"]] == most_cooccurring(hid, cooccurrence_counts(ds), 3)
    assert set(res.pca) == {f"pca_{m}_{d}d" for m in ("visual", "text") for d in (2, 3)}
    last = res.params["pca_layer"]
    fig = res.pca_figure("text", 2)
    highlighted = next(t for t in fig.data if t.name.endswith("(highlighted)"))
    assert list(highlighted.customdata) == [[hid]]
    assert set(res.pca["pca_text_2d"]["layer"]) == set(res.representations.layers) and last == res.representations.layers[-1]
    assert len(res.figure().data) == 6  # 3 panels × 2 modalities
    written = {p.name for p in res.save(tmp_path, png=False)}
    assert {"separability.csv", "confounders_summary.csv", "confounders.npz", "pca_visual_2d.csv", "manifest.json",
            "confounders_separability.html", "confounders_pca_text_3d.html"} <= written
    back = pd.read_csv(tmp_path / "separability.csv")
    pd.testing.assert_series_equal(back["silhouette"], res.table["silhouette"], check_exact=True)
    man = json.loads((tmp_path / "manifest.json").read_text())
    assert man["highlight"] == res.params["highlight"] and "separability" in man["figures"]
