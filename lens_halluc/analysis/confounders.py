"""Confounders and separability (Causal-LLaVA): per-category mean hidden states, per layer, and numbers.

A *visual confounder* of a category is the mean hidden state over the image tokens that fall
inside its objects' boxes; a *text confounder* is the mean hidden state of its name's tokens in
captions. Both are taken per layer (layer 0 = the projector output at the image positions /
the token embeddings, layer ``l`` = decoder layer ``l``'s output) from one teacher-forced pass of
image + caption prompt + the dataset's reference caption. The reference only draws PCA pictures
of the stacked category means; here every layer also gets numbers: the silhouette score of the
per-instance representations by category, the between/within scatter ratio, and the mean
distance between co-occurring categories' means relative to other category pairs.

Everything is keyed by **category id** (the reference keyed rows by position and highlighted the
wrong objects). This module computes tables only; the figures are in
:mod:`lens_halluc.figures.confounders`.

Command line (also ``python -m lens_halluc.analysis confounders ...``)::

    python -m lens_halluc.analysis.confounders --out runs/confounders            # shipped organism
    python -m lens_halluc.analysis.confounders --model llava-hf/llava-1.5-7b-hf --device cuda \\
        --dtype bfloat16 --data DIR_WITH_OBJECTS_JSON --highlight dog --out runs/conf-llava

Example
-------
>>> vlm = load_vlm()                                                            # doctest: +SKIP
>>> ds, objects, pairs = load_export("runs/confounders/data/normal-300")        # doctest: +SKIP
>>> reps = collect_representations(vlm, ds, objects)                           # doctest: +SKIP
>>> table = separability(reps, pairs, cooccurrence_counts(ds))                 # doctest: +SKIP
>>> dictionary = confounder_dictionary(reps)                                   # doctest: +SKIP
>>> rows = pca_views(dictionary, "text", layer=6, n_components=2)              # doctest: +SKIP
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import warnings
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

MODALITIES = ("visual", "text")

SEPARABILITY_COLUMNS = ("modality", "layer", "silhouette", "scatter_ratio", "pair_distance_ratio", "pair_rank",
                        "mean_pair_distance", "mean_other_distance", "n_pairs", "n_instances", "n_categories")


# ------------------------------------------------------------------------------- data
def load_objects(path: str | Path) -> dict[int, list[dict]]:
    """``objects.json`` of an export as ``{image_id: [{category_id, name, bbox, patches, drawn}, ...]}``.

    JSON keys are strings; they become ints here so they match :class:`CocoDataset` image ids.

    >>> load_objects("runs/confounders/data/normal-300/objects.json")[1][0]["patches"]   # doctest: +SKIP
    [7, 8, 13, 14]
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the confounder analysis needs objects.json (per image the objects' "
                                "image-token indices), as written by `python -m lens_halluc.organism export`.")
    return {int(k): list(v) for k, v in json.loads(path.read_text()).items()}


def load_export(data_dir: str | Path):
    """``(dataset, objects, pairs)`` of an exported split (or any COCO-format dir with objects.json).

    ``dataset``: :class:`CocoDataset` with captions and images; ``objects``: see :func:`load_objects`;
    ``pairs``: list of ``(A category id, B category id)`` from ``pairs.json``, or None when absent.

    >>> ds, objects, pairs = load_export("runs/confounders/data/normal-300")     # doctest: +SKIP
    >>> pairs[:2]                                                               # doctest: +SKIP
    [(18, 34), (48, 49)]
    """
    from ..data.coco import CocoDataset

    d = Path(data_dir)
    captions = d / "captions.json"
    ds = CocoDataset.load(d / "instances.json", captions if captions.is_file() else None, d / "images")
    objects = load_objects(d / "objects.json")
    pairs = None
    if (d / "pairs.json").is_file():
        pairs = pairs_from_names(json.loads((d / "pairs.json").read_text()), ds.categories)
    return ds, objects, pairs


def pairs_from_names(pairs: Mapping[str, str] | Iterable[tuple[str, str]], categories: Mapping[int, str]) -> list[tuple[int, int]]:
    """``{"dog": "frisbee", ...}`` (or name pairs) → ``[(18, 34), ...]`` category-id pairs.

    >>> pairs_from_names({"dog": "frisbee"}, {18: "dog", 34: "frisbee"})
    [(18, 34)]
    """
    by_name = {n: c for c, n in categories.items()}
    items = pairs.items() if isinstance(pairs, Mapping) else pairs
    out = []
    for a, b in items:
        missing = [n for n in (a, b) if n not in by_name]
        if missing:
            raise KeyError(f"pair ({a!r}, {b!r}): unknown category name(s) {missing}; known: {sorted(by_name)}.")
        out.append((by_name[a], by_name[b]))
    return out


