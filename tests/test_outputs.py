"""Outputs we own (marker, --overwrite, locks, atomic parts) and honest resumes (kill -9, other options)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lens_halluc.data.outputs import (LOCK, MARKER, OutputError, OutputLock, check_results_file, output_dir,
                                      read_marker)
from lens_halluc.organism.shipped import SHIPPED_DIR

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1")
shipped = pytest.mark.skipif(not (SHIPPED_DIR / "base" / "config.json").is_file(),
                             reason="no organism shipped in this checkout")


def _cli(module: str, *argv, cwd=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"lens_halluc.{module}", *map(str, argv)], capture_output=True,
                          text=True, env=ENV, cwd=cwd or ROOT, timeout=timeout)


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _foreign(d: Path) -> dict[str, bytes]:
    d.mkdir(parents=True, exist_ok=True)
    (d / "notes.txt").write_text("my notes\n")
    (d / "data").mkdir()
    (d / "data" / "table.csv").write_text("a,b\n1,2\n")
    return _snapshot(d)


# ------------------------------------------------------------------------------ outputs we own
def test_overwrite_on_a_directory_we_did_not_create_keeps_its_files(tmp_path):
    d = tmp_path / "mine"
    before = _foreign(d)
    r = _cli("attribute", "--out", d, "--overwrite", "--n-images", "4", "--no-progress")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert str(d) in r.stderr and "not written by lens_halluc" in r.stderr and "new or empty directory" in r.stderr
    assert _snapshot(d) == before and not (d / MARKER).exists() and not (d / LOCK).exists()


def test_out_dot_overwrite_is_refused_and_the_working_directory_kept(tmp_path):
    before = _foreign(tmp_path / "cwd")
    r = _cli("attribute", "--out", ".", "--overwrite", "--n-images", "4", "--no-progress", cwd=tmp_path / "cwd")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "--out . is not empty" in r.stderr
    assert _snapshot(tmp_path / "cwd") == before


@pytest.mark.parametrize("module,argv", [
    ("intervene", ["--method", "greedy"]),
    ("retrain", ["--method", "seed"]),
    ("analysis", ["bias", "--attribution", "nowhere"]),
])
def test_every_directory_command_refuses_a_foreign_directory(tmp_path, module, argv):
    d = tmp_path / "mine"
    before = _foreign(d)
    args = [*argv, "--out", str(d)] if module != "analysis" else [argv[0], "--out", str(d), *argv[1:]]
    r = _cli(module, *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "not written by lens_halluc" in r.stderr, r.stderr
    assert _snapshot(d) == before


def test_overwrite_removes_only_what_we_wrote(tmp_path):
    d = tmp_path / "run"
    with output_dir(d, "attribute") as out:
        (out / "scores.csv").write_text("1\n")
        (out / "parts").mkdir()
        (out / "parts" / "000000.npz").write_bytes(b"x")
    with output_dir(d, "analysis-bias") as out:  # another command's files in the same directory
        (out / "bias.csv").write_text("2\n")
    (d / "user.txt").write_text("put here by hand\n")  # and a file of the user's
    assert read_marker(d)["commands"]["attribute"]["files"] == ["parts", "scores.csv"]
    with output_dir(d, "attribute", overwrite=True):
        assert not (d / "scores.csv").exists() and not (d / "parts").exists()
    assert (d / "bias.csv").read_text() == "2\n" and (d / "user.txt").read_text() == "put here by hand\n"
    marker = read_marker(d)
    assert marker["written_by"] == "lens_halluc" and marker["version"]
    assert marker["commands"]["attribute"]["files"] == [] and marker["commands"]["analysis-bias"]["files"] == ["bias.csv"]


def test_a_file_as_out_directory_is_refused(tmp_path):
    f = tmp_path / "results.json"
    f.write_text("{}")
    with pytest.raises(OutputError, match="is a file, not a directory"):
        with output_dir(f, "attribute"):
            pass
    assert f.read_text() == "{}"


def test_a_run_made_with_other_options_is_refused(tmp_path):
    d = tmp_path / "run"
    with output_dir(d, "attribute", options={"metric": "prob_diff", "scope": "local"}):
        (d / "scores.csv").write_text("old\n")
    with pytest.raises(OutputError) as e:
        with output_dir(d, "attribute", options={"metric": "log_prob_diff", "scope": "local"}):
            pass
    msg = str(e.value)
    assert "holds a attribute run with metric=prob_diff" in msg and "use a new --out or --overwrite" in msg
    assert "scope" not in msg and (d / "scores.csv").read_text() == "old\n"
    with output_dir(d, "attribute", options={"metric": "log_prob_diff", "scope": "local"}, overwrite=True):
        assert not (d / "scores.csv").exists()
    assert read_marker(d)["commands"]["attribute"]["options"]["metric"] == "log_prob_diff"


def test_retrain_rerun_with_other_steps_is_refused_not_returned(tmp_path):
    from lens_halluc.cli import retrain

    out = tmp_path / "ckpt"
    first = retrain.build_parser().parse_args(["--method", "seed", "--out", str(out), "--steps", "150"])
    with output_dir(out, "retrain", options=retrain._options(first)):
        (out / "training.json").write_text(json.dumps({"method": "seed"}))
    r = _cli("retrain", "--method", "seed", "--out", out, "--steps", "300")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "steps=150" in r.stderr and "steps=300" in r.stderr and "use a new --out or --overwrite" in r.stderr


def test_a_directory_written_without_a_marker_by_the_api_is_adopted(tmp_path):
    d = tmp_path / "attr"
    d.mkdir()
    for name in ("manifest.json", "head_scores.csv", "captions.rank0.jsonl"):
        (d / name).write_text("x\n")
    with output_dir(d, "attribute", adopt=("manifest.json", "head_scores.csv", "captions.rank*.jsonl*")):
        pass
    assert read_marker(d)["commands"]["attribute"]["files"] == ["captions.rank0.jsonl", "head_scores.csv",
                                                               "manifest.json"]
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "manifest.json").write_text("x\n")
    (tmp_path / "mixed" / "thesis.tex").write_text("mine\n")
    with pytest.raises(OutputError, match="thesis.tex"):
        with output_dir(tmp_path / "mixed", "attribute", adopt=("manifest.json",)):
            pass


# ------------------------------------------------------------------------------ results files
JSON_DUMP = '{"images": [1, 2], "note": "written by json.dump"}'  # one line, no final newline


@pytest.mark.parametrize("overwrite", [False, True])
def test_caption_out_on_a_foreign_file_refuses_and_leaves_it_byte_identical(tiny_llava_dir, toy_coco, tmp_path,
                                                                            overwrite):
    out = tmp_path / "results.json"
    out.write_text(JSON_DUMP)
    r = _cli("caption", "--model", tiny_llava_dir, "--instances", toy_coco / "instances.json", "--image-dir",
             toy_coco / "images", "--out", out, "--max-new-tokens", "4", *(["--overwrite"] if overwrite else []))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert str(out) in r.stderr and "is not a lens_halluc captions file" in r.stderr and "left as it is" in r.stderr
    assert out.read_text() == JSON_DUMP and not (tmp_path / "results.json.config.json").exists()


def test_answer_out_on_a_foreign_file_refuses_and_leaves_it_byte_identical(tiny_llava_dir, toy_coco, tmp_path):
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"question_id": 1, "image": "000001.png", "text": "Is there a dog?", "label": "yes"}) + "\n")
    out = tmp_path / "answers.jsonl"
    out.write_text(JSON_DUMP)
    r = _cli("answer", "--model", tiny_llava_dir, "--questions", q, "--image-dir", toy_coco / "images", "--out", out)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "not a lens_halluc answers file" in r.stderr
    assert out.read_text() == JSON_DUMP


def test_captions_config_of_another_kind_is_not_ours(tmp_path):
    out = tmp_path / "c.jsonl"
    out.write_text('{"question_id": 1, "text": "yes"}\n')
    (tmp_path / "c.jsonl.config.json").write_text(json.dumps({"kind": "answers"}))
    with pytest.raises(OutputError, match="describes answers"):
        check_results_file(out, "captions")


def test_resumable_jsonl_drops_a_torn_row_keeps_a_complete_one_and_refuses_foreign_json(tmp_path):
    from lens_halluc.generation.jsonl import ResumableJsonl

    torn = tmp_path / "torn.jsonl"
    torn.write_text('{"image_id": 1, "caption": "a"}\n{"image_id": 2, "capt')
    assert ResumableJsonl(torn, "image_id").done == {1}
    assert torn.read_text() == '{"image_id": 1, "caption": "a"}\n'
    whole = tmp_path / "whole.jsonl"
    whole.write_text('{"image_id": 1, "caption": "a"}\n{"image_id": 2, "caption": "b"}')  # only the newline lost
    assert ResumableJsonl(whole, "image_id").done == {1, 2}
    assert whole.read_text().endswith('"b"}\n')
    foreign = tmp_path / "foreign.json"
    foreign.write_text(JSON_DUMP)
    with pytest.raises(ValueError, match="left as it is"):
        ResumableJsonl(foreign, "image_id")
    assert foreign.read_text() == JSON_DUMP


def test_read_jsonl_names_a_cut_short_last_line(tmp_path):
    from lens_halluc.data.coco import DataError
    from lens_halluc.data.jsonl import read_jsonl

    p = tmp_path / "c.jsonl"
    p.write_text('{"image_id": 1}\n{"image_id": 2, "ca')
    with pytest.raises(DataError, match=r"line 2 is cut short .*rerun the command"):
        read_jsonl(p, "captions")
    assert read_jsonl(p, torn_tail=True) == [{"image_id": 1}]


def test_torn_results_jsonl_never_breaks_later_intervene_runs(tmp_path):
    from lens_halluc.cli.intervene import append_row, read_rows

    row = {"method": "greedy", "options": "{}", "heads": "", "control": "none", "draw": None, "model": "m", "n": 8,
           "max_new_tokens": 12, "data": "d1", "sec_per_caption": 0.1}
    append_row(tmp_path, row)
    with open(tmp_path / "results.jsonl", "a") as f:
        f.write('{"method": "adhh", "opt')  # killed while appending
    append_row(tmp_path, dict(row, method="vcd"))
    append_row(tmp_path, dict(row, method="dola"))
    assert [r["method"] for r in read_rows(tmp_path)] == ["greedy", "vcd", "dola"]
    assert all(json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines())


# ------------------------------------------------------------------------------ locks
_HOLD = """
import sys, time
from lens_halluc.data.outputs import output_dir
with output_dir(sys.argv[1], "attribute"):
    open(sys.argv[2], "w").close()
    time.sleep(600)
