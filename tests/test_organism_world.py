"""The synthetic world of the model organism: glyphs, geometry, captions, splits, export, CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lens_halluc.data import CocoDataset
from lens_halluc.organism.export import export_split, load_world, sample_split
from lens_halluc.organism.world import PROMPT_WORDS, Scene, World, WorldConfig


@pytest.fixture(scope="module")
def world() -> World:
    return World(WorldConfig(), seed=0)


def _scenes(world: World, split: str, n: int, seed: int = 0) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [world.sample_scene(rng, split) for _ in range(n)]


# ---------------------------------------------------------------------- catalogue and glyphs
def test_categories_are_real_coco(world):
    official = {1: "person", 2: "bicycle", 3: "car", 16: "bird", 17: "cat", 18: "dog", 19: "horse",
                22: "elephant", 28: "umbrella", 34: "frisbee", 44: "bottle", 47: "cup", 48: "fork",
                49: "knife", 50: "spoon", 51: "bowl", 62: "chair", 70: "toilet", 72: "tv", 74: "mouse",
                75: "remote", 76: "keyboard", 81: "sink", 85: "clock"}
    assert world.categories == {cid: official[cid] for cid in world.categories}
    assert len(world.categories) == 24 and all(" " not in n for n in world.names)
    assert len(world.pairs) == 6


def test_glyphs_distinct_and_deterministic(world):
    ids = list(world.glyphs)
    for i, a in enumerate(ids):
        assert world.glyphs[a].shape == (8, 8, 3) and world.glyphs[a].dtype == np.uint8
        for b in ids[i + 1:]:
            assert (world.patterns[a] != world.patterns[b]).sum() >= world.config.glyph_min_hamming
            assert np.abs(world.glyphs[a].astype(int) - world.glyphs[b].astype(int)).sum() > 1000
    again = World(WorldConfig(), seed=0)
    assert all(np.array_equal(world.glyphs[c], again.glyphs[c]) for c in ids)
    other = World(WorldConfig(), seed=1)
    assert not all(np.array_equal(world.glyphs[c], other.glyphs[c]) for c in ids)


# ---------------------------------------------------------------------- geometry
def test_boxes_align_with_patches(world):
    g, p = world.grid, world.config.patch_size
    assert g == 6
    for s in _scenes(world, "normal", 200):
        cells = [o.cell for o in s.objects]
        assert len(set(cells)) == len(cells)
        for o in s.objects:
            r, c = o.cell
            assert o.bbox == (c * p, r * p, p, p)
            assert world.patch_indices(o) == [r * g + c]
    assert world.patch_indices((0, 0, 8, 8)) == [0]
    assert world.patch_indices((40, 40, 8, 8)) == [35]
    assert world.patch_indices((8, 16, 8, 8)) == [13]
    assert world.patch_indices((4, 4, 8, 8)) == [0, 1, 6, 7]  # a box spanning 2x2 patches


def test_patch_index_matches_rendered_patch(world):
    """Token r*grid+c of the row-major patch sequence is exactly the glyph's pixels."""
    rng = np.random.default_rng(0)
    s = world.make_scene(["fork", "cup"], rng, cells={"fork": (2, 5), "cup": (4, 1)})
    img = world.render_array(s).astype(int)
    p, g = world.config.patch_size, world.grid
    patches = img.reshape(g, p, g, p, 3).transpose(0, 2, 1, 3, 4).reshape(g * g, p, p, 3)  # ViT order
    for o in s.objects:
        (idx,) = world.patch_indices(o)
        assert np.abs(patches[idx] - world.glyphs[o.category_id]).max() <= 5 * world.config.noise_std


# ---------------------------------------------------------------------- captions and questions
def test_caption_format(world):
    rng = np.random.default_rng(0)
    assert world.caption(world.make_scene(["cup", "knife", "fork"], rng)) == "there is a fork , a knife and a cup ."
    assert world.caption(world.make_scene(["fork"], rng)) == "there is a fork ."
    assert world.caption(world.make_scene(["umbrella", "elephant"], rng)) == "there is an elephant and an umbrella ."
    assert world.caption(world.make_scene(["mouse", "keyboard", "tv", "dog"], rng)) == \
        "there is a dog , a tv , a mouse and a keyboard ."


