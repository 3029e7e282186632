"""Per-instance hidden states of objects (image patches) and of their names (caption tokens), and category means.

A *visual confounder* of a category is the mean hidden state over the image tokens that fall
inside its objects' boxes; a *text confounder* is the mean hidden state of its name's tokens in
captions. Both are taken per layer (layer 0 = the projector output at the image positions /
the token embeddings, layer ``l`` = decoder layer ``l``'s output) from one teacher-forced pass of
image + caption prompt + the dataset's reference caption. Keyed by **category id** (the reference
keyed rows by position and highlighted the wrong objects).

Example
-------
>>> reps = collect_representations(vlm, ds, objects)                           # doctest: +SKIP
>>> dictionary = confounder_dictionary(reps)                                   # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from ..models.adapters import require_defined

MODALITIES = ("visual", "text")


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


def grid_patch_positions(input_ids, image_token_ids: Sequence[int], grid: tuple[int, int],
                         patches: Sequence[int]) -> np.ndarray:
    """Positions of image patches ``patches`` (row-major indices on ``grid`` = ``(rows, cols)``).

    Image token ``k`` (in sequence order, whatever structure tokens lie between them) is patch
    ``(k // cols, k % cols)`` (:meth:`Adapter.patch_grid`); the row must hold exactly
    ``rows * cols`` image tokens.

    >>> grid_patch_positions([1, 9, 9, 4, 9, 9, 7], [9], (2, 2), [0, 2, 3]).tolist()
    [1, 4, 5]
    """
    ids = np.asarray(input_ids.tolist() if hasattr(input_ids, "tolist") else input_ids)
    pos = np.flatnonzero(np.isin(ids, np.asarray(list(image_token_ids))))
    n = int(grid[0]) * int(grid[1])
    if pos.size != n:
        raise ValueError(f"the input has {pos.size} image tokens, not the {grid[0]}×{grid[1]} = {n} of the patch grid.")
    idx = np.asarray(list(patches), dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"patch index {int(idx.max())} out of range: the patch grid is {grid[0]}×{grid[1]}. "
                         "objects.json patches must index the model's image tokens (grid of the vision tower).")
    return pos[idx]


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
      mean over its image-token positions (patch ``p`` of the adapter's row-major patch grid,
      :meth:`Adapter.patch_grid`, is the ``p``-th image token; a family without one grid raises
      :class:`~lens_halluc.models.adapters.NotDefinedForArchitecture`) → ``[len(layers), d]``;
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
    require_defined(vlm, "confounders")  # NotDefinedForArchitecture with the family's reason
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
    ids_all = list(dataset.image_ids if image_ids is None else image_ids)
    visual, text = [], []
    decoder = spec.layers(vlm.model)
    batches = [ids_all[i:i + batch_size] for i in range(0, len(ids_all), batch_size)]
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc="confounders")
    for batch in batches:
        cap_ids = []
        for img in batch:
            caps = dataset.captions.get(img) or []
            cap_ids.append(list(tok(caps[0], add_special_tokens=False)["input_ids"]) if caps else [])
        # every image input and per-token input of the family, captions appended, right-padded: with a
        # causal mask, padding after a row's end changes none of its states
        padded = vlm.caption_batch([load_image(dataset.image_path(i)) for i in batch], [prompt] * len(batch), cap_ids)
        lengths = padded["attention_mask"].sum(-1).tolist()
        n_prompt = [int(n) - len(c) for n, c in zip(lengths, cap_ids)]
        last: list = []
        # transformers v5 returns the *final-normed* state as the last hidden state; the last decoder
        # layer's own output is read with a hook so that every layer l is "decoder layer l's output".
        hook = decoder[-1].register_forward_hook(lambda m, i, o: last.append(o[0] if isinstance(o, tuple) else o))
        try:
            with torch.no_grad():
                out = vlm.model(**padded, output_hidden_states=True, use_cache=False)
        finally:
            hook.remove()
        hs = list(out.hidden_states)
        hs[-1] = last[0]
        H = torch.stack([hs[l] for l in layers]).float().cpu().numpy()  # [len(layers), B, T, d]
        for r, img in enumerate(batch):
            drawn = [o for o in objects.get(int(img), []) if o.get("drawn", True) and o.get("patches")]
            # (a hidden partner has no pixels: no visual instance)
            if drawn:
                grid = vlm.adapter.patch_grid(vlm.model, padded, r)  # NotDefinedForArchitecture: no single grid
                ids = padded["input_ids"][r].tolist()
                for o in drawn:
                    pos = grid_patch_positions(ids, spec.image_token_ids, grid, o["patches"])
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
