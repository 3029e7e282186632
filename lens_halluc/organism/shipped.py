"""Where the shipped model organism's checkpoints live inside the package.

Example
-------
>>> organism_path("final")                 # doctest: +SKIP
PosixPath('.../lens_halluc/organism/shipped/final')
"""
from __future__ import annotations

from pathlib import Path


from ..models.default import SHIPPED_DIR, STAGES, list_checkpoints, organism_path  # noqa: F401 (re-exported)


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
