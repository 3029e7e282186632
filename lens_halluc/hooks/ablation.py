"""Head outputs through plain torch hooks on ``o_proj`` inputs (the obviously-correct reference).

A head's output is its slice of the ``o_proj`` input (``[..., h*head_dim:(h+1)*head_dim]``).
:func:`head_output_hooks` is the one place that hooks those inputs (read them, or replace them
before the output projection); :func:`ablate_heads` replaces chosen heads' slices (zero, or a
given mean) with it, and the attribution methods (exact, AtP, head means) use it too. Fast paths
elsewhere are tested against this.

Example
-------
>>> with ablate_heads(vlm.model, vlm.spec, [(3, 1), (5, 0)]):          # doctest: +SKIP
...     logits = vlm.model(**enc).logits
"""
from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from ..models.spec import ModelSpec


class InterventionNotAppliedError(RuntimeError):
    """An intervention whose hooks never ran: it would have silently done nothing."""


@contextmanager
def head_output_hooks(
    model: nn.Module,
    spec: ModelSpec,
    fns: Mapping[int, Callable[[torch.Tensor], torch.Tensor | None]],
) -> Iterator[dict[int, int]]:
    """Call ``fns[layer]`` on the ``o_proj`` input of each layer inside the context.

    Parameters
    ----------
    fns : layer -> function of the ``o_proj`` input ``x`` (``[batch, seq, n_heads * head_dim]``,
        head ``h`` in ``x[..., spec.head_slice(h)]``). It returns the tensor that replaces ``x``
        (same shape), or None to leave the input unchanged (to read it). It must not modify ``x``
        in place: clone first.

    Yields a dict layer -> number of times that layer's hook ran (every call, whatever the
    function returned), filled in while the context is open. The hooks are removed on exit, also
    on error. Layers are validated by the spec (:class:`~lens_halluc.models.spec.SpecError`).

    Example
    -------
    >>> acts = {}
    >>> def keep(x):                   # read only: returning None leaves the input as it is
    ...     acts[1] = x.detach().clone()
    >>> halve = lambda x: x * 0.5      # replace: every head of layer 3 at half strength
    >>> with head_output_hooks(vlm.model, vlm.spec, {1: keep, 3: halve}) as calls:   # doctest: +SKIP
    ...     vlm.model(**enc)
    >>> calls                                                                        # doctest: +SKIP
    {1: 1, 3: 1}
    """
    calls: dict[int, int] = {int(layer): 0 for layer in fns}
    handles = []

    def make(layer: int, fn: Callable[[torch.Tensor], torch.Tensor | None]):
        def hook(module, args):
            calls[layer] += 1
            out = fn(args[0])
            if out is None:
                return None
            return (out,) + tuple(args[1:])  # o_proj is a Linear: args[1:] is empty, kept for safety
        return hook

    try:
        for layer, fn in fns.items():
            handles.append(spec.o_proj(model, layer).register_forward_pre_hook(make(int(layer), fn)))
        yield calls
    finally:
        for h in handles:
            h.remove()


@contextmanager
def ablate_heads(
    model: nn.Module,
    spec: ModelSpec,
    heads: Iterable[tuple[int, int]],
    values: Mapping[tuple[int, int], torch.Tensor] | None = None,
    positions: torch.Tensor | None = None,
    runs: list | None = None,
) -> Iterator[None]:
    """Ablate ``heads`` inside the context.

    Parameters
    ----------
    heads : (layer, head) pairs; validated against the spec.
    values : optional replacement per head, a ``[head_dim]`` tensor (mean ablation); zero otherwise.
    positions : optional bool mask ``[seq]`` or ``[batch, seq]`` of the positions to ablate
        (every position when None). Applies to full-sequence forwards.

    runs : optional list; when given, the number of hooked calls is appended to it on exit, and a
        context in which no forward of ``model`` ran at all is accepted (a decoding strategy's context
        also wraps a prefill's image pre-encoding, which runs no text layer).

    Raises :class:`InterventionNotAppliedError` on exit if a hooked layer never ran (with ``runs``: if a
    forward of the model ran without it).
    """
    heads = spec.check_heads(heads)
    by_layer: dict[int, list[int]] = defaultdict(list)
    for layer, head in heads:
        by_layer[layer].append(head)

    def make_fill(layer: int, layer_heads: list[int]):
        def fill_heads(x: torch.Tensor) -> torch.Tensor:
            x = x.clone()
            for h in layer_heads:
                sl = spec.head_slice(h)
                fill = values[(layer, h)].to(x) if values is not None and (layer, h) in values else 0.0
                if positions is None:
                    x[..., sl] = fill
                else:
                    mask = positions if positions.dim() == 2 else positions.expand(x.shape[0], -1)
                    x[..., sl] = torch.where(mask[..., None].to(x.device), torch.as_tensor(fill, dtype=x.dtype, device=x.device), x[..., sl])
            return x
        return fill_heads

    forwards = [0]
    counter = model.register_forward_pre_hook(lambda module, args: forwards.__setitem__(0, forwards[0] + 1))
    try:
        with head_output_hooks(model, spec, {layer: make_fill(layer, lh) for layer, lh in by_layer.items()}) as calls:
            yield
    finally:
        counter.remove()
    if runs is not None:
        runs.append(sum(calls.values()))
        if forwards[0] == 0:
            return  # no forward of the model here: nothing was produced without the ablation
    missed = [layer for layer, n in calls.items() if n == 0]
    if missed:
        raise InterventionNotAppliedError(
            f"head ablation hooks on layer(s) {missed} never ran: the model inside the context did not use "
            "these o_proj modules (wrong model object, or no forward was run).")
