"""Head ablation with plain torch hooks on ``o_proj`` inputs (the obviously-correct reference).

A head's output is its slice of the ``o_proj`` input (``[..., h*head_dim:(h+1)*head_dim]``);
ablating it replaces that slice (zero, or a given mean) before the output projection. Fast
paths elsewhere are tested against this.

Example
-------
>>> with ablate_heads(vlm.model, vlm.spec, [(3, 1), (5, 0)]):          # doctest: +SKIP
...     logits = vlm.model(**enc).logits
"""
from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from typing import Iterable, Iterator, Mapping

import torch
from torch import nn

from ..models.spec import ModelSpec


class InterventionNotAppliedError(RuntimeError):
    """An intervention whose hooks never ran: it would have silently done nothing."""


@contextmanager
def ablate_heads(
    model: nn.Module,
    spec: ModelSpec,
    heads: Iterable[tuple[int, int]],
    values: Mapping[tuple[int, int], torch.Tensor] | None = None,
    positions: torch.Tensor | None = None,
) -> Iterator[None]:
    """Ablate ``heads`` inside the context.

    Parameters
    ----------
    heads : (layer, head) pairs; validated against the spec.
    values : optional replacement per head, a ``[head_dim]`` tensor (mean ablation); zero otherwise.
    positions : optional bool mask ``[seq]`` or ``[batch, seq]`` of the positions to ablate
        (every position when None). Applies to full-sequence forwards.

    Raises :class:`InterventionNotAppliedError` on exit if a hooked layer never ran.
    """
    heads = spec.check_heads(heads)
    by_layer: dict[int, list[int]] = defaultdict(list)
    for layer, head in heads:
        by_layer[layer].append(head)
    calls: dict[int, int] = {layer: 0 for layer in by_layer}
    handles = []

    def make_hook(layer: int, layer_heads: list[int]):
        def hook(module, args):
            x = args[0].clone()
            calls[layer] += 1
            for h in layer_heads:
                sl = spec.head_slice(h)
                fill = values[(layer, h)].to(x) if values is not None and (layer, h) in values else 0.0
                if positions is None:
                    x[..., sl] = fill
                else:
                    mask = positions if positions.dim() == 2 else positions.expand(x.shape[0], -1)
                    x[..., sl] = torch.where(mask[..., None].to(x.device), torch.as_tensor(fill, dtype=x.dtype, device=x.device), x[..., sl])
            return (x,) + tuple(args[1:])
        return hook

    try:
        for layer, layer_heads in by_layer.items():
            handles.append(spec.o_proj(model, layer).register_forward_pre_hook(make_hook(layer, layer_heads)))
        yield
    finally:
        for h in handles:
            h.remove()
    missed = [layer for layer, n in calls.items() if n == 0]
    if missed:
        raise InterventionNotAppliedError(
            f"head ablation hooks on layer(s) {missed} never ran: the model inside the context did not use "
            "these o_proj modules (wrong model object, or no forward was run).")
