"""Export a split of the synthetic world as a COCO-format dataset.

``export_split`` writes, under ``out_dir``::

    instances.json   COCO instances: images, annotations (hidden partners included), categories
    captions.json    COCO captions: one reference caption per image (the world's caption)
    images/          {image_id:06d}.png, RGB, image_size x image_size
    pairs.json       {"A name": "B name", ...}
    objects.json     {image_id: [{category_id, name, bbox, patches, drawn}, ...]}
                     patches = image-token indices (row-major patches, CLS dropped)
    probes.json      {image_id: {"A": name, "B": name}} for break/control; {} for normal
    meta.json        split, n, seed, world_seed, world config, grid

so that :class:`lens_halluc.data.CocoDataset` loads it unchanged and CHAIR / POPE run on it.
Output is a pure function of (world config, world seed, split, n, seed): exporting twice gives
byte-identical files. Image ``i`` (id ``i + 1``) uses its own generator seeded by
``(world seed, split, seed, i)``, so a smaller export is a prefix of a larger one; break and control
images cycle through the pairs (image ``i`` probes pair ``i % n_pairs``) so probes are balanced.

Example
-------
>>> from lens_halluc.organism.world import World
>>> out = export_split(World(seed=0), "break", n=8, seed=1, out_dir="/tmp/world_break")  # doctest: +SKIP
>>> from lens_halluc.data import CocoDataset
>>> ds = CocoDataset.load(out / "instances.json", out / "captions.json", out / "images", check_images=True)  # doctest: +SKIP
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .world import SPLITS, Scene, World, WorldConfig

#: Stable code per split for seeding (never reorder: it would change every export).
SPLIT_CODES: dict[str, int] = {"normal": 0, "break": 1, "control": 2, "mixed": 3}

#: Files written by :func:`export_split` (besides ``images/``).
EXPORT_FILES: tuple[str, ...] = (
    "instances.json", "captions.json", "pairs.json", "objects.json", "probes.json", "meta.json",
)

FORMAT = "lens_halluc.organism.world/1"

#: Held-out sampling seeds of the evaluation splits (training scenes use the recipe seed).
EVAL_SEEDS: dict[str, int] = {"normal": 1001, "break": 1002, "control": 1003, "mixed": 1004}


def scene_rng(world: World, split: str, seed: int, index: int) -> np.random.Generator:
    """The generator of image ``index`` of a split export (independent per image)."""
    return np.random.default_rng([world.seed, SPLIT_CODES[split], seed, index])


def sample_split(world: World, split: str, n: int, seed: int) -> list[Scene]:
    """The ``n`` scenes :func:`export_split` would write, without writing anything.

    >>> scenes = sample_split(World(), "control", n=6, seed=0)
    >>> [s.probe[0] for s in scenes] == [a for a, _ in World().config.pairs]
    True
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}.")
    if n < 0 or seed < 0:
        raise ValueError(f"n and seed must be >= 0, got n={n}, seed={seed}.")
    pairs = world.config.pairs
    scenes = []
    for i in range(n):
        probe = None if split == "normal" else pairs[i % len(pairs)]
        scenes.append(world.sample_scene(scene_rng(world, split, seed, i), split, probe=probe))
    return scenes


def _dump(path: Path, obj, indent: int | None = None) -> None:
    # Fixed separators and key order => byte-identical files across runs.
    sep = (",", ":") if indent is None else (",", ": ")
    path.write_text(json.dumps(obj, indent=indent, separators=sep, ensure_ascii=True) + "\n", encoding="utf-8")


