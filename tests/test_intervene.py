"""The interventions command line (python -m lens_halluc.intervene), its registry and the comparison table."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lens_halluc.intervene import columns, main, read_rows
from lens_halluc.interventions.registry import (METHODS, MethodUnavailableError, build_strategy, control_heads,
                                                 control_strategies, method_options, needs_editable_attention,
                                                 resolve_options)

ROOT = Path(__file__).resolve().parents[1]
HAL = [[0, 0], [0, 4], [1, 7], [2, 6], [1, 0]]
FAST = ["--n", "8", "--max-new-tokens", "12", "--batch-size", "16"]


@pytest.fixture(scope="module")
def heads_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("heads") / "top_heads.json"
    p.write_text(json.dumps({"heads": HAL, "k": len(HAL)}))
    return p


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, heads_file):
    """greedy, ablate and adhh (an adhh random control of 2 draws, and the corrected adhh on 3 heads), organism, n = 8."""
    out = tmp_path_factory.mktemp("interventions")
    data = out / "data"
    for argv in (["--method", "greedy"],
                 ["--method", "ablate", "--heads", str(heads_file)],
                 ["--method", "adhh", "--tau", "0.45", "--heads", str(heads_file)],
                 ["--method", "adhh", "--heads", str(heads_file), "--control", "random", "--draws", "2"],
                 ["--method", "adhh", "--flavour", "corrected", "--k", "3", "--heads", str(heads_file)]):
        main([*argv, *FAST, "--out", str(out), "--data", str(data)])
    return out


def _cli(*argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "lens_halluc.intervene", *argv], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)


def test_rows_have_all_columns(run_dir):
    rows = read_rows(run_dir)
    assert [r["method"] for r in rows] == ["greedy", "ablate", "adhh", "adhh", "adhh", "adhh"]
    assert [r["control"] for r in rows] == ["none", "none", "none", "random", "random", "none"]
    with open(run_dir / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows)
    for col in columns(("break", "normal")):
        assert col in table[0], col
    for r in rows:
        for s in ("break", "normal"):
            for m in ("CHAIR_s", "CHAIR_i", "Recall", "Len"):
                assert r[f"{s}_{m}"] is not None
        for s in ("random", "popular", "adversarial"):
            assert 0 <= r[f"pope_{s}_accuracy"] <= 1 and 0 <= r[f"pope_{s}_yes_ratio"] <= 1
        assert r["sec_per_caption"] > 0 and r["rel_time"] > 0
        assert r["captions_timed"] == 16
    assert rows[0]["rel_time"] == 1.0
    assert json.loads(rows[2]["options"]) == {"tau": 0.45, "renormalize": False, "rows": "last", "flavour": "reference"}
    assert rows[1]["heads_source"].endswith("top_heads.json") and rows[1]["n_heads"] == 5
    # --flavour corrected --k 3: every row edited, tau from the flavour, the first 3 heads of the file
    assert json.loads(rows[5]["options"]) == {"tau": 0.5, "renormalize": False, "rows": "all", "flavour": "corrected"}
    assert json.loads(rows[5]["heads"]) == HAL[:3] and rows[5]["n_heads"] == 3
    assert {r["metric_flavour"] for r in rows if "metric_flavour" in r} <= {"reference"}


def test_resume_does_not_duplicate(run_dir, heads_file):
    before = read_rows(run_dir)
    main(["--method", "ablate", "--heads", str(heads_file), *FAST, "--out", str(run_dir), "--data", str(run_dir / "data")])
    after = read_rows(run_dir)
    assert len(after) == len(before)
    with open(run_dir / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == len(before)


def test_greedy_row_equals_caption_and_score(run_dir):
    from lens_halluc.models import load_vlm
    from lens_halluc.organism.evaluate import EvalConfig, caption_and_score

    greedy = read_rows(run_dir)[0]
    vlm = load_vlm()
    split = run_dir / "data" / "break-8"
    ref = caption_and_score(vlm, split, run_dir / "ref-break.jsonl", EvalConfig(n=8, max_new_tokens=12, batch_size=16))
    for m in ("CHAIR_s", "CHAIR_i", "Recall", "Len", "partner_rate"):
        assert greedy[f"break_{m}"] == pytest.approx(ref[m])


def test_control_draws_exclude_attributed_heads(run_dir):
    rows = [r for r in read_rows(run_dir) if r["control"] == "random"]
    assert [r["draw"] for r in rows] == [0, 1]
    hal = {tuple(h) for h in HAL}
    for r in rows:
        hs = {tuple(h) for h in json.loads(r["heads"])}
        assert len(hs) == len(HAL) and not hs & hal
    for draw in control_heads(6, 8, [tuple(h) for h in HAL], draws=10, seed=3):
        assert len(draw) == len(HAL) and not set(draw) & hal


def test_unknown_method_is_a_clear_error():
    res = _cli("--method", "nope", "--out", "/tmp/never")
    assert res.returncode == 2
    assert "unknown method 'nope'" in res.stderr and "Traceback" not in res.stderr


def test_missing_heads_is_a_clear_error():
    res = _cli("--method", "adhh", "--out", "/tmp/never")
    assert res.returncode == 2
    assert "--heads" in res.stderr and "Traceback" not in res.stderr


def test_registry_api(tiny_vlm):
    assert set(METHODS) >= {"greedy", "ablate", "adhh", "reweight", "vcd", "seed", "causalmm", "dola"}
    assert [o.flag for o in method_options("reweight")] == ["--alpha", "--keys", "--renormalize"]
    assert [o.aliases for o in method_options("reweight")] == [(), ("--key-group",), ()]
    assert resolve_options("reweight", alpha="0.2") == {"alpha": 0.2, "keys": "text", "renormalize": False}
    assert resolve_options("reweight", key_group="image")["keys"] == "image"   # today's name, as an alias
    vcd = resolve_options("vcd", alpha=2, beta=0.2)
    assert {k: vcd[k] for k in ("strength", "cutoff", "noise_step", "seed")} == {"strength": 2.0, "cutoff": 0.2,
                                                                                "noise_step": 500, "seed": 0}
    with pytest.raises(ValueError, match="given twice"):
        resolve_options("vcd", alpha=2, strength=2)
    assert needs_editable_attention("adhh") and not needs_editable_attention("vcd")
    assert needs_editable_attention("causalmm", llm="reverse") and not needs_editable_attention("causalmm", llm="none", vision="random")
    assert build_strategy("greedy", tiny_vlm) is None
    with pytest.raises(ValueError, match="needs hallucination heads"):
        build_strategy("adhh", tiny_vlm)
    with pytest.raises(ValueError, match="unknown method"):
        build_strategy("nope", tiny_vlm)
    with pytest.raises(ValueError, match="takes no option"):
        build_strategy("ablate", tiny_vlm, [(0, 0)], tau=0.3)
    ctrl = control_strategies("reweight", tiny_vlm, [(0, 0)], draws=3, seed=0, alpha=0.0)
    assert len(ctrl) == 3 and all((0, 0) not in hs for _, hs, _ in ctrl)


def test_unavailable_method_is_reported(monkeypatch):
    from lens_halluc.interventions import registry

    monkeypatch.setitem(registry.METHODS, "ghost", registry.Method("ghost", "lens_halluc.interventions.no_such:X", "test"))
    with pytest.raises(MethodUnavailableError, match="unavailable"):
        registry.build_strategy("ghost", None)
    assert registry.available_methods()["ghost"] is False


def test_summary_table_and_figure(run_dir):
    from lens_halluc.figures.interventions import interventions_figure, markdown_table, summary_table

    table = summary_table(read_rows(run_dir))
    assert [r["method"] for r in table] == ["greedy", "ablate", "adhh", "adhh", "adhh"]
    assert table[3]["control"] == "random" and table[3]["n_draws"] == 2
    assert table[4]["control"] == "none" and table[4]["n_heads"] == 3
    md = markdown_table(table)
    assert md.count("\n") == len(table) + 1 and "random heads" in md
    fig = interventions_figure(table)
    assert len(fig.data) >= len(table)


def test_real_dataset_path_with_a_tiny_llava(tiny_llava_dir, toy_coco, tmp_path):
    """The same command on a non-organism model and COCO-format files (the route a real LLaVA takes)."""
    import json
    import os
    import subprocess
    import sys

    q = tmp_path / "q.jsonl"
    subprocess.run([sys.executable, "-m", "lens_halluc.pope", "build", "--instances", str(toy_coco / "instances.json"),
                    "--split", "random", "--n-images", "3", "--n-per-image", "2", "--out", str(q)], check=True,
                   capture_output=True)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "lens_halluc.intervene", "--method", "vcd", "--model", str(tiny_llava_dir),
                        "--instances", str(toy_coco / "instances.json"), "--references", str(toy_coco / "captions.json"),
                        "--image-dir", str(toy_coco / "images"), "--pope-random", str(q), "--n", "4",
                        "--max-new-tokens", "6", "--out", str(out)],
                       capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr
    rows = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    assert {row["method"] for row in rows} >= {"vcd"}
    vcd = next(row for row in rows if row["method"] == "vcd")
    assert any(k.startswith("coco") and "CHAIR_i" in k for k in vcd), sorted(vcd)
    assert any("random" in k and "accuracy" in k for k in vcd), sorted(vcd)


# ---------------------------------------------------------------- --flavour, --k, --metric-flavour
def _parse(*argv):
    from lens_halluc.cli.intervene import build_parser

    method = argv[argv.index("--method") + 1]
    return build_parser(method).parse_args([*argv, "--out", "/tmp/never"])


def _built(*argv):
    from lens_halluc.interventions.registry import build_intervention, method_options

    args = _parse(*argv)
    opts = resolve_options(args.method, **{o.name: getattr(args, f"opt_{o.name}") for o in method_options(args.method)})
    return build_intervention(args.method, [(0, 0), (1, 2)] if args.method in ("adhh", "reweight", "ablate") else None,
                              **opts)


def test_flavour_flag_selects_each_methods_flavour():
    from lens_halluc.interventions import ADHH, DoLa

    assert _built("--method", "adhh") == ADHH([(0, 0), (1, 2)])
    assert _built("--method", "adhh").rows == "last" and _built("--method", "adhh").tau == 0.5
    corrected = _built("--method", "adhh", "--flavour", "corrected")
    assert corrected == ADHH([(0, 0), (1, 2)], flavour="corrected") and corrected.rows == "all"
    assert _built("--method", "adhh", "--flavour", "corrected", "--rows", "last", "--tau", "0.4").rows == "last"
    # original DoLa is the default; the corrected variant and single choices are selectable
    assert _built("--method", "dola") == DoLa()
    assert _built("--method", "dola").contrast == "plain" and _built("--method", "dola").repetition_penalty == 1.2
    assert _built("--method", "dola", "--flavour", "corrected") == DoLa(flavour="corrected")
    mixed = _built("--method", "dola", "--flavour", "corrected", "--contrast", "plain", "--no-final-norm",
                   "--repetition-penalty", "1.2", "--divergence", "dola", "--candidate-layers", "0,2")
    assert mixed == DoLa(candidate_layers=[0, 2], contrast="plain", final_norm=False, repetition_penalty=1.2,
                         divergence="dola", flavour="corrected")
    assert _built("--method", "dola", "--strength", "1").contrast == "interpolated"
    with pytest.raises(SystemExit):
        _parse("--method", "adhh", "--flavour", "paper")


def test_flavour_and_k_appear_in_help():
    adhh, dola = _cli("--method", "adhh", "--help"), _cli("--method", "dola", "--help")
    assert adhh.returncode == 0 and dola.returncode == 0
    for text in (adhh.stdout, dola.stdout):
        assert "--flavour {reference,corrected}" in text and "--metric-flavour" in text and "--k K" in text
    assert "per --flavour: reference last, corrected all" in " ".join(adhh.stdout.split())
    assert "--final-norm, --no-final-norm" in dola.stdout and "--contrast {plain,interpolated}" in dola.stdout


def _heads_file(tmp_path, n, scores=False):
    d = tmp_path / f"heads{n}{'s' if scores else ''}"
    d.mkdir()
    ranked = [[l, h] for l in range(6) for h in range(8)]
    (d / "top_heads.json").write_text(json.dumps({"heads": ranked[:n], "k": n}))
    if scores:
        with open(d / "head_scores.csv", "w") as f:
            f.write("layer,head,score\n" + "".join(f"{l},{h},{1 - i / 100}\n" for i, (l, h) in enumerate(ranked)))
    return d / "top_heads.json", [tuple(h) for h in ranked]


def test_k_takes_the_first_heads_with_the_references_defaults(tmp_path):
    from lens_halluc.cli.intervene import heads_k, select_heads
    from lens_halluc.models.heads import HA_K, HeadsFileError

    many, ranked = _heads_file(tmp_path, 30)
    few, _ = _heads_file(tmp_path, 5)
    assert HA_K["adhh"] == 20 and HA_K["reweight"] == 20
    for method, want in (("adhh", 20), ("reweight", 20), ("ablate", 30)):
        heads, k = select_heads(_parse("--method", method, "--heads", str(many)))
        assert k == want and heads == ranked[:want]
    heads, k = select_heads(_parse("--method", "adhh", "--heads", str(few)))  # capped at what the file lists
    assert k == 5 and heads == ranked[:5]
    assert select_heads(_parse("--method", "adhh", "--heads", str(many), "--k", "3"))[0] == ranked[:3]
    assert select_heads(_parse("--method", "ablate", "--heads", str(many), "--k", "4"))[0] == ranked[:4]
    with pytest.raises(HeadsFileError, match="lists 5 heads"):
        select_heads(_parse("--method", "adhh", "--heads", str(few), "--k", "7"))
    ranked_file, _ = _heads_file(tmp_path, 5, scores=True)  # the ranking beside it gives more
    assert select_heads(_parse("--method", "adhh", "--heads", str(ranked_file), "--k", "7"))[0] == ranked[:7]
    assert heads_k("greedy", 9) == 9


def test_k_errors_are_clear(tmp_path):
    few, _ = _heads_file(tmp_path, 5)
    res = _cli("--method", "adhh", "--heads", str(few), "--k", "7", "--out", str(tmp_path / "o1"))
    assert res.returncode == 2 and "lists 5 heads" in res.stderr and "Traceback" not in res.stderr
    res = _cli("--method", "vcd", "--k", "3", "--out", str(tmp_path / "o2"))
    assert res.returncode == 2 and "--k takes the first k heads of --heads" in res.stderr
    res = _cli("--method", "dola", "--contrast", "plain", "--strength", "1", "--out", str(tmp_path / "o3"))
    assert res.returncode == 2 and "interpolated" in res.stderr and "Traceback" not in res.stderr


def test_metric_flavour_is_parsed():
    assert _parse("--method", "greedy").metric_flavour == "reference"
    assert _parse("--method", "greedy", "--metric-flavour", "corrected").metric_flavour == "corrected"


def test_halc_gets_a_detector_from_the_command_line():
    """HALC needs a detector: ``--detector organism`` (default) trains the organism's own, else a transformers model."""
    from lens_halluc.cli.intervene import make_detector
    from lens_halluc.interventions.registry import build_intervention

    args = _parse("--method", "halc")
    assert args.detector == "organism" and _parse("--method", "halc", "--detector", "IDEA-Research/x").detector
    det = make_detector(args.detector)
    boxes = det.detect(__import__("PIL.Image", fromlist=["Image"]).new("RGB", (48, 48)), "dog")
    assert isinstance(boxes, list)
    iv = build_intervention("halc", detector=det)
    assert iv.get_params()["detector"]["kind"] != "none" and json.dumps(iv.get_params())
