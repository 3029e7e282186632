"""Reading and editing model internals: head ablation (torch hooks), attention editing."""
from .ablation import InterventionNotAppliedError, ablate_heads

__all__ = ["InterventionNotAppliedError", "ablate_heads"]
