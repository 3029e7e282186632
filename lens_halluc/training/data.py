"""Training examples (image, prompt, answer) and the teacher-forced batches every method trains on.

A batch is ``template(prompt)`` with the image, followed by the answer's tokens and EOS, right-
padded; ``labels`` are the answer tokens (``IGNORE`` = -100 elsewhere), so ``model(**batch).loss``
is the answer cross-entropy, and ``answer_query_mask(labels)`` marks the positions that *predict*
an answer token (where TFHH and the distillation losses are taken).

Examples come from :func:`coco_caption_examples` here, or from the organism's training scenes
(:func:`lens_halluc.organism.examples.training_examples`, a layer above).

Example
-------
>>> ex = coco_caption_examples(CocoDataset.load(instances, captions, images), n=64)  # doctest: +SKIP
>>> batch = collate(vlm, ex[:8])                                               # doctest: +SKIP
>>> batch["input_ids"].shape, batch["labels"].shape, batch["pixel_values"].shape  # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from ..models.batching import IGNORE


@dataclass(frozen=True)
class TrainExample:
    """One supervised example: ``image`` (PIL image or path), user ``prompt``, target ``answer``.

    Example
    -------
    >>> TrainExample("cat.jpg", "Is there a cat in the image?", "Yes").answer
    'Yes'
    """

    image: Any
    prompt: str
    answer: str


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
    """Teacher-forced batch: ``input_ids``/``attention_mask``/``labels`` ``[B, T]`` (right-padded) and
    every image input of the family (``pixel_values``, ``image_sizes``, ``image_grid_thw`` ...), per-token
    inputs (``token_type_ids``, ``mm_token_type_ids`` ...) extended over the answer and right-padded.

    The prompt part is exactly what :meth:`LoadedVLM.encode` produces at inference (template, image
    tokens expanded by the processor), so training and decoding see the same prefix; the answers
    are appended and the rows right-padded by :meth:`LoadedVLM.caption_batch`.

    Example
    -------
    >>> batch = collate(vlm, examples[:8])                                      # doctest: +SKIP
    >>> vlm.model(**batch).loss                   # the answer cross-entropy    # doctest: +SKIP
    """
    from ..generation.runner import load_image

    tok = vlm.tokenizer
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    images = [load_image(e.image) if isinstance(e.image, (str, Path)) else e.image for e in examples]
    answers = [list(tok(e.answer, add_special_tokens=False)["input_ids"]) + eos for e in examples]
    batch = vlm.caption_batch(images, [e.prompt for e in examples], answers)
    lengths = batch["attention_mask"].sum(-1).tolist()
    labels = torch.full_like(batch["input_ids"], IGNORE)
    for r, a in enumerate(answers):
        end = int(lengths[r])
        labels[r, end - len(a):end] = torch.tensor(a, dtype=torch.long)
    return batch | {"labels": labels}


def answer_query_mask(labels: torch.Tensor) -> torch.Tensor:
    """BoolTensor ``[B, T]``: position ``q`` predicts an answer token (``labels[:, q + 1] != IGNORE``).

    Example
    -------
    >>> answer_query_mask(torch.tensor([[IGNORE, IGNORE, 7, 2]])).tolist()
    [[False, True, True, False]]
    """
    out = torch.zeros_like(labels, dtype=torch.bool)
    out[:, :-1] = labels[:, 1:] != IGNORE
    return out


def example_batches(examples: Sequence[TrainExample], batch_size: int, steps: int, seed: int) -> Iterator[list[TrainExample]]:
    """``steps`` batches sampled without replacement within a batch, reproducibly from ``seed``.

    Example
    -------
    >>> [len(b) for b in example_batches(list("abcde"), batch_size=2, steps=3, seed=0)]
    [2, 2, 2]
    """
    if not examples:
        raise ValueError("no training examples.")
    rng = np.random.default_rng(seed)
    b = min(batch_size, len(examples))
    for _ in range(steps):
        yield [examples[int(i)] for i in rng.choice(len(examples), size=b, replace=False)]
