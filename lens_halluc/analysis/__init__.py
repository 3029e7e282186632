"""Analyses of *why* hallucination heads hallucinate, as functions returning result objects.

=====================  =====================================================  =========================
function               question                                               result
=====================  =====================================================  =========================
:func:`bias`           do the heads read the image or earlier text when an    :class:`BiasResult`
                       object word is predicted?
:func:`inheritance`    is their text-to-text attention the base LM's?         :class:`InheritanceResult`
:func:`drift`          how far does their attention move during tuning?       :class:`DriftResult`
:func:`confounders`    do co-occurring objects share representations?         :class:`ConfoundersResult`
:func:`reweighting`    does scaling their text/image attention change CHAIR   :class:`ReweightingResult`
                       more than for random heads?
=====================  =====================================================  =========================

Every result has ``.table`` (tidy DataFrame), ``.summary`` (DataFrame), ``.figure()`` (plotly,
built by :mod:`lens_halluc.figures`) and ``.save(dir)`` (the CSVs and figures
``python -m lens_halluc.analysis <name>`` writes). ``attribution`` arguments take a fitted
:class:`lens_halluc.attribution.Attribution` or its run directory (:func:`as_attribution`). Head
groups have one naming everywhere (:mod:`._groups`: ``hallucination``, ``lowest``, ``all``,
``other``, ``random``); each analysis's default ``k`` is the reference's
(:data:`lens_halluc.models.heads.HA_K`: bias 20, inheritance 1, drift 3, re-weighting 20), and
inheritance and drift compare with the k lowest-scoring heads (``against="others"``, the
``corrected`` flavour, with every other head). This package never imports the organism: its defaults (base LM,
checkpoints, splits) are passed in, e.g. from :mod:`lens_halluc.models.default`.

Example
-------
>>> import lens_halluc as lh                                                      # doctest: +SKIP
>>> res = lh.analysis.bias(lh.load_vlm(), "runs/attribution_heads", n_samples=40)  # doctest: +SKIP
>>> res.summary                                                                   # doctest: +SKIP
>>> res.figure().show(); res.save("runs/bias")                                    # doctest: +SKIP
"""
from ._attention import (AttentionUnavailableError, AttributionRun, as_attribution, attention_maps,
                         hallucination_heads, load_attribution_run, prompt_length, resolve_k, sample_inputs, sample_pixels,
                         select_samples)
from ._bias import BiasConfig, BiasResult, attention_bias, bias, role_masses, summarize_bias
from ._confounders import ConfoundersResult, confounders, summarize_separability
from ._confounders_data import (cooccurrence_counts, load_export, load_objects, most_cooccurring, pairs_from_names,
                                top_cooccurring_pairs)
from ._drift import FLAVOURS_DRIFT, DriftConfig, DriftResult, attention_drift, drift, drift_curve, js_divergence, \
    last_checkpoint_heads, row_js
from ._groups import AGAINST, ALL, GROUPS, HALLUCINATION, LOWEST, OTHER, RANDOM, comparison_groups, group_of, head_groups
from ._inheritance import (FLAVOURS_INHERITANCE, AlignmentError, InheritanceConfig, InheritanceResult, block_cosine,
                           inheritance, inheritance_rows, per_head_cosine, summarize_inheritance, text_only_ids)
from ._representations import (MODALITIES, Representations, collect_representations, confounder_dictionary,
                               grid_patch_positions, image_positions, load_dictionary, patch_positions,
                               save_dictionary)
from ._result import AnalysisResult
from ._reweighting import (ALPHAS_IMAGE, ALPHAS_TEXT, FLAVOURS_REWEIGHTING, RANDOM_POOLS, ReweightingResult,
                           chair_scorer, reweighting, reweighting_curves, summarize_curves)
from ._separability import SEPARABILITY_COLUMNS, pair_distances, pca_views, scatter_ratio, separability

__all__ = [
    # the analyses and their results
    "bias", "inheritance", "drift", "confounders", "reweighting",
    "AnalysisResult", "BiasResult", "InheritanceResult", "DriftResult", "ConfoundersResult", "ReweightingResult",
    # attributions and head groups
    "as_attribution", "AttributionRun", "load_attribution_run", "hallucination_heads",
    "head_groups", "comparison_groups", "group_of", "resolve_k", "GROUPS", "AGAINST", "HALLUCINATION", "LOWEST", "ALL",
    "OTHER", "RANDOM", "FLAVOURS_INHERITANCE", "FLAVOURS_DRIFT", "FLAVOURS_REWEIGHTING", "RANDOM_POOLS",
    # building blocks
    "attention_maps", "AttentionUnavailableError", "sample_inputs", "sample_pixels", "prompt_length", "select_samples",
    "attention_bias", "role_masses", "summarize_bias", "BiasConfig",
    "inheritance_rows", "block_cosine", "text_only_ids", "per_head_cosine", "summarize_inheritance",
    "InheritanceConfig", "AlignmentError",
    "attention_drift", "js_divergence", "row_js", "drift_curve", "last_checkpoint_heads", "DriftConfig",
    "reweighting_curves", "summarize_curves", "chair_scorer", "ALPHAS_TEXT", "ALPHAS_IMAGE",
    "load_export", "load_objects", "pairs_from_names", "cooccurrence_counts", "most_cooccurring",
    "top_cooccurring_pairs", "Representations", "collect_representations", "confounder_dictionary",
    "save_dictionary", "load_dictionary", "image_positions", "patch_positions", "grid_patch_positions", "MODALITIES",
    "separability", "scatter_ratio", "pair_distances", "pca_views", "SEPARABILITY_COLUMNS", "summarize_separability",
]
