"""How separable object representations are at the last layer: the before/after record of a re-training run.

Causal-LLaVA's claim is that de-confounding spreads co-occurring objects apart; every method's
record carries this measure (when given a confounder export) so the claim can be checked for
each of them.

Example
-------
>>> separability_summary(vlm, "runs/_data/data/normal-200", 200)               # doctest: +SKIP
{'visual': {'silhouette': 0.12, 'scatter_ratio': 1.4, 'pair_distance_ratio': 0.8, 'layer': 6}, 'text': {...}}
"""
from __future__ import annotations

from pathlib import Path


def separability_summary(vlm, data_dir: str | Path, n_images: int) -> dict:
    """Separability at the last layer per modality: silhouette, scatter ratio, co-occurring-pair distance ratio.

    Parameters
    ----------
    vlm : LoadedVLM.
    data_dir : an export with ``objects.json`` (per-object patches), e.g. an organism split export.
    n_images : the first ``n_images`` images of the export are used.

    Returns
    -------
    ``{modality: {"silhouette", "scatter_ratio", "pair_distance_ratio", "layer"}}``.

    Example
    -------
    >>> separability_summary(vlm, data_dir, 100)["visual"]["silhouette"]        # doctest: +SKIP
    0.12
    """
    from ..analysis import collect_representations, cooccurrence_counts, load_export, separability

    ds, objects, pairs = load_export(data_dir)
    ids = ds.image_ids[:n_images]
    L = vlm.spec.n_layers
    reps = collect_representations(vlm, ds, objects, layers=[L], image_ids=ids)
    rows = separability(reps, pairs, cooccurrence_counts(ds, ids))
    return {r["modality"]: {k: r[k] for k in ("silhouette", "scatter_ratio", "pair_distance_ratio")} | {"layer": L}
            for r in rows}
