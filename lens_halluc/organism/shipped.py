"""Where the shipped model organism's checkpoints live inside the package.

Example
-------
>>> organism_path("final")                 # doctest: +SKIP
PosixPath('.../lens_halluc/organism/shipped/final')
"""
from __future__ import annotations

from pathlib import Path

from ..models.loading import ModelLoadError

SHIPPED_DIR = Path(__file__).parent / "shipped"
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


def ship_organism(train_dir: str | Path, dtype=None) -> Path:
    """Copy a recipe run into the package as the shipped organism (maintainers only).

    Weights are stored in float16 to keep the package small (``load_vlm`` loads float32); the
    final model is the last checkpoint, so it is not stored twice.
    """
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    src = Path(train_dir)
    dtype = dtype or torch.float16
    if SHIPPED_DIR.exists():
        shutil.rmtree(SHIPPED_DIR)
    dirs = ["base", "projector"] + [f"checkpoints/{p.name}" for p in sorted(
        (src / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))]
    for d in dirs:
        shutil.copytree(src / d, SHIPPED_DIR / d)
        for f in (SHIPPED_DIR / d).glob("*.safetensors"):
            tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(f).items()}
            save_file(tensors, f, metadata={"format": "pt"})
    (SHIPPED_DIR / "recipe.json").write_text((src / "recipe.json").read_text())
    return SHIPPED_DIR
