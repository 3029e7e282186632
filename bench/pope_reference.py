"""Make the POPE reference fixture: question files written by the reference code itself.

``tests/data/pope_reference/`` holds, for a few small COCO-format instances files, the question
files that AoiDragon/POPE's own ``main.py`` + ``utils.py`` write (run unmodified, from a checkout
outside this repository). ``tests/test_pope.py::test_reference_flavour_equals_reference_code``
checks that ``build_questions(..., flavour="reference")`` writes the same questions.

    git clone https://github.com/AoiDragon/POPE /tmp/POPE      # commit 08d957b (utils.py at 7cf0a02)
    python bench/pope_reference.py --reference /tmp/POPE        # rewrites tests/data/pope_reference/

What it does, per input and configuration of ``manifest.json``:

1. inputs: ``organism_instances.json`` (the shipped organism's ``normal`` split, 200 images,
   seed 1, reduced to ids, file names and categories) and ``skewed_instances.json`` (a random
   world made here: 80 images, 14 categories with skewed frequencies, repeated annotations of one
   category on an image, images with 1-2 categories). Both are written to the fixture folder.
2. the reference's input format (README "From annotations"): one line
   ``{"image": file_name, "objects": [names]}`` per image in file order, the objects being the
   image's distinct annotated category names in annotation order (written with plain ``json``).
3. ``python -c "import random; random.seed(SEED); ...; main.main()"`` with ``--seg_path``,
   ``--img_num``, ``--sample_num``, ``--dataset``, ``--save_path``: the reference never seeds its
   global ``random``; seeding it first is the only addition. ``--img_num`` ``all`` is the number of
   eligible images (our ``n_images=None``).
4. its ``{dataset}_pope_{random,popular,adversarial}.json`` are copied here unchanged, so they keep
   the reference's ``"imange"`` typo (see ``lens_halluc.data.pope``: fixed in both flavours).

Nothing here imports the reference into lens_halluc; only its output files are kept.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "data" / "pope_reference"
SPLITS = ("random", "popular", "adversarial")

#: (name, instances file, seed, img_num or "all", sample_num)
CONFIGS = [
    ("organism_s0_n30_k3", "organism_instances.json", 0, 30, 3),
    ("organism_s1_n30_k2", "organism_instances.json", 1, 30, 2),
    ("skewed_s0_n20_k3", "skewed_instances.json", 0, 20, 3),
    ("skewed_s1_n20_k3", "skewed_instances.json", 1, 20, 3),
    ("skewed_s2_all_k3", "skewed_instances.json", 2, "all", 3),
    ("skewed_s3_n10_k4", "skewed_instances.json", 3, 10, 4),
]


def organism_instances() -> dict:
    import lens_halluc as lh

    d = lh.organism.split_dir("normal", n=200, seed=1)
    inst = json.loads((d / "instances.json").read_text())
    return {"images": [{"id": im["id"], "file_name": im["file_name"]} for im in inst["images"]],
            "annotations": [{"id": a["id"], "image_id": a["image_id"], "category_id": a["category_id"]}
                            for a in inst["annotations"]],
            "categories": [{"id": c["id"], "name": c["name"]} for c in inst["categories"]]}


def skewed_instances(seed: int = 11) -> dict:
    rng = np.random.default_rng(seed)
    names = ["person", "car", "apple", "umbrella", "oven", "bus", "dog", "cat", "knife", "egg tart",
             "chair", "bottle", "ice cream", "zebra"]
    cats = [{"id": 3 * k + 2, "name": n} for k, n in enumerate(names)]  # ids not in name order
    p = np.arange(len(names), 0, -1, dtype=float) ** 1.5
    p /= p.sum()
    images, anns = [], []
    for i in range(1, 81):
        images.append({"id": 1000 + i, "file_name": f"skew_{i:04d}.jpg"})
        for c in rng.choice(len(names), size=int(rng.integers(1, 8)), replace=True, p=p):  # repeats allowed
            anns.append({"id": len(anns) + 1, "image_id": 1000 + i, "category_id": cats[int(c)]["id"]})
    order = rng.permutation(len(anns))  # annotations not grouped by image, as in COCO files
    return {"images": images, "annotations": [anns[k] for k in order], "categories": cats}


def to_reference_format(inst: dict) -> list[dict]:
    """One ``{"image", "objects"}`` per image (file order); objects distinct, in annotation order."""
    names = {c["id"]: c["name"] for c in inst["categories"]}
    objs: dict[int, list[str]] = {im["id"]: [] for im in inst["images"]}
    for a in inst["annotations"]:
        o = names[a["category_id"]]
        if o not in objs[a["image_id"]]:
            objs[a["image_id"]].append(o)
    return [{"image": im["file_name"], "objects": objs[im["id"]]} for im in inst["images"]]


def run_reference(reference: Path, seg: Path, seed: int, img_num: int, sample_num: int, work: Path) -> dict[str, str]:
    code = ("import random, sys; random.seed(%d); sys.path.insert(0, %r); sys.argv = %r; import main; main.main()"
            % (seed, str(reference), ["main.py", "--seg_path", str(seg), "--img_num", str(img_num),
                                      "--sample_num", str(sample_num), "--dataset", "ref", "--save_path", str(work)]))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=work)
    return {s: (work / "ref" / f"ref_pope_{s}.json").read_text() for s in SPLITS}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", required=True, type=Path, help="checkout of AoiDragon/POPE (main.py, utils.py)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if not (args.reference / "main.py").is_file() or not (args.reference / "utils.py").is_file():
        ap.error(f"{args.reference} has no main.py / utils.py; pass a checkout of AoiDragon/POPE.")
    args.out.mkdir(parents=True, exist_ok=True)
    inputs = {"organism_instances.json": organism_instances(), "skewed_instances.json": skewed_instances()}
    for name, inst in inputs.items():
        (args.out / name).write_text(json.dumps(inst, separators=(",", ":")) + "\n")
    manifest = []
    for name, inst_name, seed, img_num, k in CONFIGS:
        seg_rows = to_reference_format(inputs[inst_name])
        n_eligible = sum(len(r["objects"]) >= k for r in seg_rows)
        n = n_eligible if img_num == "all" else img_num
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            seg = work / "seg.jsonl"
            seg.write_text("".join(json.dumps(r) + "\n" for r in seg_rows))
            files = run_reference(args.reference, seg, seed, n, k, work)
        for split, text in files.items():
            (args.out / f"{name}_{split}.json").write_text(text)
        manifest.append({"name": name, "instances": inst_name, "seed": seed,
                         "n_images": None if img_num == "all" else img_num, "img_num": n, "n_per_image": k})
        print(f"{name}: " + ", ".join(f"{s} {t.count(chr(10))} lines" for s, t in files.items()))
    commit = subprocess.run(["git", "-C", str(args.reference), "rev-parse", "HEAD"], capture_output=True, text=True)
    (args.out / "manifest.json").write_text(json.dumps({
        "made_by": "bench/pope_reference.py", "reference": "AoiDragon/POPE main.py + utils.py",
        "reference_commit": commit.stdout.strip() or None, "python": sys.version.split()[0],
        "configs": manifest}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
