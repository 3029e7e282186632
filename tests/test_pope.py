"""POPE question building, answer parsing, scoring and CLI (fast: toy datasets only)."""
from __future__ import annotations

import json
import random
import subprocess
import sys
import warnings
from collections import Counter
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest

from lens_halluc.data import CocoDataset
from lens_halluc.data.pope import (
    FLAVOURS_POPE,
    POPE_PROMPTS,
    PopeError,
    build_questions,
    prompt_suffix,
    parse_answer,
    question_text,
    read_answers,
    read_questions,
    score,
    write_jsonl,
)

# ----------------------------------------------------------------------------- toy data
# Hand-built world. Image 4 has only 2 categories and image 6 has one category three times, so
# only images 1, 2, 3, 5 are eligible. "elephant" is never annotated (not in the pool).
CATS = {1: "person", 2: "car", 3: "dog", 4: "apple", 5: "umbrella", 6: "bus", 7: "elephant"}
IMAGES = {1: [1, 2, 3], 2: [1, 2, 6], 3: [1, 6, 5], 4: [1, 4], 5: [2, 6, 4], 6: [3, 3, 3]}
# Counted by hand from IMAGES: images containing each category...
FREQ = {"person": 4, "car": 3, "dog": 2, "apple": 2, "umbrella": 1, "bus": 3, "elephant": 0}
# ...and images containing each pair.
CO = {
    frozenset(p): n for p, n in {
        ("person", "car"): 2, ("person", "dog"): 1, ("car", "dog"): 1, ("person", "bus"): 2,
        ("car", "bus"): 2, ("bus", "umbrella"): 1, ("person", "umbrella"): 1, ("person", "apple"): 1,
        ("car", "apple"): 1, ("bus", "apple"): 1,
    }.items()
}


def coco_dict(cats: dict[int, str], images: dict[int, list[int]]) -> dict:
    anns = [{"id": k, "image_id": img, "category_id": c, "bbox": [0, 0, 1, 1]}
            for k, (img, c) in enumerate(((i, c) for i, cs in images.items() for c in cs), 1)]
    return {
        "images": [{"id": i, "file_name": f"img_{i:04d}.jpg"} for i in images],
        "annotations": anns,
        "categories": [{"id": c, "name": n} for c, n in cats.items()],
    }


@pytest.fixture
def toy() -> CocoDataset:
    return CocoDataset.from_dicts(coco_dict(CATS, IMAGES))


def random_world(n_images: int = 60, n_cats: int = 15, seed: int = 1) -> dict:
    """A larger random world for property checks (skewed category frequencies)."""
    rng = np.random.default_rng(seed)
    names = ["person", "car", "apple", "umbrella", "oven", "bus", "dog", "cat", "knife", "egg tart",
             "chair", "bottle", "ice cream", "zebra", "bench", "orange", "vase", "train"][:n_cats]
    cats = {i + 1: n for i, n in enumerate(names)}
    p = np.arange(n_cats, 0, -1, dtype=float)
    p /= p.sum()
    images = {i: [int(c) + 1 for c in rng.choice(n_cats, size=int(rng.integers(1, 7)), replace=True, p=p)]
              for i in range(1, n_images + 1)}
    return coco_dict(cats, images)


@pytest.fixture
def world() -> CocoDataset:
    return CocoDataset.from_dicts(random_world())


