"""Interventions that reduce hallucination, each usable as a decoding strategy."""
from .ablation import HeadAblation

__all__ = ["HeadAblation"]
