"""COCO-format datasets: instances JSON + captions JSON + an image directory.

A :class:`CocoDataset` is the one data noun of lens_halluc. CHAIR takes its ground truth from it,
POPE builds questions from it, the captioning runner reads its images, and the model organism
exports its synthetic world in the same format, so every analysis runs unchanged on real COCO.

Example
-------
>>> ds = CocoDataset.load("instances_val2014.json", captions="captions_val2014.json",
...                       image_dir="val2014/")                          # doctest: +SKIP
>>> ds.category_names(ds.image_ids[0])                                   # doctest: +SKIP
{'person', 'surfboard'}
"""
from __future__ import annotations

import json
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable


class DataError(ValueError):
    """Raised for missing or malformed dataset files; the message names the file and the fix."""


def _as_id(value, where: str) -> int:
    """An image / category id: an int (or an integral float, or a string of digits, as some exports write)."""
    if isinstance(value, bool):
        raise DataError(f"{where}: id must be an integer, got {value!r}.")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    raise DataError(f"{where}: id must be an integer, got {value!r}.")


def _as_bbox(value, where: str) -> tuple[float, float, float, float]:
    """A COCO box ``[x, y, w, h]``: four finite numbers, ``w, h >= 0``."""
    import math

    ok = isinstance(value, (list, tuple)) and len(value) == 4 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    if not ok or value[2] < 0 or value[3] < 0:
        raise DataError(f"{where}: bbox must be [x, y, width, height] (four numbers, width and height >= 0), "
                        f"got {value!r}.")
    return tuple(float(v) for v in value)


