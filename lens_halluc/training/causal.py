"""Causal intervention module (Causal-LLaVA): cross-attention over confounder dictionaries.

A dictionary ``D [C, d]`` holds per-category mean representations (the visual and text
confounders of :mod:`lens_halluc.analysis.confounders`, at the layer where the module sits): every
hidden state can draw on every category's mean, so the representation of an object is no longer
tied to the objects it co-occurs with (a backdoor-style adjustment). Both modules start as the
identity (a zero-initialised projection), so at initialisation the model's outputs are exactly
unchanged. Two flavours (``flavour=``, table :data:`FLAVOURS_CAUSAL`):

- ``reference`` (IgniSavium/Causal-LLaVA ``modification/transformers/modeling_llama.py``
  ``CausalIntervention`` / ``ConfounderCrossAttention``, ``llava/train/train.py``):
  :class:`CausalIntervention` — ``h + Σ_m CrossAttn_m(RMSNorm(h), D_m)`` with one cross-attention
  per modality (visual, text) whose outputs are summed; the query is the normed hidden state split
  into heads (no q projection), keys = values = ``kv_m(D_m)`` through one shared ``Linear``
  zero-initialised (``causal_bin_gen_vicuna.py``), no output projection, as many heads as the
  model; dictionary rows: every category of the export (sorted ids), zero where a category has no
  instance (``get_visual_confounders.py``). Training (``--train_version ft``): CE, the whole
  language model, LM head, projector and module train (``model.requires_grad_(True)``; the
  dictionaries and the vision tower stay frozen), lr 2e-5.
  At the ``projector`` site the reference (``llava/model/multimodal_projector/builder.py``) has one
  visual cross-attention added to the projector output, no norm.
- ``corrected``: :class:`ConfounderAttention` —
  ``h + W_o · MultiHeadAttn(LN(h) W_q, LN(D) W_k, LN(D) W_v)`` over one dictionary (visual and text
  rows stacked, categories without instances dropped), 4 heads, ``W_o`` zero-initialised; only the
  module trains (the projector too with ``train_projector=True``), lr 1e-3.

Sites (both flavours): ``"lm"`` — after the last decoder layer, before the final norm (where the
reference puts it; dictionary: confounders at the last layer); ``"projector"`` — on the multimodal
projector's output (dictionary: visual confounders at layer 0, the projector output). Modules
attach with forward hooks; a checkpoint saves them beside the model
(``causal_intervention.safetensors`` + ``.json``, the JSON naming :func:`load_attached` as its
loader and each site's module ``kind``) and :func:`lens_halluc.models.load_vlm` re-attaches them
through :mod:`lens_halluc.models.addons`. Checkpoints saved before ``kind`` existed hold
:class:`ConfounderAttention` modules and load as such.

Fixed in both flavours: the reference's shared projection is also zero-initialised at the
projector site (the reference trains its projector from scratch, we attach to a trained one).

Example
-------
>>> res = lh.train.causal_module(vlm, examples, data_dir, steps=150)             # doctest: +SKIP
>>> res = lh.train.causal_module(vlm, examples, data_dir, flavour="corrected")   # doctest: +SKIP
>>> res.save("runs/retrain/causal")                                              # doctest: +SKIP

or step by step:

>>> dictionary = build_confounder_dictionary(vlm, data_dir, site="lm")          # doctest: +SKIP
>>> attach_causal_module(vlm, ConfounderAttention(dictionary), site="lm")        # doctest: +SKIP
>>> record = train_causal(vlm, examples, CausalConfig(steps=150, flavour="corrected"))  # doctest: +SKIP
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..data.flavour import check_flavour, resolve
from .data import TrainExample, collate, example_batches
from .loop import TrainResult, count_trainable, run_training

SITES = ("lm", "projector")
MODULE_FILE = "causal_intervention.safetensors"
MODULE_META = "causal_intervention.json"
LOADER = "lens_halluc.training.causal:load_attached"  # what MODULE_META names (lens_halluc.models.addons)
_ATTACHED = "_lens_halluc_causal"  # model.__dict__ key: {site: (module, hook handle)}
MODULE_KINDS = ("reference", "corrected")  # CausalIntervention, ConfounderAttention
TRAINABLE = ("model", "module")

#: The causal module's flavour-dependent defaults (see the module doc). ``n_heads="model"``: the model's heads.
FLAVOURS_CAUSAL = {
    "reference": {"module": "reference", "n_heads": "model", "trainable": "model", "lr": 2e-5},
    "corrected": {"module": "corrected", "n_heads": 4, "trainable": "module", "lr": 1e-3},
}


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

    kind = "corrected"

    @property
    def n_rows(self) -> int:
        """Dictionary rows."""
        return int(self.dictionary.shape[0])

    def meta(self) -> dict:
        """What :func:`load_attached` needs to rebuild the module (saved in ``causal_intervention.json``)."""
        return {"kind": self.kind, "n_heads": self.n_heads, "n_categories": self.n_rows, "d": int(self.dictionary.shape[1])}

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


def _check_dictionary(D, name: str = "dictionary") -> torch.Tensor:
    D = torch.as_tensor(D, dtype=torch.float32).clone()
    if D.dim() != 2 or D.shape[0] < 1:
        raise ValueError(f"{name} must be [n_categories, d], got {tuple(D.shape)}.")
    if not torch.isfinite(D).all():
        raise ValueError(f"{name} has non-finite rows (a category without instances?); use zeros or drop them first.")
    return D


class CausalIntervention(nn.Module):
    """Causal-LLaVA's module (``reference``): ``h + Σ_m CrossAttn_m(RMSNorm(h), D_m)``.

    For each modality ``m`` (e.g. ``"visual"``, ``"text"``) a cross-attention whose queries are
    its input split into ``n_heads`` heads (no q projection), whose keys and values are both
    ``kv_m(D_m)`` (one ``Linear(d, d)`` with bias, zero-initialised) and which has no output
    projection; the outputs of all modalities are summed and added to ``h``. ``pre_norm``: an
    RMSNorm (weight initialised to ones, ``eps``) on the query input, as at the reference's LM
    site; the projector site has none.

    Parameters
    ----------
    dictionaries : ``{modality: FloatTensor [C_m, d]}`` (buffers: saved, never trained).
    n_heads : attention heads (the model's, in the reference; ``d`` must be divisible).
    pre_norm, eps : see above.

    Shapes: ``forward(h [B, T, d]) -> [B, T, d]``.

    >>> m = CausalIntervention({"visual": torch.randn(5, 8), "text": torch.randn(3, 8)}, n_heads=2)
    >>> h = torch.randn(2, 3, 8)
    >>> torch.equal(m(h), h)             # identity at initialisation
    True
    """

    kind = "reference"

    def __init__(self, dictionaries: Mapping[str, torch.Tensor], n_heads: int, pre_norm: bool = True, eps: float = 1e-6):
        super().__init__()
        if not dictionaries:
            raise ValueError("CausalIntervention needs at least one dictionary ({modality: [C, d]}).")
        self.modalities = tuple(dictionaries)
        dims = set()
        for m in self.modalities:
            D = _check_dictionary(dictionaries[m], f"the {m} dictionary")
            dims.add(D.shape[1])
            self.register_buffer(f"{m}_dictionary", D)
        if len(dims) != 1:
            raise ValueError(f"the dictionaries have different widths {sorted(dims)}.")
        d = dims.pop()
        if d % n_heads:
            raise ValueError(f"hidden size {d} is not divisible by n_heads={n_heads}.")
        self.n_heads, self.d, self.pre_norm, self.eps = int(n_heads), int(d), bool(pre_norm), float(eps)
        self.kv = nn.ModuleDict({m: nn.Linear(d, d) for m in self.modalities})
        for lin in self.kv.values():
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        self.norm_weight = nn.Parameter(torch.ones(d)) if self.pre_norm else None

    def dictionary(self, modality: str) -> torch.Tensor:
        """The ``[C, d]`` dictionary of ``modality``."""
        return getattr(self, f"{modality}_dictionary")

    @property
    def n_rows(self) -> int:
        """Dictionary rows over all modalities."""
        return int(sum(self.dictionary(m).shape[0] for m in self.modalities))

    def meta(self) -> dict:
        """What :func:`load_attached` needs to rebuild the module (saved in ``causal_intervention.json``)."""
        return {"kind": self.kind, "n_heads": self.n_heads, "d": self.d, "modalities": list(self.modalities),
                "n_categories": {m: int(self.dictionary(m).shape[0]) for m in self.modalities},
                "pre_norm": self.pre_norm, "eps": self.eps}

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B, T, d = h.shape
        H, dh = self.n_heads, d // self.n_heads
        x = h.float()
        if self.pre_norm:
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm_weight.float()
        q = x.view(B, T, H, dh).transpose(1, 2)                              # [B, H, T, dh]
        out = torch.zeros_like(x)
        for m in self.modalities:
            kv = self.kv[m](self.dictionary(m)).view(-1, H, dh).transpose(0, 1)[None]  # [1, H, C, dh]: keys = values
            att = torch.softmax(q @ kv.transpose(-1, -2) / math.sqrt(dh), -1)
            out = out + (att @ kv).transpose(1, 2).reshape(B, T, d)
        return h + out.to(h.dtype)


def _site_module(vlm, site: str) -> nn.Module:
    if site == "lm":
        return vlm.spec.layers(vlm.model)[-1]
    if site == "projector":
        proj = getattr(getattr(vlm.model, "model", vlm.model), "multi_modal_projector", None)
        if proj is None:
            raise ValueError("the model has no multi_modal_projector; use site='lm'.")
        return proj
    raise ValueError(f"unknown site {site!r}; choose from {SITES}.")


def attach_causal_module(vlm, module: nn.Module, site: str = "lm") -> nn.Module:
    """Hook ``module`` onto ``site`` of ``vlm.model`` (replacing one already there); returns it on the model's device.

    Example
    -------
    >>> attach_causal_module(vlm, ConfounderAttention(torch.randn(12, 128)), "lm")  # doctest: +SKIP

    ``module``: a :class:`CausalIntervention` or :class:`ConfounderAttention`.
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


def attached_modules(model: nn.Module) -> dict[str, nn.Module]:
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
    "sites": {site: {kind, n_heads, d, ...}}}`` (``kind`` "reference": :class:`CausalIntervention`
    with its modalities, pre_norm and eps; "corrected": :class:`ConfounderAttention`); :func:`lens_halluc.models.load_vlm` finds it
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
    sites = {site: m.meta() for site, m in mods.items()}
    (Path(out) / MODULE_META).write_text(json.dumps({"loader": LOADER, "sites": sites}, indent=1))


