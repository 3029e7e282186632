"""The embedded default checkpoint: where the shipped model organism lies inside the package.

This is the one place core code knows the organism: as a default path. Everything else about it
(its world, recipe, splits) lives in :mod:`lens_halluc.organism`, above the methods.

Example
-------
>>> organism_path("final").name in ("final",) or organism_path("final").parent.name == "checkpoints"
True
"""
from __future__ import annotations

from pathlib import Path

from .errors import ModelLoadError

SHIPPED_DIR = Path(__file__).resolve().parents[1] / "organism" / "shipped"
STAGES = ("base", "projector", "final")


def organism_path(stage: str = "final", checkpoint: int | None = None) -> Path:
    """Directory of a shipped organism checkpoint.

    ``stage``: ``"base"`` (language model before visual tuning), ``"projector"`` (stage 2, the
    initial model for drift), ``"final"``; ``checkpoint=K`` selects the K-th stage-3 checkpoint.
    """
    if checkpoint is not None:
        path = SHIPPED_DIR / "checkpoints" / f"checkpoint-{int(checkpoint)}"
    elif stage == "final" and not (SHIPPED_DIR / "final").is_dir() and list_checkpoints():
        path = list_checkpoints()[-1]  # the final model is the last instruction-tuning checkpoint
    elif stage in STAGES:
        path = SHIPPED_DIR / stage
    else:
        raise ValueError(f"unknown organism stage {stage!r}; choose one of {STAGES} or pass checkpoint=K.")
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"the shipped organism has no {path.relative_to(SHIPPED_DIR)} checkpoint at {path}. "
            "Train one with `python -m lens_halluc.organism train --out DIR` and pass --model DIR."
        )
    return path


def list_checkpoints() -> list[Path]:
    """The shipped stage-3 checkpoints, in training order."""
    root = SHIPPED_DIR / "checkpoints"
    found = [p for p in root.glob("checkpoint-*") if (p / "config.json").is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))
