"""Analyses of *why* hallucination heads hallucinate: attention bias, inheritance, drift (+ confounders).

Each analysis is a pure function from (model(s), attribution data, heads, config) to a tidy table
(a list of dicts), with a summary function; figures are built from those tables in
:mod:`lens_halluc.figures` (this package never imports plotly). Command line::

    python -m lens_halluc.analysis bias|inheritance|drift --attribution RUN_DIR --out DIR

Example
-------
>>> from lens_halluc.analysis.attention import load_attribution_run, head_groups   # doctest: +SKIP
>>> from lens_halluc.analysis.bias import attention_bias, summarize_bias            # doctest: +SKIP
"""
