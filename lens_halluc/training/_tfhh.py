"""TFHH — targeted fine-tuning of the hallucination heads (Yang et al., ICLR 2025).

Only the query rows of each listed head ``(l, h)`` and the key rows of the key/value head it
reads (``h // (n_heads / n_kv_heads)``; with grouped-query attention those key rows are shared by
the group) are trained, with the full LM head in the ``reference`` flavour, on

    L = CE(answer) + λ · text_term,   text_term = mean log(text_attention_{l,h}(q) + 1e-8)

over the loss rows ``q`` and the listed heads. The attention weights come from the package's one
attention-editing mechanism (:func:`~lens_halluc.hooks.attention.edit_attention` with a recording
edit), so they are the weights the model really used, with gradients. Five choices differ between
the flavours (``flavour=``, table :data:`FLAVOURS_TFHH`):

- ``text_mass`` — reference ``"not-image"``: mass on every key that is not an image token (BOS
  and the system prompt included; HA ``calculate_attention_statistics``: ``txt_mask = 1 − img_mask``);
  corrected ``"text"``: TEXT-role keys only (after the image, up to the query).
- ``rows`` — reference ``"answer"``: the answer tokens' own rows (``labels[q] != -100``, HA's
  unshifted labels); corrected ``"predicting"``: the rows that predict an answer token.
- ``train_lm_head`` — reference True (``--fine_tuning_last_layer True``); corrected False.
- ``k`` — reference 30 (``hal_heads[:selective_tuning_top_k]``, top-k 30): the first k listed
  heads; corrected None: every listed head.
- ``loss_mean`` — reference ``"per-layer"``: mean over heads and rows within a layer, then over
  layers (HA's per-layer ``.mean()`` then ``torch.stack(...).mean()`` in the trainer); corrected
  ``"pooled"``: one mean over every (row, head) of every layer.
- ``lr`` — reference 2e-5 (``targeted_finetune.sh``); corrected 1e-3 (organism scale).

λ = 2 in both (``--attention_loss_coeff 2.0``, CE coefficient 1). Fixed in both flavours (accidents,
not the method): the reference trains only the first listed head of each layer (``if is_trainable:
break`` in ``llava_trainer.py``) — here exactly the listed rows change: gradients of every other row
are masked to zero, the optimiser has no weight decay (it would shrink masked rows), and
:func:`train_tfhh` checks after training that every other element is bit-identical; the reference
hard-codes the image at positions 35…611 — here the image positions come from the processor's token
roles.

Example
-------
>>> import lens_halluc as lh
>>> vlm = lh.load_vlm()                                                         # doctest: +SKIP
>>> res = lh.train.tfhh(vlm, read_heads("top_heads.json"), examples, steps=150)  # doctest: +SKIP
>>> res = lh.train.tfhh(vlm, heads, examples, flavour="corrected")              # doctest: +SKIP
>>> res.save("runs/retrain/tfhh")                                               # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import torch

from ..data.flavour import check_flavour, resolve
from ..hooks.attention import EditContext, edit_attention, editable_attention
from .data import IGNORE, TrainExample, answer_query_mask, collate, example_batches
from .loop import TrainResult, run_training

TEXT_MASSES = ("not-image", "text")
ROWS = ("answer", "predicting")
LOSS_MEANS = ("per-layer", "pooled")

#: TFHH's flavour-dependent defaults (see the module doc; FIDELITY.md has one row per entry).
FLAVOURS_TFHH = {
    "reference": {"text_mass": "not-image", "rows": "answer", "train_lm_head": True, "k": 30,
                  "loss_mean": "per-layer", "lr": 2e-5},
    "corrected": {"text_mass": "text", "rows": "predicting", "train_lm_head": False, "k": None,
                  "loss_mean": "pooled", "lr": 1e-3},
}


@dataclass(frozen=True)
class TFHHConfig:
    """The options of :func:`lens_halluc.training.tfhh`; ``None`` fields take the flavour's value (:data:`FLAVOURS_TFHH`).

    steps, lr, lam (λ of the text-attention term; 2 in the reference), batch_size, train_lm_head,
    k (first k listed heads; None = all), text_mass, rows, loss_mean, seed, eps, flavour. The
    stored config holds the resolved values.

    Example
    -------
    >>> TFHHConfig(steps=10).lam, TFHHConfig().k, TFHHConfig(flavour="corrected").rows
    (2.0, 30, 'predicting')
    """

    steps: int = 150
    lr: Optional[float] = None
    lam: float = 2.0
    batch_size: int = 16
    train_lm_head: Optional[bool] = None
    k: Optional[int] = None
    text_mass: Optional[str] = None
    rows: Optional[str] = None
    loss_mean: Optional[str] = None
    seed: int = 0
    eps: float = 1e-8
    flavour: str = "reference"

    def __post_init__(self):
        check_flavour(self.flavour, "TFHH")
        for name in ("lr", "train_lm_head", "k", "text_mass", "rows", "loss_mean"):
            object.__setattr__(self, name, resolve(FLAVOURS_TFHH, self.flavour, name, getattr(self, name)))
        for name, allowed in (("text_mass", TEXT_MASSES), ("rows", ROWS), ("loss_mean", LOSS_MEANS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"TFHH: {name} must be one of {allowed}, got {getattr(self, name)!r}.")
        if self.k is not None and (isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1):
            raise ValueError(f"TFHH: k must be a positive integer (or None for every listed head), got {self.k!r}.")


class TextAttentionRecorder:
    """An attention "edit" that changes nothing and records each listed head's text-attention mass.

    ``mass``: ``"not-image"`` (the reference: every non-image key, BOS and system prompt included)
    or ``"text"`` (TEXT-role keys only). ``records``: list of FloatTensor ``[B, h_sel, Q]`` (one
    per layer call, in call order), differentiable; ``layers``: the layer of each record.

    Example
    -------
    >>> rec = TextAttentionRecorder("text")
    >>> with edit_attention(vlm, rec, heads): vlm.model(**batch)                 # doctest: +SKIP
    """

    def __init__(self, mass: str = "not-image"):
        if mass not in TEXT_MASSES:
            raise ValueError(f"mass must be one of {TEXT_MASSES}, got {mass!r}.")
        self.mass = mass
        self.records: list[torch.Tensor] = []
        self.layers: list[int] = []

    def __call__(self, weights: torch.Tensor, ctx: EditContext) -> torch.Tensor:
        keys = ~ctx.key_group("image") if self.mass == "not-image" else ctx.key_group("text")
        self.records.append((weights * keys.to(weights.dtype)).sum(-1))
        self.layers.append(ctx.layer)
        return weights

    def __repr__(self) -> str:
        return f"TextAttentionRecorder({self.mass!r})"


def loss_rows(labels: torch.Tensor, rows: str) -> torch.Tensor:
    """BoolTensor ``[B, T]``: the query rows of the text-attention term.

    ``"answer"`` (reference): the answer tokens' own positions, ``labels != -100`` (as HA indexes
    its unshifted labels); ``"predicting"``: positions that predict an answer token.

    >>> lab = torch.tensor([[IGNORE, IGNORE, 7, 2]])
    >>> loss_rows(lab, "answer").tolist(), loss_rows(lab, "predicting").tolist()
    ([[False, False, True, True]], [[False, True, True, False]])
    """
    if rows == "answer":
        return labels != IGNORE
    if rows == "predicting":
        return answer_query_mask(labels)
    raise ValueError(f"rows must be one of {ROWS}, got {rows!r}.")


def text_attention_term(records: Sequence[torch.Tensor], where: torch.Tensor, loss_mean: str = "per-layer",
                        eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """``(term, mass)``: the loss term ``mean log(mass + eps)`` over the rows ``where`` ``[B, T]`` and the mean mass.

    ``records``: one ``[B, h_sel, T]`` tensor per layer (:class:`TextAttentionRecorder`).
    ``"per-layer"`` (reference): mean over heads and rows within each layer, then over layers;
    ``"pooled"``: one mean over every (row, head) of every layer. ``mass`` is averaged the same way.

    >>> r = [torch.full((1, 1, 2), 0.5), torch.full((1, 3, 2), 0.25)]
    >>> w = torch.tensor([[True, True]])
    >>> [round(float(x), 4) for x in text_attention_term(r, w, "per-layer", 0.0)]
    [-1.0397, 0.375]
    """
    picked = [rec[where[:, None, :].expand_as(rec)] for rec in records]
    if loss_mean == "per-layer":
        term = torch.stack([torch.log(x + eps).mean() for x in picked]).mean()
        mass = torch.stack([x.detach().mean() for x in picked]).mean()
    elif loss_mean == "pooled":
        flat = torch.cat(picked)
        term, mass = torch.log(flat + eps).mean(), flat.detach().mean()
    else:
        raise ValueError(f"loss_mean must be one of {LOSS_MEANS}, got {loss_mean!r}.")
    return term, mass


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
    heads : ``(layer, head)`` pairs in rank order, e.g. ``read_heads("top_heads.json")``; the first
        ``config.k`` are trained (all of them when ``k`` is None).

    Example
    -------
    >>> record = train_tfhh(vlm, examples, [(0, 0)], TFHHConfig(steps=2))      # doctest: +SKIP
    """
    cfg = config or TFHHConfig()
    model = vlm.model
    listed = list(heads)
    pairs = vlm.spec.check_heads(listed[: cfg.k] if cfg.k is not None else listed)
    params, masks = tfhh_parameters(vlm, pairs, cfg.train_lm_head)
    snap = _frozen_snapshot(params, masks)
    n_trained = sum(int(masks[id(p)].sum()) * (p[0].numel() if p.dim() > 1 else 1) if id(p) in masks else p.numel()
                    for p in params)
    batches = example_batches(examples, cfg.batch_size, cfg.steps, cfg.seed)
    torch.manual_seed(cfg.seed)

    def step(_):
        batch = collate(vlm, next(batches))
        rec = TextAttentionRecorder(cfg.text_mass)
        with edit_attention(vlm, rec, pairs):
            out = model(**batch, use_cache=False)
        where = loss_rows(batch["labels"], cfg.rows)  # [B, T]
        text_log, mass = text_attention_term(rec.records, where, cfg.loss_mean, cfg.eps)
        loss = out.loss + cfg.lam * text_log
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
    res.info = {"heads": [list(h) for h in pairs], "n_heads": len(pairs), "flavour": cfg.flavour,
                "text_attention_before": res.parts["text_attention"][0], "text_attention_after": res.parts["text_attention"][-1]}
    return res
