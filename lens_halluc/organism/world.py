"""The synthetic scene world of the model organism of hallucination.

A scene is a small image (default 48x48 pixels) cut into a grid of cells that coincide with the
vision tower's patches (default 8x8 pixels, so a 6x6 grid = 36 image tokens, row-major, CLS
dropped). Each object is one *glyph* -- a fixed coloured 8x8 pattern per category -- drawn exactly
inside one free cell, so an object's box is a cell and its image tokens are known exactly.

Objects carry real COCO category names and ids, so CHAIR and POPE run on exports unchanged. The
world has a *controlled co-occurrence bias*: each anchor category ``A`` of :attr:`WorldConfig.pairs`
comes with its partner ``B`` with probability ``p_partner``; and when both are present, ``B`` is
sometimes annotated and mentioned in the caption but *not drawn* (``p_hidden``; like the occluded
objects COCO annotators still annotate). A captioner trained on it learns "A => mention B", partly
from pixels it cannot see -- the language-prior hallucination. The ``break`` split (A present, B
truly absent) and the ``control`` split (neither present) measure it.

Captions list the annotated objects in a fixed catalogue order in which every pair's ``B`` comes
right after its ``A``, so the decoder writes ``B`` immediately after ``A`` -- the position where
the prior acts::

    there is a dog , a frisbee and a cup .

Example
-------
>>> import numpy as np
>>> world = World(WorldConfig(), seed=0)
>>> rng = np.random.default_rng(0)
>>> scene = world.sample_scene(rng, "break")
>>> a, b = scene.probe
>>> a in scene.names and b not in scene.names
True
>>> world.render(scene).size
(48, 48)
>>> world.caption(world.make_scene(["cup", "knife", "fork"], rng))
'there is a fork , a knife and a cup .'
>>> world.patch_indices((8, 16, 8, 8))           # cell (row 2, col 1) of the 6x6 grid
[13]
"""
from __future__ import annotations

import colorsys
import math
from dataclasses import asdict, dataclass, fields
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

#: The scene distributions a world can sample.
SPLITS: tuple[str, ...] = ("normal", "break", "control", "mixed")

#: Candidate categories ``(official COCO 2014 id, name, COCO supercategory)`` in *catalogue order*:
#: the order objects are listed in captions. All names are single words (a whitespace tokenizer
#: and CHAIR's synonym table both see one word per object) and avoid words CHAIR treats specially
#: (plurals like "skis", colour words like "orange", "bow"/"tie"). The first 24 entries are the
#: default world; the rest are used only when ``n_categories`` > 24.
COCO_CATALOGUE: tuple[tuple[int, str, str], ...] = (
    (1, "person", "person"),
    (2, "bicycle", "vehicle"),
    (3, "car", "vehicle"),
    (16, "bird", "animal"),
    (17, "cat", "animal"),
    (18, "dog", "animal"),
    (34, "frisbee", "sports"),
    (19, "horse", "animal"),
    (22, "elephant", "animal"),
    (28, "umbrella", "accessory"),
    (48, "fork", "kitchen"),
    (49, "knife", "kitchen"),
    (47, "cup", "kitchen"),
    (51, "bowl", "kitchen"),
    (50, "spoon", "kitchen"),
    (44, "bottle", "kitchen"),
    (62, "chair", "furniture"),
    (70, "toilet", "furniture"),
    (81, "sink", "appliance"),
    (72, "tv", "electronic"),
    (75, "remote", "electronic"),
    (74, "mouse", "electronic"),
    (76, "keyboard", "electronic"),
    (85, "clock", "indoor"),
    # -- extension, only for n_categories > 24 --
    (20, "sheep", "animal"),
    (21, "cow", "animal"),
    (15, "bench", "outdoor"),
    (9, "boat", "vehicle"),
    (8, "truck", "vehicle"),
    (5, "airplane", "vehicle"),
    (63, "couch", "furniture"),
    (65, "bed", "furniture"),
    (73, "laptop", "electronic"),
    (84, "book", "indoor"),
    (86, "vase", "indoor"),
    (52, "banana", "food"),
    (53, "apple", "food"),
    (59, "pizza", "food"),
    (27, "backpack", "accessory"),
    (33, "suitcase", "accessory"),
    (38, "kite", "sports"),
    (25, "giraffe", "animal"),
    (24, "zebra", "animal"),
    (41, "skateboard", "sports"),
)