def cooccurrence_counts(dataset, image_ids: Iterable[int] | None = None) -> dict[int, dict[int, int]]:
    """Number of images annotated with both categories: ``{a: {b: count}}`` (symmetric, a != b).

    >>> from lens_halluc.data.coco import CocoDataset
    >>> ds = CocoDataset.from_dicts({"images": [{"id": 1, "file_name": "x"}], "categories": [
    ...     {"id": 18, "name": "dog"}, {"id": 34, "name": "frisbee"}], "annotations": [
    ...     {"image_id": 1, "category_id": 18}, {"image_id": 1, "category_id": 34}]})
    >>> cooccurrence_counts(ds)
    {18: {34: 1}, 34: {18: 1}}
    """
    counts: dict[int, dict[int, int]] = {}
    for img in (dataset.image_ids if image_ids is None else image_ids):
        cats = sorted(set(dataset.category_ids(img)))
        for a, b in combinations(cats, 2):
            counts.setdefault(a, {}).setdefault(b, 0)
            counts.setdefault(b, {}).setdefault(a, 0)
            counts[a][b] += 1
            counts[b][a] += 1
    return counts


def most_cooccurring(category_id: int, cooccurrence: Mapping[int, Mapping[int, int]], n: int = 3) -> list[int]:
    """The ``n`` category ids seen most often with ``category_id`` (ties by id), zero counts excluded.

    >>> most_cooccurring(18, {18: {34: 9, 1: 2, 17: 2}}, n=2)
    [34, 1]
    """
    row = cooccurrence.get(int(category_id), {})
    ranked = sorted(((c, k) for c, k in row.items() if k > 0 and c != category_id), key=lambda ck: (-ck[1], ck[0]))
    return [int(c) for c, _ in ranked[:n]]


def top_cooccurring_pairs(cooccurrence: Mapping[int, Mapping[int, int]], n: int) -> list[tuple[int, int]]:
    """The ``n`` unordered category pairs with the highest co-occurrence counts (for data without planted pairs).

    >>> top_cooccurring_pairs({1: {2: 5, 3: 1}, 2: {1: 5}, 3: {1: 1}}, 1)
    [(1, 2)]
    """
    seen = {(min(a, b), max(a, b)): k for a, row in cooccurrence.items() for b, k in row.items() if a != b}
    return [p for p, _ in sorted(seen.items(), key=lambda pk: (-pk[1], pk[0]))[:n]]


# --------------------------------------------------------------------- representations
@dataclass
class Representations:
    """Per-instance hidden states keyed by category id.

    Attributes
    ----------
    layers : hidden-state indices kept, e.g. ``[0, 1, ..., L]`` (0 = projector output / embeddings,
        ``l`` = decoder layer ``l``'s output, 1-based).
    categories : category id -> name (the dataset's categories).
    visual, text : category id -> float32 ``[n_instances, len(layers), d]``.
    visual_images, text_images : category id -> int ``[n_instances]`` image id of each instance.
    """

    layers: list[int]
    categories: dict[int, str]
    visual: dict[int, np.ndarray] = field(default_factory=dict)
    text: dict[int, np.ndarray] = field(default_factory=dict)
    visual_images: dict[int, np.ndarray] = field(default_factory=dict)
    text_images: dict[int, np.ndarray] = field(default_factory=dict)

    def modality(self, name: str) -> dict[int, np.ndarray]:
        if name not in MODALITIES:
            raise ValueError(f"unknown modality {name!r}; choose from {MODALITIES}.")
        return getattr(self, name)

    @staticmethod
    def from_instances(layers: Sequence[int], categories: Mapping[int, str],
                       visual: Iterable[tuple[int, int, np.ndarray]] = (),
                       text: Iterable[tuple[int, int, np.ndarray]] = ()) -> "Representations":
        """Build from ``(category_id, image_id, [len(layers), d] array)`` instances, in any order.

        >>> r = Representations.from_instances([0], {1: "a"}, visual=[(1, 7, np.zeros((1, 2)))])
        >>> r.visual[1].shape, r.visual_images[1].tolist()
        ((1, 1, 2), [7])
        """
        reps = Representations(list(layers), dict(categories))
        for name, items in (("visual", visual), ("text", text)):
            grouped: dict[int, list] = {}
            for cid, img, vec in items:
                grouped.setdefault(int(cid), []).append((int(img), np.asarray(vec, dtype=np.float32)))
            setattr(reps, name, {c: np.stack([v for _, v in g]) for c, g in sorted(grouped.items())})
            setattr(reps, f"{name}_images", {c: np.array([i for i, _ in g], dtype=np.int64) for c, g in sorted(grouped.items())})
        return reps


