"""Issue 16 drills: bad numbers, heads files, image paths and image files give one clear error.

Each test feeds one hostile input and checks the outcome: a command line exits with status 2 (POPE
``build``: 1, its documented status for bad input) and a message naming the flag or file and the
allowed range or the fix, with no traceback; or the library raises ``DataError``/``ValueError``
naming the file. Most drills stop at argument parsing, before any model is loaded.
"""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest
import torch

from lens_halluc.data.coco import CocoDataset, DataError

from conftest import write_toy_coco


def run_cli(main, argv, capsys) -> str:
    """Run ``main(argv)``; it must exit with status 2. Returns stderr (which must hold no traceback)."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.fixture()
def coco(tmp_path):
    return write_toy_coco(tmp_path / "coco", n_images=3)


def caption_argv(coco, out, *extra):
    return ["--instances", coco / "instances.json", "--image-dir", coco / "images", "--out", out, *extra]


def edit_instances(coco, fn) -> Path:
    p = coco / "instances.json"
    data = json.loads(p.read_text())
    fn(data)
    p.write_text(json.dumps(data))
    return p


# ----------------------------------------------------------------------------- numeric options
def test_max_new_tokens_zero_is_refused(coco, tmp_path, capsys):
    from lens_halluc.cli.caption import main

    err = run_cli(main, caption_argv(coco, tmp_path / "c.jsonl", "--max-new-tokens", "0"), capsys)
    assert "--max-new-tokens" in err and ">= 1" in err and "got 0" in err
    assert not (tmp_path / "c.jsonl").exists()


@pytest.mark.parametrize("value", ["-1", "0"])
def test_batch_size_below_one_is_refused(coco, tmp_path, capsys, value):
    from lens_halluc.cli.caption import main

    err = run_cli(main, caption_argv(coco, tmp_path / "c.jsonl", "--batch-size", value), capsys)
    assert "--batch-size" in err and ">= 1" in err and f"got {value}" in err


def test_negative_limit_is_refused(coco, tmp_path, capsys):
    from lens_halluc.cli.answer import main

    err = run_cli(main, ["--questions", tmp_path / "q.jsonl", "--image-dir", coco / "images",
                         "--out", tmp_path / "a.jsonl", "--limit", "-3"], capsys)
    assert "--limit" in err and ">= 1" in err and "got -3" in err


@pytest.mark.parametrize("value", ["0", "-2"])
def test_top_k_below_one_is_refused(tmp_path, capsys, value):
    from lens_halluc.cli.attribute import main

    err = run_cli(main, ["--out", tmp_path / "attr", "--top-k", value], capsys)
    assert "--top-k" in err and ">= 1" in err
    assert not (tmp_path / "attr").exists()


def test_top_k_above_the_models_heads_is_refused(tiny_llava_dir, coco, tmp_path, capsys):
    from lens_halluc.cli.attribute import main

    err = run_cli(main, ["--model", tiny_llava_dir, "--instances", coco / "instances.json", "--references",
                         coco / "captions.json", "--image-dir", coco / "images", "--n-images", "2",
                         "--out", tmp_path / "attr", "--top-k", "1000", "--no-png", "--no-progress"], capsys)
    # the tiny model has 2 layers x 4 heads
    assert "--top-k 1000" in err and "8 attention heads" in err and "between 1 and 8" in err
    assert not list((tmp_path / "attr").glob("captions*.jsonl"))


def test_analysis_k_zero_is_refused(tmp_path, capsys):
    from lens_halluc.cli.analysis import main

    err = run_cli(main, ["bias", "--attribution", tmp_path, "--out", tmp_path / "b", "--k", "0"], capsys)
    assert "--k" in err and ">= 1" in err and "got 0" in err


def test_analysis_negative_n_samples_is_refused(tmp_path, capsys):
    from lens_halluc.cli.analysis import main

    err = run_cli(main, ["drift", "--attribution", tmp_path, "--out", tmp_path / "d", "--n-samples", "-2"], capsys)
    assert "--n-samples" in err and ">= 1" in err and "got -2" in err


def test_analysis_k_above_the_runs_heads_is_refused(tmp_path):
    from lens_halluc.cli.analysis import check_k

    class Run:
        head_scores = [{"layer": 0, "head": h} for h in range(8)]

    class Args:
        k, attribution = 9, tmp_path

    with pytest.raises(ValueError, match=r"--k 9 is more than the 8 heads .* between 1 and 8"):
        check_k(Args, Run)


def test_retrain_fraction_out_of_range_is_refused(tmp_path, capsys):
    from lens_halluc.cli.retrain import main

    err = run_cli(main, ["--method", "seed", "--out", tmp_path / "r", "--noise", "1.5"], capsys)
    assert "--noise" in err and "between 0 and 1" in err


def test_intervene_negative_draws_is_refused(tmp_path, capsys):
    from lens_halluc.cli.intervene import main

    err = run_cli(main, ["--method", "greedy", "--out", tmp_path / "i", "--draws", "-1"], capsys)
    assert "--draws" in err and ">= 1" in err


def test_organism_export_zero_images_is_refused(tmp_path, capsys):
    from lens_halluc.organism.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["export", "--split", "break", "--n", "0", "--out", str(tmp_path / "w")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--n" in err and ">= 1" in err
    assert not (tmp_path / "w").exists()


# ----------------------------------------------------------------------------- dtype and device
@pytest.mark.parametrize("value", ["int8", "nn"])
def test_unknown_dtype_is_refused(coco, tmp_path, capsys, value):
    from lens_halluc.cli.caption import main

    err = run_cli(main, caption_argv(coco, tmp_path / "c.jsonl", "--dtype", value), capsys)
    assert "--dtype" in err and value in err and "use float32, bfloat16 or float16" in err


def test_dtype_aliases_and_library_check():
    from lens_halluc.cli.common import dtype_arg
    from lens_halluc.models.loading import _as_dtype

    assert dtype_arg("BF16") == "bfloat16" and _as_dtype("fp16") is torch.float16
    with pytest.raises(ValueError, match="use float32, bfloat16 or float16"):
        _as_dtype(torch.int8)


@pytest.mark.skipif(torch.cuda.is_available(), reason="drills a machine without CUDA")
def test_cuda_device_without_cuda_is_refused(coco, tmp_path, capsys):
    from lens_halluc.cli.caption import main

    err = run_cli(main, caption_argv(coco, tmp_path / "c.jsonl", "--device", "cuda"), capsys)
    assert "--device" in err and "CUDA is not available" in err and "--device cpu" in err


def test_unknown_device_is_refused(coco, tmp_path, capsys):
    from lens_halluc.cli.caption import main

    err = run_cli(main, caption_argv(coco, tmp_path / "c.jsonl", "--device", "gpu0"), capsys)
    assert "--device" in err and "'gpu0'" in err and "cpu, cuda, cuda:N or mps" in err


def test_cuda_index_beyond_the_machines_gpus_is_refused():
    from lens_halluc.models.loading import check_device

    with pytest.raises(ValueError, match="CUDA"):
        check_device(f"cuda:{torch.cuda.device_count() + 3}")


# ----------------------------------------------------------------------------- POPE build
def test_pope_n_per_image_above_the_datas_objects_names_that_flag(coco, tmp_path, capsys):
    from lens_halluc.cli.pope import main

    status = main(["build", "--instances", str(coco / "instances.json"), "--split", "random",
                   "--n-per-image", "100", "--out", str(tmp_path / "q.jsonl")])
    err = capsys.readouterr().err
    assert status == 1
    assert "--n-per-image" in err and "at most 3" in err and "n_images" not in err
    assert not (tmp_path / "q.jsonl").exists()


# ----------------------------------------------------------------------------- heads files
HEADS_FILES = {
    "empty": ("", "not valid JSON"),
    "truncated": ('{"heads": [[0, 1], [1', "not valid JSON"),
    "top_key": ('{"top": [[0, 1]]}', 'no "heads" key'),
    "wrong_shape": ('{"heads": [[0, 1, 2]]}', "pair of integers"),
    "strings": ('{"heads": [["a", "b"]]}', "pair of integers"),
    "floats_flat": ("[0.7, 4.9]", "pair of integers"),
    "floats": ('{"heads": [[0.7, 4.9]]}', "pair of integers"),
    "duplicates": ('{"heads": [[0, 1], [0, 1]]}', "listed twice"),
    "negative": ('{"heads": [[0, -1]]}', ">= 0"),
    "not_a_list": ('{"heads": "0,1"}', "must be a list"),
    "no_heads": ('{"heads": []}', "lists no heads"),
}


@pytest.mark.parametrize("case", sorted(HEADS_FILES))
def test_bad_heads_file_is_refused_naming_it(tmp_path, capsys, case):
    from lens_halluc.cli.intervene import main

    text, expected = HEADS_FILES[case]
    path = tmp_path / f"{case}.json"
    path.write_text(text)
    err = run_cli(main, ["--method", "adhh", "--heads", path, "--out", tmp_path / "i"], capsys)
    assert str(path) in err and expected in err
    assert not (tmp_path / "i" / "results.jsonl").exists()


def test_heads_outside_the_model_are_refused_naming_the_file(tiny_llava_dir, tmp_path, capsys):
    from lens_halluc.cli.intervene import main

    path = tmp_path / "top_heads.json"
    path.write_text(json.dumps({"heads": [[0, 1], [5, 0]], "k": 2}))
    err = run_cli(main, ["--method", "ablate", "--heads", path, "--model", tiny_llava_dir,
                         "--out", tmp_path / "i"], capsys)
    assert str(path) in err and "[5, 0]" in err and "2 layers" in err


def test_retrain_bad_heads_file_is_refused_before_the_model_loads(tmp_path, capsys):
    from lens_halluc.cli.retrain import main

    path = tmp_path / "h.json"
    path.write_text('{"heads": [[0.7, 4.9]]}')
    err = run_cli(main, ["--method", "tfhh", "--heads", path, "--model", tmp_path / "no-such-model",
                         "--out", tmp_path / "r"], capsys)
    assert str(path) in err and "pair of integers" in err


def test_organism_evaluate_bad_heads_file_is_refused(tmp_path, capsys):
    from lens_halluc.organism.__main__ import main

    path = tmp_path / "h.json"
    path.write_text('{"top": [[0, 1]]}')
    assert main(["evaluate", "--heads", str(path), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and 'no "heads" key' in err


# ----------------------------------------------------------------------------- paths inside their roots
@pytest.mark.parametrize("name", ["../secret.png", "/etc/shadow"])
def test_image_file_name_outside_the_image_dir_is_refused(coco, tmp_path, capsys, name):
    from lens_halluc.cli.caption import main

    (coco / "secret.png").write_bytes((coco / "images" / "000001.png").read_bytes())
    edit_instances(coco, lambda d: d["images"][1].update(file_name=name))
    err = run_cli(main, caption_argv(coco, tmp_path / "c.jsonl"), capsys)
    assert name in err and "outside the image directory" in err and "--allow-outside-image-dir" in err
    assert not (tmp_path / "c.jsonl").exists()


def test_symlink_out_of_the_image_dir_is_refused(coco, tmp_path):
    (coco / "images" / "link.png").symlink_to(tmp_path / "elsewhere.png")
    edit_instances(coco, lambda d: d["images"][0].update(file_name="link.png"))
    ds = CocoDataset.load(coco / "instances.json", image_dir=coco / "images")
    with pytest.raises(DataError, match="outside the image directory"):
        ds.image_path(1)


def test_allow_outside_image_dir_opens_the_named_file(coco):
    (coco / "secret.png").write_bytes((coco / "images" / "000001.png").read_bytes())
    edit_instances(coco, lambda d: d["images"][1].update(file_name="../secret.png"))
    ds = CocoDataset.load(coco / "instances.json", image_dir=coco / "images", allow_outside_image_dir=True)
    assert ds.image_path(2).resolve() == (coco / "secret.png").resolve()
    ds.check_images()
    assert ds.subset([2]).allow_outside_image_dir


@pytest.mark.parametrize("name", ["../secret.png", "/etc/shadow"])
def test_pope_question_image_outside_the_image_dir_is_refused(coco, tmp_path, capsys, name):
    from lens_halluc.cli.answer import main

    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"question_id": 1, "image": "000001.png", "text": "Is there a dog?", "label": "yes"}) + "\n"
                 + json.dumps({"question_id": 2, "image": name, "text": "Is there a cat?", "label": "no"}) + "\n")
    err = run_cli(main, ["--questions", q, "--image-dir", coco / "images", "--out", tmp_path / "a.jsonl"], capsys)
    assert "question 2" in err and name in err and "--allow-outside-image-dir" in err
    assert not (tmp_path / "a.jsonl").exists()


def test_answer_api_refuses_question_images_outside_the_image_dir(tiny_vlm, coco):
    from lens_halluc.generation.runner import answer

    qs = [{"question_id": 1, "image": "../../etc/passwd", "text": "Is there a dog?", "label": "yes"}]
    with pytest.raises(DataError, match="outside the image directory"):
        answer(tiny_vlm, qs, coco / "images", max_new_tokens=2, progress=False)


def test_image_id_that_is_not_an_integer_names_the_file(coco):
    p = edit_instances(coco, lambda d: d["images"][0].update(id="abc"))
    with pytest.raises(DataError, match=r"instances\.json, image #0: id must be an integer, got 'abc'"):
        CocoDataset.load(p)


def test_bbox_that_is_not_four_numbers_names_the_file(coco):
    p = edit_instances(coco, lambda d: d["annotations"][2].update(bbox="oops"))
    with pytest.raises(DataError, match=r"instances\.json, annotation #2: bbox must be \[x, y, width, height\]"):
        CocoDataset.load(p)


def test_duplicate_image_id_names_the_file(coco):
    p = edit_instances(coco, lambda d: d["images"].append(dict(d["images"][0])))
    with pytest.raises(DataError, match="image id 1 is listed twice"):
        CocoDataset.load(p)


# ----------------------------------------------------------------------------- images checked up front
def test_missing_image_is_found_before_the_model_loads(coco, tmp_path, capsys):
    from lens_halluc.cli.caption import main

    (coco / "images" / "000003.png").unlink()
    # a model path that does not exist: reaching the model would be a different error
    err = run_cli(main, caption_argv(coco, tmp_path / "c.jsonl", "--model", tmp_path / "no-model"), capsys)
    assert "000003.png" in err and "missing" in err and "--image-dir" in err


def test_missing_image_is_found_before_captioning_starts(tiny_vlm, coco, monkeypatch):
    import lens_halluc.generation.runner as runner

    calls = []
    monkeypatch.setattr(runner, "generate", lambda *a, **k: calls.append(1) or [])
    (coco / "images" / "000003.png").unlink()
    ds = CocoDataset.load(coco / "instances.json", image_dir=coco / "images")
    with pytest.raises(DataError, match="000003.png"):
        runner.caption(tiny_vlm, ds, max_new_tokens=2, batch_size=1, progress=False)
    assert calls == []  # not one batch was generated


def test_undecodable_image_is_named(coco, tmp_path, capsys):
    from lens_halluc.cli.caption import main

    (coco / "images" / "000002.png").write_bytes(b"not an image at all")
    err = run_cli(main, caption_argv(coco, tmp_path / "c.jsonl"), capsys)
    assert "000002.png" in err and "cannot read image" in err


def test_truncated_image_is_named_when_decoded(coco):
    from lens_halluc.generation.runner import load_image

    p = coco / "images" / "000002.png"
    p.write_bytes(p.read_bytes()[:60])
    with pytest.raises(DataError, match="000002.png"):
        load_image(p)


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width x height`` (no pixel data): what a decompression bomb looks like to open()."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def test_huge_image_names_the_limit_and_how_to_raise_it(coco, tmp_path, capsys):
    from lens_halluc.cli.caption import main

    png_header_only(coco / "images" / "000002.png", 14000, 14000)
    err = run_cli(main, caption_argv(coco, tmp_path / "c.jsonl"), capsys)
    assert "000002.png" in err and "14000x14000" in err and "89478485" in err and "--max-image-pixels 196000000" in err
    assert "DecompressionBomb" not in err


def test_max_image_pixels_raises_and_lowers_the_limit(coco):
    from lens_halluc.data.images import check_image

    big = png_header_only(coco / "images" / "big.png", 14000, 14000)
    assert check_image(big, max_image_pixels=14000 * 14000) == (14000, 14000)
    ds = CocoDataset.load(coco / "instances.json", image_dir=coco / "images", max_image_pixels=1000)
    with pytest.raises(DataError, match=r"48x48 = 2304 pixels, more than the limit of 1000"):
        ds.check_images([1])


def test_max_image_pixels_flag_is_validated(coco, tmp_path, capsys):
    from lens_halluc.cli.caption import main

    err = run_cli(main, caption_argv(coco, tmp_path / "c.jsonl", "--max-image-pixels", "0"), capsys)
    assert "--max-image-pixels" in err and ">= 1" in err