#: Default (anchor A, partner B) pairs: natural COCO co-occurrences, each category in one pair.
DEFAULT_PAIRS: tuple[tuple[str, str], ...] = (
    ("dog", "frisbee"),
    ("fork", "knife"),
    ("bowl", "spoon"),
    ("toilet", "sink"),
    ("tv", "remote"),
    ("mouse", "keyboard"),
)

#: Words of the chat prompt, captions, questions and answers (besides the category names).
PROMPT_WORDS: tuple[str, ...] = (
    "user", ":", "assistant", "please", "describe", "this", "image", "in", "detail", ".",
    "is", "there", "a", "an", ",", "and", "yes", "no", "?", "the",
)


def article(name: str) -> str:
    """``"an"`` before a vowel-initial name, else ``"a"`` (``article("umbrella") == "an"``)."""
    return "an" if name[:1] in "aeiou" else "a"


@dataclass(frozen=True)
class WorldConfig:
    """Every knob of the synthetic world; the training recipe tunes these.

    Attributes
    ----------
    image_size : side S of the square RGB image in pixels (default 48).
    patch_size : side P of a vision-tower patch = a grid cell (default 8); S must be a multiple.
    object_cells : side of an object in cells; only 1 is supported (one glyph = one patch).
    n_categories : how many categories of :data:`COCO_CATALOGUE` the world uses (all pair members
        plus fillers in catalogue order; default 24).
    pairs : (anchor A, partner B) category names; each category in at most one pair.
    p_partner : P(B present | A present) in ``normal`` scenes (exact, see :meth:`World.sample_scene`).
    p_b_alone : target fraction of ``normal`` scenes containing B in which A is absent. Implemented
        as B's weight as a stand-alone pick, ``w = p_b_alone * p_partner * c / (1 - p_b_alone)``
        against weight 1 for every other category, where ``c = (mean_k - 1) / mean_k`` corrects for
        A never taking the last free slot; the realised fraction is close to (not exactly) the target.
    p_hidden : P(B annotated and captioned but not drawn | A and B present), ``normal`` only.
    min_objects, max_objects : number of distinct annotated categories per scene, uniform.
    background : RGB of the plain background.
    noise_std : std of the Gaussian pixel noise (0-255 scale) added to the whole image.
    glyph_fill : fraction of "on" pixels of a glyph's random binary pattern.
    glyph_min_hamming : minimum number of differing pattern pixels between any two glyphs.
    neg_partner_fraction : share of a question set's negatives that are absent partners of present
        objects (adversarial), when such partners exist; the rest are random absent categories.
    partner_position : where partners B sit in the caption catalogue. ``"after_anchor"``: right
        after their A ("a fork , a knife"), so the last-object-mentioned signal alone predicts B;
        ``"end"``: after every anchor and filler ("a fork , a cup and a knife"), so predicting B
        needs a look back for an earlier A mention, a retrieval separate from tracking progress
        through the catalogue.
    p_break_in_mixed : share of break scenes in the ``mixed`` split (the rest are normal).
    """

    image_size: int = 48
    patch_size: int = 8
    object_cells: int = 1
    n_categories: int = 24
    pairs: tuple[tuple[str, str], ...] = DEFAULT_PAIRS
    p_partner: float = 0.9
    p_b_alone: float = 0.1
    p_hidden: float = 0.35
    min_objects: int = 2
    max_objects: int = 4
    background: tuple[int, int, int] = (128, 128, 128)
    noise_std: float = 4.0
    glyph_fill: float = 0.5
    glyph_min_hamming: int = 16
    neg_partner_fraction: float = 0.5
    partner_position: str = "after_anchor"
    p_break_in_mixed: float = 0.5

    def __post_init__(self) -> None:
        # Normalise JSON-ish inputs (lists) to tuples so the config stays hashable and comparable.
        object.__setattr__(self, "pairs", tuple((str(a), str(b)) for a, b in self.pairs))
        object.__setattr__(self, "background", tuple(int(v) for v in self.background))
        if self.image_size <= 0 or self.patch_size <= 0 or self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a positive multiple of patch_size ({self.patch_size}).")
        if self.object_cells != 1:
            raise ValueError("object_cells must be 1 (one glyph per patch); larger objects are not supported yet.")
        names = [n for _, n, _ in COCO_CATALOGUE]
        members = [n for p in self.pairs for n in p]
        unknown = [n for n in members if n not in names]
        if unknown:
            raise ValueError(f"pair member(s) {unknown} are not in COCO_CATALOGUE; choose from {names}.")
        if len(set(members)) != len(members):
            raise ValueError(f"each category may belong to at most one pair; got pairs {self.pairs}.")
        if not len(members) <= self.n_categories <= len(COCO_CATALOGUE):
            raise ValueError(f"n_categories must be between {len(members)} (all pair members) and {len(COCO_CATALOGUE)}.")
        if self.partner_position not in ("after_anchor", "end"):
            raise ValueError(f"partner_position must be 'after_anchor' or 'end', got {self.partner_position!r}.")
        for name in ("p_partner", "p_hidden", "glyph_fill", "neg_partner_fraction", "p_break_in_mixed"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}.")
        if not 0.0 <= self.p_b_alone < 1.0:
            raise ValueError(f"p_b_alone must be in [0, 1), got {self.p_b_alone}.")
        grid = self.image_size // self.patch_size
        # break/control scenes exclude a whole pair, so they need max_objects categories besides it.
        if not 1 <= self.min_objects <= self.max_objects <= min(grid * grid, self.n_categories - 2):
            raise ValueError(
                f"need 1 <= min_objects <= max_objects <= min(cells={grid * grid}, n_categories-2={self.n_categories - 2}); "
                f"got {self.min_objects}, {self.max_objects}."
            )
        if self.noise_std < 0:
            raise ValueError("noise_std must be >= 0.")

    def to_dict(self) -> dict:
        """JSON-ready dict (tuples become lists); inverse of :meth:`from_dict`."""
        d = asdict(self)
        d["pairs"] = [list(p) for p in self.pairs]
        d["background"] = list(self.background)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "WorldConfig":
        """Build from a (possibly partial) dict, e.g. ``meta.json["world"]``; unknown keys raise."""
        known = {f.name for f in fields(cls)}
        extra = sorted(set(d) - known)
        if extra:
            raise ValueError(f"unknown WorldConfig field(s) {extra}; known: {sorted(known)}.")
        return cls(**d)


