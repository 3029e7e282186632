"""COCO-format loading: validation with clear errors."""
from __future__ import annotations

import json

import pytest

from lens_halluc.data import CocoDataset, DataError

INST = {"images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}],
        "categories": [{"id": 18, "name": "dog"}],
        "annotations": [{"image_id": 1, "category_id": 18, "bbox": [0, 0, 8, 8]}]}


def _write(tmp_path, obj, name="i.json"):
    p = tmp_path / name
    p.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)
    return p


def test_loads_and_queries(tmp_path):
    caps = {"annotations": [{"image_id": 2, "caption": "a cat ."}]}
    ds = CocoDataset.load(_write(tmp_path, INST), _write(tmp_path, caps, "c.json"))
    assert ds.image_ids == [1, 2] and ds.category_names(1) == {"dog"} and ds.category_names(2) == set()
    assert ds.captions[2] == ["a cat ."] and ds.subset([2]).image_ids == [2]


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(DataError, match="instances file not found"):
        CocoDataset.load(tmp_path / "nope.json")
    with pytest.raises(DataError, match="not valid JSON"):
        CocoDataset.load(_write(tmp_path, "{oops"))
    with pytest.raises(DataError, match="missing the 'annotations' list"):
        CocoDataset.load(_write(tmp_path, {"images": [], "categories": []}))


def test_unknown_ids(tmp_path):
    bad = dict(INST, annotations=[{"image_id": 1, "category_id": 99}])
    with pytest.raises(DataError, match="unknown category id 99"):
        CocoDataset.load(_write(tmp_path, bad))
    bad = dict(INST, annotations=[{"image_id": 7, "category_id": 18}])
    with pytest.raises(DataError, match="unknown image id 7"):
        CocoDataset.load(_write(tmp_path, bad))


def test_images_without_any_annotation_warn(tmp_path):
    with pytest.warns(UserWarning, match="neither instance annotations nor reference captions"):
        CocoDataset.load(_write(tmp_path, INST))


def test_missing_image_files(tmp_path):
    (tmp_path / "imgs").mkdir()
    with pytest.warns(UserWarning), pytest.raises(DataError, match="image directory not found"):
        CocoDataset.load(_write(tmp_path, INST), image_dir=tmp_path / "nope")
    with pytest.warns(UserWarning):
        with pytest.raises(DataError, match="2 image file\\(s\\).*missing"):
            CocoDataset.load(_write(tmp_path, INST), image_dir=tmp_path / "imgs", check_images=True)
