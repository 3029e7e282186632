"""The one right-padded batch builder: token rows of different lengths → ``input_ids``/``attention_mask`` (+ ``labels``).

Right padding is what teacher-forced passes want: with a causal mask, padding after a row's end
changes none of its states, and positions stay ``0 … T-1`` without position-id bookkeeping.
(Generation pads on the left instead: :meth:`~lens_halluc.models.LoadedVLM.encode`.)

Example
-------
>>> b = right_padded_batch([[5, 6, 7], [8]], pad_token_id=0, labels=[[-100, 6, 7], [8]])
>>> b["input_ids"].tolist(), b["attention_mask"].tolist(), b["labels"].tolist()
([[5, 6, 7], [8, 0, 0]], [[1, 1, 1], [1, 0, 0]], [[-100, 6, 7], [8, -100, -100]])
"""
from __future__ import annotations

from typing import Sequence

import torch

IGNORE = -100  # label of positions the loss skips (transformers' ignore_index)


def right_padded_batch(rows: Sequence[Sequence[int]], pad_token_id: int | None = 0,
                       labels: Sequence[Sequence[int]] | None = None, ignore_index: int = IGNORE,
                       device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """Right-pad token rows into one batch.

    Parameters
    ----------
    rows : token ids per row (lengths may differ; at least one row).
    pad_token_id : id written after each row's end (``None`` means 0).
    labels : optional per-row labels, each no longer than its row; padded with ``ignore_index``.
    device : where the tensors go (default: CPU).

    Returns
    -------
    ``{"input_ids", "attention_mask"}`` LongTensors ``[B, T]`` (``T`` = longest row), plus
    ``"labels"`` ``[B, T]`` when ``labels`` is given.

    Example
    -------
    >>> right_padded_batch([[1, 2], [3]])["attention_mask"].tolist()
    [[1, 1], [1, 0]]
    """
    if not rows:
        raise ValueError("right_padded_batch needs at least one row.")
    if labels is not None and len(labels) != len(rows):
        raise ValueError(f"{len(labels)} label rows for {len(rows)} token rows.")
    T = max(len(r) for r in rows)
    pad = 0 if pad_token_id is None else int(pad_token_id)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, :len(r)] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    if labels is not None:
        lab = torch.full((len(rows), T), int(ignore_index), dtype=torch.long)
        for i, y in enumerate(labels):
            if len(y) > len(rows[i]):
                raise ValueError(f"row {i}: {len(y)} labels for {len(rows[i])} tokens.")
            lab[i, :len(y)] = torch.as_tensor(list(y), dtype=torch.long)
        out["labels"] = lab
    if device is not None:
        out = {k: v.to(device) for k, v in out.items()}
    return out
