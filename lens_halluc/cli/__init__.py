"""Command lines: each module parses flags, calls the library and saves; no computing lives here.

``python -m lens_halluc.attribute`` (and ``caption``, ``chair``, ``pope``, ``answer``,
``intervene``, ``retrain``, ``analysis``, ``organism``) run the ``main`` of the module of the same
name in this package.
"""