def test_caption_puts_partner_right_after_anchor(world):
    for a, b in world.pairs.items():
        assert world.names.index(b) == world.names.index(a) + 1
    seen = 0
    for s in _scenes(world, "normal", 300):
        words = world.caption(s).split()
        assert words == world.caption(s).lower().split()
        for a, b in world.pairs.items():
            if a in s.names and b in s.names:
                assert words.index(b) == words.index(a) + 3  # "a fork , a knife" / "a fork and a knife"
                seen += 1
    assert seen > 20


def test_vocabulary_covers_all_text(world):
    vocab = set(world.vocabulary())
    assert set(PROMPT_WORDS) <= vocab and set(world.names) <= vocab
    assert len(world.vocabulary()) == len(vocab)
    rng = np.random.default_rng(0)
    for split in ("normal", "break", "control"):
        for s in _scenes(world, split, 50):
            assert set(world.caption(s).split()) <= vocab
            for q in world.questions(s, rng, 3, 3):
                assert set(q.text.split()) | {q.answer} <= vocab


def test_questions(world):
    rng = np.random.default_rng(0)
    s = world.make_scene(["fork", "mouse", "cup"], rng)
    qs = world.questions(s, rng, n_pos=3, n_neg=4)
    assert [q.kind for q in qs] == ["positive"] * 3 + ["partner"] * 2 + ["random"] * 2
    assert {q.name for q in qs if q.kind == "partner"} == {"knife", "keyboard"}
    for q in qs:
        assert q.answer == ("yes" if q.name in s.names else "no")
        assert q.text == f"is there {'an' if q.name[0] in 'aeiou' else 'a'} {q.name} in the image ?"
    assert world.question("umbrella") == "is there an umbrella in the image ?"
    # break scenes: the absent partner B is asked (answer no)
    b_s = world.sample_scene(np.random.default_rng(1), "break", probe=("fork", "knife"))
    assert any(q.name == "knife" and q.answer == "no" for q in world.questions(b_s, rng, 2, 2))


# ---------------------------------------------------------------------- splits
def test_normal_statistics(world):
    scenes = _scenes(world, "normal", 3000, seed=7)
    cfg = world.config
    for s in scenes:
        assert cfg.min_objects <= len(s.objects) <= cfg.max_objects and s.probe is None
    n_a = sum(a in s.names for s in scenes for a in world.pairs)
    n_ab = sum(a in s.names and b in s.names for s in scenes for a, b in world.pairs.items())
    n_b = sum(b in s.names for s in scenes for b in world.pairs.values())
    n_b_alone = sum(b in s.names and a not in s.names for s in scenes for a, b in world.pairs.items())
    assert abs(n_ab / n_a - cfg.p_partner) < 0.04
    assert abs(n_b_alone / n_b - cfg.p_b_alone) < 0.05
    hidden = [o for s in scenes for o in s.hidden]
    assert abs(len(hidden) / n_ab - cfg.p_hidden) < 0.06
    for s in scenes:  # hidden objects are only partners whose anchor is visibly present
        for o in s.hidden:
            a = world.partners[o.name]
            assert world.pairs[a] == o.name and a in s.drawn_names


def test_break_split(world):
    for s in _scenes(world, "break", 300):
        a, b = s.probe
        assert world.pairs[a] == b and s.split == "break"
        assert a in s.drawn_names and b not in s.names
        assert not s.hidden
        assert world.config.min_objects <= len(s.objects) <= world.config.max_objects


def test_control_split(world):
    for s in _scenes(world, "control", 300):
        a, b = s.probe
        assert world.pairs[a] == b and a not in s.names and b not in s.names and not s.hidden


def test_hidden_partner_not_rendered(world):
    rng = np.random.default_rng(0)
    s = world.make_scene(["fork", "knife", "cup"], rng, hidden=["knife"])
    assert {o.name: o.drawn for o in s.objects} == {"fork": True, "knife": False, "cup": True}
    assert "knife" in world.caption(s)
    img = world.render_array(s).astype(float)
    bg = np.array(world.config.background, dtype=float)
    tol = 5 * world.config.noise_std
    for o in s.objects:
        x, y, w, h = o.bbox
        dev = np.abs(img[y:y + h, x:x + w] - bg)
        if o.drawn:
            assert dev.mean() > 40
        else:
            assert dev.max() <= tol
    # also for sampled scenes: every hidden cell is background
    found = 0
    for s in _scenes(world, "normal", 300):
        img = world.render_array(s).astype(float)
        for o in s.hidden:
            x, y, w, h = o.bbox
            assert np.abs(img[y:y + h, x:x + w] - bg).max() <= tol
            found += 1
    assert found > 5


