"""Numbers of the confounder analysis: per layer and modality, how well categories separate, and PCA views.

The reference only draws PCA pictures of the stacked category means; here every layer also gets
numbers: the silhouette score of the per-instance representations by category, the between/within
scatter ratio, and the mean distance between co-occurring categories' means relative to other
category pairs.

Example
-------
>>> rows = separability(reps, pairs)                                           # doctest: +SKIP
>>> view = pca_views(confounder_dictionary(reps), "text", layer=6)             # doctest: +SKIP
"""
from __future__ import annotations

from itertools import combinations
from typing import Iterable, Mapping

import numpy as np

from ._confounders_data import top_cooccurring_pairs
from ._representations import MODALITIES, Representations

SEPARABILITY_COLUMNS = ("modality", "layer", "silhouette", "scatter_ratio", "pair_distance_ratio", "pair_rank",
                        "mean_pair_distance", "mean_other_distance", "n_pairs", "n_instances", "n_categories")


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