def export_split(world: World, split: str, n: int, seed: int, out_dir: str | Path,
                 overwrite: bool = False) -> Path:
    """Write ``n`` scenes of ``split`` as a COCO-format dataset in ``out_dir``; return ``out_dir``.

    Parameters
    ----------
    world : the world (its config and seed fix categories and glyphs).
    split : ``"normal"``, ``"break"``, ``"control"`` or ``"mixed"`` (normal and break scenes).
    n : number of images (ids 1..n).
    seed : sampling seed of this export.
    out_dir : target directory (created). If it already holds an export, pass ``overwrite=True``;
        then the previous export's files (the JSON files above and ``images/*.png``) are replaced.
    """
    out = Path(out_dir)
    img_dir = out / "images"
    existing = [f for f in EXPORT_FILES if (out / f).exists()]
    old_pngs = sorted(img_dir.glob("*.png")) if img_dir.is_dir() else []
    if (existing or old_pngs) and not overwrite:
        raise FileExistsError(f"{out} already holds an export ({(existing or ['images/'])[0]}); pass overwrite=True / --overwrite.")
    scenes = sample_split(world, split, n, seed)
    img_dir.mkdir(parents=True, exist_ok=True)
    for p in old_pngs:  # stale images of a larger previous export would break byte-identity
        p.unlink()

    cfg = world.config
    size = cfg.image_size
    images, annotations, captions, objects, probes = [], [], [], {}, {}
    ann_id = 0
    for i, scene in enumerate(scenes):
        image_id = i + 1
        file_name = f"{image_id:06d}.png"
        world.render(scene).save(img_dir / file_name, format="PNG")
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        for o in scene.objects:
            ann_id += 1
            x, y, w, h = o.bbox
            annotations.append({
                "id": ann_id, "image_id": image_id, "category_id": o.category_id,
                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0,
            })
        captions.append({"id": image_id, "image_id": image_id, "caption": world.caption(scene)})
        objects[str(image_id)] = [
            {"category_id": o.category_id, "name": o.name, "bbox": list(o.bbox),
             "patches": world.patch_indices(o), "drawn": o.drawn}
            for o in scene.objects
        ]
        if scene.probe is not None:
            probes[str(image_id)] = {"A": scene.probe[0], "B": scene.probe[1]}

    info = {"description": f"lens_halluc synthetic world, split {split}", "version": FORMAT,
            "split": split, "n": n, "seed": seed, "world_seed": world.seed}
    _dump(out / "instances.json", {"info": info, "licenses": [], "images": images,
                                   "annotations": annotations, "categories": world.coco_categories()})
    _dump(out / "captions.json", {"info": info, "licenses": [], "images": images, "annotations": captions})
    _dump(out / "pairs.json", world.pairs, indent=2)
    _dump(out / "objects.json", objects)
    _dump(out / "probes.json", probes)
    _dump(out / "meta.json", {
        "format": FORMAT, "split": split, "n": n, "seed": seed, "world_seed": world.seed,
        "world": cfg.to_dict(), "grid": world.grid, "n_image_tokens": world.grid * world.grid,
        "image_tokens": "patches in row-major order, CLS dropped; cell (row, col) -> row * grid + col",
        "categories": {str(cid): name for cid, name in world.categories.items()},
    }, indent=2)
    return out


def export_cached(world: World, split: str, n: int, seed: int, out_dir: str | Path) -> Path:
    """``out_dir`` holding the export of ``(world, split, n, seed)``, written only if missing.

    The one "export the split if it is not there yet" of lens_halluc. The export is written to a
    temporary folder beside ``out_dir`` and renamed into place, so a killed run never leaves a
    half split and two processes exporting at once both end with one complete copy. A folder
    without ``meta.json`` (an interrupted export of an older version) is replaced.

    Example
    -------
    >>> d = export_cached(World(seed=0), "break", 8, 1, "/tmp/splits/break-8")     # doctest: +SKIP
    """
    out = Path(out_dir)
    if (out / "meta.json").is_file():
        return out
    if out.exists():
        leftovers = {p.name for p in out.iterdir()}
        if leftovers - set(EXPORT_FILES) - {"images"}:
            raise FileExistsError(f"{out} exists and holds files that are not a split export "
                                  f"({sorted(leftovers)[:3]}); pass another directory.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        export_split(world, split, n, seed, tmp, overwrite=True)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the split is an ordinary folder
        if out.exists() and not (out / "meta.json").is_file():
            shutil.rmtree(out, ignore_errors=True)  # a half export: replace it
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / "meta.json").is_file():  # not another process's complete copy
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_world(out_dir: str | Path) -> World:
    """Rebuild the :class:`World` that wrote an export, from its ``meta.json``.

    >>> world = load_world("/tmp/world_break")   # doctest: +SKIP
    """
    path = Path(out_dir) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; pass the directory written by export_split.")
    meta = json.loads(path.read_text())
    return World(WorldConfig.from_dict(meta["world"]), seed=int(meta["world_seed"]))