def image_positions(input_ids, image_token_id: int) -> np.ndarray:
    """Sequence positions of the image tokens of one row (``input_ids == image_token_id``), ``[n_image_tokens]``.

    Never a hard-coded offset: the first image token moves with the system prompt and template.

    >>> image_positions([1, 5, 9, 9, 9, 7], image_token_id=9).tolist()
    [2, 3, 4]
    """
    ids = np.asarray(input_ids.tolist() if hasattr(input_ids, "tolist") else input_ids)
    pos = np.flatnonzero(ids == image_token_id)
    if pos.size == 0:
        raise ValueError(f"no image token (id {image_token_id}) in the input; the prompt template must contain '<image>'.")
    return pos


def patch_positions(input_ids, image_token_id: int, patches: Sequence[int]) -> np.ndarray:
    """Positions of image patches ``patches`` (row-major patch indices, CLS dropped): first image token + index.

    Raises if a patch index runs past the image tokens or the image tokens are not contiguous there
    (a model with extra tokens inside the image, e.g. LLaVA-NeXT row separators, needs its own mapping).

    >>> patch_positions([1, 5, 9, 9, 9, 7], 9, [0, 2]).tolist()
    [2, 4]
    """
    pos = image_positions(input_ids, image_token_id)
    idx = np.asarray(list(patches), dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= pos.size):
        raise ValueError(f"patch index {int(idx.max())} out of range: the input has {pos.size} image tokens. "
                         "objects.json patches must index the model's image tokens (grid of the vision tower).")
    out = pos[0] + idx
    if not np.array_equal(pos[idx], out):
        raise ValueError("image tokens are not contiguous; first-token + patch-index positions would be wrong.")
    return out


def _mention_token_spans(chair, caption_ids: list[int], tokenizer, name_to_id: Mapping[str, int]):
    """``(category_id, first, last)`` token indices (into ``caption_ids``) of each object mention.

    Mentions come from CHAIR on the decoded caption and are aligned to tokens by
    :func:`align_mentions` (never by string matching of tokens); ``last`` aligns the mention's
    last character, so multi-token names ("wine glass", sub-words) are covered whole.
    """
    from ..data.chair import Mention, align_mentions

    text = tokenizer.decode(caption_ids, skip_special_tokens=True)
    mentions = [m for m in chair.caption_objects(text) if m.node in name_to_id]
    if not mentions:
        return []
    firsts = align_mentions(mentions, text, caption_ids, tokenizer)
    lasts = align_mentions([Mention(m.word, m.node, m.char_end - 1, m.char_end) for m in mentions], text,
                           caption_ids, tokenizer)
    return [(name_to_id[m.node], f, l) for m, f, l in zip(mentions, firsts, lasts) if f is not None and l is not None]