def load_attached(vlm, meta_path: str | Path | None = None) -> dict[str, nn.Module]:
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
        kind = m.get("kind", "corrected")
        if kind == "reference":
            mods = list(m.get("modalities", []))
            if not mods or any(f"{mod}_dictionary" not in state for mod in mods):
                raise ValueError(f"{meta_path} lists site {site!r} but {MODULE_FILE} has no weights for it; re-save the model.")
            module = CausalIntervention({mod: state[f"{mod}_dictionary"] for mod in mods}, n_heads=m["n_heads"],
                                        pre_norm=m.get("pre_norm", True), eps=m.get("eps", 1e-6))
        elif kind == "corrected":
            if "dictionary" not in state:
                raise ValueError(f"{meta_path} lists site {site!r} but {MODULE_FILE} has no weights for it; re-save the model.")
            module = ConfounderAttention(state["dictionary"], n_heads=m["n_heads"])
        else:
            raise ValueError(f"{meta_path}: site {site!r} has unknown module kind {kind!r} (expected one of {MODULE_KINDS}).")
        module.load_state_dict(state)
        module.to(vlm.dtype if vlm.dtype in (torch.float32, torch.float64) else torch.float32).eval()
        out[site] = attach_causal_module(vlm, module, site)
    return out


def _site_means(vlm, data_dir, site: str, n_images: int | None, batch_size: int):
    """``(confounder_dictionary output, dataset, layer)`` at the site's layer."""
    from ..analysis import collect_representations, confounder_dictionary, load_export

    layer = vlm.spec.n_layers if site == "lm" else 0
    ds, objects, _ = load_export(data_dir)
    ids = ds.image_ids[:n_images] if n_images else ds.image_ids
    reps = collect_representations(vlm, ds, objects, layers=[layer], batch_size=batch_size, image_ids=ids)
    return confounder_dictionary(reps), ds, layer


