"""lens_halluc: find why vision-language models hallucinate objects, and fix it.

Nouns: a loaded model with its :class:`~lens_halluc.models.ModelSpec`, a
:class:`~lens_halluc.data.CocoDataset`, attribution results and interventions.
"""
__version__ = "0.1.0"