def collect_representations(vlm, dataset, objects: Mapping[int, Sequence[Mapping]], layers: Sequence[int] | None = None,
                            prompt: str | None = None, batch_size: int = 16, image_ids: Sequence[int] | None = None,
                            progress: bool = False) -> Representations:
    """Teacher-forced hidden states of the objects (image patches) and of their names (caption tokens).

    Per image: ``template(prompt)`` with the image, then the dataset's first reference caption
    appended as token ids (as the attribution pipeline appends generated captions), one forward
    with ``output_hidden_states=True``.

    * visual instance: each object of ``objects[image_id]`` with ``drawn`` true and patches: the
      mean over its image-token positions (first image token + patch index) → ``[len(layers), d]``;
    * text instance: each CHAIR mention of a dataset category in the caption: the mean over its
      token(s) → ``[len(layers), d]``.

    Parameters
    ----------
    vlm : :class:`~lens_halluc.models.loading.LoadedVLM`.
    dataset : :class:`~lens_halluc.data.coco.CocoDataset` with captions and an image directory.
    objects : ``{image_id: [{category_id, patches, drawn, ...}]}`` (:func:`load_objects`).
    layers : hidden-state indices to keep (default all, ``0..n_layers``); 0 = projector output at the
        image positions and the token embeddings at the caption positions.
    prompt : user prompt (default: the captioning prompt). batch_size : images per forward.
    image_ids : images to use (default: all dataset images, in order).

    Returns
    -------
    :class:`Representations` keyed by category id.

    Example
    -------
    >>> reps = collect_representations(load_vlm(), ds, load_objects(d / "objects.json"))   # doctest: +SKIP
    >>> reps.visual[18].shape            # dog: [n_instances, 7 layers, 128]              # doctest: +SKIP
    (41, 7, 128)
    """
    import torch

    from ..data.chair import ChairEvaluator
    from ..generation.runner import load_image
    from ..models.prompts import CAPTION_PROMPT

    spec, tok = vlm.spec, vlm.tokenizer
    n_hidden = spec.n_layers + 1
    layers = list(range(n_hidden)) if layers is None else [int(l) for l in layers]
    bad = [l for l in layers if not 0 <= l < n_hidden]
    if bad:
        raise ValueError(f"layer(s) {bad} out of range: hidden states are 0 (projector/embeddings) .. {spec.n_layers}.")
    prompt = CAPTION_PROMPT if prompt is None else prompt
    name_to_id = dataset.category_ids_by_name
    chair = ChairEvaluator()
    pad = spec.pad_token_id if spec.pad_token_id is not None else 0
    ids_all = list(dataset.image_ids if image_ids is None else image_ids)
    visual, text = [], []
    decoder = spec.layers(vlm.model)
    batches = [ids_all[i:i + batch_size] for i in range(0, len(ids_all), batch_size)]
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc="confounders")
    for batch in batches:
        enc = vlm.encode([load_image(dataset.image_path(i)) for i in batch], [prompt] * len(batch))
        rows, n_prompt, cap_ids = [], [], []
        for r, img in enumerate(batch):
            keep = enc["attention_mask"][r].bool()
            p_ids = enc["input_ids"][r][keep].tolist()  # drop the processor's left padding
            caps = dataset.captions.get(img) or []
            c_ids = tok(caps[0], add_special_tokens=False)["input_ids"] if caps else []
            rows.append(p_ids + list(c_ids))
            n_prompt.append(len(p_ids))
            cap_ids.append(list(c_ids))
        # Right padding: with a causal mask, padding after a row's end changes none of its states,
        # and positions stay 0..T-1 without position-id bookkeeping.
        T = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), T), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for r, seq in enumerate(rows):
            input_ids[r, :len(seq)] = torch.tensor(seq)
            mask[r, :len(seq)] = 1
        last: list = []
        # transformers v5 returns the *final-normed* state as the last hidden state; the last decoder
        # layer's own output is read with a hook so that every layer l is "decoder layer l's output".
        hook = decoder[-1].register_forward_hook(lambda m, i, o: last.append(o[0] if isinstance(o, tuple) else o))
        try:
            with torch.no_grad():
                out = vlm.model(input_ids=input_ids.to(vlm.device), attention_mask=mask.to(vlm.device),
                                pixel_values=enc["pixel_values"], output_hidden_states=True, use_cache=False)
        finally:
            hook.remove()
        hs = list(out.hidden_states)
        hs[-1] = last[0]
        H = torch.stack([hs[l] for l in layers]).float().cpu().numpy()  # [len(layers), B, T, d]
        for r, img in enumerate(batch):
            for o in objects.get(int(img), []):
                if not o.get("drawn", True) or not o.get("patches"):
                    continue  # a hidden partner has no pixels: no visual instance
                pos = patch_positions(rows[r], spec.image_token_id, o["patches"])
                visual.append((int(o["category_id"]), int(img), H[:, r, pos].mean(1)))
            for cid, f, l in _mention_token_spans(chair, cap_ids[r], tok, name_to_id):
                s = n_prompt[r]
                text.append((cid, int(img), H[:, r, s + f: s + l + 1].mean(1)))
    return Representations.from_instances(layers, dataset.categories, visual, text)


# --------------------------------------------------------------------------- dictionary
def confounder_dictionary(reps: Representations) -> dict[str, np.ndarray]:
    """Category means per layer, rows keyed by category id.

    Returns ``{"category_ids": int64 [C], "names": str [C], "layers": int64 [L+1],
    "visual": float32 [L+1, C, d], "text": float32 [L+1, C, d], "n_visual": int64 [C], "n_text": int64 [C]}``;
    row ``k`` is category ``category_ids[k]`` (sorted ids), NaN where a modality has no instance.
    Instance order does not matter.

    >>> r = Representations.from_instances([0], {5: "a", 2: "b"}, visual=[(5, 1, [[1., 1.]]), (2, 1, [[0., 2.]]),
    ...                                                                    (5, 2, [[3., 1.]])])
    >>> d = confounder_dictionary(r)
    >>> d["category_ids"].tolist(), d["visual"][0].tolist()
    ([2, 5], [[0.0, 2.0], [2.0, 1.0]])
    """
    ids = sorted(set(reps.visual) | set(reps.text))
    if not ids:
        raise ValueError("no instances: no drawn object with patches and no caption mention was found.")
    dim = next(iter((reps.visual or reps.text).values())).shape[-1]
    out: dict[str, np.ndarray] = {
        "category_ids": np.array(ids, dtype=np.int64),
        "names": np.array([reps.categories.get(c, str(c)) for c in ids]),
        "layers": np.array(reps.layers, dtype=np.int64),
    }
    for mod in MODALITIES:
        data = reps.modality(mod)
        means = np.full((len(reps.layers), len(ids), dim), np.nan, dtype=np.float32)
        counts = np.zeros(len(ids), dtype=np.int64)
        for k, c in enumerate(ids):
            if c in data:
                means[:, k] = data[c].mean(0)
                counts[k] = len(data[c])
        out[mod], out[f"n_{mod}"] = means, counts
    return out