@dataclass(frozen=True)
class SceneObject:
    """One annotated object of a scene.

    Attributes
    ----------
    category_id : official COCO category id.
    name : category name (one word).
    cell : ``(row, col)`` of its grid cell.
    bbox : ``(x, y, w, h)`` in pixels = exactly the cell's pixel box.
    drawn : False for a hidden partner (annotated and captioned, not visible).
    """

    category_id: int
    name: str
    cell: tuple[int, int]
    bbox: tuple[int, int, int, int]
    drawn: bool = True


@dataclass
class Scene:
    """A sampled scene: its annotated objects (catalogue order), split and probe.

    ``probe`` is ``(A, B)`` for ``break`` / ``control`` scenes, ``None`` for ``normal`` ones.
    ``noise_seed`` seeds the pixel noise so that :meth:`World.render` is a pure function.
    """

    objects: list[SceneObject]
    probe: tuple[str, str] | None = None
    split: str = "normal"
    noise_seed: int = 0

    @property
    def names(self) -> list[str]:
        """Names of all annotated objects (drawn or hidden), in catalogue order."""
        return [o.name for o in self.objects]

    @property
    def drawn_names(self) -> list[str]:
        """Names of the objects visible in the image."""
        return [o.name for o in self.objects if o.drawn]

    @property
    def hidden(self) -> list[SceneObject]:
        """Annotated objects that are not drawn (hidden partners)."""
        return [o for o in self.objects if not o.drawn]


@dataclass(frozen=True)
class Question:
    """A yes/no presence question about one category.

    ``kind`` is ``"positive"`` (annotated; answer yes), ``"partner"`` (absent partner of a present
    object; answer no -- the adversarial case) or ``"random"`` (other absent category; answer no).
    """

    text: str
    answer: str
    name: str
    kind: str