def build_confounder_dictionary(vlm, data_dir: str | Path, site: str = "lm", n_images: int | None = 200,
                                modalities: Sequence[str] = ("visual", "text"), batch_size: int = 16) -> torch.Tensor:
    """``corrected`` dictionary: per-category means at the site's layer (last decoder layer for ``"lm"``,
    projector output for ``"projector"``) from :func:`lens_halluc.analysis.collect_representations`, the
    modalities' rows stacked; rows of categories without instances are dropped. FloatTensor ``[C', d]``.

    ``data_dir``: an export with ``objects.json`` (``python -m lens_halluc.organism export``, or a
    COCO-format directory with per-object patch indices).

    Example
    -------
    >>> D = build_confounder_dictionary(vlm, "runs/_data/data/normal-200", site="lm")  # doctest: +SKIP
    >>> D.shape                                                                 # doctest: +SKIP
    torch.Size([40, 128])
    """
    if site == "projector":
        modalities = ("visual",)  # layer 0 of text is the token embedding, not the projector
    d, _, layer = _site_means(vlm, data_dir, site, n_images, batch_size)
    rows = np.concatenate([d[m][0] for m in modalities])
    rows = rows[np.isfinite(rows).all(1)]
    if not len(rows):
        raise ValueError(f"no confounder rows at layer {layer}: the images in {data_dir} have no objects.")
    return torch.from_numpy(rows)


