"""HALC: its fields of view are the reference's, its pair choice and contrast are the reference's formulas,
it is deterministic with a fixed detector, it is greedy when it never acts, and it runs end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lens_halluc.generation.decoding import greedy_decode
from lens_halluc.interventions.halc import (
    HALC, fov_boxes, fov_pixel_boxes, halc_contrast, halc_divergence, pick_pair,
)
from lens_halluc.models.detectors import FixedDetector, FixedScorer

PROMPTS = ["Please describe this image in detail.", "is there a cat ?", "describe the image ."]
N_NEW = 12
BOX = ((8, 8, 24, 24), 0.9)


@pytest.fixture(scope="module")
def vlm(tiny_llava_dir):
    from lens_halluc.models import load_vlm

    return load_vlm(tiny_llava_dir)


@pytest.fixture(scope="module")
def enc(vlm):
    rng = np.random.default_rng(0)
    ims = [Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)) for _ in PROMPTS]
    return vlm.encode(ims, PROMPTS)


def _run(vlm, enc, halc):
    strategy = halc.bind(vlm)
    out = greedy_decode(vlm.model, enc, max_new_tokens=N_NEW, strategy=strategy).sequences
    return out, strategy


# --------------------------------------------------------------- plain re-statements of the reference
def _reference_fovs(bbox, context_window, expand_ratio):
    """context_density_embedding: expand_bbox(b, f) moves each side by f*w/2, clipped to [0, 1]."""
    def expand(b, f):
        w, h = b[2] - b[0], b[3] - b[1]
        return [max(0, b[0] - w * f / 2), max(0, b[1] - h * f / 2), min(1, b[2] + w * f / 2), min(1, b[3] + h * f / 2)]
    if context_window == 1:
        return [list(bbox)]
    boxes = [expand(bbox, -0.8 if expand_ratio > 0.8 else -expand_ratio), list(bbox)]
    for _ in range(1, context_window - 1):
        boxes.append(expand(boxes[-1], expand_ratio))
    return boxes


@pytest.mark.parametrize("box,cw,r", [((0.4, 0.4, 0.6, 0.6), 4, 0.6), ((0.1, 0.5, 0.5, 0.95), 4, 0.15),
                                       ((0.0, 0.0, 0.9, 0.9), 5, 1.0), ((0.2, 0.2, 0.3, 0.3), 1, 0.6)])
def test_fov_boxes_equal_reference_restatement(box, cw, r):
    got = fov_boxes(box, cw, r)
    want = _reference_fovs(box, cw, r)
    assert len(got) == cw
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=0, atol=1e-12)
    sizes = [(b[2] - b[0]) * (b[3] - b[1]) for b in got]
    assert sizes == sorted(sizes)  # smallest first, growing


def test_divergence_is_the_references_kl_div_expression():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 50, generator=g) * 3, torch.randn(1, 50, generator=g) * 3
    m = 0.5 * (F.softmax(a, -1) + F.softmax(b, -1))
    ref = 0.5 * (F.kl_div(F.log_softmax(a, -1), m, reduction="batchmean")
                 + F.kl_div(F.log_softmax(b, -1), m, reduction="batchmean"))
    assert halc_divergence(a, b, "reference") == pytest.approx(float(ref), rel=1e-5)
    pa, pb, mm = (F.softmax(a, -1).double().numpy(), F.softmax(b, -1).double().numpy(), m.double().numpy())
    jsd = 0.5 * ((pa * np.log(pa / mm)).sum() + (pb * np.log(pb / mm)).sum())
    assert halc_divergence(a, b, "corrected") == pytest.approx(float(jsd), rel=1e-5)
    assert abs(float(ref) - jsd) > 1e-4  # the two flavours really differ


def test_pick_pair_and_contrast_by_hand():
    v = 6
    same = torch.zeros(v)
    far = torch.tensor([8.0, 0, 0, 0, 0, 0])
    mid = torch.tensor([2.0, 0, 0, 0, 0, 0])
    assert pick_pair([same, mid, far], "reference") == (0, 2)
    assert pick_pair([mid, same, mid, far], "corrected") == (1, 3)
    base, final = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, -2000.0, 1.0])
    got = halc_contrast(base, final, 0.05)
    assert torch.allclose(got, torch.tensor([0.5 - 0.05, -2000.0 + 0.05 * 1e3, 1.0 - 0.15]))


# --------------------------------------------------------------- on the tiny model
def test_crops_are_the_boxes_fields_of_view(vlm, enc):
    strategy = HALC(detector=FixedDetector([BOX])).bind(vlm)
    strategy.begin(dict(enc))
    image = strategy._images[0]
    assert image.size == (48, 48)
    norm = [v / 48 for v in BOX[0]]
    px, crops = strategy.crops(0, norm)
    want = [tuple(int(round(c * 48)) for c in b) for b in _reference_fovs(norm, 4, 0.6)]
    assert px == want == fov_pixel_boxes(fov_boxes(norm), 48, 48)
    assert px[1] == BOX[0]  # the detected box itself is the second field of view
    for b, c in zip(px, crops):
        assert c.size == (b[2] - b[0], b[3] - b[1])
        assert np.array_equal(np.asarray(c), np.asarray(image)[b[1]:b[3], b[0]:b[2]])
    # the de-normalised image is the one the model saw
    again = vlm.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    assert torch.allclose(again, enc["pixel_values"][:1].float().cpu(), atol=1 / 127)


def test_halc_is_deterministic_and_acts(vlm, enc):
    a, sa = _run(vlm, enc, HALC(detector=FixedDetector([BOX]), skip_rate=0.0))
    b, sb = _run(vlm, enc, HALC(detector=FixedDetector([BOX]), skip_rate=0.0))
    assert torch.equal(a, b)
    assert json.dumps(sa.log) == json.dumps(sb.log)
    acted = [e for e in sa.log if e["status"] == "activated"]
    assert acted, "the tiny model's captions contain object words; HALC must act on some"
    # every activation: the token chosen is the argmax of the contrast between the chosen FOVs
    for e in acted:
        assert e["fovs"][1] == list(BOX[0]) and e["pair"][0] < e["pair"][1]
        assert int(a[e["row"], e["step"]]) == e["new_token"]
    greedy = greedy_decode(vlm.model, enc, max_new_tokens=N_NEW).sequences
    assert not torch.equal(a, greedy)


def test_halc_that_never_acts_is_greedy(vlm, enc):
    greedy = greedy_decode(vlm.model, enc, max_new_tokens=N_NEW).sequences
    skip_all, s1 = _run(vlm, enc, HALC(detector=FixedDetector([BOX]), skip_rate=1.0))
    assert torch.equal(skip_all, greedy) and s1.log and all(e["status"] == "skipped" for e in s1.log)
    too_many = FixedDetector([BOX] * 4)  # more than max_handle_box = 3 boxes: "invalid", left alone
    out, s2 = _run(vlm, enc, HALC(detector=too_many, skip_rate=0.0))
    assert torch.equal(out, greedy) and s2.log and all(e["status"] == "invalid" for e in s2.log)


def test_params_errors_and_flavours(vlm):
    h = HALC(detector=FixedDetector([BOX]))
    params = h.get_params()
    json.dumps(params)
    assert params["detector"] == {"kind": "fixed", "boxes": [[[8.0, 8.0, 24.0, 24.0], 0.9]]}
    assert (params["contrast_weight"], params["context_window"], params["expand_ratio"], params["skip_rate"]) \
        == (0.05, 4, 0.6, 0.3)
    assert HALC(flavour="corrected").skip_rate == 0.0
    rebuilt = HALC(**params)
    assert rebuilt.get_params() == params
    with pytest.raises(ValueError, match="needs a detector"):
        rebuilt.bind(vlm)
    assert rebuilt.bind(vlm, detector=FixedDetector([BOX])).detector is not None
    with pytest.raises(ValueError, match="needs a detector"):
        HALC().bind(vlm)
    with pytest.raises(ValueError, match="even"):
        HALC(k_candidate_num=3)


# --------------------------------------------------------------- the visual-matching beam search
def test_beam_search_only_through_beam_decode(vlm, enc):
    strategy = HALC(detector=FixedDetector([BOX]), beam_search=True).bind(vlm)
    with pytest.raises(NotImplementedError, match="beam_decode"):
        greedy_decode(vlm.model, enc, max_new_tokens=4, strategy=strategy)
    with pytest.raises(ValueError, match="scorer"):
        strategy.beam_decode(enc, 4)


def test_beam_search_that_never_grounds_is_greedy(vlm, enc):
    greedy = greedy_decode(vlm.model, enc, max_new_tokens=N_NEW).sequences
    scorer = FixedScorer(lambda t: len(t))
    strategy = HALC(detector=FixedDetector([BOX] * 4), skip_rate=0.0, beam_search=True, scorer=scorer).bind(vlm)
    got = strategy.beam_decode(enc, N_NEW)
    assert [list(map(int, r)) for r in greedy] == got
    assert scorer.calls == []  # never grounded: the reference's seeded random.sample picks the beams


def test_beam_search_picks_the_best_scored_distinct_texts(vlm, enc):
    def score(text):  # prefer texts with many distinct words, then shorter ones (any fixed rule would do)
        return len(set(text.split())) - 0.01 * len(text)

    runs = []
    for _ in range(2):
        scorer = FixedScorer(score)
        strategy = HALC(detector=FixedDetector([BOX]), skip_rate=0.0, beam_search=True, scorer=scorer).bind(vlm)
        one = {k: v[2:3] for k, v in enc.items()}  # one row (calls of several rows would interleave)
        runs.append((strategy.beam_decode(one, N_NEW), scorer.calls, strategy.log))
    (out, calls, log), (out2, calls2, log2) = runs
    assert out == out2 and calls == calls2 and json.dumps(log) == json.dumps(log2)
    grounded = [e for e in log if e.get("candidates")]
    assert grounded and calls, "the tiny model's captions contain object words; the beam search must ground some"
    for e in grounded:
        assert len(e["candidates"]) == 4
    # plain re-statement of clip_score_selection: softmax, best first (stable), distinct texts, pad with the best
    compared = 0
    for before, after in zip(calls, calls[1:]):
        if len(after) != len(before):
            continue
        probs = torch.softmax(torch.tensor([score(t) for t in before], dtype=torch.float64), 0)
        order = sorted(range(len(before)), key=lambda n: -float(probs[n]))
        chosen = []
        for n in order:
            if before[n] not in chosen:
                chosen.append(before[n])
            if len(chosen) == 3:
                break
        chosen += [chosen[0]] * (3 - len(chosen))
        for b in range(3):  # beam b continues the b-th best distinct text
            assert all(t.startswith(chosen[b]) for t in after[4 * b:4 * b + 4]), (b, chosen, after)
        compared += 1
    assert compared >= 3
    assert len({t for c in calls for t in c}) > 4  # the candidates really differed


# --------------------------------------------------------------- the organism's own detector
@pytest.fixture(scope="module")
def organism_world(organism):
    from lens_halluc.organism import _world

    return _world(organism)


@pytest.fixture(scope="module")
def organism_detector(organism_world):
    from lens_halluc.organism.detector import train_detector

    return train_detector(organism_world, seed=0)


def test_organism_detector_is_learned_seeded_and_accurate(organism_world, organism_detector):
    from lens_halluc.organism.detector import evaluate_detector, train_detector

    again = train_detector(organism_world, seed=0)
    assert torch.equal(again.weight, organism_detector.weight)
    other = train_detector(organism_world, seed=1)
    assert not torch.equal(other.weight, organism_detector.weight)
    scores = evaluate_detector(organism_detector, n_scenes=100, seed=12345)  # scenes it never saw
    assert scores["cell_accuracy"] >= 0.98 and scores["precision"] >= 0.95 and scores["recall"] >= 0.95, scores
    # pixels only: a hidden (annotated, not drawn) object is not found; a drawn one is, in its cell
    rng = np.random.default_rng(3)
    for _ in range(200):
        scene = organism_world.sample_scene(rng, "normal")
        if scene.hidden:
            break
    else:
        pytest.skip("no scene with a hidden object sampled")
    image = organism_world.render(scene)
    assert organism_detector.detect(image, scene.hidden[0].name) == []
    drawn = next(o for o in scene.objects if o.drawn)
    x, y, w, h = drawn.bbox
    boxes = [b for b, _ in organism_detector.detect(image, drawn.name)]
    assert (float(x), float(y), float(x + w), float(y + h)) in boxes
    assert organism_detector.detect(image, "zebra-that-is-not-a-category") == []


def test_halc_on_the_organism_end_to_end(organism, organism_world, organism_detector):
    rng = np.random.default_rng(7)
    scenes = [organism_world.sample_scene(rng, "break") for _ in range(2)]
    enc = organism.encode([organism_world.render(s) for s in scenes], ["Please describe this image in detail."] * 2)
    eos = organism.spec.eos_token_ids
    greedy = greedy_decode(organism.model, enc, 16, eos_token_ids=eos).sequences
    strategy = HALC(detector=organism_detector, flavour="corrected").bind(organism)
    out = greedy_decode(organism.model, enc, 16, strategy=strategy, eos_token_ids=eos).sequences
    acted = [e for e in strategy.log if e["status"] == "activated"]
    assert acted and all(int(out[e["row"], e["step"]]) == e["new_token"] for e in acted)
    names = {o.name for s in scenes for o in s.objects}
    assert all(e["word"] in organism_world.names for e in strategy.log)
    assert {e["word"] for e in acted} & names  # it grounds words of objects that are there
    skip = HALC(detector=organism_detector, skip_rate=1.0).bind(organism)
    assert torch.equal(greedy_decode(organism.model, enc, 16, strategy=skip, eos_token_ids=eos).sequences, greedy)