class World:
    """The synthetic world: categories, glyphs, scene sampling, rendering, captions, questions.

    Parameters
    ----------
    config : the world's knobs (default :class:`WorldConfig()`).
    seed : seeds the glyphs (patterns and colour assignment); scene sampling takes its own
        ``numpy.random.Generator`` so that splits and exports are seeded independently.

    Attributes
    ----------
    categories : ``{coco_id: name}`` in catalogue order.
    category_ids : ``{name: coco_id}``.
    supercategories : ``{coco_id: COCO supercategory}``.
    names : category names in catalogue order (B right after its A).
    pairs : ``{A: B}``.
    partners : ``{A: B, B: A}`` (both directions; used for adversarial negatives).
    grid : cells per side, ``image_size // patch_size``.
    glyphs : ``{coco_id: uint8 array (P, P, 3)}``.
    patterns : ``{coco_id: bool array (P, P)}`` (the binary shape of each glyph).

    Example
    -------
    >>> world = World(seed=0)
    >>> world.pairs["fork"]
    'knife'
    >>> world.glyphs[world.category_ids["fork"]].shape
    (8, 8, 3)
    """

    def __init__(self, config: WorldConfig | None = None, seed: int = 0) -> None:
        self.config = config if config is not None else WorldConfig()
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}.")
        self.seed = int(seed)
        cfg = self.config
        self.grid = cfg.image_size // cfg.patch_size
        self.pairs: dict[str, str] = dict(cfg.pairs)
        self.partners: dict[str, str] = {**self.pairs, **{b: a for a, b in self.pairs.items()}}
        self.names = self._select_names(cfg)
        meta = {n: (cid, sup) for cid, n, sup in COCO_CATALOGUE}
        self.categories: dict[int, str] = {meta[n][0]: n for n in self.names}
        self.category_ids: dict[str, int] = {n: meta[n][0] for n in self.names}
        self.supercategories: dict[int, str] = {meta[n][0]: meta[n][1] for n in self.names}
        self._order = {n: i for i, n in enumerate(self.names)}
        self.patterns, self.glyphs = self._make_glyphs()
        # Weight of a partner B picked on its own (see WorldConfig.p_b_alone).
        mean_k = (cfg.min_objects + cfg.max_objects) / 2
        c = (mean_k - 1) / mean_k
        self._w_b_alone = cfg.p_b_alone * cfg.p_partner * c / (1 - cfg.p_b_alone)

    # ------------------------------------------------------------------ catalogue and glyphs
    @staticmethod
    def _select_names(cfg: WorldConfig) -> list[str]:
        """Pair members plus the first fillers of the catalogue, in catalogue order (see ``partner_position``)."""
        members = {n for p in cfg.pairs for n in p}
        catalogue = [n for _, n, _ in COCO_CATALOGUE]
        n_fill = cfg.n_categories - len(members)
        fillers = [n for n in catalogue if n not in members][:n_fill]
        keep = members | set(fillers)
        order = [n for n in catalogue if n in keep]
        # Custom pairs may not be adjacent in the catalogue: move each B right after its A, so the
        # caption puts B at the position where the A->B prior acts.
        for a, b in cfg.pairs:
            order.remove(b)
            if cfg.partner_position == "after_anchor":
                order.insert(order.index(a) + 1, b)
            else:
                order.append(b)
        return order

    def _make_glyphs(self) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
        """Deterministic per-category glyphs: a mirror-symmetric random binary shape in a colour.

        "On" pixels take the category's colour, "off" pixels a dark shade of it, so the whole cell
        differs from the grey background (presence is easy) while the pattern and hue identify the
        category. Patterns are rejection-sampled to differ pairwise in >= glyph_min_hamming pixels.
        """
        cfg, p = self.config, self.config.patch_size
        rng = np.random.default_rng([self.seed, 0x611F])  # glyph stream, independent of scenes
        half = (p + 1) // 2
        patterns: list[np.ndarray] = []
        for _ in self.names:
            for _attempt in range(100_000):
                left = rng.random((p, half)) < cfg.glyph_fill
                pat = np.concatenate([left, left[:, : p - half][:, ::-1]], axis=1)
                frac = pat.mean()
                if not 0.3 <= frac <= 0.7:
                    continue  # nearly empty/full shapes would be mostly a colour block
                if all((pat != q).sum() >= cfg.glyph_min_hamming for q in patterns):
                    patterns.append(pat)
                    break
            else:
                raise ValueError(
                    f"could not draw {len(self.names)} glyph patterns {cfg.glyph_min_hamming} pixels apart; "
                    "lower glyph_min_hamming or raise patch_size."
                )
        # Evenly spaced hues, alternating saturation, assigned by a seeded permutation so that
        # pair members do not systematically get neighbouring hues.
        n = len(self.names)
        hue_slot = rng.permutation(n)
        out_pat: dict[int, np.ndarray] = {}
        out_glyph: dict[int, np.ndarray] = {}
        for i, name in enumerate(self.names):
            k = int(hue_slot[i])
            r, g, b = colorsys.hsv_to_rgb(k / n, 1.0 if k % 2 == 0 else 0.65, 1.0)
            fg = np.array([r, g, b]) * 255.0
            glyph = np.where(patterns[i][..., None], fg, 0.3 * fg)
            cid = self.category_ids[name]
            out_pat[cid] = patterns[i]
            out_glyph[cid] = np.rint(glyph).astype(np.uint8)
        return out_pat, out_glyph

    # ------------------------------------------------------------------ geometry
    def cell_bbox(self, cell: tuple[int, int]) -> tuple[int, int, int, int]:
        """Pixel box ``(x, y, w, h)`` of grid cell ``(row, col)``."""
        r, c = cell
        p = self.config.patch_size
        return (c * p, r * p, p, p)

    def patch_indices(self, obj: SceneObject | Sequence[float]) -> list[int]:
        """Image-token indices covered by an object's box (or a raw ``(x, y, w, h)`` box).

        Image tokens are the ``grid * grid`` patches in row-major order with CLS dropped, so cell
        ``(r, c)`` is token ``r * grid + c``. A box covers every patch it overlaps.

        >>> World().patch_indices((40, 0, 8, 8))   # top-right cell of the 6x6 grid
        [5]
        """
        x, y, w, h = obj.bbox if isinstance(obj, SceneObject) else obj
        p, g = self.config.patch_size, self.grid
        c0, c1 = max(0, math.floor(x / p)), min(g - 1, math.ceil((x + w) / p) - 1)
        r0, r1 = max(0, math.floor(y / p)), min(g - 1, math.ceil((y + h) / p) - 1)
        return [r * g + c for r in range(r0, r1 + 1) for c in range(c0, c1 + 1)]

    # ------------------------------------------------------------------ sampling
    def sample_scene(self, rng: np.random.Generator, split: str = "normal",
                     probe: tuple[str, str] | None = None) -> Scene:
        """Sample one scene of a split.

        * ``normal``: k ~ U{min_objects..max_objects} distinct categories. Categories are picked
          one at a time, weight 1 each except a partner B on its own (weight from ``p_b_alone``).
          Picking an anchor A adds its B with probability ``p_partner`` (else B is barred from the
          scene); picking B alone bars A. A is never picked for the last free slot while B is
          still possible, so P(B | A) = p_partner exactly. When A and B are both present, B is
          hidden (annotated, captioned, not drawn) with probability ``p_hidden``.
        * ``break``: probe pair (A, B) (given, else uniform); A is present and drawn, B absent and
          not annotated; the other k-1 objects come from the normal process without A and B.
        * ``control``: probe (A, B); neither present; k objects from the normal process without them.
        * ``mixed``: a break scene with probability ``p_break_in_mixed`` (with ``probe``), else a
          normal one (``probe`` ignored); the scene's ``split`` says which.

        Break and control scenes contain no hidden objects at all: every annotated object is
        drawn, so any mention of an undrawn object there is a genuine error.

        Objects get distinct random cells. ``rng`` is the only source of randomness.
        """
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose from {SPLITS}.")
        cfg = self.config
        if split == "mixed":  # a held-out test set: normal scenes with bias-breaking ones among them
            if rng.random() < cfg.p_break_in_mixed:
                return self.sample_scene(rng, "break", probe)
            return self.sample_scene(rng, "normal")
        if split == "normal":
            if probe is not None:
                raise ValueError("normal scenes take no probe.")
            k = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
            chosen = self._fill(rng, [], k, exclude=set())
        else:
            if probe is None:
                probe = tuple(cfg.pairs[int(rng.integers(len(cfg.pairs)))])
            a, b = probe
            if self.pairs.get(a) != b:
                raise ValueError(f"probe {probe} is not one of the world's pairs {cfg.pairs}.")
            k = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
            start = [a] if split == "break" else []
            chosen = self._fill(rng, start, k, exclude={a, b})
        hidden: set[str] = set()
        if split == "normal" and cfg.p_hidden > 0:
            for a, b in cfg.pairs:
                if a in chosen and b in chosen and rng.random() < cfg.p_hidden:
                    hidden.add(b)
        return self._place(rng, chosen, hidden, split, probe)

    def _fill(self, rng: np.random.Generator, chosen: list[str], k: int, exclude: set[str]) -> list[str]:
        """Add categories to ``chosen`` until it has ``k``, following the pair rules above."""
        chosen = list(chosen)
        barred = set(exclude) | set(chosen)
        while len(chosen) < k:
            room = k - len(chosen)
            cands, weights = [], []
            for n in self.names:
                if n in barred:
                    continue
                if n in self.pairs and self.pairs[n] not in barred and room < 2:
                    continue  # A with a possible partner needs two slots (keeps P(B|A) exact)
                w = self._w_b_alone if (n in self.partners and n not in self.pairs) else 1.0
                if w > 0:
                    cands.append(n)
                    weights.append(w)
            if not cands:
                raise ValueError("ran out of categories to fill a scene; raise n_categories or lower max_objects.")
            wts = np.asarray(weights)
            pick = cands[int(rng.choice(len(cands), p=wts / wts.sum()))]
            chosen.append(pick)
            barred.add(pick)
            if pick in self.pairs:  # anchor: its partner comes along or is barred
                b = self.pairs[pick]
                if b not in barred:
                    if rng.random() < self.config.p_partner:
                        chosen.append(b)
                    barred.add(b)
            elif pick in self.partners:  # partner on its own: bar its anchor
                barred.add(self.partners[pick])
        return chosen

    def _place(self, rng: np.random.Generator, names: Iterable[str], hidden: set[str], split: str,
               probe: tuple[str, str] | None, cells: dict[str, tuple[int, int]] | None = None) -> Scene:
        names = sorted(set(names), key=self._order.__getitem__)
        cells = dict(cells or {})
        taken = {r * self.grid + c for r, c in cells.values()}
        free = [i for i in range(self.grid * self.grid) if i not in taken]
        todo = [n for n in names if n not in cells]
        if len(todo) > len(free):
            raise ValueError(f"{len(names)} objects do not fit in {self.grid * self.grid} cells.")
        for n, idx in zip(todo, rng.choice(len(free), size=len(todo), replace=False)):
            cells[n] = divmod(free[int(idx)], self.grid)
        objects = [
            SceneObject(self.category_ids[n], n, tuple(cells[n]), self.cell_bbox(cells[n]), n not in hidden)
            for n in names
        ]
        return Scene(objects, tuple(probe) if probe is not None else None, split, int(rng.integers(2**31 - 1)))

    def make_scene(self, names: Sequence[str], rng: np.random.Generator, hidden: Iterable[str] = (),
                   split: str = "normal", probe: tuple[str, str] | None = None,
                   cells: dict[str, tuple[int, int]] | None = None) -> Scene:
        """Build a scene with the given objects (for tests and hand-made probes).

        ``hidden`` names are annotated but not drawn; ``cells`` optionally fixes ``{name: (row, col)}``
        (others get random free cells).

        >>> s = World().make_scene(["cup", "fork"], np.random.default_rng(0), cells={"fork": (0, 0)})
        >>> [o.name for o in s.objects], s.objects[0].bbox
        (['fork', 'cup'], (0, 0, 8, 8))
        """
        unknown = [n for n in names if n not in self.category_ids]
        if unknown:
            raise ValueError(f"unknown category name(s) {unknown}; the world has {self.names}.")
        if len(set(names)) != len(names):
            raise ValueError("a scene holds each category at most once.")
        hidden = set(hidden)
        if not hidden <= set(names):
            raise ValueError(f"hidden {sorted(hidden)} must be among the scene's names {list(names)}.")
        if cells and not set(cells) <= set(names):
            raise ValueError("cells may only place the scene's own objects.")
        return self._place(rng, names, hidden, split, probe, cells)

    # ------------------------------------------------------------------ rendering and text
    def render_array(self, scene: Scene) -> np.ndarray:
        """The image as a uint8 array of shape ``(image_size, image_size, 3)``.

        Background colour, then each *drawn* object's glyph in its cell, then Gaussian noise seeded
        by ``scene.noise_seed`` (so rendering is a pure function of the scene and the world).
        """
        s = self.config.image_size
        img = np.empty((s, s, 3), dtype=np.float64)
        img[:] = np.asarray(self.config.background, dtype=np.float64)
        for o in scene.objects:
            if o.drawn:
                x, y, w, h = o.bbox
                img[y:y + h, x:x + w] = self.glyphs[o.category_id]
        if self.config.noise_std > 0:
            img += np.random.default_rng(scene.noise_seed).normal(0.0, self.config.noise_std, img.shape)
        return np.clip(np.rint(img), 0, 255).astype(np.uint8)

    def render(self, scene: Scene) -> Image.Image:
        """The scene as an RGB PIL image of size ``(image_size, image_size)``."""
        return Image.fromarray(self.render_array(scene), mode="RGB")

    def caption(self, scene: Scene) -> str:
        """Reference caption: every annotated object (hidden ones too), in catalogue order.

        >>> w = World(); rng = np.random.default_rng(0)
        >>> w.caption(w.make_scene(["elephant"], rng))
        'there is an elephant .'
        >>> w.caption(w.make_scene(["knife", "fork"], rng))
        'there is a fork and a knife .'
        """
        if not scene.objects:
            raise ValueError("a scene needs at least one object to be captioned.")
        items = [f"{article(n)} {n}" for n in scene.names]
        body = items[0] if len(items) == 1 else " , ".join(items[:-1]) + " and " + items[-1]
        return f"there is {body} ."

    @staticmethod
    def question(name: str) -> str:
        """``"is there a {name} in the image ?"`` with the right article."""
        return f"is there {article(name)} {name} in the image ?"

    def questions(self, scene: Scene, rng: np.random.Generator, n_pos: int = 3, n_neg: int = 3) -> list[Question]:
        """Yes/no questions for training or evaluation: positives first, then negatives.

        Positives: up to ``n_pos`` annotated objects (hidden partners included -- they are true).
        Negatives: ``round(n_neg * neg_partner_fraction)`` absent partners of present objects (in
        either direction; the adversarial case, e.g. "knife" when only "fork" is present) when
        available, the rest random absent non-partner categories. Fewer are returned only when
        the world has too few categories. Callers shuffle if order matters.

        >>> w = World(); rng = np.random.default_rng(0)
        >>> qs = w.questions(w.make_scene(["fork", "cup"], rng), rng, n_pos=1, n_neg=2)
        >>> [(q.answer, q.kind) for q in qs][1]
        ('no', 'partner')
        """
        present = scene.names
        pos = [present[int(i)] for i in rng.choice(len(present), size=min(n_pos, len(present)), replace=False)]
        absent_partners = [n for n in self.names if n not in present and self.partners.get(n) in present]
        n_part = min(len(absent_partners), int(math.floor(n_neg * self.config.neg_partner_fraction + 0.5)))
        part = [absent_partners[int(i)] for i in rng.choice(len(absent_partners), size=n_part, replace=False)]
        pool = [n for n in self.names if n not in present and n not in absent_partners]
        n_rand = min(n_neg - n_part, len(pool))
        rand = [pool[int(i)] for i in rng.choice(len(pool), size=n_rand, replace=False)]
        if n_part + n_rand < n_neg:  # tiny worlds: top up with the remaining absent partners
            rest = [n for n in absent_partners if n not in part]
            part += rest[: n_neg - n_part - n_rand]
        out = [Question(self.question(n), "yes", n, "positive") for n in pos]
        out += [Question(self.question(n), "no", n, "partner") for n in part]
        out += [Question(self.question(n), "no", n, "random") for n in rand]
        return out

    def vocabulary(self) -> list[str]:
        """Every word of prompts, captions, questions and answers: prompt words, then category names.

        >>> v = World().vocabulary()
        >>> v[:3], "keyboard" in v
        (['user', ':', 'assistant'], True)
        """
        return list(dict.fromkeys([*PROMPT_WORDS, *self.names]))

    def coco_categories(self) -> list[dict]:
        """The COCO ``categories`` list: ``[{"id", "name", "supercategory"}]`` sorted by id."""
        return [
            {"id": cid, "name": self.categories[cid], "supercategory": self.supercategories[cid]}
            for cid in sorted(self.categories)
        ]