def save_dictionary(dictionary: Mapping[str, np.ndarray], path: str | Path) -> Path:
    """``np.savez`` the dictionary: the stacked arrays with ``category_ids``, plus one array per category
    under ``visual_<id>`` / ``text_<id>`` (``[L+1, d]``) so a reader can look a category up by id.

    >>> save_dictionary(confounder_dictionary(reps), "runs/confounders/confounders.npz")   # doctest: +SKIP
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = dict(dictionary)
    for mod in MODALITIES:
        for k, c in enumerate(dictionary["category_ids"].tolist()):
            arrays[f"{mod}_{c}"] = dictionary[mod][:, k]
    np.savez(path, **arrays)
    return path


def load_dictionary(path: str | Path) -> dict[str, np.ndarray]:
    """Read :func:`save_dictionary` output; checks that every row matches its per-id array.

    >>> d = load_dictionary("runs/confounders/confounders.npz")                    # doctest: +SKIP
    """
    with np.load(path) as z:
        out = {k: z[k] for k in ("category_ids", "names", "layers", "visual", "text", "n_visual", "n_text")}
        for mod in MODALITIES:
            for k, c in enumerate(out["category_ids"].tolist()):
                if not np.array_equal(z[f"{mod}_{c}"], out[mod][:, k], equal_nan=True):
                    raise ValueError(f"{path}: row {k} of {mod!r} is not category {c}'s array; the file is inconsistent.")
    return out


# ------------------------------------------------------------------------- separability
def scatter_ratio(x: np.ndarray, labels: np.ndarray) -> float:
    """``trace(S_B) / trace(S_W)`` for points ``x [n, d]`` with class ``labels [n]``.

    ``trace(S_W) = Σ_i ||x_i − μ_{c(i)}||²``, ``trace(S_B) = Σ_c n_c ||μ_c − μ||²``. When S_W is 0 (every
    instance equals its class mean, e.g. token embeddings of one-token names at layer 0) the ratio
    is ``inf`` if the classes differ and NaN if nothing varies.

    >>> scatter_ratio(np.array([[0.], [2.], [10.], [12.]]), np.array([0, 0, 1, 1]))   # S_B = 100, S_W = 4
    25.0
    """
    x = np.asarray(x, dtype=np.float64)
    labels = np.asarray(labels)
    mu = x.mean(0)
    sb = sw = 0.0
    for c in np.unique(labels):
        xc = x[labels == c]
        mc = xc.mean(0)
        sb += len(xc) * float(((mc - mu) ** 2).sum())
        sw += float(((xc - mc) ** 2).sum())
    if sw > 0:
        return sb / sw
    return float("inf") if sb > 0 else float("nan")


def pair_distances(means: Mapping[int, np.ndarray], pairs: Iterable[tuple[int, int]]) -> dict[str, float]:
    """Mean Euclidean distance of the ``pairs``' means vs all other category pairs.

    ``means``: category id -> ``[d]``. Returns ``pair`` (mean over the given pairs present in
    ``means``), ``other`` (mean over every other unordered pair), ``ratio = pair / other`` (< 1:
    co-occurring categories are closer), ``rank`` (mean over pairs (A, B) of the fraction of other
    categories C farther from A than B is; 1 = the partner is the nearest, 0.5 = chance), ``n_pairs``.

    >>> m = {1: np.array([0.]), 2: np.array([1.]), 3: np.array([5.]), 4: np.array([6.])}
    >>> pair_distances(m, [(1, 2), (3, 4)])["ratio"]          # pairs at 1, others at 5,6,4,5 → 1 / 5
    0.2
    """
    ids = sorted(c for c, v in means.items() if np.all(np.isfinite(v)))
    wanted = {(min(a, b), max(a, b)) for a, b in pairs if a != b}
    present = [p for p in wanted if p[0] in ids and p[1] in ids]
    dist = {(a, b): float(np.linalg.norm(np.asarray(means[a], np.float64) - np.asarray(means[b], np.float64)))
            for a, b in combinations(ids, 2)}
    other = [d for p, d in dist.items() if p not in wanted]
    if not present or not other:
        return {"pair": float("nan"), "other": float("nan"), "ratio": float("nan"), "rank": float("nan"), "n_pairs": len(present)}
    pair_d = float(np.mean([dist[p] for p in present]))
    other_d = float(np.mean(other))
    ranks = []
    for a, b in present:
        for x, y in ((a, b), (b, a)):  # both directions: is B nearest to A, and A to B?
            d_xy = dist[(min(x, y), max(x, y))]
            rest = [dist[(min(x, c), max(x, c))] for c in ids if c not in (x, y)]
            if rest:
                ranks.append(np.mean([r > d_xy for r in rest]) + 0.5 * np.mean([r == d_xy for r in rest]))
    return {"pair": pair_d, "other": other_d, "ratio": pair_d / other_d if other_d > 0 else float("nan"),
            "rank": float(np.mean(ranks)) if ranks else float("nan"), "n_pairs": len(present)}


def _silhouette(x: np.ndarray, labels: np.ndarray, max_instances: int | None, seed: int) -> float:
    from sklearn.metrics import silhouette_score

    n_labels = len(np.unique(labels))
    if not 2 <= n_labels <= len(x) - 1:
        return float("nan")  # silhouette is undefined for one class or one point per class
    sample = max_instances if max_instances is not None and len(x) > max_instances else None
    return float(silhouette_score(x, labels, sample_size=sample, random_state=seed))


def separability(reps: Representations, pairs: Iterable[tuple[int, int]] | None = None,
                 cooccurrence: Mapping[int, Mapping[int, int]] | None = None, n_pairs: int = 10,
                 max_instances: int | None = 5000, seed: int = 0) -> list[dict]:
    """Per layer and modality: how well categories separate, and whether co-occurring ones sit together.

    Parameters
    ----------
    reps : :func:`collect_representations` output.
    pairs : co-occurring ``(a, b)`` category-id pairs (the organism's planted pairs). When None,
        the ``n_pairs`` most co-occurring pairs of ``cooccurrence`` are used (real data).
    cooccurrence : :func:`cooccurrence_counts` output (needed only when ``pairs`` is None).
    max_instances : silhouette on a random subset of this size when there are more instances
        (it is O(n²)); None = all.

    Returns
    -------
    Tidy rows, one per (modality, layer), with :data:`SEPARABILITY_COLUMNS`: ``silhouette``
    (sklearn, Euclidean, per-instance representations labelled by category), ``scatter_ratio``
    (:func:`scatter_ratio`), ``pair_distance_ratio``/``pair_rank``/``mean_pair_distance``/
    ``mean_other_distance``/``n_pairs`` (:func:`pair_distances` on the category means),
    ``n_instances``, ``n_categories``.

    Example
    -------
    >>> rows = separability(reps, [(18, 34), (48, 49)])                        # doctest: +SKIP
    >>> [(r["layer"], round(r["pair_distance_ratio"], 2)) for r in rows if r["modality"] == "text"]   # doctest: +SKIP
    """
    if pairs is None:
        if cooccurrence is None:
            raise ValueError("pass the co-occurring pairs or a co-occurrence table to derive them from.")
        pairs = top_cooccurring_pairs(cooccurrence, n_pairs)
    pairs = [(int(a), int(b)) for a, b in pairs]
    rows = []
    for mod in MODALITIES:
        data = reps.modality(mod)
        if not data:
            continue
        ids = sorted(data)
        x_all = np.concatenate([data[c] for c in ids])                  # [n, L, d]
        labels = np.concatenate([np.full(len(data[c]), c) for c in ids])
        for k, layer in enumerate(reps.layers):
            x = x_all[:, k].astype(np.float64)
            pd = pair_distances({c: data[c][:, k].mean(0) for c in ids}, pairs)
            rows.append({
                "modality": mod, "layer": int(layer), "silhouette": _silhouette(x, labels, max_instances, seed),
                "scatter_ratio": scatter_ratio(x, labels), "pair_distance_ratio": pd["ratio"], "pair_rank": pd["rank"],
                "mean_pair_distance": pd["pair"], "mean_other_distance": pd["other"], "n_pairs": pd["n_pairs"],
                "n_instances": int(len(x)), "n_categories": len(ids),
            })
    return rows


# --------------------------------------------------------------------------------- PCA
def pca_views(dictionary: Mapping[str, np.ndarray], modality: str, layer: int, n_components: int = 2) -> list[dict]:
    """PCA of the standardised category means of one modality at hidden-state index ``layer``.

    The categories with a mean in that modality are stacked ``[C, d]``, each dimension
    standardised over categories (as the reference does), and projected on ``n_components`` (2 or 3)
    principal components. Rows: ``category_id``, ``name``, ``pc1``, ``pc2`` (, ``pc3``) and
    ``explained_pc1`` … (the explained-variance ratio of each component, the same on every row).

    >>> rows = pca_views(confounder_dictionary(reps), "visual", layer=0, n_components=3)   # doctest: +SKIP
    >>> rows[0]["category_id"], sorted(rows[0])                                             # doctest: +SKIP
    """
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    if n_components not in (2, 3):
        raise ValueError(f"n_components must be 2 or 3, got {n_components}.")
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; choose from {MODALITIES}.")
    layers = [int(l) for l in dictionary["layers"]]
    if int(layer) not in layers:
        raise ValueError(f"layer {layer} not in the dictionary's layers {layers}.")
    means = dictionary[modality][layers.index(int(layer))]             # [C, d]
    ok = np.all(np.isfinite(means), axis=1)
    if ok.sum() < n_components:
        raise ValueError(f"{int(ok.sum())} categories have a {modality} mean; PCA with {n_components} components needs more.")
    z = StandardScaler().fit_transform(means[ok].astype(np.float64))
    pca = PCA(n_components=n_components, random_state=0)
    proj = pca.fit_transform(z)
    ids = dictionary["category_ids"][ok]
    names = dictionary["names"][ok]
    rows = []
    for i in range(len(ids)):
        row = {"category_id": int(ids[i]), "name": str(names[i])}
        row.update({f"pc{j + 1}": float(proj[i, j]) for j in range(n_components)})
        row.update({f"explained_pc{j + 1}": float(pca.explained_variance_ratio_[j]) for j in range(n_components)})
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------- I/O
def write_csv(rows: Sequence[Mapping], path: str | Path, columns: Sequence[str] | None = None) -> Path:
    """Write dict rows as CSV (columns: ``columns`` or the first row's keys).

    >>> write_csv([{"a": 1}], "/tmp/x.csv")                                   # doctest: +SKIP
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = list(columns) if columns is not None else (list(rows[0]) if rows else [])
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return path


# ---------------------------------------------------------------------------------- CLI
DESCRIPTION = "Visual and text confounders per layer: category means, PCA views and separability numbers."


def _add_args(p: argparse.ArgumentParser) -> None:
    from ..cli.common import add_model_args

    add_model_args(p)
    d = p.add_argument_group("data")
    d.add_argument("--data", type=Path, default=None,
                   help="exported organism split or COCO-format dir with objects.json "
                        "(default: export the organism's normal split into OUT/data)")
    d.add_argument("--n-images", type=int, default=300, help="images used (the first N)")
    d.add_argument("--prompt", default=None, help="user prompt before the caption (default: the captioning prompt)")
    d.add_argument("--batch-size", type=int, default=16)
    a = p.add_argument_group("analysis")
    a.add_argument("--layers", type=int, nargs="*", default=None,
                   help="hidden-state indices (0 = projector output/embeddings, l = decoder layer l; default all)")
    a.add_argument("--highlight", default=None,
                   help="category name to highlight in the PCA figures (default: the first pair's A, else the most frequent)")
    a.add_argument("--n-partners", type=int, default=3, help="most co-occurring partners highlighted")
    a.add_argument("--pca-layer", type=int, default=None, help="layer of the PCA figures (default: the last)")
    a.add_argument("--n-pairs", type=int, default=10, help="co-occurring pairs used when the data has no pairs.json")
    o = p.add_argument_group("output")
    o.add_argument("--out", type=Path, default=Path("runs/confounders"), help="output directory")
    o.add_argument("--no-png", action="store_true", help="skip the static PNGs")
    o.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lens_halluc.analysis.confounders", description=DESCRIPTION,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_args(p)
    return p


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register the ``confounders`` sub-command on an ``argparse`` subparsers object.

    The parser's ``func`` default is :func:`run` (call ``args.func(args)``).

    >>> p = argparse.ArgumentParser(); sub = p.add_subparsers(dest="command")
    >>> _ = add_cli(sub); p.parse_args(["confounders", "--n-images", "5"]).n_images
    5
    """
    p = subparsers.add_parser("confounders", help=DESCRIPTION, description=DESCRIPTION,
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_args(p)
    p.set_defaults(func=run)
    return p


def _organism_data(model, out: Path, n: int) -> Path:
    from ..models.loading import resolve_model_path
    from ..organism.export import export_split
    from ..organism.recipe import read_organism_meta

    model_dir = resolve_model_path(model)
    try:
        world, _ = read_organism_meta(model_dir)
    except FileNotFoundError:
        raise ValueError(f"{model_dir} is not an organism checkpoint: pass --data (a COCO-format dir with objects.json).") from None
    d = out / "data" / f"normal-{n}"
    if not (d / "meta.json").is_file():  # meta.json is written last: its presence means a complete export
        export_split(world, "normal", n, 1, d, overwrite=True)
    return d


def run(args: argparse.Namespace) -> dict:
    """Run the analysis for parsed CLI ``args``; write the files; return a summary dict.

    Writes in ``args.out``: ``separability.csv``, ``confounders.npz``, ``pca_{visual,text}_{2d,3d}.csv``
    (every layer, with a ``layer`` column), ``confounders_separability.html/.png``,
    ``confounders_pca_{visual,text}_{2d,3d}.html/.png`` and ``manifest.json``.
    """
    from ..cli.common import load_model_from_args
    from ..figures.confounders import pca_scatter, separability_lines
    from ..figures.io import save_figure

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    data_dir = args.data if args.data is not None else _organism_data(args.model, out, args.n_images)
    ds, objects, pairs = load_export(data_dir)
    image_ids = ds.image_ids[: args.n_images]
    vlm = load_model_from_args(args)
    reps = collect_representations(vlm, ds, objects, layers=args.layers, prompt=args.prompt,
                                   batch_size=args.batch_size, image_ids=image_ids, progress=not args.no_progress)
    cooc = cooccurrence_counts(ds, image_ids)
    if pairs is None:
        pairs = top_cooccurring_pairs(cooc, args.n_pairs)
    table = separability(reps, pairs, cooc)
    write_csv(table, out / "separability.csv", SEPARABILITY_COLUMNS)
    dictionary = confounder_dictionary(reps)
    save_dictionary(dictionary, out / "confounders.npz")

    by_name = ds.category_ids_by_name
    if args.highlight is not None:
        if args.highlight not in by_name:
            raise KeyError(f"--highlight {args.highlight!r} is not a category; known: {sorted(by_name)}.")
        hid = by_name[args.highlight]
    elif pairs:
        hid = pairs[0][0]
    else:
        hid = int(dictionary["category_ids"][np.argmax(dictionary["n_visual"] + dictionary["n_text"])])
    if hid not in dictionary["category_ids"].tolist():
        raise ValueError(f"category {ds.categories[hid]!r} has no instance (drawn object or caption mention) in the "
                         f"{len(image_ids)} images; use more images (--n-images) or another --highlight.")
    partners = most_cooccurring(hid, cooc, args.n_partners)
    pca_layer = reps.layers[-1] if args.pca_layer is None else args.pca_layer
    png = not args.no_png
    written = {}
    for mod in MODALITIES:
        for dims in (2, 3):
            rows = []
            for layer in reps.layers:
                try:
                    view = pca_views(dictionary, mod, layer, dims)
                except ValueError:
                    continue  # too few categories in this modality for this many components
                rows += [{"layer": layer, **r} for r in view]
            if not rows:
                continue
            write_csv(rows, out / f"pca_{mod}_{dims}d.csv")
            view = [r for r in rows if r["layer"] == pca_layer]
            if view and hid not in {r["category_id"] for r in view}:
                warnings.warn(f"{ds.categories[hid]!r} has no {mod} instance: confounders_pca_{mod}_{dims}d not drawn.",
                              stacklevel=2)
            elif view:
                fig = pca_scatter(view, hid, partners, title=f"{mod} confounders, layer {pca_layer}: "
                                  f"{ds.categories[hid]} and its {len(partners)} most co-occurring objects")
                written[f"pca_{mod}_{dims}d"] = [str(p) for p in save_figure(fig, out / f"confounders_pca_{mod}_{dims}d", png=png)]
    written["separability"] = [str(p) for p in save_figure(separability_lines(table), out / "confounders_separability", png=png)]
    summary = {"data": str(data_dir), "n_images": len(image_ids), "layers": reps.layers,
               "pairs": [[a, b, ds.categories[a], ds.categories[b]] for a, b in pairs],
               "highlight": [hid, ds.categories[hid]], "partners": [[c, ds.categories[c]] for c in partners],
               "pca_layer": pca_layer, "figures": written, "separability": table}
    (out / "manifest.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "separability"}, indent=1))
    _print_table(table)
    return summary


def _print_table(rows: Sequence[Mapping]) -> None:
    print(f"{'modality':8} {'layer':>5} {'silhouette':>10} {'scatter':>8} {'pair/other':>10} {'rank':>5} {'n':>5} {'C':>3}")
    for r in rows:
        print(f"{r['modality']:8} {r['layer']:5d} {r['silhouette']:10.3f} {r['scatter_ratio']:8.3f} "
              f"{r['pair_distance_ratio']:10.3f} {r['pair_rank']:5.2f} {r['n_instances']:5d} {r['n_categories']:3d}")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lens_halluc.analysis.confounders [options]``; returns the exit status.

    >>> main(["--out", "runs/confounders", "--n-images", "60"])                 # doctest: +SKIP
    0
    """
    from ..cli.common import friendly_errors

    args = build_parser().parse_args(argv)
    with friendly_errors("python -m lens_halluc.analysis.confounders"):
        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
