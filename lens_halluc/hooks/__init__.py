"""Reading and editing model internals: head outputs and their ablation (torch hooks on ``o_proj``
inputs, :func:`head_output_hooks`) and attention editing.

Importing this package registers the ``"lens_halluc"`` attention implementation (an eager
attention with editable post-softmax weights, plus its mask function under the same name).
"""
from .ablation import InterventionNotAppliedError, ablate_heads, head_output_hooks
from .attention import (AttentionEdit, AttentionEditing, Counterfactual, EditContext, Identity, ScaleKeys,
                        ThresholdZeroText, capture_attention, edit_attention, editable_attention,
                        set_text_attn_implementation, text_attn_implementation, use_editable_attention)

__all__ = [
    "AttentionEdit", "AttentionEditing", "Counterfactual", "EditContext", "Identity", "InterventionNotAppliedError",
    "ScaleKeys", "ThresholdZeroText", "ablate_heads", "capture_attention", "edit_attention", "editable_attention",
    "head_output_hooks",
    "set_text_attn_implementation", "text_attn_implementation", "use_editable_attention",
]