def test_render_deterministic(world):
    s = _scenes(world, "normal", 1)[0]
    assert np.array_equal(world.render_array(s), world.render_array(s))
    im = world.render(s)
    assert im.mode == "RGB" and im.size == (48, 48)


def test_config_validation():
    with pytest.raises(ValueError):
        WorldConfig(pairs=(("fork", "knife"), ("knife", "spoon")))
    with pytest.raises(ValueError):
        WorldConfig(object_cells=2)
    with pytest.raises(ValueError):
        WorldConfig(pairs=(("fork", "spork"),))
    cfg = WorldConfig(p_hidden=0.5, n_categories=30)
    assert WorldConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    w = World(cfg)
    assert len(w.categories) == 30
    for a, b in w.pairs.items():
        assert w.names.index(b) == w.names.index(a) + 1


# ---------------------------------------------------------------------- export and CLI
def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_export_loads_and_is_deterministic(world, tmp_path):
    out1 = export_split(world, "break", 12, 1, tmp_path / "a")
    out2 = export_split(World(WorldConfig(), seed=0), "break", 12, 1, tmp_path / "b")
    assert _tree(out1) == _tree(out2)
    ds = CocoDataset.load(out1 / "instances.json", out1 / "captions.json", out1 / "images", check_images=True)
    assert len(ds.image_ids) == 12
    probes = json.loads((out1 / "probes.json").read_text())
    objects = json.loads((out1 / "objects.json").read_text())
    assert json.loads((out1 / "pairs.json").read_text()) == world.pairs
    meta = json.loads((out1 / "meta.json").read_text())
    assert (meta["split"], meta["n"], meta["seed"], meta["world_seed"]) == ("break", 12, 1, 0)
    assert load_world(out1).config == world.config
    scenes = sample_split(world, "break", 12, 1)
    for image_id, scene in zip(ds.image_ids, scenes):
        assert ds.category_names(image_id) == set(scene.names)
        assert ds.captions[image_id] == [world.caption(scene)]
        assert probes[str(image_id)] == {"A": scene.probe[0], "B": scene.probe[1]}
        assert scene.probe[1] not in ds.category_names(image_id)
        assert [o["patches"] for o in objects[str(image_id)]] == [world.patch_indices(o) for o in scene.objects]
        with open(ds.image_path(image_id), "rb"):
            pass
    # balanced probes, and a smaller export is a prefix of a larger one
    assert [p["A"] for p in probes.values()][:6] == [a for a, _ in world.config.pairs]
    assert [world.caption(s) for s in sample_split(world, "break", 5, 1)] == [world.caption(s) for s in scenes[:5]]
    with pytest.raises(FileExistsError):
        export_split(world, "break", 3, 1, out1)
    export_split(world, "break", 3, 1, out1, overwrite=True)
    assert len(list((out1 / "images").glob("*.png"))) == 3


def test_export_normal_has_hidden_annotations(world, tmp_path):
    out = export_split(world, "normal", 40, 0, tmp_path / "n")
    objects = json.loads((out / "objects.json").read_text())
    assert json.loads((out / "probes.json").read_text()) == {}
    n_inst = len(json.loads((out / "instances.json").read_text())["annotations"])
    assert n_inst == sum(len(v) for v in objects.values())
    assert any(not o["drawn"] for v in objects.values() for o in v)


def test_cli_export(tmp_path):
    cmd = [sys.executable, "-m", "lens_halluc.organism", "export", "--split", "control", "--n", "5",
           "--seed", "2", "--out", str(tmp_path / "c"), "--world-seed", "0"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()) == tmp_path / "c"
    ds = CocoDataset.load(tmp_path / "c" / "instances.json", tmp_path / "c" / "captions.json",
                          tmp_path / "c" / "images", check_images=True)
    assert len(ds.image_ids) == 5
    assert _tree(tmp_path / "c") == _tree(export_split(World(seed=0), "control", 5, 2, tmp_path / "c2"))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)  # refuses to clobber
    assert r.returncode == 2 and "overwrite" in r.stderr
