"""Inputs of the confounder analysis: exported splits with object boxes, planted pairs, co-occurrence counts.

An export (``python -m lens_halluc.organism export``, or any COCO-format folder) holds
``instances.json``, ``captions.json``, ``images/``, ``objects.json`` (per image the objects' image-token
indices) and optionally ``pairs.json`` (the planted co-occurring pairs, by name). Everything is keyed
by **category id**.

Example
-------
>>> ds, objects, pairs = load_export("runs/confounders/data/normal-300")        # doctest: +SKIP
>>> most_cooccurring(pairs[0][0], cooccurrence_counts(ds), 3)                  # doctest: +SKIP
"""
from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path
from typing import Iterable, Mapping


def load_objects(path: str | Path) -> dict[int, list[dict]]:
    """``objects.json`` of an export as ``{image_id: [{category_id, name, bbox, patches, drawn}, ...]}``.

    JSON keys are strings; they become ints here so they match :class:`CocoDataset` image ids.

    >>> load_objects("runs/confounders/data/normal-300/objects.json")[1][0]["patches"]   # doctest: +SKIP
    [7, 8, 13, 14]
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the confounder analysis needs objects.json (per image the objects' "
                                "image-token indices), as written by `python -m lens_halluc.organism export`.")
    return {int(k): list(v) for k, v in json.loads(path.read_text()).items()}


def load_export(data_dir: str | Path):
    """``(dataset, objects, pairs)`` of an exported split (or any COCO-format dir with objects.json).

    ``dataset``: :class:`CocoDataset` with captions and images; ``objects``: see :func:`load_objects`;
    ``pairs``: list of ``(A category id, B category id)`` from ``pairs.json``, or None when absent.

    >>> ds, objects, pairs = load_export("runs/confounders/data/normal-300")     # doctest: +SKIP
    >>> pairs[:2]                                                               # doctest: +SKIP
    [(18, 34), (48, 49)]
    """
    from ..data.coco import CocoDataset

    d = Path(data_dir)
    captions = d / "captions.json"
    ds = CocoDataset.load(d / "instances.json", captions if captions.is_file() else None, d / "images")
    objects = load_objects(d / "objects.json")
    pairs = None
    if (d / "pairs.json").is_file():
        pairs = pairs_from_names(json.loads((d / "pairs.json").read_text()), ds.categories)
    return ds, objects, pairs


def pairs_from_names(pairs: Mapping[str, str] | Iterable[tuple[str, str]], categories: Mapping[int, str]) -> list[tuple[int, int]]:
    """``{"dog": "frisbee", ...}`` (or name pairs) → ``[(18, 34), ...]`` category-id pairs.

    >>> pairs_from_names({"dog": "frisbee"}, {18: "dog", 34: "frisbee"})
    [(18, 34)]
    """
    by_name = {n: c for c, n in categories.items()}
    items = pairs.items() if isinstance(pairs, Mapping) else pairs
    out = []
    for a, b in items:
        missing = [n for n in (a, b) if n not in by_name]
        if missing:
            raise KeyError(f"pair ({a!r}, {b!r}): unknown category name(s) {missing}; known: {sorted(by_name)}.")
        out.append((by_name[a], by_name[b]))
    return out


def cooccurrence_counts(dataset, image_ids: Iterable[int] | None = None) -> dict[int, dict[int, int]]:
    """Number of images annotated with both categories: ``{a: {b: count}}`` (symmetric, a != b).

    >>> from lens_halluc.data.coco import CocoDataset
    >>> ds = CocoDataset.from_dicts({"images": [{"id": 1, "file_name": "x"}], "categories": [
    ...     {"id": 18, "name": "dog"}, {"id": 34, "name": "frisbee"}], "annotations": [
    ...     {"image_id": 1, "category_id": 18}, {"image_id": 1, "category_id": 34}]})
    >>> cooccurrence_counts(ds)
    {18: {34: 1}, 34: {18: 1}}
    """
    counts: dict[int, dict[int, int]] = {}
    for img in (dataset.image_ids if image_ids is None else image_ids):
        cats = sorted(set(dataset.category_ids(img)))
        for a, b in combinations(cats, 2):
            counts.setdefault(a, {}).setdefault(b, 0)
            counts.setdefault(b, {}).setdefault(a, 0)
            counts[a][b] += 1
            counts[b][a] += 1
    return counts


def most_cooccurring(category_id: int, cooccurrence: Mapping[int, Mapping[int, int]], n: int = 3) -> list[int]:
    """The ``n`` category ids seen most often with ``category_id`` (ties by id), zero counts excluded.

    >>> most_cooccurring(18, {18: {34: 9, 1: 2, 17: 2}}, n=2)
    [34, 1]
    """
    row = cooccurrence.get(int(category_id), {})
    ranked = sorted(((c, k) for c, k in row.items() if k > 0 and c != category_id), key=lambda ck: (-ck[1], ck[0]))
    return [int(c) for c, _ in ranked[:n]]


def top_cooccurring_pairs(cooccurrence: Mapping[int, Mapping[int, int]], n: int) -> list[tuple[int, int]]:
    """The ``n`` unordered category pairs with the highest co-occurrence counts (for data without planted pairs).

    >>> top_cooccurring_pairs({1: {2: 5, 3: 1}, 2: {1: 5}, 3: {1: 1}}, 1)
    [(1, 2)]
    """
    seen = {(min(a, b), max(a, b)): k for a, row in cooccurrence.items() for b, k in row.items() if a != b}
    return [p for p, _ in sorted(seen.items(), key=lambda pk: (-pk[1], pk[0]))[:n]]
