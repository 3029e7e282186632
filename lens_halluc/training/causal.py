"""Causal intervention module (Causal-LLaVA): cross-attention over a confounder dictionary.

The dictionary ``D [C, d]`` holds per-category mean representations (the visual and text
confounders of :mod:`lens_halluc.analysis.confounders`, at the layer where the module sits). The
module implements a backdoor-style adjustment ``h ← h + W_o · Attn(h W_q, D W_k, D W_v)``: every
hidden state can draw on every category's mean, so the representation of an object is no longer
tied to the objects it co-occurs with. ``W_o`` starts at zero, so at initialisation the model's
outputs are exactly unchanged; training (model frozen, or with the projector) moves it.

Sites: ``"lm"`` — after the last decoder layer (dictionary: confounders at the last layer);
``"projector"`` — on the multimodal projector's output (dictionary: visual confounders at layer
0, the projector output). Modules attach with forward hooks; a checkpoint saves them beside the
model (``causal_intervention.safetensors`` + ``.json``, the JSON naming :func:`load_attached` as
its loader) and :func:`lens_halluc.models.load_vlm` re-attaches them through
:mod:`lens_halluc.models.addons`.

Example
-------
>>> res = lh.train.causal_module(vlm, examples, data_dir, steps=150)             # doctest: +SKIP
>>> res.save("runs/retrain/causal")                                              # doctest: +SKIP

or step by step:

>>> dictionary = build_confounder_dictionary(vlm, data_dir, site="lm")          # doctest: +SKIP
>>> attach_causal_module(vlm, ConfounderAttention(dictionary), site="lm")        # doctest: +SKIP
>>> record = train_causal(vlm, examples, CausalConfig(steps=150))                # doctest: +SKIP
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .data import TrainExample, collate, example_batches
from .loop import TrainResult, count_trainable, run_training

SITES = ("lm", "projector")
MODULE_FILE = "causal_intervention.safetensors"
MODULE_META = "causal_intervention.json"
LOADER = "lens_halluc.training.causal:load_attached"  # what MODULE_META names (lens_halluc.models.addons)
_ATTACHED = "_lens_halluc_causal"  # model.__dict__ key: {site: (module, hook handle)}


class ConfounderAttention(nn.Module):
    """``h + W_o · MultiHeadAttn(LN(h) W_q, LN(D) W_k, LN(D) W_v)``; ``W_o`` zero-initialised.

    Parameters
    ----------
    dictionary : FloatTensor ``[C, d]`` (a buffer: saved, never trained).
    n_heads : attention heads (``d`` must be divisible).

    Shapes: ``forward(h [B, T, d]) -> [B, T, d]``.

    >>> m = ConfounderAttention(torch.randn(5, 8), n_heads=2)
    >>> h = torch.randn(2, 3, 8)
    >>> torch.equal(m(h), h)             # identity at initialisation
    True
    """

    def __init__(self, dictionary: torch.Tensor, n_heads: int = 4):
        super().__init__()
        dictionary = torch.as_tensor(dictionary, dtype=torch.float32).clone()
        if dictionary.dim() != 2 or dictionary.shape[0] < 1:
            raise ValueError(f"dictionary must be [n_categories, d], got {tuple(dictionary.shape)}.")
        if not torch.isfinite(dictionary).all():
            raise ValueError("dictionary has non-finite rows (a category without instances?); drop them first.")
        d = dictionary.shape[1]
        if d % n_heads:
            raise ValueError(f"hidden size {d} is not divisible by n_heads={n_heads}.")
        self.n_heads = n_heads
        self.register_buffer("dictionary", dictionary)
        self.norm_h, self.norm_d = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.o = nn.Linear(d, d)
        nn.init.zeros_(self.o.weight)
        nn.init.zeros_(self.o.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B, T, d = h.shape
        H, dh = self.n_heads, d // self.n_heads
        x = self.norm_h(h.float())
        D = self.norm_d(self.dictionary)
        q = self.q(x).view(B, T, H, dh).transpose(1, 2)               # [B, H, T, dh]
        k = self.k(D).view(-1, H, dh).transpose(0, 1)[None]           # [1, H, C, dh]
        v = self.v(D).view(-1, H, dh).transpose(0, 1)[None]
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), -1)
        ctx = (att @ v).transpose(1, 2).reshape(B, T, d)
        return h + self.o(ctx).to(h.dtype)


def _site_module(vlm, site: str) -> nn.Module:
    if site == "lm":
        return vlm.spec.layers(vlm.model)[-1]
    if site == "projector":
        proj = getattr(getattr(vlm.model, "model", vlm.model), "multi_modal_projector", None)
        if proj is None:
            raise ValueError("the model has no multi_modal_projector; use site='lm'.")
        return proj
    raise ValueError(f"unknown site {site!r}; choose from {SITES}.")


def attach_causal_module(vlm, module: ConfounderAttention, site: str = "lm") -> ConfounderAttention:
    """Hook ``module`` onto ``site`` of ``vlm.model`` (replacing one already there); returns it on the model's device.

    Example
    -------
    >>> attach_causal_module(vlm, ConfounderAttention(torch.randn(12, 128)), "lm")  # doctest: +SKIP
    """
    target = _site_module(vlm, site)
    module = module.to(vlm.device)
    attached = vlm.model.__dict__.setdefault(_ATTACHED, {})
    if site in attached:
        attached.pop(site)[1].remove()

    def hook(mod, args, output):
        if isinstance(output, tuple):
            return (module(output[0]),) + tuple(output[1:])
        return module(output)

    attached[site] = (module, target.register_forward_hook(hook))
    return module


def attached_modules(model: nn.Module) -> dict[str, ConfounderAttention]:
    """``{site: module}`` attached to ``model``.

    Example
    -------
    >>> attached_modules(torch.nn.Linear(2, 2))
    {}
    """
    return {s: m for s, (m, _) in model.__dict__.get(_ATTACHED, {}).items()}


def detach_causal_modules(model: nn.Module) -> None:
    """Remove every attached module's hook from ``model``.

    Example
    -------
    >>> detach_causal_modules(vlm.model)                                        # doctest: +SKIP
    """
    for _, handle in model.__dict__.pop(_ATTACHED, {}).values():
        handle.remove()


def save_attached(model: nn.Module, out: str | Path) -> None:
    """Write the attached modules (if any) beside a saved checkpoint: weights and the add-on file naming its loader.

    ``causal_intervention.json`` is ``{"loader": "lens_halluc.training.causal:load_attached",
    "sites": {site: {n_heads, n_categories, d}}}``; :func:`lens_halluc.models.load_vlm` finds it
    through :mod:`lens_halluc.models.addons` and calls the loader.

    Example
    -------
    >>> save_attached(vlm.model, "runs/retrain/causal")                         # doctest: +SKIP
    """
    mods = attached_modules(model)
    if not mods:
        return
    from safetensors.torch import save_file

    tensors = {f"{site}.{k}": v.detach().cpu().clone().contiguous() for site, m in mods.items() for k, v in m.state_dict().items()}
    save_file(tensors, str(Path(out) / MODULE_FILE))
    sites = {site: {"n_heads": m.n_heads, "n_categories": int(m.dictionary.shape[0]), "d": int(m.dictionary.shape[1])}
             for site, m in mods.items()}
    (Path(out) / MODULE_META).write_text(json.dumps({"loader": LOADER, "sites": sites}, indent=1))


def load_attached(vlm, meta_path: str | Path | None = None) -> dict[str, ConfounderAttention]:
    """Re-attach the modules a checkpoint directory holds (``load_vlm`` calls it as the add-on loader); ``{}`` when none.

    ``meta_path``: the checkpoint's ``causal_intervention.json`` (default: the one in ``vlm.path``).
    Files saved before the loader field (``{site: {...}}`` at the top level) load too.

    Example
    -------
    >>> load_attached(vlm)                                                      # doctest: +SKIP
    {'lm': ConfounderAttention(...)}
    """
    if meta_path is None:
        if vlm.path is None or not (Path(vlm.path) / MODULE_META).is_file():
            return {}
        meta_path = Path(vlm.path) / MODULE_META
    meta_path = Path(meta_path)
    from safetensors.torch import load_file

    weights = meta_path.parent / MODULE_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{meta_path} names causal modules but {MODULE_FILE} is missing; re-save the model.")
    meta = json.loads(meta_path.read_text())
    sites = meta["sites"] if "sites" in meta else meta  # the format before the loader field: sites at the top level
    tensors = load_file(str(weights))
    out = {}
    for site, m in sites.items():
        state = {k[len(site) + 1:]: v for k, v in tensors.items() if k.startswith(site + ".")}
        if "dictionary" not in state:
            raise ValueError(f"{meta_path} lists site {site!r} but {MODULE_FILE} has no weights for it; re-save the model.")
        module = ConfounderAttention(state["dictionary"], n_heads=m["n_heads"])
        module.load_state_dict(state)
        module.to(vlm.dtype if vlm.dtype in (torch.float32, torch.float64) else torch.float32).eval()
        out[site] = attach_causal_module(vlm, module, site)
    return out


def build_confounder_dictionary(vlm, data_dir: str | Path, site: str = "lm", n_images: int | None = 200,
                                modalities: Sequence[str] = ("visual", "text"), batch_size: int = 16) -> torch.Tensor:
    """Per-category means at the site's layer (last decoder layer for ``"lm"``, projector output for
    ``"projector"``) from :func:`lens_halluc.analysis.collect_representations`; rows of
    categories without instances are dropped. Returns FloatTensor ``[C', d]``.

    ``data_dir``: an export with ``objects.json`` (``python -m lens_halluc.organism export``, or a
    COCO-format directory with per-object patch indices).

    Example
    -------
    >>> D = build_confounder_dictionary(vlm, "runs/_data/data/normal-200", site="lm")  # doctest: +SKIP
    >>> D.shape                                                                 # doctest: +SKIP
    torch.Size([40, 128])
    """
    from ..analysis import collect_representations, confounder_dictionary, load_export

    layer = vlm.spec.n_layers if site == "lm" else 0
    if site == "projector":
        modalities = ("visual",)  # layer 0 of text is the token embedding, not the projector
    ds, objects, _ = load_export(data_dir)
    ids = ds.image_ids[:n_images] if n_images else ds.image_ids
    reps = collect_representations(vlm, ds, objects, layers=[layer], batch_size=batch_size, image_ids=ids)
    d = confounder_dictionary(reps)
    rows = np.concatenate([d[m][0] for m in modalities])
    rows = rows[np.isfinite(rows).all(1)]
    if not len(rows):
        raise ValueError(f"no confounder rows at layer {layer}: the images in {data_dir} have no objects.")
    return torch.from_numpy(rows)


@dataclass(frozen=True)
class CausalConfig:
    """steps, lr, batch_size, n_heads of the module, sites, train_projector, seed.

    The options of :func:`lens_halluc.training.causal_module`.

    Example
    -------
    >>> CausalConfig(sites=("lm", "projector")).n_heads
    4
    """

    steps: int = 150
    lr: float = 1e-3
    batch_size: int = 16
    n_heads: int = 4
    sites: tuple[str, ...] = ("lm",)
    train_projector: bool = False
    seed: int = 0


def train_causal(vlm, examples: Sequence[TrainExample], config: CausalConfig | None = None,
                 progress: bool = True) -> TrainResult:
    """Train the attached causal module(s) (and the projector with ``train_projector``) on the answer CE.

    Attach first with :func:`attach_causal_module`. The model's own weights stay frozen. The
    building block of :func:`lens_halluc.training.causal_module` (which attaches the modules too).

    Example
    -------
    >>> record = train_causal(vlm, examples, CausalConfig(steps=2))             # doctest: +SKIP
    """
    cfg = config or CausalConfig()
    mods = attached_modules(vlm.model)
    missing = [s for s in cfg.sites if s not in mods]
    if missing:
        raise ValueError(f"no causal module attached at {missing}: call attach_causal_module(vlm, ...) first.")
    torch.manual_seed(cfg.seed)
    model = vlm.model
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for s in cfg.sites for p in mods[s].parameters()]
    if cfg.train_projector:
        params += list(_site_module(vlm, "projector").parameters())
    for p in params:
        p.requires_grad_(True)
    n_trained = count_trainable(params)
    batches = example_batches(examples, cfg.batch_size, cfg.steps, cfg.seed)

    def step(_):
        out = model(**collate(vlm, next(batches)), use_cache=False)
        return out.loss, {"ce": out.loss.item()}

    model.train()
    for s in cfg.sites:
        mods[s].train()
    try:
        res = run_training("causal", cfg.steps, step, params, cfg.lr, 0.0, asdict(cfg), progress)
    finally:
        model.eval()
        for s in cfg.sites:
            mods[s].eval()
        for p in params:
            p.requires_grad_(False)
    res.trained_params = n_trained
    res.info = {"sites": list(cfg.sites), "dictionary_rows": {s: int(mods[s].dictionary.shape[0]) for s in cfg.sites}}
    return res
