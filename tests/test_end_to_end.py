"""A tiny random LLaVA end to end through the command lines: caption → CHAIR; questions → answers → POPE."""
from __future__ import annotations

import json
import subprocess
import sys


def _run(*args):
    r = subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_caption_then_chair(tiny_llava_dir, toy_coco, tmp_path):
    caps = tmp_path / "captions.jsonl"
    _run("lens_halluc.caption", "--model", tiny_llava_dir, "--instances", toy_coco / "instances.json",
         "--image-dir", toy_coco / "images", "--out", caps, "--max-new-tokens", "12")
    out = tmp_path / "chair.json"
    last = _run("lens_halluc.chair", "--captions", caps, "--instances", toy_coco / "instances.json",
                "--references", toy_coco / "captions.json", "--out", out).strip().splitlines()[-1]
    summary = json.loads(last)
    assert set(summary) == {"CHAIR_s", "CHAIR_i", "Recall", "Len"}
    detail = json.loads(out.read_text())
    assert len(detail["captions"]) == 6 and detail["summary"] == summary


def test_questions_answers_pope(tiny_llava_dir, toy_coco, tmp_path):
    q = tmp_path / "q.jsonl"
    _run("lens_halluc.pope", "build", "--instances", toy_coco / "instances.json", "--split", "popular",
         "--n-images", "4", "--n-per-image", "2", "--seed", "0", "--out", q)
    a = tmp_path / "a.jsonl"
    _run("lens_halluc.answer", "--model", tiny_llava_dir, "--questions", q, "--image-dir", toy_coco / "images",
         "--out", a, "--max-new-tokens", "3")
    assert len(a.read_text().splitlines()) == len(q.read_text().splitlines()) == 16
    last = _run("lens_halluc.pope", "score", "--questions", q, "--answers", a).strip().splitlines()[-1]
    metrics = json.loads(last)
    assert set(metrics) == {"accuracy", "precision", "recall", "f1", "yes_ratio"}
    assert 0.0 <= metrics["accuracy"] <= 1.0