def build_confounder_dictionaries(vlm, data_dir: str | Path, site: str = "lm", n_images: int | None = 200,
                                  batch_size: int = 16) -> dict[str, torch.Tensor]:
    """``reference`` dictionaries: ``{modality: FloatTensor [C, d]}``, one row per category of the export
    (sorted ids), the category's mean at the site's layer, zeros where it has no instance (as
    Causal-LLaVA's ``get_visual_confounders.py`` / ``get_text_confounders.py``). ``"lm"``: visual and
    text at the last layer; ``"projector"``: visual at layer 0.

    Example
    -------
    >>> D = build_confounder_dictionaries(vlm, "runs/_data/data/normal-200", site="lm")  # doctest: +SKIP
    >>> {m: t.shape for m, t in D.items()}                                      # doctest: +SKIP
    {'visual': torch.Size([80, 128]), 'text': torch.Size([80, 128])}
    """
    modalities = ("visual",) if site == "projector" else ("visual", "text")
    d, ds, layer = _site_means(vlm, data_dir, site, n_images, batch_size)
    cats = sorted(ds.categories)
    seen = {int(c): k for k, c in enumerate(d["category_ids"])}
    out = {}
    for m in modalities:
        means = d[m][0]
        rows = np.zeros((len(cats), means.shape[-1]), dtype=np.float32)
        for r, c in enumerate(cats):
            if c in seen and np.isfinite(means[seen[c]]).all():
                rows[r] = means[seen[c]]
        if not rows.any():
            raise ValueError(f"no {m} confounder rows at layer {layer}: the images in {data_dir} have no objects.")
        out[m] = torch.from_numpy(rows)
    return out


