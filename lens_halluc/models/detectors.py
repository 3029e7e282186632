"""Open-vocabulary object detectors for HALC: one protocol, a transformers loader and a fixed one for tests.

A detector answers "where is ``phrase`` in ``image``?" with boxes in pixels::

    detector.detect(image: PIL.Image, phrase: str) -> list[((x0, y0, x1, y1), score)]

* :class:`HFZeroShotDetector` wraps any checkpoint that transformers' ``AutoModelForZeroShotObjectDetection``
  loads (Grounding DINO, which HALC uses by default, or OWLv2, its alternative). It is loaded like
  every model here: a local directory, the HF cache, or the hub when allowed (``HF_HUB_OFFLINE=1``
  forbids downloads; nothing is fetched in tests).
* :class:`FixedDetector`: the same boxes for every phrase (or a ``{phrase: boxes}`` table), for tests.

Every detector has ``describe()``: a JSON-able description (kind + parameters) that an intervention
stores in its parameters instead of the object.

Example
-------
>>> from PIL import Image
>>> det = FixedDetector([((4, 4, 20, 20), 0.9)])
>>> det.detect(Image.new("RGB", (48, 48)), "dog")
[((4.0, 4.0, 20.0, 20.0), 0.9)]
>>> det.describe()
{'kind': 'fixed', 'boxes': [[[4.0, 4.0, 20.0, 20.0], 0.9]]}
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import torch

__all__ = ["Box", "Detector", "FixedDetector", "FixedScorer", "HFImageTextScorer", "HFZeroShotDetector", "ImageTextScorer",
           "describe_detector"]

Box = tuple[tuple[float, float, float, float], float]
"""One detection: ``((x0, y0, x1, y1) in pixels, score)``."""


@runtime_checkable
class Detector(Protocol):
    """What HALC needs of a detector: boxes of ``phrase`` in ``image`` (pixels, xyxy) with scores."""

    def detect(self, image, phrase: str) -> list[Box]:
        ...


def _box(b: Sequence[float]) -> tuple[float, float, float, float]:
    if len(b) != 4:
        raise ValueError(f"a box is (x0, y0, x1, y1), got {b!r}.")
    x0, y0, x1, y1 = (float(v) for v in b)
    return (x0, y0, x1, y1)


def _boxes(boxes: Sequence) -> list[Box]:
    out = []
    for item in boxes:
        if len(item) == 2 and not isinstance(item[0], (int, float)):
            out.append((_box(item[0]), float(item[1])))
        else:  # a bare box: score 1
            out.append((_box(item), 1.0))
    return out


def describe_detector(detector) -> dict | None:
    """A JSON-able description of ``detector`` (its ``describe()``, else its class name); None for None."""
    if detector is None:
        return None
    describe = getattr(detector, "describe", None)
    if callable(describe):
        return describe()
    return {"kind": type(detector).__name__}


class FixedDetector:
    """Returns given boxes whatever the image: one list for every phrase, or ``{phrase: boxes}``.

    ``boxes``: ``[((x0, y0, x1, y1), score), ...]`` (a bare ``(x0, y0, x1, y1)`` gets score 1). With a
    mapping, a phrase not in it has no box. Deterministic by construction (tests).
    """

    def __init__(self, boxes: Sequence | Mapping[str, Sequence] = ()):
        if isinstance(boxes, Mapping):
            self.table: dict[str, list[Box]] | None = {str(k): _boxes(v) for k, v in boxes.items()}
            self.boxes: list[Box] = []
        else:
            self.table = None
            self.boxes = _boxes(boxes)
        self.calls: list[str] = []

    def detect(self, image, phrase: str) -> list[Box]:
        self.calls.append(phrase)
        if self.table is not None:
            return list(self.table.get(phrase, []))
        return list(self.boxes)

    def describe(self) -> dict:
        enc = lambda bs: [[list(b), s] for b, s in bs]  # noqa: E731
        if self.table is not None:
            return {"kind": "fixed", "table": {k: enc(v) for k, v in self.table.items()}}
        return {"kind": "fixed", "boxes": enc(self.boxes)}


class HFZeroShotDetector:
    """A transformers zero-shot detector (Grounding DINO, OWLv2...), loaded like any model.

    Parameters
    ----------
    model_id_or_path : a local directory or a hub id (e.g. ``"IDEA-Research/grounding-dino-tiny"``,
        ``"google/owlv2-base-patch16-ensemble"``). With ``HF_HUB_OFFLINE=1`` (or
        ``local_files_only=True``) only local files / the cache are used.
    threshold : box score threshold. Default 0.45, HALC's ``--box_threshold`` for Grounding DINO
        (``run_scripts/caption_generation.py``; its README says 0.4). HALC's OWLv2 path uses 0.05.
    text_threshold : Grounding DINO's text threshold (its default 0.25); unused by OWLv2.
    device : where the detector runs (default CPU).

    ``detect`` returns boxes in the pixels of the image it is given, best score first.
    """

    def __init__(self, model_id_or_path: str | os.PathLike, threshold: float = 0.45, text_threshold: float = 0.25,
                 device: str | torch.device = "cpu", local_files_only: bool | None = None):
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        self.model_id_or_path = str(model_id_or_path)
        self.threshold, self.text_threshold = float(threshold), float(text_threshold)
        if local_files_only is None:
            local_files_only = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
        kw: dict[str, Any] = {"local_files_only": bool(local_files_only)}
        self.processor = AutoProcessor.from_pretrained(self.model_id_or_path, **kw)
        self.model = AutoModelForZeroShotObjectDetection.from_pretrained(self.model_id_or_path,
                                                                         **kw)
        self.model.eval().to(device)
        self.device = torch.device(device)

    @property
    def kind(self) -> str:
        return getattr(self.model.config, "model_type", type(self.model).__name__)

    def _text(self, phrase: str):
        if self.kind == "grounding-dino":  # Grounding DINO wants lower-case phrases ending with "."
            p = phrase.strip().lower()
            return p if p.endswith(".") else p + "."
        return [[phrase]]  # OWL-ViT / OWLv2: one list of queries per image

    @torch.no_grad()
    def detect(self, image, phrase: str) -> list[Box]:
        image = image.convert("RGB")
        text = self._text(phrase)
        inputs = self.processor(images=image, text=text, return_tensors="pt").to(self.device)
        outputs = self.model(**inputs)
        size = [(image.height, image.width)]
        post = self.processor.post_process_grounded_object_detection
        if self.kind == "grounding-dino":
            res = post(outputs, inputs["input_ids"], threshold=self.threshold, text_threshold=self.text_threshold,
                       target_sizes=size)[0]
        else:
            res = post(outputs, threshold=self.threshold, target_sizes=size)[0]
        found = [(_box(b.tolist()), float(s)) for b, s in zip(res["boxes"], res["scores"])]
        return sorted(found, key=lambda d: -d[1])

    def describe(self) -> dict:
        return {"kind": "hf_zero_shot", "model": self.model_id_or_path, "threshold": self.threshold,
                "text_threshold": self.text_threshold}


# ------------------------------------------------------------------ image–text scorers (HALC's beam search)
@runtime_checkable
class ImageTextScorer(Protocol):
    """Image–text similarity for HALC's visual-matching beam search: one score per text (higher = closer)."""

    def score(self, image, texts: Sequence[str]) -> list[float]:
        ...


