"""TFHH — targeted fine-tuning of the hallucination heads (Yang et al., ICLR 2025).

Only the query rows of each listed head ``(l, h)`` and the key rows of the key/value head it
reads (``h // (n_heads / n_kv_heads)``; with grouped-query attention those key rows are shared by
the group) are trained, optionally with the LM head, on

    L = CE(answer) + λ · mean_{answer positions q, listed heads} log(text_attention_{l,h}(q) + 1e-8)

where ``text_attention(q)`` is the post-softmax mass a head puts on TEXT-role keys (the
instruction after the image and the answer so far, :class:`~lens_halluc.hooks.attention.EditContext`)
at the position ``q`` that predicts an answer token. The attention weights come from the package's
one attention-editing mechanism (:func:`~lens_halluc.hooks.attention.edit_attention` with a
recording edit), so they are the weights the model really used, with gradients.

Exactly the listed rows change: gradients of every other row are masked to zero, the optimiser
has no weight decay (it would shrink masked rows), and :func:`train_tfhh` checks after training
that every other element is bit-identical (the reference trains one head per layer by accident).

Example
-------
>>> import lens_halluc as lh
>>> vlm = lh.load_vlm()                                                         # doctest: +SKIP
>>> res = lh.train.tfhh(vlm, read_heads("top_heads.json"), examples, steps=150, lam=2.0)  # doctest: +SKIP
>>> res.save("runs/retrain/tfhh")                                               # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from ..hooks.attention import EditContext, edit_attention, editable_attention
from .data import TrainExample, answer_query_mask, collate, example_batches
from .loop import TrainResult, run_training


@dataclass(frozen=True)
class TFHHConfig:
    """steps, lr, lam (λ of the text-attention term; 2 in the reference), batch_size, train_lm_head, seed, eps.

    The options of :func:`lens_halluc.training.tfhh`.

    Example
    -------
    >>> TFHHConfig(steps=10).lam
    2.0
    """

    steps: int = 150
    lr: float = 1e-3
    lam: float = 2.0
    batch_size: int = 16
    train_lm_head: bool = False
    seed: int = 0
    eps: float = 1e-8


class TextAttentionRecorder:
    """An attention "edit" that changes nothing and records each listed head's text-attention mass.

    ``records``: list of FloatTensor ``[B, h_sel, Q]`` (one per layer call), differentiable.

    Example
    -------
    >>> rec = TextAttentionRecorder()
    >>> with edit_attention(vlm, rec, heads): vlm.model(**batch)                 # doctest: +SKIP
    """

    def __init__(self):
        self.records: list[torch.Tensor] = []

    def __call__(self, weights: torch.Tensor, ctx: EditContext) -> torch.Tensor:
        self.records.append((weights * ctx.key_group("text")).sum(-1))
        return weights

    def __repr__(self) -> str:
        return "TextAttentionRecorder()"


def tfhh_parameters(vlm, heads: Sequence[tuple[int, int]], train_lm_head: bool = False
                    ) -> tuple[list[torch.nn.Parameter], dict[int, torch.Tensor]]:
    """The parameters TFHH trains and, per partially trained parameter (by ``id``), its boolean row mask.

    For each listed ``(l, h)``: ``q_proj`` rows ``h·d … (h+1)·d`` and ``k_proj`` rows of kv head
    ``h // n_rep`` (and the same rows of their biases, if any). Returns ``(params, masks)``; every
    other parameter of the model gets ``requires_grad = False``.

    Example
    -------
    >>> params, masks = tfhh_parameters(vlm, [(0, 1)])                          # doctest: +SKIP
    """
    model, spec = vlm.model, vlm.spec
    pairs = spec.check_heads(heads)
    if not pairs:
        raise ValueError("TFHH needs at least one (layer, head).")
    d, n_rep = spec.head_dim, spec.n_heads // spec.n_kv_heads
    for p in model.parameters():
        p.requires_grad_(False)
    masks: dict[int, torch.Tensor] = {}
    params: list[torch.nn.Parameter] = []
    for layer, head in pairs:
        attn = spec.attention(model, layer)
        for proj, idx in (("q_proj", head), ("k_proj", head // n_rep)):
            lin = getattr(attn, proj, None)
            if not isinstance(lin, torch.nn.Linear):
                raise ValueError(f"layer {layer}'s attention has no {proj} Linear (fused qkv projections are not supported).")
            for p in (lin.weight, lin.bias):
                if p is None:
                    continue
                if id(p) not in masks:
                    masks[id(p)] = torch.zeros(p.shape[0], dtype=torch.bool, device=p.device)
                    params.append(p)
                masks[id(p)][idx * d:(idx + 1) * d] = True
    if train_lm_head:
        head_w = model.get_output_embeddings().weight
        params.append(head_w)
    for p in params:
        p.requires_grad_(True)
        if id(p) in masks:
            m = masks[id(p)].view(-1, *([1] * (p.dim() - 1))).to(p.dtype)
            p.register_hook(lambda g, m=m: g * m)
    return params, masks


def _frozen_snapshot(params, masks) -> dict[int, torch.Tensor]:
    return {id(p): p.detach()[~masks[id(p)]].clone() for p in params if id(p) in masks}


def _check_frozen(params, masks, snap) -> None:
    for p in params:
        if id(p) in snap and not torch.equal(p.detach()[~masks[id(p)]], snap[id(p)]):
            raise RuntimeError("TFHH changed rows outside the listed heads: the gradient masks did not hold.")


def train_tfhh(vlm, examples: Sequence[TrainExample], heads: Sequence[tuple[int, int]],
               config: TFHHConfig | None = None, progress: bool = True) -> TrainResult:
    """Fine-tune the listed heads' query/key rows in place (see module doc); returns the :class:`TrainResult`.

    The building block of :func:`lens_halluc.training.tfhh` (which adds separability and the result object).

    Parameters
    ----------
    vlm : LoadedVLM (trained in place; put back in eval mode on return).
    examples : :class:`TrainExample` s.
    heads : ``(layer, head)`` pairs, e.g. ``read_heads("top_heads.json")``.

    Example
    -------
    >>> record = train_tfhh(vlm, examples, [(0, 0)], TFHHConfig(steps=2))      # doctest: +SKIP
    """
    cfg = config or TFHHConfig()
    model = vlm.model
    pairs = vlm.spec.check_heads(heads)
    params, masks = tfhh_parameters(vlm, pairs, cfg.train_lm_head)
    snap = _frozen_snapshot(params, masks)
    n_trained = sum(int(masks[id(p)].sum()) * (p[0].numel() if p.dim() > 1 else 1) if id(p) in masks else p.numel()
                    for p in params)
    batches = example_batches(examples, cfg.batch_size, cfg.steps, cfg.seed)
    torch.manual_seed(cfg.seed)

    def step(_):
        batch = collate(vlm, next(batches))
        rec = TextAttentionRecorder()
        with edit_attention(vlm, rec, pairs):
            out = model(**batch, use_cache=False)
        where = answer_query_mask(batch["labels"])  # [B, T]
        text = torch.cat([r[where[:, None, :].expand_as(r)] for r in rec.records])  # [n answer positions × heads]
        text_log = torch.log(text + cfg.eps).mean()
        loss = out.loss + cfg.lam * text_log
        mass = text.detach().mean()
        return loss, {"ce": out.loss.item(), "text_attention_log": text_log.item(), "text_attention": mass.item()}

    model.train()
    try:
        with editable_attention(vlm):
            res = run_training("tfhh", cfg.steps, step, params, cfg.lr, 0.0, asdict(cfg), progress)
    finally:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
    _check_frozen(params, masks, snap)
    res.trained_params = n_trained
    res.info = {"heads": [list(h) for h in pairs], "n_heads": len(pairs),
                "text_attention_before": res.parts["text_attention"][0], "text_attention_after": res.parts["text_attention"][-1]}
    return res

