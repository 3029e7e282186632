"""Confounders and separability (Causal-LLaVA) as one analysis: :func:`confounders` → :class:`ConfoundersResult`.

Per layer and modality (visual: object patches; text: name tokens in the reference captions) the
category means (the *confounder dictionary*), numbers of how well categories separate and whether
co-occurring ones sit together (:mod:`._separability`), and PCA views of the means with one object
and its most co-occurring partners highlighted. The building blocks live in
:mod:`._confounders_data` (inputs), :mod:`._representations` (hidden states) and
:mod:`._separability` (numbers, PCA); figures in :mod:`lens_halluc.figures.confounders`.

Example
-------
>>> res = lh.analysis.confounders(lh.load_vlm(), "runs/confounders/data/normal-300", highlight="dog")  # doctest: +SKIP
>>> res.table.query("modality == 'text'")[["layer", "pair_distance_ratio"]]                            # doctest: +SKIP
>>> res.pca_figure("visual").show()                                                                    # doctest: +SKIP
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from ._confounders_data import cooccurrence_counts, load_export, load_objects, most_cooccurring, pairs_from_names, \
    top_cooccurring_pairs
from ._representations import MODALITIES, collect_representations, confounder_dictionary, save_dictionary
from ._result import AnalysisResult, frame
from ._separability import SEPARABILITY_COLUMNS, pca_views, separability

SUMMARY_COLUMNS = ("modality", "n_layers", "max_silhouette", "max_silhouette_layer", "min_pair_distance_ratio",
                   "min_pair_distance_ratio_layer", "n_layers_pairs_closer")


def summarize_separability(rows: Sequence[dict]) -> list[dict]:
    """Per modality: the best silhouette, the smallest pair-distance ratio (and their layers), and in how
    many layers co-occurring pairs sit closer than other pairs (ratio < 1).

    Example
    -------
    >>> summarize_separability([{"modality": "text", "layer": 0, "silhouette": 0.1, "pair_distance_ratio": 0.9},
    ...                         {"modality": "text", "layer": 1, "silhouette": 0.3, "pair_distance_ratio": 1.2}])[0]
    {'modality': 'text', 'n_layers': 2, 'max_silhouette': 0.3, 'max_silhouette_layer': 1, 'min_pair_distance_ratio': 0.9, 'min_pair_distance_ratio_layer': 0, 'n_layers_pairs_closer': 1}
    """
    out = []
    for mod in MODALITIES:
        mine = [r for r in rows if r["modality"] == mod]
        if not mine:
            continue
        sil = [r for r in mine if np.isfinite(r["silhouette"])]
        rat = [r for r in mine if np.isfinite(r["pair_distance_ratio"])]
        best = max(sil, key=lambda r: r["silhouette"]) if sil else None
        near = min(rat, key=lambda r: r["pair_distance_ratio"]) if rat else None
        out.append({"modality": mod, "n_layers": len(mine),
                    "max_silhouette": float(best["silhouette"]) if best else float("nan"),
                    "max_silhouette_layer": int(best["layer"]) if best else None,
                    "min_pair_distance_ratio": float(near["pair_distance_ratio"]) if near else float("nan"),
                    "min_pair_distance_ratio_layer": int(near["layer"]) if near else None,
                    "n_layers_pairs_closer": sum(r["pair_distance_ratio"] < 1.0 for r in rat)})
    return out


class ConfoundersResult(AnalysisResult):
    """:func:`confounders` result.

    Attributes
    ----------
    table : separability per (modality, layer), :data:`SEPARABILITY_COLUMNS`.
    summary : per modality, :data:`SUMMARY_COLUMNS`.
    dictionary : the confounder dictionary (:func:`confounder_dictionary`: category means per layer).
    pca : ``{"pca_<modality>_<2|3>d": DataFrame}``, every layer (``layer`` column).
    representations : the per-instance :class:`Representations`.
    params : data, n_images, layers, pairs, highlight, partners, pca_layer (the ``manifest.json``).

    Files (:meth:`save`): ``separability.csv``, ``confounders_summary.csv``, ``confounders.npz``,
    ``pca_{visual,text}_{2d,3d}.csv``, ``confounders_separability.html/.png``,
    ``confounders_pca_{visual,text}_{2d,3d}.html/.png`` and ``manifest.json``.

    Example
    -------
    >>> res.pca["pca_text_2d"].query("layer == 6")                         # doctest: +SKIP
    """

    name = "confounders"

    def __init__(self, table, summary, dictionary, pca, representations, params):
        super().__init__(table, summary, params)
        self.dictionary = dictionary
        self.pca = pca
        self.representations = representations

    def tables(self):
        return {"separability": self.table, "confounders_summary": self.summary, **self.pca}

    def figure(self, title: str | None = None):
        """Silhouette, scatter ratio and pair-distance ratio per layer (:func:`~lens_halluc.figures.confounders.separability_lines`)."""
        from ..figures.confounders import separability_lines

        return separability_lines(self.table, title=title)

    def pca_figure(self, modality: str = "visual", dims: int = 2, layer: int | None = None):
        """PCA scatter of one modality's category means at ``layer`` (default: the result's ``pca_layer``),
        the highlighted category and its partners coloured; None when that view has no highlighted category.
        """
        from ..figures.confounders import pca_scatter

        key = f"pca_{modality}_{dims}d"
        if key not in self.pca:
            raise KeyError(f"no {dims}-D PCA view of {modality!r} confounders (too few categories); have {sorted(self.pca)}.")
        layer = self.params["pca_layer"] if layer is None else int(layer)
        hid, hname = self.params["highlight"]
        partners = [c for c, _ in self.params["partners"]]
        view = self.pca[key][self.pca[key]["layer"] == layer].drop(columns="layer")
        if view.empty or hid not in set(view["category_id"].tolist()):
            return None
        return pca_scatter(view, hid, partners, title=f"{modality} confounders, layer {layer}: "
                           f"{hname} and its {len(partners)} most co-occurring objects")

    def save(self, out_dir: str | Path, png: bool = True) -> list[Path]:
        from ..data.tables import write_table
        from ..figures.io import save_figure

        out = Path(out_dir)
        written = [write_table(self.table, out / "separability.csv"),
                   write_table(self.summary, out / "confounders_summary.csv"),
                   save_dictionary(self.dictionary, out / "confounders.npz")]
        figures = {}
        for key, table in self.pca.items():
            written.append(write_table(table, out / f"{key}.csv"))
            mod, dims = key.split("_")[1], int(key.split("_")[2][0])
            fig = self.pca_figure(mod, dims)
            if fig is None:
                warnings.warn(f"{self.params['highlight'][1]!r} has no {mod} instance: confounders_{key} not drawn.",
                              stacklevel=2)
                continue
            figures[key] = [str(p) for p in save_figure(fig, out / f"confounders_{key}", png=png)]
        figures["separability"] = [str(p) for p in save_figure(self.figure(), out / "confounders_separability", png=png)]
        written += [Path(p) for paths in figures.values() for p in paths]
        (out / "manifest.json").write_text(json.dumps({**self.params, "figures": figures}, indent=1))
        return written + [out / "manifest.json"]


def _inputs(dataset, objects, pairs):
    """``(dataset, objects, pairs, where)`` from a split directory or a CocoDataset (+ objects)."""
    from ..data.coco import CocoDataset

    if not isinstance(dataset, CocoDataset):
        ds, objs, file_pairs = load_export(dataset)
        return ds, objects if objects is not None else objs, pairs if pairs is not None else file_pairs, str(dataset)
    root = dataset.image_dir.parent if dataset.image_dir is not None else None
    if objects is None:
        objects = getattr(dataset, "objects", None)
    if objects is None:
        if root is None or not (root / "objects.json").is_file():
            raise ValueError("the confounder analysis needs each image's objects (objects.json of an export): pass "
                             "objects= or a split directory.")
        objects = load_objects(root / "objects.json")
    if pairs is None and root is not None and (root / "pairs.json").is_file():
        pairs = pairs_from_names(json.loads((root / "pairs.json").read_text()), dataset.categories)
    return dataset, {int(k): v for k, v in dict(objects).items()}, pairs, str(root) if root else "in-memory dataset"


def confounders(vlm, dataset, objects=None, pairs: Iterable[tuple[int, int]] | None = None,
                n_images: int | None = None, layers: Sequence[int] | None = None, prompt: str | None = None,
                batch_size: int = 16, highlight: str | None = None, n_partners: int = 3,
                pca_layer: int | None = None, n_pairs: int = 10, progress: bool = False) -> ConfoundersResult:
    """Visual and text confounders per layer: category means, separability numbers and PCA views.

    Parameters
    ----------
    vlm : :class:`~lens_halluc.models.loading.LoadedVLM`.
    dataset : an exported split directory (``objects.json``, optional ``pairs.json``) or a
        :class:`~lens_halluc.data.coco.CocoDataset` (its folder's ``objects.json``, or ``objects=``).
    objects : ``{image_id: [{category_id, patches, drawn}, ...]}`` (default: from the export).
    pairs : co-occurring ``(a, b)`` category ids (default: the export's planted pairs, else the
        ``n_pairs`` most co-occurring pairs of the images).
    n_images : the first N images (None = all). layers : hidden-state indices (default all).
    prompt, batch_size, progress : of :func:`collect_representations`.
    highlight : category name highlighted in the PCA views (default: the first pair's A, else the
        most frequent); ``n_partners`` most co-occurring partners are highlighted with it.
    pca_layer : layer of the PCA figures (default: the last).

    Returns
    -------
    :class:`ConfoundersResult`.

    Example
    -------
    >>> res = confounders(vlm, normal_dir, n_images=150, batch_size=25)              # doctest: +SKIP
    >>> res.save("runs/confounders")                                                # doctest: +SKIP
    """
    ds, objects, pairs, where = _inputs(dataset, objects, pairs)
    image_ids = ds.image_ids if n_images is None else ds.image_ids[: int(n_images)]
    reps = collect_representations(vlm, ds, objects, layers=layers, prompt=prompt, batch_size=batch_size,
                                   image_ids=image_ids, progress=progress)
    cooc = cooccurrence_counts(ds, image_ids)
    pairs = top_cooccurring_pairs(cooc, n_pairs) if pairs is None else [(int(a), int(b)) for a, b in pairs]
    rows = separability(reps, pairs, cooc)
    dictionary = confounder_dictionary(reps)

    by_name = ds.category_ids_by_name
    if highlight is not None:
        if highlight not in by_name:
            raise KeyError(f"highlight {highlight!r} is not a category; known: {sorted(by_name)}.")
        hid = by_name[highlight]
    elif pairs:
        hid = pairs[0][0]
    else:
        hid = int(dictionary["category_ids"][np.argmax(dictionary["n_visual"] + dictionary["n_text"])])
    if hid not in dictionary["category_ids"].tolist():
        raise ValueError(f"category {ds.categories[hid]!r} has no instance (drawn object or caption mention) in the "
                         f"{len(image_ids)} images; use more images (--n-images) or another highlight.")
    partners = most_cooccurring(hid, cooc, n_partners)
    pca = {}
    for mod in MODALITIES:
        for dims in (2, 3):
            view_rows = []
            for layer in reps.layers:
                try:
                    view = pca_views(dictionary, mod, layer, dims)
                except ValueError:
                    continue  # too few categories in this modality for this many components
                view_rows += [{"layer": layer, **r} for r in view]
            if view_rows:
                pca[f"pca_{mod}_{dims}d"] = pd.DataFrame(view_rows)
    params = {"data": where, "n_images": len(image_ids), "layers": reps.layers,
              "pairs": [[a, b, ds.categories[a], ds.categories[b]] for a, b in pairs],
              "highlight": [hid, ds.categories[hid]], "partners": [[c, ds.categories[c]] for c in partners],
              "pca_layer": reps.layers[-1] if pca_layer is None else int(pca_layer)}
    return ConfoundersResult(frame(rows, SEPARABILITY_COLUMNS), frame(summarize_separability(rows), SUMMARY_COLUMNS),
                             dictionary, pca, reps, params)
