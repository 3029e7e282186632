"""COCO-format data, CHAIR, POPE and prompts (pure Python + numpy; no torch)."""
from .coco import Annotation, CocoDataset, DataError, ImageRecord, read_json

__all__ = ["Annotation", "CocoDataset", "DataError", "ImageRecord", "read_json"]