def by_image(rows: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for r in rows:
        out.setdefault(r["image_id"], []).append(r)
    return out


def check_structure(ds: CocoDataset, rows: list[dict], n_per_image: int = 3) -> None:
    """Invariants shared by all splits."""
    assert [r["question_id"] for r in rows] == list(range(1, len(rows) + 1))
    for img, rs in by_image(rows).items():
        present = ds.category_names(img)
        assert len(present) >= 3
        assert len(rs) == 2 * n_per_image
        assert [r["label"] for r in rs] == ["yes", "no"] * n_per_image  # each negative right after
        pos = [r["object"] for r in rs if r["label"] == "yes"]
        neg = [r["object"] for r in rs if r["label"] == "no"]
        assert set(pos) <= present and len(set(pos)) == n_per_image
        assert not set(neg) & present and len(set(neg)) == n_per_image
        for r in rs:
            assert r["image"] == ds.images[img].file_name
            assert r["text"] == question_text(r["object"])


# ----------------------------------------------------------------------------- building
def test_question_text_articles():
    assert question_text("apple") == "Is there an apple in the image?"
    assert question_text("umbrella") == "Is there an umbrella in the image?"
    assert question_text("oven") == "Is there an oven in the image?"
    assert question_text("car") == "Is there a car in the image?"
    assert question_text("hair drier") == "Is there a hair drier in the image?"


@pytest.mark.parametrize("flavour", ["reference", "corrected"])
@pytest.mark.parametrize("split", ["random", "popular", "adversarial"])
def test_only_eligible_images_and_structure(toy, split, flavour):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = build_questions(toy, split, n_images=4, seed=0, flavour=flavour)
    assert set(by_image(rows)) == {1, 2, 3, 5}  # 4 has 2 categories, 6 one category 3 times
    check_structure(toy, rows)
    assert {r["object"] for r in rows} <= {n for n, f in FREQ.items() if f > 0}  # never "elephant"


@pytest.mark.parametrize("flavour", ["reference", "corrected"])
def test_too_few_eligible_images_names_count(toy, flavour):
    with pytest.raises(PopeError, match=r"only 4 image\(s\) have >= 3 distinct"):
        build_questions(toy, "random", n_images=5, flavour=flavour)
    assert len(build_questions(toy, "random", n_images=None, flavour=flavour)) == 4 * 6  # None = all eligible


def test_corrected_popular_is_most_frequent_absent_unused(toy):
    rows = build_questions(toy, "popular", n_images=4, seed=0, flavour="corrected")
    for img, rs in by_image(rows).items():
        present, used = toy.category_names(img), set()
        for r in rs:
            if r["label"] == "no":
                cands = [n for n, f in FREQ.items() if f > 0 and n not in present and n not in used]
                best = max(FREQ[n] for n in cands)
                assert FREQ[r["object"]] == best
                used.add(r["object"])
    # Spelled out for image 1 (person, car, dog): absent pool bus 3 > apple 2 > umbrella 1.
    assert [r["object"] for r in by_image(rows)[1] if r["label"] == "no"] == ["bus", "apple", "umbrella"]
    # Image 2 (person, car, bus): apple and dog tie at 2 -> lower category id (dog=3) first.
    assert [r["object"] for r in by_image(rows)[2] if r["label"] == "no"] == ["dog", "apple", "umbrella"]


def test_corrected_adversarial_is_most_cooccurring_absent_unused(toy):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = build_questions(toy, "adversarial", n_images=4, seed=0, flavour="corrected")
    n_fallback = 0
    for img, rs in by_image(rows).items():
        present, used = toy.category_names(img), set()
        for pos, neg in zip(rs[::2], rs[1::2]):
            cands = [n for n, f in FREQ.items() if f > 0 and n not in present and n not in used]
            co = {n: CO.get(frozenset((pos["object"], n)), 0) for n in cands}
            if max(co.values()) > 0:
                best = max(co.values())
                top = [n for n in cands if co[n] == best]
                # ties: higher frequency, then lower category id
                expect = min(top, key=lambda n: (-FREQ[n], [k for k, v in CATS.items() if v == n][0]))
                assert neg["object"] == expect, (img, pos["object"])
            else:
                n_fallback += 1  # reference: nothing co-occurring left -> random absent object
            used.add(neg["object"])
    assert n_fallback > 0 and len(caught) == 1 and "drawn at random" in str(caught[0].message)


def test_corrected_adversarial_hand_example(toy):
    # Image 1 (person, car, dog) with positives in the order person, car, dog:
    # person -> bus (co-occur 2 > umbrella 1 = apple 1); car -> bus is used, apple (1) beats
    # umbrella (0); dog -> nothing absent and unused co-occurs with dog -> random: umbrella is left.
    hits = 0
    for seed in range(40):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rs = by_image(build_questions(toy, "adversarial", n_images=4, seed=seed, flavour="corrected"))[1]
        if [r["object"] for r in rs[::2]] == ["person", "car", "dog"]:
            assert [r["object"] for r in rs[1::2]] == ["bus", "apple", "umbrella"]
            hits += 1
    assert hits > 0


@pytest.mark.parametrize("split", ["random", "popular", "adversarial"])
def test_corrected_property_checks_on_random_world(world, split):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = build_questions(world, split, n_images=15, seed=3, flavour="corrected")
    assert len(rows) == 15 * 6
    check_structure(world, rows)
    if split == "popular":
        freq = Counter(n for i in world.image_ids for n in world.category_names(i))
        for img, rs in by_image(rows).items():
            used: set[str] = set()
            for r in rs[1::2]:
                cands = [n for n in freq if n not in world.category_names(img) and n not in used]
                assert freq[r["object"]] == max(freq[n] for n in cands)
                used.add(r["object"])
    if split == "adversarial":
        co = Counter(frozenset(p) for i in world.image_ids for p in combinations(sorted(world.category_names(i)), 2))
        for img, rs in by_image(rows).items():
            used = set()
            for pos, neg in zip(rs[::2], rs[1::2]):
                cands = {n for n in world.categories.values() if n not in world.category_names(img) and n not in used}
                best = max(co[frozenset((pos["object"], n))] for n in cands)
                if best > 0:
                    assert co[frozenset((pos["object"], neg["object"]))] == best
                used.add(neg["object"])


@pytest.mark.parametrize("flavour", ["reference", "corrected"])
def test_seed_reproducible_and_splits_share_images(world, tmp_path, flavour):
    a = build_questions(world, "random", n_images=10, seed=7, flavour=flavour)
    b = build_questions(world, "random", n_images=10, seed=7, flavour=flavour)
    c = build_questions(world, "random", n_images=10, seed=8, flavour=flavour)
    write_jsonl(a, tmp_path / "a.jsonl")
    write_jsonl(b, tmp_path / "b.jsonl")
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert [r["image_id"] for r in a] != [r["image_id"] for r in c]
    # Same seed: the three splits ask about the same images and the same positives.
    pop = build_questions(world, "popular", n_images=10, seed=7, flavour=flavour)
    assert [(r["image_id"], r["object"]) for r in a[::2]] == [(r["image_id"], r["object"]) for r in pop[::2]]


@pytest.mark.parametrize("split", ["random", "popular", "adversarial"])
@pytest.mark.parametrize("flavour", ["reference", "corrected"])
def test_pool_exhausted_raises(flavour, split):
    # The reference loops forever here (random.choice until an absent object turns up); both raise.
    ds = CocoDataset.from_dicts(coco_dict({1: "a1", 2: "b", 3: "c", 4: "d"}, {1: [1, 2, 3], 2: [4]}))
    with pytest.raises(PopeError, match="no absent category left"):
        build_questions(ds, split, n_images=1, flavour=flavour, stats_from="dataset")
    with pytest.raises(PopeError, match=r"no absent category left .*sample more images .*stats_from='dataset'"):
        build_questions(ds, split, n_images=1, flavour=flavour, stats_from="sample")


def test_bad_split(toy):
    with pytest.raises(PopeError, match="unknown POPE split"):
        build_questions(toy, "hard", n_images=1)  # type: ignore[arg-type]


def test_bad_flavour_and_stats_from(toy):
    with pytest.raises(ValueError, match="flavour must be 'reference'"):
        build_questions(toy, "random", n_images=1, flavour="paper")
    with pytest.raises(PopeError, match="stats_from must be 'sample' or 'dataset'"):
        build_questions(toy, "random", n_images=1, stats_from="all")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- reference flavour
REF_DIR = Path(__file__).parent / "data" / "pope_reference"
REF_CONFIGS = json.loads((REF_DIR / "manifest.json").read_text())["configs"]
REF_KEYS = ("question_id", "image", "text", "label")


def as_reference_file(rows: list[dict]) -> str:
    """Our rows as the reference writes them: its four keys, json.dumps per line."""
    return "".join(json.dumps({k: r[k] for k in REF_KEYS}) + "\n" for r in rows)


def test_flavour_table():
    assert FLAVOURS_POPE == {"reference": {"stats_from": "sample"}, "corrected": {"stats_from": "dataset"}}


@pytest.mark.parametrize("split", ["random", "popular", "adversarial"])
@pytest.mark.parametrize("cfg", REF_CONFIGS, ids=[c["name"] for c in REF_CONFIGS])
def test_reference_flavour_equals_reference_code(cfg, split):
    """The question files AoiDragon/POPE's main.py wrote (bench/pope_reference.py), line for line.

    The only difference allowed is the reference's "imange" typo (template.replace("a", "an") also
    hits "image"), fixed in both flavours: it must occur exactly on the "an" lines.
    """
    ds = CocoDataset.load(REF_DIR / cfg["instances"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = build_questions(ds, split, n_images=cfg["n_images"], n_per_image=cfg["n_per_image"], seed=cfg["seed"])
    raw = (REF_DIR / f"{cfg['name']}_{split}.json").read_text()
    ref_lines, our_lines = raw.splitlines(), as_reference_file(rows).splitlines()
    assert len(our_lines) == len(ref_lines) == 2 * cfg["n_per_image"] * cfg["img_num"]
    typo = [i for i, line in enumerate(ref_lines) if " in the imange?" in line]
    assert typo == [i for i, r in enumerate(rows) if r["text"].startswith("Is there an ")]
    assert our_lines == [line.replace(" in the imange?", " in the image?") for line in ref_lines]
    # adversarial: every fixture has random fallbacks (drawn after the random split's draws)
    assert (len(caught) == 1) == (split == "adversarial")


def test_reference_fixture_discriminates():
    """The fixture pins the choices: the corrected flavour and whole-dataset statistics differ from it."""
    cfg = next(c for c in REF_CONFIGS if c["name"] == "skewed_s0_n20_k3")
    ds = CocoDataset.load(REF_DIR / cfg["instances"])
    ref = (REF_DIR / f"{cfg['name']}_popular.json").read_text().replace(" in the imange?", " in the image?")
    kw = dict(n_images=cfg["n_images"], n_per_image=cfg["n_per_image"], seed=cfg["seed"])
    assert as_reference_file(build_questions(ds, "popular", **kw)) == ref
    assert as_reference_file(build_questions(ds, "popular", stats_from="dataset", **kw)) != ref
    assert as_reference_file(build_questions(ds, "popular", flavour="corrected", **kw)) != ref
    # adversarial without first replaying the random split's draws would differ too
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adv = build_questions(ds, "adversarial", **kw)
    ref_adv = (REF_DIR / f"{cfg['name']}_adversarial.json").read_text().replace(" in the imange?", " in the image?")
    assert as_reference_file(adv) == ref_adv


def plain_reference(objects: dict[str, list[str]], order: list[str], split: str, k: int, rng: random.Random):
    """The reference's per-image loop re-stated from its description (utils.pope), for one split."""
    freq: dict[str, int] = {}
    co: dict[str, dict[str, int]] = {}
    for img in order:
        for o in objects[img]:
            freq[o] = freq.get(o, 0) + 1
            for x in objects[img]:
                if x != o:
                    co.setdefault(o, {})[x] = co.setdefault(o, {}).get(x, 0) + 1
    by_freq = sorted(freq, key=lambda o: -freq[o])  # sorted() is stable: ties keep first-seen order
    out = []
    for img in order:
        hist: list[str] = []
        for pos in objects[img][:k]:
            hist.append(pos)
            ok = [o for o in (by_freq if split == "popular" else sorted(co.get(pos, {}), key=lambda x: -co[pos][x]))
                  if o not in hist and o not in objects[img]]
            if split == "random" or not ok:
                neg = rng.choice(list(freq))
                while neg in hist or neg in objects[img]:
                    neg = rng.choice(list(freq))
            else:
                neg = ok[0]
            hist.append(neg)
            out.append((img, pos, neg))
    return out


def test_reference_flavour_toy_by_hand(toy):
    rows = build_questions(toy, "popular", n_images=4, seed=0)  # all 4 eligible images, shuffled
    order = list(by_image(rows))
    assert sorted(order) == [1, 2, 3, 5]
    for img, rs in by_image(rows).items():  # positives: the first 3 objects in annotation order
        assert [r["object"] for r in rs[::2]] == [CATS[c] for c in dict.fromkeys(IMAGES[img])][:3]
    # Statistics over the 4 sampled images only: person 3, car 3, bus 3, dog 1, umbrella 1, apple 1
    # (images 4 and 6 are not sampled). Image 1 (person, car, dog): bus first, then umbrella and
    # apple in the order they were first seen among the sampled images (image 3 has umbrella, 5 apple).
    first = ["umbrella", "apple"] if order.index(3) < order.index(5) else ["apple", "umbrella"]
    assert [r["object"] for r in by_image(rows)[1][1::2]] == ["bus"] + first
    # Whole-dataset statistics (stats_from="dataset"): apple 2 > umbrella 1, as in the corrected flavour.
    rows_ds = build_questions(toy, "popular", n_images=4, seed=0, stats_from="dataset")
    assert [r["object"] for r in by_image(rows_ds)[1][1::2]] == ["bus", "apple", "umbrella"]


@pytest.mark.parametrize("seed", [0, 1, 2, 5])
def test_reference_flavour_equals_plain_restatement(world, seed):
    """All three splits against the re-statement above, with the reference's one stream (random first)."""
    objects = {world.images[i].file_name: [world.categories[c] for c in world.category_ids(i)] for i in world.image_ids}
    eligible = [world.images[i].file_name for i in world.image_ids if len(world.category_ids(i)) >= 3]
    rng = random.Random(seed)
    order = rng.sample(eligible, 12)
    for split in ("random", "popular", "adversarial"):
        expect = plain_reference(objects, order, split, 3, rng)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rows = build_questions(world, split, n_images=12, seed=seed)
        got = [(p["image"], p["object"], n["object"]) for p, n in zip(rows[::2], rows[1::2])]
        assert got == expect, split


def test_reference_eligibility_follows_n_per_image():
    # reference: len(objects) >= sample_num; corrected: >= max(3, n_per_image)
    ds = CocoDataset.from_dicts(coco_dict(CATS, {1: [1, 2], 2: [3, 4], 3: [5, 6, 1]}))
    assert len(build_questions(ds, "popular", n_images=3, n_per_image=2)) == 3 * 4
    with pytest.raises(PopeError, match=r"only 1 image\(s\) have >= 3"):
        build_questions(ds, "popular", n_images=3, n_per_image=2, flavour="corrected")


# ----------------------------------------------------------------------------- answer prompts
def test_named_answer_prompts():
    assert POPE_PROMPTS["pope"] == ""
    # VCD experiments/eval/object_hallucination_vqa_llava.py and CausalMM llava-1.5/...: qs + this
    assert POPE_PROMPTS["vcd"] == " Please answer this question with one word."
    assert prompt_suffix("vcd") == " Please answer this question with one word."
    assert prompt_suffix("pope") == "" and prompt_suffix(None) == ""
    assert prompt_suffix(" Answer yes or no.") == " Answer yes or no."  # literal text passes through
    with pytest.raises(PopeError, match="must be a string"):
        prompt_suffix(3)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("text, pope, vcd_yes, vcd_no", [
    # (answer, pope parser, vcd on a yes-question, vcd on a no-question)
    ("No, there is not.", "no", "no", "no"),
    ("Yes, there is a knife. No other objects.", "yes", "yes", "no"),  # vcd: "no" in "no other"
    ("I don't know", "yes", "no", "no"),        # vcd: "know" contains "no"
    ("Not sure", "yes", "no", "no"),            # pope is case-sensitive: "Not" is not "not"
    ("Yes", "yes", "yes", "yes"),
    ("no.", "no", "no", "no"),
    ("NO", "yes", "no", "no"),
    ("There is a dog", "yes", "no", "yes"),     # vcd: neither word -> always wrong
    ("Yes, a snowboard.", "yes", "yes", "no"),  # vcd: "snowboard" contains "no"
    ("There is not a cat", "no", "no", "no"),
    ("", "yes", "no", "yes"),
])
def test_parsers(text, pope, vcd_yes, vcd_no):
    assert parse_answer(text, "pope") == pope
    assert parse_answer(text, "vcd", label="yes") == vcd_yes
    assert parse_answer(text, "vcd", label="no") == vcd_no
    assert parse_answer(text, "vcd") == vcd_yes  # label-free vcd = its rule for yes-questions


def test_unknown_parser():
    with pytest.raises(PopeError, match="unknown answer parser"):
        parse_answer("yes", "regex")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- metrics
QS = [{"question_id": i, "label": lab} for i, lab in enumerate(["yes", "no", "yes", "no", "yes", "no"], 1)]
ANS = ["Yes", "No", "No, there is not.", "Yes there is.", "yes", "I don't know"]


def test_metrics_pope_by_hand():
    m = score(QS, [{"question_id": i, "text": t} for i, t in enumerate(ANS, 1)], parser="pope")
    # preds: yes no no yes yes yes -> TP 2 (q1,q5), FP 2 (q4,q6), TN 1 (q2), FN 1 (q3)
    assert (m["tp"], m["fp"], m["tn"], m["fn"], m["n"]) == (2, 2, 1, 1, 6)
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["precision"] == pytest.approx(2 / 4)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(4 / 7)  # 2 * 1/2 * 2/3 / (1/2 + 2/3)
    assert m["yes_ratio"] == pytest.approx(4 / 6)


def test_metrics_vcd_by_hand():
    m = score(QS, {i: t for i, t in enumerate(ANS, 1)}, parser="vcd")
    # q6 "I don't know" on a no-question -> no (TN); q4 "Yes there is." has no "no" -> FP
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 2, 1)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(3 / 6)


def test_metrics_zero_denominators():
    m = score(QS[:2], {1: "no", 2: "no"})
    assert (m["precision"], m["recall"], m["f1"], m["yes_ratio"], m["accuracy"]) == (0.0, 0.0, 0.0, 0.0, 0.5)


def test_score_join_errors():
    with pytest.raises(PopeError, match=r"1 answer\(s\) refer to question ids not in .* \(first: 99\)"):
        score(QS, {**{i: "yes" for i in range(1, 7)}, 99: "yes"})
    with pytest.raises(PopeError, match=r"2 question\(s\) have no answer \(first id: 5\)"):
        score(QS, {i: "yes" for i in range(1, 5)})
    with pytest.raises(PopeError, match="more than once"):
        score(QS, [{"question_id": 1, "text": "yes"}, {"question_id": 1, "text": "no"}])


# ----------------------------------------------------------------------------- files
# Lines in the two layouts in circulation: the first RUCAIBox/POPE output/ files (0-based ids, with
# image_id; replaced in Aug 2023 by 1-based files without image_id) and the current files, which the
# LLaVA / VCD / CausalMM copies share (1-based ids, no image_id).
OFFICIAL_POPE = (
    '{"question_id": 0, "image": "COCO_val2014_000000000001.jpg", "image_id": 1, "text": "Is there a dog in the image?", "label": "yes"}\n'
    '{"question_id": 1, "image": "COCO_val2014_000000000001.jpg", "image_id": 1, "text": "Is there an oven in the image?", "label": "no"}\n'
)
OFFICIAL_VCD = (
    '{"question_id": 1, "image": "COCO_val2014_000000000002.jpg", "text": "Is there a skis in the image?", "label": "yes"}\n'
    "\n"
    '{"question_id": 2, "image": "COCO_val2014_000000000002.jpg", "text": "Is there a chair in the image?", "label": "no"}\n'
)


def test_read_official_files(tmp_path):
    (tmp_path / "coco_pope_adversarial.json").write_text(OFFICIAL_POPE)
    (tmp_path / "vcd.json").write_text(OFFICIAL_VCD)
    qs = read_questions(tmp_path / "coco_pope_adversarial.json")
    assert [q["question_id"] for q in qs] == [0, 1] and qs[1]["text"] == "Is there an oven in the image?"
    assert qs[0]["image_id"] == 1
    qs = read_questions(tmp_path / "vcd.json")  # blank line skipped
    assert [(q["question_id"], q["label"]) for q in qs] == [(1, "yes"), (2, "no")]
    assert score(qs, {1: "Yes", 2: "No"})["accuracy"] == 1.0


def test_read_ours_roundtrip(toy, tmp_path):
    # n_images=4: with the reference's sample statistics, 2 images leave too few absent objects
    rows = build_questions(toy, "popular", n_images=4, seed=0)
    assert read_questions(write_jsonl(rows, tmp_path / "q.jsonl")) == rows


def test_read_errors_name_line_and_key(tmp_path):
    p = tmp_path / "q.jsonl"
    p.write_text(OFFICIAL_VCD + '{"question_id": 3, "image": "x.jpg", "text": "Is there a cat?"}\n')
    with pytest.raises(PopeError, match=r"line 4: missing key 'label'"):
        read_questions(p)
    p.write_text(OFFICIAL_VCD + "{not json\n")
    with pytest.raises(PopeError, match=r"line 4: not valid JSON"):
        read_questions(p)
    p.write_text(OFFICIAL_VCD.replace('"label": "no"', '"label": "maybe"'))
    with pytest.raises(PopeError, match=r"line 3: label must be 'yes' or 'no'"):
        read_questions(p)
    with pytest.raises(PopeError, match="questions file not found"):
        read_questions(tmp_path / "missing.jsonl")
    a = tmp_path / "a.jsonl"
    a.write_text('{"question_id": 1, "answer": "Yes"}\n{"question_id": 2}\n')
    with pytest.raises(PopeError, match=r"line 2: missing key 'text'"):
        read_answers(a)


# ----------------------------------------------------------------------------- CLI
def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lens_halluc.pope", *args],
                          capture_output=True, text=True, timeout=60)


def test_cli_build_and_score(tmp_path):
    inst = tmp_path / "instances.json"
    inst.write_text(json.dumps(random_world()))
    q = tmp_path / "q.jsonl"
    r = cli("build", "--instances", str(inst), "--split", "adversarial", "--n-images", "10",
            "--seed", "0", "--out", str(q))
    assert r.returncode == 0, r.stderr
    qs = read_questions(q)
    assert len(qs) == 60 and "wrote 60 adversarial questions (reference flavour) for 10 images" in r.stdout
    # the CLI's default is the API's default (reference flavour), byte for byte
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        api = build_questions(CocoDataset.load(inst), "adversarial", n_images=10, seed=0)
    assert q.read_bytes() == write_jsonl(api, tmp_path / "api.jsonl").read_bytes()
    q2 = tmp_path / "q2.jsonl"
    r = cli("build", "--instances", str(inst), "--split", "popular", "--n-images", "10", "--flavour", "corrected",
            "--stats-from", "sample", "--out", str(q2))
    assert r.returncode == 0 and "(corrected flavour)" in r.stdout, r.stderr
    ds = CocoDataset.load(inst)
    assert read_questions(q2) == build_questions(ds, "popular", n_images=10, flavour="corrected", stats_from="sample")
    # Answer yes to everything -> recall 1, precision 0.5, yes_ratio 1.
    a = tmp_path / "a.jsonl"
    write_jsonl([{"question_id": x["question_id"], "text": "Yes, there is."} for x in qs], a)
    for parser in ("pope", "vcd"):
        r = cli("score", "--questions", str(q), "--answers", str(a), "--parser", parser)
        assert r.returncode == 0, r.stderr
        last = json.loads(r.stdout.strip().splitlines()[-1])
        assert set(last) == {"accuracy", "precision", "recall", "f1", "yes_ratio"}
        assert last["yes_ratio"] == 1.0 and last["recall"] == 1.0 and last["accuracy"] == 0.5


def test_cli_help():
    r = cli("--help")
    assert r.returncode == 0 and "build" in r.stdout and "score" in r.stdout
    r = cli("build", "--help")
    assert r.returncode == 0 and "--n-per-image" in r.stdout and "adversarial" in r.stdout
    assert "--flavour" in r.stdout and "--stats-from" in r.stdout


def test_cli_prompts():
    r = cli("prompts")
    assert r.returncode == 0 and json.loads(r.stdout) == POPE_PROMPTS
    r = cli("prompts", "--get", "vcd")
    assert r.returncode == 0 and r.stdout == " Please answer this question with one word."


def test_cli_bad_inputs(tmp_path):
    inst = tmp_path / "instances.json"
    inst.write_text(json.dumps(coco_dict(CATS, IMAGES)))
    r = cli("build", "--instances", str(tmp_path / "nope.json"), "--split", "random", "--out", str(tmp_path / "q.jsonl"))
    assert r.returncode == 1 and "instances file not found" in r.stderr and "Traceback" not in r.stderr
    r = cli("build", "--instances", str(inst), "--split", "hard", "--out", str(tmp_path / "q.jsonl"))
    assert r.returncode == 2 and "invalid choice" in r.stderr and "Traceback" not in r.stderr
    r = cli("build", "--instances", str(inst), "--split", "random", "--out", str(tmp_path / "q.jsonl"))
    assert r.returncode == 1 and "only 4 image(s)" in r.stderr and "Traceback" not in r.stderr
    q = tmp_path / "q.jsonl"
    q.write_text(OFFICIAL_VCD + "{broken\n")
    a = tmp_path / "a.jsonl"
    a.write_text('{"question_id": 1, "text": "Yes"}\n')
    r = cli("score", "--questions", str(q), "--answers", str(a))
    assert r.returncode == 1 and "line 4: not valid JSON" in r.stderr and "Traceback" not in r.stderr
    q.write_text(OFFICIAL_VCD)
    a.write_text('{"question_id": 1, "text": "Yes"}\n{"question_id": 7, "text": "No"}\n')
    r = cli("score", "--questions", str(q), "--answers", str(a))
    assert r.returncode == 1 and "first: 7" in r.stderr and "Traceback" not in r.stderr
    r = cli("score", "--questions", str(q), "--answers", str(tmp_path / "missing.jsonl"))
    assert r.returncode == 1 and "answers file not found" in r.stderr
