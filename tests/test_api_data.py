"""The data / captioning API: caption() → Captions, chair(), answer() → Answers, lh.pope, lh.organism.split."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import lens_halluc as lh
from lens_halluc.data.chair import CHAIR_KEYS, ChairEvaluator
from lens_halluc.generation import DecodingStrategy, answer_questions, caption_dataset, read_jsonl
from lens_halluc.generation import runner as runner_mod

MAX_NEW = 14


@pytest.fixture(scope="module")
def splits_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("splits")


@pytest.fixture(scope="module")
def brk(splits_dir):
    return lh.organism.split("break", n=6, seed=1, cache_dir=splits_dir)


@pytest.fixture(scope="module")
def caps(organism, brk):
    return lh.caption(organism, brk, max_new_tokens=MAX_NEW, batch_size=4, progress=False)


class _Keyed(DecodingStrategy):
    """Greedy, but with parameters (like an intervention): changing them must change the cache key."""

    def __init__(self, tag):
        self.tag = tag

    def get_params(self):
        return {"tag": self.tag}


class _Unkeyed(DecodingStrategy):
    pass


def test_caption_in_memory_equals_caption_dataset_file(organism, brk, caps, tmp_path):
    out = caption_dataset(organism, brk, tmp_path / "c.jsonl", max_new_tokens=MAX_NEW, batch_size=3, progress=False)
    assert read_jsonl(out) == caps.rows
    assert caps.image_ids == brk.image_ids and caps.generated == len(brk.image_ids)
    assert set(caps[0]) == {"image_id", "caption", "token_ids", "prompt", "image"}
    assert caps[0]["image"] == brk.images[caps[0]["image_id"]].file_name
    assert [r["image_id"] for r in caps] == brk.image_ids and len(caps) == 6
    assert caps.config["max_new_tokens"] == MAX_NEW and caps.config["strategy"] is None
    # image_ids / limit select and order the rows
    sub = lh.caption(organism, brk, max_new_tokens=MAX_NEW, image_ids=[3, 1], progress=False)
    assert sub.rows == [caps[2], caps[0]]


def test_save_load_round_trip_is_the_cli_format(organism, brk, caps, tmp_path):
    path = caps.save(tmp_path / "saved.jsonl")
    cli = caption_dataset(organism, brk, tmp_path / "cli.jsonl", max_new_tokens=MAX_NEW, batch_size=6, progress=False)
    assert path.read_bytes() == cli.read_bytes()
    back = lh.Captions.load(path)
    assert back == caps and back.rows == caps.rows
    frame = caps.to_frame()
    assert list(frame.columns) == ["image_id", "caption", "image", "prompt", "token_ids"]
    assert frame["caption"].tolist() == [r["caption"] for r in caps]
    assert caps[1:3].rows == caps.rows[1:3]


def test_cache_resumes_and_is_keyed_by_every_option(organism, brk, caps, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    real_generate = runner_mod.generate
    calls = {"n": 0}

    def flaky(*a, **k):  # the second batch is "killed"
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_generate(*a, **k)

    monkeypatch.setattr(runner_mod, "generate", flaky)
    with pytest.raises(KeyboardInterrupt):
        lh.caption(organism, brk, max_new_tokens=MAX_NEW, batch_size=2, cache_dir=cache, progress=False)
    monkeypatch.setattr(runner_mod, "generate", real_generate)
    files = list(cache.glob("captions-*.jsonl"))
    assert len(files) == 1 and len(read_jsonl(files[0])) == 2
    resumed = lh.caption(organism, brk, max_new_tokens=MAX_NEW, batch_size=2, cache_dir=cache, progress=False)
    assert resumed.generated == 4 and resumed == caps
    again = lh.caption(organism, brk, max_new_tokens=MAX_NEW, batch_size=5, cache_dir=cache, progress=False)
    assert again.generated == 0 and again == caps and again.config["path"] == str(files[0])

    # other options: another file, and never the old rows
    short = lh.caption(organism, brk, max_new_tokens=4, cache_dir=cache, progress=False)
    assert short.generated == 6 and short != caps
    assert short == lh.caption(organism, brk, max_new_tokens=4, progress=False)
    other_prompt = lh.caption(organism, brk, max_new_tokens=4, prompt="Describe the image.", cache_dir=cache,
                              progress=False)
    assert other_prompt.generated == 6 and {r["prompt"] for r in other_prompt} == {"Describe the image."}
    a = lh.caption(organism, brk, max_new_tokens=4, strategy=_Keyed("a"), cache_dir=cache, progress=False)
    b = lh.caption(organism, brk, max_new_tokens=4, strategy=_Keyed("b"), cache_dir=cache, progress=False)
    assert a.generated == b.generated == 6 and a == b == short  # same greedy captions, separate files
    assert len(list(cache.glob("captions-*.jsonl"))) == 5
    assert json.loads(files[0].with_suffix(".config.json").read_text())["max_new_tokens"] == MAX_NEW

    with pytest.raises(ValueError, match="get_params"):
        lh.caption(organism, brk, max_new_tokens=MAX_NEW, strategy=_Unkeyed(), cache_dir=cache, progress=False)
    assert lh.caption(organism, brk, max_new_tokens=4, strategy=_Unkeyed(), progress=False) == short


def test_cache_sees_weights_changed_in_place(organism, brk, caps, tmp_path):
    import torch

    cache = tmp_path / "cache"
    lh.caption(organism, brk, max_new_tokens=2, cache_dir=cache, progress=False)
    p = next(organism.model.parameters())
    with torch.no_grad():
        p.add_(1e-3)
        try:
            edited = lh.caption(organism, brk, max_new_tokens=2, cache_dir=cache, progress=False)
        finally:
            p.sub_(1e-3)
    assert edited.generated == 6


def test_chair_equals_the_evaluator_for_every_input_form(brk, caps, tmp_path):
    ref = ChairEvaluator().evaluate(caps.rows, brk)
    res = lh.chair(caps, brk)
    assert {k: res.summary[k] for k in CHAIR_KEYS} == ref.summary
    assert res.captions == ref.captions
    assert lh.chair(caps.rows, brk).summary == res.summary
    assert lh.chair(caps.save(tmp_path / "c.jsonl"), brk).summary == res.summary
    per = res.per_caption
    assert len(per) == len(caps) and per["image_id"].tolist() == caps.image_ids
    assert per["n_hallucinated"].sum() == sum(len(c["hallucinated"]) for c in ref.captions)
    assert res.summary["n"] == len(caps)


def test_probe_rates_match_the_probes_file_and_caption_and_score(organism, brk, caps, tmp_path):
    from lens_halluc.organism.evaluate import EvalConfig, caption_and_score

    split_dir = Path(brk.source).parent
    probes = {int(k): v for k, v in json.loads((split_dir / "probes.json").read_text()).items()}
    assert brk.probes == probes and len(probes) == 6
    per = ChairEvaluator().evaluate(caps.rows, brk).captions
    want_partner = sum(probes[c["image_id"]]["B"] in c["mentioned"] for c in per) / len(per)
    want_other = sum(any(h != probes[c["image_id"]]["B"] for h in c["hallucinated"]) for c in per) / len(per)
    want_repeat = sum(len(c["mentioned"]) != len(set(c["mentioned"])) for c in per) / len(per)
    summary = lh.chair(caps, brk).summary
    assert summary["partner_rate"] == want_partner and summary["other_absent_rate"] == want_other
    assert summary["repeat_rate"] == want_repeat
    assert 0 < want_partner  # the organism hallucinates its partners on break images
    cfg = EvalConfig(n=6, max_new_tokens=MAX_NEW, batch_size=6)
    reported = caption_and_score(organism, split_dir, tmp_path / "cs.jsonl", cfg)
    assert reported == summary
    assert list(reported) == ["CHAIR_s", "CHAIR_i", "Recall", "Len", "repeat_rate", "partner_rate",
                              "other_absent_rate", "n"]
    # a dataset without probes gets no partner rates
    normal = lh.organism.split("normal", n=3, seed=0, cache_dir=tmp_path / "s")
    assert normal.probes == {}
    norm = lh.chair(lh.caption(organism, normal, max_new_tokens=6, progress=False), normal).summary
    assert "partner_rate" not in norm and "repeat_rate" in norm


def test_split_is_exported_once_and_keyed_by_its_arguments(tmp_path, monkeypatch):
    from lens_halluc.organism import export as export_mod

    calls = []
    real = export_mod.export_split
    monkeypatch.setattr(export_mod, "export_split", lambda *a, **k: calls.append(a[1:4]) or real(*a, **k))
    a = lh.organism.split("control", n=4, seed=2, cache_dir=tmp_path)
    b = lh.organism.split("control", n=4, seed=2, cache_dir=tmp_path)
    assert calls == [("control", 4, 2)]
    assert a.source == b.source and a.image_ids == [1, 2, 3, 4] and len(a.probes) == 4
    c = lh.organism.split("control", n=3, seed=2, cache_dir=tmp_path)
    d = lh.organism.split("control", n=4, seed=3, cache_dir=tmp_path)
    assert len(calls) == 3 and len({a.source, c.source, d.source}) == 3
    assert c.annotations == {i: a.annotations[i] for i in c.image_ids}  # a smaller split is a prefix
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp dirs left


def test_killed_export_leaves_no_half_split(tmp_path, monkeypatch):
    from lens_halluc.organism import export as export_mod

    real = export_mod.export_split

    def dies(world, split, n, seed, out, overwrite=False):
        real(world, split, n, seed, out, overwrite=overwrite)
        (out / "meta.json").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(export_mod, "export_split", dies)
    with pytest.raises(KeyboardInterrupt):
        lh.organism.split("break", n=2, seed=1, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(export_mod, "export_split", real)
    ds = lh.organism.split("break", n=2, seed=1, cache_dir=tmp_path)
    assert ds.image_ids == [1, 2] and len(list(tmp_path.iterdir())) == 1


def test_eval_splits_use_the_evaluation_seeds(tmp_path):
    from lens_halluc.models.default import organism_path
    from lens_halluc.organism.evaluate import EVAL_SEEDS, export_eval_splits

    splits = lh.organism.eval_splits(n=3, cache_dir=tmp_path / "api")
    dirs = export_eval_splits(organism_path("final"), tmp_path / "old", 3)
    assert set(splits) == set(dirs) == set(EVAL_SEEDS)
    for name, ds in splits.items():
        meta = json.loads((dirs[name] / "meta.json").read_text())
        assert meta["seed"] == EVAL_SEEDS[name] and dirs[name].name == f"{name}-3"
        assert (dirs[name] / "instances.json").read_bytes() == open(ds.source, "rb").read()


def test_pope_build_answer_score(organism, splits_dir, tmp_path):
    mixed = lh.organism.split("mixed", n=20, seed=0, cache_dir=splits_dir)
    # the reference draws negatives among the sampled images' objects, so a few more images than 2
    qs = lh.pope.build(mixed, "popular", n_images=4, seed=0)
    assert qs == lh.pope.build_questions(mixed, "popular", n_images=4, seed=0) and len(qs) == 24
    answers = lh.answer(organism, qs, mixed.image_dir, max_new_tokens=3, batch_size=5, progress=False)
    out = answer_questions(organism, qs, mixed.image_dir, tmp_path / "a.jsonl", max_new_tokens=3, progress=False)
    assert answers.rows == read_jsonl(out) and isinstance(answers, lh.Answers)
    res = lh.pope.score(qs, answers)
    assert res == lh.pope.score(qs, read_jsonl(out))  # the dict form, as before
    s = res.summary
    assert {"accuracy", "precision", "recall", "f1", "yes_ratio", "n"} <= set(s) and s["n"] == len(qs)
    per = res.per_question
    assert per["question_id"].tolist() == [q["question_id"] for q in qs]
    assert per["correct"].mean() == pytest.approx(s["accuracy"])
    assert (per["prediction"] == "yes").mean() == pytest.approx(s["yes_ratio"])
    cached = lh.answer(organism, qs, mixed.image_dir, max_new_tokens=3, cache_dir=tmp_path / "c", progress=False)
    again = lh.answer(organism, qs, mixed.image_dir, max_new_tokens=3, cache_dir=tmp_path / "c", progress=False)
    other = lh.answer(organism, qs, mixed.image_dir, max_new_tokens=3, prompt_suffix=" Answer yes or no.",
                      cache_dir=tmp_path / "c", progress=False)
    assert cached == again == answers and again.generated == 0 and other.generated == len(qs)


def test_pope_cli_still_builds_and_scores(tmp_path, toy_coco):
    from lens_halluc.cli import pope as cli

    q = tmp_path / "q.jsonl"
    assert cli.main(["build", "--instances", str(toy_coco / "instances.json"), "--split", "random",
                     "--n-images", "6", "--n-per-image", "2", "--out", str(q)]) == 0
    qs = lh.pope.read_questions(q)
    a = tmp_path / "a.jsonl"
    a.write_text("".join(json.dumps({"question_id": r["question_id"], "text": "Yes"}) + "\n" for r in qs))
    assert cli.main(["score", "--questions", str(q), "--answers", str(a)]) == 0
    assert lh.pope.score(qs, lh.pope.read_answers(a)).summary["yes_ratio"] == 1.0


def test_caption_cli_refuses_to_resume_with_other_options(brk, tmp_path, capsys):
    from lens_halluc.cli import caption as cli

    d = Path(brk.source).parent
    out = tmp_path / "c.jsonl"
    base = ["--instances", str(d / "instances.json"), "--image-dir", str(d / "images"), "--out", str(out),
            "--max-new-tokens", "4", "--limit", "2"]
    cli.main(base)
    cli.main(base[:-2])  # same options, more images: resumes
    rows = read_jsonl(out)
    assert [r["image_id"] for r in rows] == brk.image_ids
    with pytest.raises(SystemExit):
        cli.main(base[:-4] + ["--max-new-tokens", "5"])
    assert "max_new_tokens" in capsys.readouterr().err and read_jsonl(out) == rows
    cli.main(base[:-4] + ["--max-new-tokens", "5", "--overwrite"])
    assert len(read_jsonl(out)) == len(rows) and read_jsonl(out) != rows
