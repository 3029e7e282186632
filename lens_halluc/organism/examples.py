"""Re-training examples from the organism's world: its training scenes as captions and yes/no questions.

The organism sits above the training layer, so the examples of its world are built here and
handed to :mod:`lens_halluc.training` as plain :class:`~lens_halluc.training.data.TrainExample` s.

Example
-------
>>> import lens_halluc as lh
>>> vlm = lh.load_vlm()                                                        # doctest: +SKIP
>>> res = lh.train.tfhh(vlm, [(0, 0), (1, 7)], training_examples(vlm.path, n=2000))  # doctest: +SKIP
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..models.default import organism_path
from ..models.prompts import CAPTION_PROMPT
from ..training.data import TrainExample
from .export import sample_split
from .recipe import read_organism_meta


def training_examples(model_dir: str | Path | None = None, n: int = 2000, seed: int = 0,
                      question_fraction: float = 0.5) -> list[TrainExample]:
    """Training scenes of an organism checkpoint's world: captions and yes/no questions.

    Parameters
    ----------
    model_dir : an organism checkpoint (its ``organism.json`` names the world); None for the shipped final model.
    n : number of examples (one scene each).
    seed : scene seed. 0 gives the recipe's own (normal, biased) training scenes: re-training sees
        the data distribution instruction tuning saw, never the held-out evaluation splits
        (seeds 1001–1004).
    question_fraction : share of yes/no questions (the rest are captions), in ``[0, 1]``.

    Returns
    -------
    list of ``n`` :class:`~lens_halluc.training.data.TrainExample` (PIL image, prompt, answer).

    Example
    -------
    >>> ex = training_examples(n=4)
    >>> len(ex), isinstance(ex[0].answer, str)
    (4, True)
    """
    if not 0.0 <= question_fraction <= 1.0:
        raise ValueError(f"question_fraction must be in [0, 1], got {question_fraction}.")
    world, _ = read_organism_meta(organism_path("final") if model_dir is None else model_dir)
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