class FixedScorer:
    """Scores texts with a plain function ``fn(text) -> float`` whatever the image (tests)."""

    def __init__(self, fn, name: str = "fixed"):
        self.fn, self.name = fn, name
        self.calls: list[list[str]] = []

    def score(self, image, texts: Sequence[str]) -> list[float]:
        self.calls.append(list(texts))
        return [float(self.fn(t)) for t in texts]

    def describe(self) -> dict:
        return {"kind": "fixed_scorer", "name": self.name}


class HFImageTextScorer:
    """``logits_per_image`` of a transformers CLIP / BLIP model (HALC: ``score_type`` "BLIP", its default,
    ``Salesforce/blip-image-captioning-large``; or "CLIP", ``openai/clip-vit-base-patch32``), loaded like any model."""

    def __init__(self, model_id_or_path: str | os.PathLike, device: str | torch.device = "cpu",
                 local_files_only: bool | None = None):
        from transformers import AutoModel, AutoProcessor

        self.model_id_or_path = str(model_id_or_path)
        if local_files_only is None:
            local_files_only = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
        kw: dict[str, Any] = {"local_files_only": bool(local_files_only)}
        self.processor = AutoProcessor.from_pretrained(self.model_id_or_path, **kw)
        self.model = AutoModel.from_pretrained(self.model_id_or_path, **kw).eval().to(device)
        self.device = torch.device(device)

    @torch.no_grad()
    def score(self, image, texts: Sequence[str]) -> list[float]:
        inputs = self.processor(text=list(texts), images=image.convert("RGB"), return_tensors="pt", padding=True,
                                truncation=True).to(self.device)
        return self.model(**inputs).logits_per_image[0].float().tolist()

    def describe(self) -> dict:
        return {"kind": "hf_image_text", "model": self.model_id_or_path}
