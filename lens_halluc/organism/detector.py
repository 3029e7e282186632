"""The organism's own object detector (for HALC): a linear per-patch classifier learned from its scenes.

The organism's objects are glyphs of one grid cell (``patch_size`` pixels square), so detection is
per-cell classification: a softmax-linear model (equivalently one convolution with kernel = stride =
``patch_size``) maps each cell's pixels to "background" or one of the world's categories. It is
trained by :func:`train_detector` on rendered scenes (normal and bias-breaking ones; a hidden partner
is not drawn, so its cell is background), with a seed, in a few seconds on CPU. At inference it sees
**pixels only** — never the scene annotations — and returns the cells whose probability for the
queried category is at least ``threshold`` as pixel boxes.

It satisfies :class:`lens_halluc.models.detectors.Detector`, so it plugs into
``lens_halluc.interventions.HALC(detector=...)``.

What an organism HALC row can show: whether HALC's FOV contrast changes the organism's partner
hallucinations when the detector is good (the organism's glyphs are easy). What it cannot show:
anything about a real detector's errors on natural images, or about the FOV crops' effect on a
vision tower that has seen crops (the organism's tower saw only whole 48×48 scenes; crops are
resized up by the processor, which changes the glyph scale).

Example
-------
>>> from lens_halluc.organism.world import World
>>> det = train_detector(World(), n_scenes=200, seed=0)              # doctest: +SKIP
>>> det.detect(World().render(scene), "dog")                          # doctest: +SKIP
[((16.0, 8.0, 24.0, 16.0), 0.99)]
"""
from __future__ import annotations

import numpy as np
import torch

from ..data.chair import load_synonyms, singularize
from .world import World

__all__ = ["OrganismDetector", "evaluate_detector", "train_detector"]


def _cells(world: World, image) -> np.ndarray:
    """``[grid*grid, patch*patch*3]`` float pixels in [0, 1] of a (resized if needed) scene image."""
    s, p, g = world.config.image_size, world.config.patch_size, world.grid
    im = image.convert("RGB")
    if im.size != (s, s):
        im = im.resize((s, s))
    a = np.asarray(im, dtype=np.float32) / 255.0
    a = a.reshape(g, p, g, p, 3).transpose(0, 2, 1, 3, 4).reshape(g * g, p * p * 3)
    return a


def _labels(world: World, scene) -> np.ndarray:
    g = world.grid
    y = np.zeros(g * g, dtype=np.int64)  # 0 = background
    for o in scene.objects:
        if o.drawn:
            r, c = o.cell
            y[r * g + c] = 1 + world.names.index(o.name)
    return y


def _scenes(world: World, n: int, rng: np.random.Generator) -> list:
    splits = ["normal", "normal", "break", "control"]
    return [world.sample_scene(rng, splits[i % len(splits)]) for i in range(n)]


class OrganismDetector:
    """A learned per-cell detector of the organism world's categories (see the module docstring).

    ``weight`` ``[features, 1 + n_categories]`` and ``bias`` are the fitted linear model (class 0 =
    background); ``names`` the world's category names (class ``i + 1``).
    """

    def __init__(self, world: World, weight: torch.Tensor, bias: torch.Tensor, threshold: float = 0.5,
                 seed: int = 0, n_scenes: int = 0):
        self.world, self.weight, self.bias = world, weight, bias
        self.threshold, self.seed, self.n_scenes = float(threshold), int(seed), int(n_scenes)
        self.names = list(world.names)
        self._synonyms = load_synonyms()

    def probabilities(self, image) -> np.ndarray:
        """``[grid*grid, 1 + n_categories]`` class probabilities of every cell."""
        x = torch.from_numpy(_cells(self.world, image))
        return torch.softmax(x @ self.weight + self.bias, -1).numpy()

    def category(self, phrase: str) -> str | None:
        """The world category ``phrase`` names (CHAIR singular and synonyms), or None."""
        w = phrase.strip(" .,'").lower()
        for cand in (w, singularize(w)):
            node = self._synonyms.get(cand, cand)
            if node in self.names:
                return node
        return None

    def detect(self, image, phrase: str) -> list:
        name = self.category(phrase)
        if name is None:
            return []
        k = 1 + self.names.index(name)
        prob = self.probabilities(image)[:, k]
        g, p = self.world.grid, self.world.config.patch_size
        sx, sy = image.size[0] / self.world.config.image_size, image.size[1] / self.world.config.image_size
        out = []
        for i in np.flatnonzero(prob >= self.threshold):
            r, c = divmod(int(i), g)
            out.append(((c * p * sx, r * p * sy, (c + 1) * p * sx, (r + 1) * p * sy), float(prob[i])))
        return sorted(out, key=lambda d: -d[1])

    def describe(self) -> dict:
        return {"kind": "organism_linear_cells", "threshold": self.threshold, "seed": self.seed,
                "n_scenes": self.n_scenes}


def train_detector(world: World | None = None, n_scenes: int = 100, seed: int = 0, steps: int = 100,
                   lr: float = 0.05, weight_decay: float = 1e-4, threshold: float = 0.5) -> OrganismDetector:
    """Fit the per-cell softmax-linear detector on ``n_scenes`` rendered scenes (deterministic given ``seed``)."""
    world = world or World()
    rng = np.random.default_rng(seed)
    scenes = _scenes(world, n_scenes, rng)
    x = torch.from_numpy(np.concatenate([_cells(world, world.render(s)) for s in scenes]))
    y = torch.from_numpy(np.concatenate([_labels(world, s) for s in scenes]))
    gen = torch.Generator().manual_seed(seed)
    n_cls = 1 + len(world.names)
    weight = (torch.randn(x.shape[1], n_cls, generator=gen) * 0.01).requires_grad_()
    bias = torch.zeros(n_cls, requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=lr, weight_decay=weight_decay)
    # background cells outnumber object cells; weight the classes so objects are not ignored
    counts = torch.bincount(y, minlength=n_cls).float().clamp(min=1)
    cls_w = (counts.sum() / counts) / (counts.sum() / counts).mean()
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight + bias, y, weight=cls_w)
        loss.backward()
        opt.step()
    return OrganismDetector(world, weight.detach(), bias.detach(), threshold=threshold, seed=seed, n_scenes=n_scenes)


def evaluate_detector(detector: OrganismDetector, n_scenes: int = 200, seed: int = 12345) -> dict:
    """Held-out accuracy: per-cell accuracy, and per (scene, category) query precision / recall of the boxes.

    A query is every category of the world asked on every scene; a box is correct when it is the cell
    of a *drawn* object of that category.
    """
    world = detector.world
    rng = np.random.default_rng(seed)
    scenes = _scenes(world, n_scenes, rng)
    correct = total = tp = fp = fn = 0
    exact = queries = 0
    p = world.config.patch_size
    for s in scenes:
        image = world.render(s)
        y = _labels(world, s)
        pred = detector.probabilities(image).argmax(-1)
        correct += int((pred == y).sum())
        total += len(y)
        for name in world.names:
            truth = {(o.cell[1] * p, o.cell[0] * p) for o in s.objects if o.drawn and o.name == name}
            got = {(int(round(b[0])), int(round(b[1]))) for b, _ in detector.detect(image, name)}
            tp += len(truth & got)
            fp += len(got - truth)
            fn += len(truth - got)
            exact += int(truth == got)
            queries += 1
    return {"cell_accuracy": correct / total, "precision": tp / max(1, tp + fp), "recall": tp / max(1, tp + fn),
            "exact_query_rate": exact / queries, "n_scenes": n_scenes, "seed": seed}