def read_json(path: str | Path, what: str) -> dict | list:
    """Read a JSON file, with an error that says which input it was meant to be."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} file not found: {path}. Pass the path of an existing COCO-format JSON file.")
    try:
        with path.open() as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{what} file {path} is not valid JSON ({e}). Check that it is a COCO-format JSON file.") from e


def read_probes(path: str | Path, dataset: "CocoDataset | None" = None) -> dict[int, dict[str, str]]:
    """``{image_id: {"A": name, "B": name}}`` of a ``probes.json``; ids become ints.

    >>> read_probes("world/break-100/probes.json")[1]          # doctest: +SKIP
    {'A': 'dog', 'B': 'frisbee'}
    """
    raw = read_json(path, "probes")
    if not isinstance(raw, dict):
        raise DataError(f"probes file {path}: expected a JSON object {{image_id: {{\"A\": name, \"B\": name}}}}.")
    out: dict[int, dict[str, str]] = {}
    for k, v in raw.items():
        if not (isinstance(v, dict) and "B" in v and str(k).strip().isdigit()):
            raise DataError(f"probes file {path}: entry {k!r} must map an integer image id to {{\"A\": name, \"B\": name}}.")
        out[int(k)] = {str(a): str(b) for a, b in v.items()}
    if dataset is not None:
        unknown = [i for i in out if i not in dataset.images]
        if unknown:
            raise DataError(f"probes file {path} names image ids not in the instances file (first: {unknown[0]}).")
    return out


@dataclass(frozen=True)
class ImageRecord:
    """One image entry of a COCO instances file."""

    id: int
    file_name: str
    width: int | None = None
    height: int | None = None


@dataclass(frozen=True)
class Annotation:
    """One object instance: category id and box ``[x, y, w, h]`` in pixels."""

    image_id: int
    category_id: int
    bbox: tuple[float, float, float, float] | None = None


@dataclass
class CocoDataset:
    """Images, object instances and reference captions in COCO format.

    Example
    -------
    >>> ds = CocoDataset.load("instances_val2014.json", "captions_val2014.json", "val2014/")   # doctest: +SKIP
    >>> ds.image_ids[:3], ds.image_path(ds.image_ids[0])                                       # doctest: +SKIP
    >>> ds = lens_halluc.organism.split("break", n=100, seed=1)    # the organism's world    # doctest: +SKIP

    Attributes
    ----------
    categories : dict[int, str]
        Category id -> category name.
    images : dict[int, ImageRecord]
        Image id -> record, in file order.
    annotations : dict[int, list[Annotation]]
        Image id -> its instances (empty list when the image has none).
    captions : dict[int, list[str]]
        Image id -> reference captions (empty when no captions file was given).
    image_dir : Path | None
        Directory holding the image files.
    allow_outside_image_dir : bool
        Open image files whose ``file_name`` leads outside :attr:`image_dir` (``..``, absolute
        paths). False by default: :meth:`image_path` refuses them.
    max_image_pixels : int | None
        Pixel limit of :meth:`check_images` and the runners (None: :data:`lens_halluc.data.images.MAX_IMAGE_PIXELS`).
    probes : dict[int, dict[str, str]]
        Image id -> its co-occurrence probe ``{"A": present name, "B": absent partner name}``, read
        from a ``probes.json`` beside the instances file (the organism's break/control splits write
        one); empty otherwise. With probes, :func:`lens_halluc.data.chair.chair` adds partner rates.
    source : str | None
        Where the dataset was loaded from (the instances path), for provenance.
    """

    categories: dict[int, str]
    images: dict[int, ImageRecord]
    annotations: dict[int, list[Annotation]] = field(default_factory=dict)
    captions: dict[int, list[str]] = field(default_factory=dict)
    image_dir: Path | None = None
    probes: dict[int, dict[str, str]] = field(default_factory=dict)
    source: str | None = None
    allow_outside_image_dir: bool = False
    max_image_pixels: int | None = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls,
        instances: str | Path,
        captions: str | Path | None = None,
        image_dir: str | Path | None = None,
        check_images: bool = False,
        allow_outside_image_dir: bool = False,
        max_image_pixels: int | None = None,
    ) -> "CocoDataset":
        """Load and validate a dataset.

        Parameters
        ----------
        instances : path to a COCO instances JSON (``images``, ``annotations``, ``categories``).
        captions : optional path to a COCO captions JSON (``annotations`` with ``caption``).
        image_dir : optional directory with the image files.
        check_images : if True, every image file must exist in ``image_dir``, be readable and within
            the pixel limit (:meth:`check_images`).
        allow_outside_image_dir : open ``file_name`` entries that lead outside ``image_dir`` (``../x``,
            absolute paths); refused by default (``--allow-outside-image-dir``).
        max_image_pixels : pixel limit of an image (default: PIL's, ``--max-image-pixels``).

        A ``probes.json`` (``{image_id: {"A": name, "B": name}}``) beside ``instances`` is read into
        :attr:`probes`.

        Example
        -------
        >>> ds = CocoDataset.load("world/instances.json", "world/captions.json", "world/images")  # doctest: +SKIP
        """
        inst = read_json(instances, "instances")
        ds = cls.from_dicts(inst, read_json(captions, "captions") if captions is not None else None,
                            source=str(instances))
        ds.source = str(instances)
        ds.allow_outside_image_dir = bool(allow_outside_image_dir)
        ds.max_image_pixels = max_image_pixels
        probes_path = Path(instances).parent / "probes.json"
        if probes_path.is_file():
            ds.probes = read_probes(probes_path, ds)
        if image_dir is not None:
            ds.image_dir = Path(image_dir)
            if not ds.image_dir.is_dir():
                raise DataError(f"image directory not found: {ds.image_dir}. Pass --image-dir pointing at the images.")
            if check_images:
                ds.check_images()
        return ds

    @classmethod
    def from_dicts(cls, instances: dict, captions: dict | None = None, source: str = "instances") -> "CocoDataset":
        """Build a dataset from already-parsed COCO dicts (validated like :meth:`load`)."""
        if not isinstance(instances, dict):
            raise DataError(f"{source}: expected a JSON object with 'images', 'annotations', 'categories'.")
        for key in ("images", "annotations", "categories"):
            if key not in instances:
                raise DataError(f"{source}: missing the '{key}' list; this does not look like a COCO instances file.")
        for key in ("images", "annotations", "categories"):
            if not isinstance(instances[key], list):
                raise DataError(f"{source}: '{key}' must be a list, got {type(instances[key]).__name__}.")
        try:
            categories = {_as_id(c["id"], f"{source}, category #{k}"): str(c["name"])
                          for k, c in enumerate(instances["categories"])}
            images = {}
            for k, im in enumerate(instances["images"]):
                where = f"{source}, image #{k}"
                i = _as_id(im["id"], where)
                if i in images:
                    raise DataError(f"{where}: image id {i} is listed twice.")
                if not isinstance(im["file_name"], str) or not im["file_name"].strip():
                    raise DataError(f"{where}: file_name must be a non-empty string, got {im['file_name']!r}.")
                images[i] = ImageRecord(i, im["file_name"], im.get("width"), im.get("height"))
        except (KeyError, TypeError) as e:
            raise DataError(f"{source}: malformed category or image entry ({e!r}); each needs 'id' and 'name'/'file_name'.") from e
        anns: dict[int, list[Annotation]] = {i: [] for i in images}
        for k, a in enumerate(instances["annotations"]):
            try:
                img = _as_id(a["image_id"], f"{source}, annotation #{k} image_id")
                cat = _as_id(a["category_id"], f"{source}, annotation #{k} category_id")
            except (KeyError, TypeError) as e:
                raise DataError(f"{source}: annotation #{k} lacks 'image_id' or 'category_id'.") from e
            if cat not in categories:
                raise DataError(f"{source}: annotation #{k} has unknown category id {cat}; add it to 'categories'.")
            if img not in images:
                raise DataError(f"{source}: annotation #{k} refers to unknown image id {img}; add it to 'images'.")
            bbox = _as_bbox(a["bbox"], f"{source}, annotation #{k}") if a.get("bbox") is not None else None
            anns[img].append(Annotation(img, cat, bbox))
        caps: dict[int, list[str]] = defaultdict(list)
        if captions is not None:
            if not isinstance(captions, dict) or "annotations" not in captions:
                raise DataError("captions: expected a COCO captions JSON object with an 'annotations' list.")
            for k, a in enumerate(captions["annotations"]):
                try:
                    caps[_as_id(a["image_id"], f"captions, annotation #{k} image_id")].append(str(a["caption"]))
                except (KeyError, TypeError) as e:
                    raise DataError(f"captions: annotation #{k} lacks 'image_id' or 'caption'.") from e
        # An image with neither instances nor captions has no ground truth: CHAIR would count every
        # mention on it as a hallucination. Real COCO has images without instances (but with captions).
        bare = [i for i in images if not anns[i] and not caps.get(i)]
        if bare:
            warnings.warn(f"{source}: {len(bare)} image(s) have neither instance annotations nor reference captions "
                          f"(first id: {bare[0]}); CHAIR will treat every object mentioned on them as hallucinated. "
                          "Pass the captions file, or drop these images with .subset().", stacklevel=3)
        return cls(categories=categories, images=images, annotations=anns, captions=dict(caps))

    # ------------------------------------------------------------------ queries
    @property
    def image_ids(self) -> list[int]:
        """All image ids, in file order."""
        return list(self.images)

    @property
    def category_ids_by_name(self) -> dict[str, int]:
        return {name: cid for cid, name in self.categories.items()}

    def category_ids(self, image_id: int) -> list[int]:
        """Distinct category ids annotated on an image, in first-annotation order."""
        return list(dict.fromkeys(a.category_id for a in self.annotations.get(image_id, [])))

    def category_names(self, image_id: int) -> set[str]:
        """Names of the categories annotated on an image."""
        return {self.categories[c] for c in self.category_ids(image_id)}

    def image_path(self, image_id: int) -> Path:
        """Path of an image file; raises if the dataset has no image directory or the file is missing."""
        if self.image_dir is None:
            raise DataError("this dataset was loaded without an image directory; pass image_dir / --image-dir.")
        if image_id not in self.images:
            raise DataError(f"unknown image id {image_id}.")
        from .images import resolve_image

        p = resolve_image(self.image_dir, self.images[image_id].file_name, self.allow_outside_image_dir,
                          source=f"{self.source or 'instances'}, image id {image_id}")
        if not p.is_file():
            raise DataError(f"image file missing: {p}. Check --image-dir.")
        return p

    def check_images(self, image_ids: Iterable[int] | None = None) -> None:
        """Check, before any work, that each image file is inside :attr:`image_dir`, exists, is an
        image and is within :attr:`max_image_pixels` (headers only); ``DataError`` names the files.

        Example
        -------
        >>> ds.check_images(ds.image_ids[:100])                          # doctest: +SKIP
        """
        from .images import check_image, resolve_image

        if self.image_dir is None:
            raise DataError("this dataset was loaded without an image directory; pass image_dir / --image-dir.")
        ids = self.image_ids if image_ids is None else list(image_ids)
        unknown = [i for i in ids if i not in self.images]
        if unknown:
            raise DataError(f"unknown image id(s) {unknown[:5]}.")
        paths = [resolve_image(self.image_dir, self.images[i].file_name, self.allow_outside_image_dir,
                               source=f"{self.source or 'instances'}, image id {i}") for i in ids]
        missing = [self.images[i].file_name for i, p in zip(ids, paths) if not p.is_file()]
        if missing:
            raise DataError(f"{len(missing)} image file(s) listed in {self.source or 'the instances file'} are missing "
                            f"from {self.image_dir} (first: {missing[0]}). Point --image-dir at the folder that holds them.")
        for p in paths:
            check_image(p, self.max_image_pixels)

    def subset(self, image_ids: Iterable[int]) -> "CocoDataset":
        """A dataset restricted to the given image ids (same categories)."""
        ids = [int(i) for i in image_ids]
        unknown = [i for i in ids if i not in self.images]
        if unknown:
            raise DataError(f"unknown image id(s) {unknown[:5]}.")
        return CocoDataset(
            categories=dict(self.categories),
            images={i: self.images[i] for i in ids},
            annotations={i: list(self.annotations.get(i, [])) for i in ids},
            captions={i: list(self.captions.get(i, [])) for i in ids if i in self.captions},
            image_dir=self.image_dir,
            probes={i: dict(self.probes[i]) for i in ids if i in self.probes},
            source=self.source,
            allow_outside_image_dir=self.allow_outside_image_dir,
            max_image_pixels=self.max_image_pixels,
        )

