"""Attribution patching (AtP): a first-order estimate of the head influences from one backward.

For each head, let ``a`` be its ``o_proj``-input slice and ``a'`` the ablated value (0 or the
mean). Linearising ``m(p(y_t))`` around the clean run::

    I_{l,h}(t) = m(clean) - m(ablated)  ~=  -grad_a m(p(y_t)) . (a' - a)

summed over ``d`` of the slice at ``q = t - 1`` (``scope="local"``) or over every position
(``scope="global"``; positions after ``q`` have zero gradient). The gradient is the *total*
derivative (through later layers' attention), taken with respect to a zero tensor added to each
``o_proj`` input, so no path is cut. One forward with autograd, then one backward per target
(batched with ``is_grads_batched`` in chunks of ``target_chunk`` when the model's ops allow vmap;
else a loop). Cheap but approximate: report its rank agreement with :mod:`.exact`.

``metric="abs_prob_diff"``: the absolute value of the first-order estimate of ``p - p_ablated``
(the linearisation of ``|p - p'|`` wherever the estimate is not zero); same gradients as ``prob_diff``.

Example
-------
>>> est = atp_influences(vlm, enc["input_ids"], enc["pixel_values"], targets=[40, 45], scope="global")  # doctest: +SKIP
>>> est.influence.shape                                                                       # doctest: +SKIP
torch.Size([2, 32, 32])
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..hooks.ablation import head_output_hooks
from .naive import InfluenceResult, check_options, forward_inputs, metric_fn, prepare_inputs, target_logprobs


def _grads(outputs: torch.Tensor, inputs: list[torch.Tensor], batched: bool):
    """Per-output gradients ``[len(outputs), *input.shape]`` for each input (graph retained)."""
    n = outputs.numel()
    if batched:
        try:
            eye = torch.eye(n, dtype=outputs.dtype, device=outputs.device)
            return list(torch.autograd.grad(outputs, inputs, grad_outputs=eye, retain_graph=True,
                                             is_grads_batched=True))
        except (RuntimeError, NotImplementedError):
            pass  # some attention kernels have no vmap rule: fall back to one backward per output
    per = [torch.autograd.grad(outputs[i], inputs, retain_graph=True) for i in range(n)]
    return [torch.stack([g[k] for g in per]) for k in range(len(inputs))]


def atp_influences(
    vlm,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None,
    targets: Sequence[int] | torch.Tensor,
    scope: str = "local",
    ablation: str = "zero",
    metric: str = "prob_diff",
    means: torch.Tensor | None = None,
    target_chunk: int = 8,
    batched: bool = True,
    **model_kwargs,
) -> InfluenceResult:
    """AtP estimates ``[n_targets, n_layers, n_heads]`` with the sign of ``I = m(clean) - m(ablated)``
    (for ``abs_prob_diff``: ``|estimate of p - p_ablated|``).

    Same arguments as :func:`lens_halluc.attribution.exact.exact_influences`; ``target_chunk``
    bounds the memory of batched gradients (``target_chunk × n_layers × T × hidden`` floats).
    ``ablated`` of the result is None (AtP estimates differences only).
    """
    model, spec = vlm.model, vlm.spec
    means = check_options(scope, ablation, metric, means, spec)
    ids, t = prepare_inputs(input_ids, targets, model_kwargs.pop("attention_mask", None))
    dev = vlm.device
    ids, t = ids.to(dev), t.to(dev)
    q, y = t - 1, ids[0, t]
    L, H, D = spec.n_layers, spec.n_heads, spec.head_dim
    m = metric_fn(metric)

    clean_acts: dict[int, torch.Tensor] = {}
    deltas: dict[int, torch.Tensor] = {}

    def make(layer):
        def add_leaf(x):
            clean_acts[layer] = x.detach()[0]
            # a zero leaf added to the input: its gradient is the total derivative w.r.t. the input
            deltas[layer] = torch.zeros_like(x, requires_grad=True)
            return x + deltas[layer]
        return add_leaf

    with head_output_hooks(model, spec, {layer: make(layer) for layer in range(L)}), torch.enable_grad():
        logits = model(**forward_inputs(ids, pixel_values, model_kwargs), use_cache=False).logits[0]
    if len(deltas) != L:
        raise RuntimeError(f"the o_proj hooks ran on {len(deltas)} of {L} layers.")
    lp = target_logprobs(logits[q], y)  # [n]
    values = m(lp)

    # a' - a per layer: [T, H, D]
    diff = []
    for layer in range(L):
        a = clean_acts[layer].float().view(-1, H, D)
        fill = means[layer].to(a) if means is not None else torch.zeros(H, D, device=a.device)
        diff.append(fill - a)

    inputs = [deltas[layer] for layer in range(L)]
    est = torch.empty(len(t), L, H, device=dev)
    for start in range(0, len(t), target_chunk):
        sl = slice(start, start + target_chunk)
        grads = _grads(values[sl], inputs, batched)  # L × [k, 1, T, H*D]
        for layer, g in enumerate(grads):
            g = g[:, 0].float().view(g.shape[0], -1, H, D)  # [k, T, H, D]
            if scope == "local":
                rows = torch.arange(g.shape[0], device=dev)
                contrib = (g[rows, q[sl]] * diff[layer][q[sl]]).sum(-1)  # [k, H]
            else:
                contrib = torch.einsum("kthd,thd->kh", g, diff[layer])
            est[sl, layer] = -contrib
    if metric == "abs_prob_diff":
        est = est.abs()
    clean = lp.detach().exp()
    return InfluenceResult(
        influence=est.detach().cpu(), clean=clean.cpu(), ablated=None, targets=t.cpu(), target_ids=y.cpu(),
        scope=scope, ablation=ablation, metric=metric, method="atp", baseline=clean.cpu(),
    )