"""


def _holder(d: Path, tmp_path: Path) -> subprocess.Popen:
    ready = tmp_path / "ready"
    p = subprocess.Popen([sys.executable, "-c", _HOLD, str(d), str(ready)], env=ENV)
    for _ in range(600):
        if ready.exists():
            return p
        time.sleep(0.05)
    p.kill()
    raise AssertionError("the lock holder did not start")


def test_a_second_writer_on_one_out_is_refused_with_the_holders_pid(tmp_path):
    d = tmp_path / "run"
    p = _holder(d, tmp_path)
    try:
        r = _cli("attribute", "--out", d, "--n-images", "4", "--no-progress")
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert f"another lens_halluc process (pid {p.pid}) is writing {d}" in r.stderr
        r = _cli("intervene", "--method", "greedy", "--out", d)
        assert r.returncode == 2 and f"(pid {p.pid})" in r.stderr
    finally:
        p.kill()
        p.wait()


def test_the_lock_of_a_process_killed_with_sigkill_is_taken_over(tmp_path):
    d = tmp_path / "run"
    p = _holder(d, tmp_path)
    (d / "half.csv").write_text("written before the crash\n")
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert (d / LOCK).exists()  # stale: its process is gone
    with output_dir(d, "attribute"):
        pass
    assert "half.csv" in read_marker(d)["commands"]["attribute"]["files"]  # what the killed run wrote is ours
    assert not (d / LOCK).exists()


def test_a_stale_lock_file_with_a_dead_pid_is_taken_over(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    (d / LOCK).write_text("999999999\n")
    with OutputLock(d / LOCK, d):
        assert (d / LOCK).read_text().strip() == str(os.getpid())


def test_one_process_cannot_take_its_own_lock_twice(tmp_path):
    with OutputLock(tmp_path / "x.lock", tmp_path):
        with pytest.raises(OutputError, match=f"pid {os.getpid()}"):
            OutputLock(tmp_path / "x.lock", tmp_path).acquire()


def test_caption_results_file_is_locked(tiny_llava_dir, toy_coco, tmp_path):
    out = tmp_path / "c.jsonl"
    with OutputLock(tmp_path / "c.jsonl.lock", out):
        r = _cli("caption", "--model", tiny_llava_dir, "--instances", toy_coco / "instances.json", "--image-dir",
                 toy_coco / "images", "--out", out, "--max-new-tokens", "4")
    assert r.returncode == 2 and f"another lens_halluc process (pid {os.getpid()}) is writing {out}" in r.stderr
    assert not out.exists()


# ------------------------------------------------------------------------------ damaged parts
def test_damaged_part_is_named_with_the_command_that_redoes_it(tmp_path):
    from lens_halluc.attribution.pipeline import DamagedPartError, Sample, assemble, write_npz

    s = Sample(0, 1, "1.png", "Describe.", "a cat .", [3, 4, 5], 1,
               [{"position": 1, "token_id": 4, "token": "cat", "word": "cat", "hallucinated": True}])
    write_npz(tmp_path / "000000.npz", influence=np.ones((1, 2, 3), np.float32))
    assert assemble(tmp_path, [s], 2, 3).influence.shape == (1, 2, 3)
    for damage in (b"", b"garbage\n", None):
        if damage is None:
            write_npz(tmp_path / "000000.npz", influence=np.ones((2, 2, 3), np.float32))  # another shape
        else:
            (tmp_path / "000000.npz").write_bytes(damage)
        with pytest.raises(DamagedPartError) as e:
            assemble(tmp_path, [s], 2, 3)
        assert str(tmp_path / "000000.npz") in str(e.value) and "python -m lens_halluc.attribute" in str(e.value)
    assert not list(tmp_path.glob("*.tmp*"))


# ------------------------------------------------------------------------------ kill -9 and resume
def _start(module: str, *argv) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", f"lens_halluc.{module}", *map(str, argv)], env=ENV, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _kill_when(p: subprocess.Popen, ready, what: str, timeout: float = 600) -> None:
    t = time.time()
    while time.time() - t < timeout:
        if p.poll() is not None:
            raise AssertionError(f"finished before {what} (rc {p.returncode}): {p.stderr.read()[-2000:]}")
        if ready():
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
            return
        time.sleep(0.02)
    p.kill()
    raise AssertionError(f"timed out waiting for {what}")


def _nonempty_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.is_file() else 0


ATTR = ["--n-images", "16", "--max-new-tokens", "24", "--batch-size", "2", "--no-progress", "--no-png"]
ATTR_FILES = ("head_scores.csv", "tokens.csv", "influences.npz", "samples.jsonl", "top_heads.json", "manifest.json",
              "heads.html", "captions.rank0.jsonl")


@pytest.fixture(scope="module")
def attr_full(tmp_path_factory):
    out = tmp_path_factory.mktemp("attr") / "full"
    r = _cli("attribute", "--out", out, *ATTR)
    assert r.returncode == 0, r.stderr
    return out


@shipped
@pytest.mark.parametrize("stage", ["captioning", "attribution"])
def test_attribute_kill9_then_resume_is_byte_identical(attr_full, tmp_path, stage):
    out = tmp_path / "killed"
    p = _start("attribute", "--out", out, *ATTR)
    if stage == "captioning":
        _kill_when(p, lambda: _nonempty_lines(out / "captions.rank0.jsonl") >= 1, "the first caption line")
    else:
        _kill_when(p, lambda: len(list((out / "parts").glob("*/0*.npz"))) >= 1, "the first part")
    r = _cli("attribute", "--out", out, *ATTR)
    assert r.returncode == 0, r.stderr
    for f in ATTR_FILES:
        assert (out / f).read_bytes() == (attr_full / f).read_bytes(), f
    assert not list(out.rglob("*.tmp*")) and not (out / LOCK).exists()


@shipped
def test_attribute_recomputes_damaged_parts_saying_so(attr_full, tmp_path):
    import shutil

    out = tmp_path / "damaged"
    shutil.copytree(attr_full, out)
    parts = sorted((out / "parts").glob("*/0*.npz"))
    parts[0].write_bytes(b"")  # zero bytes (a full disk)
    parts[-1].write_bytes(b"PK\x03\x04garbage")
    r = _cli("attribute", "--out", out, *ATTR)
    assert r.returncode == 0, r.stderr
    assert str(parts[0]) in r.stderr and str(parts[-1]) in r.stderr and "recomputing it" in r.stderr
    for f in ATTR_FILES:
        assert (out / f).read_bytes() == (attr_full / f).read_bytes(), f


@shipped
def test_attribute_rerun_with_another_model_refuses_to_mix_captions(attr_full, tmp_path):
    import shutil

    out = tmp_path / "other-model"
    shutil.copytree(attr_full, out)
    before = (out / "captions.rank0.jsonl").read_bytes()
    r = _cli("attribute", "--out", out, *ATTR, "--model", SHIPPED_DIR / "projector")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "captions.rank0.jsonl holds captions made with other options" in r.stderr and "--overwrite" in r.stderr
    assert (out / "captions.rank0.jsonl").read_bytes() == before
    assert (out / "head_scores.csv").read_bytes() == (attr_full / "head_scores.csv").read_bytes()


@pytest.fixture(scope="module")
def organism_split():
    import lens_halluc as lh

    ds = lh.organism.split("break", n=10, seed=1)
    return Path(ds.source), Path(ds.image_dir)


CAPTION = ["--max-new-tokens", "24", "--batch-size", "2"]


@shipped
def test_caption_kill9_then_resume_is_byte_identical(organism_split, tmp_path):
    instances, images = organism_split
    full, killed = tmp_path / "full.jsonl", tmp_path / "killed.jsonl"
    assert _cli("caption", "--instances", instances, "--image-dir", images, "--out", full, *CAPTION).returncode == 0
    p = _start("caption", "--instances", instances, "--image-dir", images, "--out", killed, *CAPTION)
    _kill_when(p, lambda: _nonempty_lines(killed) >= 2, "the first caption lines")
    assert _nonempty_lines(killed) < _nonempty_lines(full)  # really interrupted
    r = _cli("caption", "--instances", instances, "--image-dir", images, "--out", killed, *CAPTION)
    assert r.returncode == 0, r.stderr
    assert killed.read_bytes() == full.read_bytes()
    # a rerun with another prompt refuses instead of appending a second prompt's captions
    r = _cli("caption", "--instances", instances, "--image-dir", images, "--out", killed, *CAPTION, "--prompt", "Hi.")
    assert r.returncode == 2 and "prompt=" in r.stderr and "use a new --out or --overwrite" in r.stderr
    assert killed.read_bytes() == full.read_bytes()


TIMING = ("sec_per_caption", "rel_time", "captions_timed")


@shipped
def test_intervene_kill9_then_resume_gives_the_same_rows(tmp_path):
    """Same rows as an uninterrupted run, every column compared except the timing columns (TIMING)."""
    data = tmp_path / "data"  # one export for both runs (the data key covers the files' contents)
    argv = ["--method", "greedy", "--n", "6", "--max-new-tokens", "12", "--batch-size", "2", "--no-pope",
            "--data", data]
    r = _cli("intervene", *argv, "--out", tmp_path / "full")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "killed"
    p = _start("intervene", *argv, "--out", out)
    _kill_when(p, lambda: any(_nonempty_lines(f) >= 1 for f in (out / "cache").rglob("captions-*.jsonl")),
               "the first cached caption")
    assert not (out / "results.jsonl").exists()
    r = _cli("intervene", *argv, "--out", out)
    assert r.returncode == 0, r.stderr

    def rows(d):
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
                for line in (d / "results.jsonl").read_text().splitlines()]

    assert rows(out) == rows(tmp_path / "full") and len(rows(out)) == 1


@shipped
def test_two_attribute_processes_on_one_out_give_one_clean_refusal(attr_full, tmp_path):
    out = tmp_path / "shared"
    a = _start("attribute", "--out", out, *ATTR)
    t = time.time()
    while not ((out / LOCK).is_file() and (out / LOCK).read_text().strip() == str(a.pid)):
        assert a.poll() is None and time.time() - t < 300, "the first writer did not take the lock"
        time.sleep(0.02)
    b = _cli("attribute", "--out", out, *ATTR)
    assert a.poll() is None, "the first writer finished before the second one tried: nothing was drilled"
    assert b.returncode == 2 and "Traceback" not in b.stderr
    assert f"another lens_halluc process (pid {a.pid}) is writing {out}" in b.stderr
    assert a.wait(timeout=600) == 0, a.stderr.read()
    for f in ATTR_FILES:  # the first run is whole: no collision, no doubled caption
        assert (out / f).read_bytes() == (attr_full / f).read_bytes(), f