def make_module(kind: str, dictionary, n_heads: int, site: str = "lm", eps: float = 1e-6) -> nn.Module:
    """The causal module of a flavour for ``site``: ``"reference"`` → :class:`CausalIntervention`
    (``dictionary``: ``{modality: [C, d]}``; RMSNorm on the query at the ``lm`` site, none at the
    projector), ``"corrected"`` → :class:`ConfounderAttention` (``dictionary``: ``[C, d]``).

    >>> make_module("reference", {"visual": torch.zeros(2, 4)}, 2, "projector").pre_norm
    False
    """
    if kind == "reference":
        if not isinstance(dictionary, Mapping):
            raise ValueError(f"the reference module needs one dictionary per modality at site {site!r} "
                             "({'visual': [C, d], 'text': [C, d]}), got a single tensor; pass a mapping or "
                             "flavour='corrected' (module='corrected').")
        return CausalIntervention(dictionary, n_heads=n_heads, pre_norm=site == "lm", eps=eps)
    if kind == "corrected":
        if isinstance(dictionary, Mapping):
            dictionary = torch.cat([torch.as_tensor(v, dtype=torch.float32) for v in dictionary.values()])
        return ConfounderAttention(dictionary, n_heads=n_heads)
    raise ValueError(f"module must be one of {MODULE_KINDS}, got {kind!r}.")


@dataclass(frozen=True)
class CausalConfig:
    """The options of :func:`lens_halluc.training.causal_module`; ``None`` fields take the flavour's value.

    steps, lr, batch_size, ``module`` (kind: "reference" / "corrected"), ``n_heads`` of the module
    ("model": the model's heads), ``trainable`` ("model": language model + LM head + projector +
    module; "module": the module only), sites, train_projector (with ``trainable="module"``), seed,
    flavour (:data:`FLAVOURS_CAUSAL`). The stored config holds the resolved values.

    Example
    -------
    >>> CausalConfig().n_heads, CausalConfig(flavour="corrected").n_heads
    ('model', 4)
    """

    steps: int = 150
    lr: Optional[float] = None
    batch_size: int = 16
    module: Optional[str] = None
    n_heads: Optional[int | str] = None
    trainable: Optional[str] = None
    sites: tuple[str, ...] = ("lm",)
    train_projector: bool = False
    seed: int = 0
    flavour: str = "reference"

    def __post_init__(self):
        check_flavour(self.flavour, "causal module")
        for name in ("lr", "module", "n_heads", "trainable"):
            object.__setattr__(self, name, resolve(FLAVOURS_CAUSAL, self.flavour, name, getattr(self, name)))
        object.__setattr__(self, "sites", tuple(self.sites))
        if self.module not in MODULE_KINDS:
            raise ValueError(f"module must be one of {MODULE_KINDS}, got {self.module!r}.")
        if self.trainable not in TRAINABLE:
            raise ValueError(f"trainable must be one of {TRAINABLE}, got {self.trainable!r}.")
        bad = [s for s in self.sites if s not in SITES]
        if bad or not self.sites:
            raise ValueError(f"unknown site(s) {bad or list(self.sites)}; choose from {SITES}.")


def train_causal(vlm, examples: Sequence[TrainExample], config: CausalConfig | None = None,
                 progress: bool = True) -> TrainResult:
    """Train the attached causal module(s) on the answer CE — with the language model, LM head and
    projector when ``trainable="model"`` (the reference), alone (and the projector with
    ``train_projector``) when ``"module"``. The vision tower and the dictionaries never train.

    Attach first with :func:`attach_causal_module`. The building block of
    :func:`lens_halluc.training.causal_module` (which attaches the modules too).

    Example
    -------
    >>> record = train_causal(vlm, examples, CausalConfig(steps=2, flavour="corrected"))  # doctest: +SKIP
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
    if cfg.trainable == "model":
        params += list(vlm.spec.language_model(model).parameters())
        params += list(model.get_output_embeddings().parameters())
        params += list(_site_module(vlm, "projector").parameters())
    elif cfg.train_projector:
        params += list(_site_module(vlm, "projector").parameters())
    params = list({id(p): p for p in params}.values())  # tied or shared weights once
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
    res.info = {"sites": list(cfg.sites), "dictionary_rows": {s: mods[s].n_rows for s in cfg.sites},
                "module": cfg.module, "trainable": cfg.trainable, "flavour": cfg.flavour}
    return res
