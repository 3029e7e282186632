"""Training examples (image, prompt, answer) and the teacher-forced batches every method trains on.

A batch is ``template(prompt)`` with the image, followed by the answer's tokens and EOS, right-
padded; ``labels`` are the answer tokens (``IGNORE`` = -100 elsewhere), so ``model(**batch).loss``
is the answer cross-entropy, and ``answer_query_mask(labels)`` marks the positions that *predict*
an answer token (where TFHH and the distillation losses are taken).

Example
-------
>>> ex = organism_examples(organism_path(), n=64, seed=0)                     # doctest: +SKIP
>>> batch = collate(vlm, ex[:8])                                               # doctest: +SKIP
>>> batch["input_ids"].shape, batch["labels"].shape, batch["pixel_values"].shape  # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

IGNORE = -100


@dataclass(frozen=True)
class TrainExample:
    """One supervised example: ``image`` (PIL image or path), user ``prompt``, target ``answer``."""

    image: Any
    prompt: str
    answer: str


def organism_examples(model_dir: str | Path, n: int = 2000, seed: int = 0,
                      question_fraction: float = 0.5) -> list[TrainExample]:
    """Training scenes of an organism checkpoint's world: captions and yes/no questions.

    ``seed`` 0 gives the recipe's own (normal, biased) training scenes: re-training sees the data
    distribution instruction tuning saw, never the held-out evaluation splits (seeds 1001–1004).

    >>> ex = organism_examples(organism_path(), n=4)                            # doctest: +SKIP
    >>> ex[0].prompt, ex[0].answer                                              # doctest: +SKIP
    """
    from ..models.prompts import CAPTION_PROMPT
    from ..organism.export import sample_split
    from ..organism.recipe import read_organism_meta

    if not 0.0 <= question_fraction <= 1.0:
        raise ValueError(f"question_fraction must be in [0, 1], got {question_fraction}.")
    world, _ = read_organism_meta(model_dir)
    rng = np.random.default_rng(seed + 1)
    out = []
    for scene in sample_split(world, "normal", n, seed):
        img = world.render(scene)
        if rng.random() < question_fraction:
            qs = world.questions(scene, rng)
            q = qs[int(rng.integers(len(qs)))]
            out.append(TrainExample(img, q.text, q.answer))
        else:
            out.append(TrainExample(img, CAPTION_PROMPT, world.caption(scene)))
    return out


def coco_caption_examples(dataset, n: int | None = None, seed: int = 0, prompt: str | None = None) -> list[TrainExample]:
    """Caption examples of a :class:`~lens_halluc.data.coco.CocoDataset` (one random reference caption per image).

    >>> ds = CocoDataset.load("instances_train2014.json", "captions_train2014.json", "train2014")  # doctest: +SKIP
    >>> ex = coco_caption_examples(ds, n=5000)                                   # doctest: +SKIP
    """
    from ..models.prompts import CAPTION_PROMPT

    rng = np.random.default_rng(seed)
    ids = [i for i in dataset.image_ids if dataset.captions.get(i)]
    if not ids:
        raise ValueError("the dataset has no reference captions: pass the COCO captions JSON (--references).")
    rng.shuffle(ids)
    ids = ids[:n] if n else ids
    prompt = CAPTION_PROMPT if prompt is None else prompt
    return [TrainExample(dataset.image_path(i), prompt, dataset.captions[i][int(rng.integers(len(dataset.captions[i])))])
            for i in ids]


def collate(vlm, examples: Sequence[TrainExample]) -> dict[str, torch.Tensor]:
    """Teacher-forced batch: ``input_ids``/``attention_mask``/``labels`` ``[B, T]`` (right-padded), ``pixel_values``.

    The prompt part is exactly what :meth:`LoadedVLM.encode` produces at inference (template, image
    tokens expanded by the processor), so training and decoding see the same prefix.
    """
    from ..generation.runner import load_image

    images = [load_image(e.image) if isinstance(e.image, (str, Path)) else e.image for e in examples]
    enc = vlm.encode(images, [e.prompt for e in examples])
    tok = vlm.tokenizer
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    rows, labels = [], []
    for r, e in enumerate(examples):
        p = enc["input_ids"][r][enc["attention_mask"][r].bool()].tolist()  # drop the left padding
        a = list(tok(e.answer, add_special_tokens=False)["input_ids"]) + eos
        rows.append(p + a)
        labels.append([IGNORE] * len(p) + a)
    T = max(len(r) for r in rows)
    pad = vlm.spec.pad_token_id if vlm.spec.pad_token_id is not None else 0
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    lab = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for r, (x, y) in enumerate(zip(rows, labels)):
        ids[r, :len(x)], lab[r, :len(y)], mask[r, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    dev = vlm.device
    return {"input_ids": ids.to(dev), "attention_mask": mask.to(dev), "labels": lab.to(dev),
            "pixel_values": enc["pixel_values"]}


def answer_query_mask(labels: torch.Tensor) -> torch.Tensor:
    """BoolTensor ``[B, T]``: position ``q`` predicts an answer token (``labels[:, q + 1] != IGNORE``)."""
    out = torch.zeros_like(labels, dtype=torch.bool)
    out[:, :-1] = labels[:, 1:] != IGNORE
    return out


def example_batches(examples: Sequence[TrainExample], batch_size: int, steps: int, seed: int) -> Iterator[list[TrainExample]]:
    """``steps`` batches sampled without replacement within a batch, reproducibly from ``seed``."""
    if not examples:
        raise ValueError("no training examples.")
    rng = np.random.default_rng(seed)
    b = min(batch_size, len(examples))
    for _ in range(steps):
        yield [examples[int(i)] for i in rng.choice(len(examples), size=b, replace=False)]
