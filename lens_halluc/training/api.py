"""Re-training as three calls: :func:`tfhh`, :func:`seed_distill`, :func:`causal_module`, each returning a :class:`Retrained`.

Each call trains ``vlm`` **in place** (for :func:`seed_distill`, ``vlm.model`` becomes the merged
model) and returns the trained model with its training record; :meth:`Retrained.save` writes the
checkpoint :func:`~lens_halluc.models.load_vlm` loads, with ``training.json`` and ``losses.csv``
(what ``python -m lens_halluc.retrain`` writes). Options are the fields of the method's config
(:class:`~lens_halluc.training._tfhh.TFHHConfig`, :class:`~lens_halluc.training.distill.DistillConfig`,
:class:`~lens_halluc.training.causal.CausalConfig`): their defaults are defined there, once.

Example
-------
>>> import lens_halluc as lh
>>> from lens_halluc.organism.examples import training_examples
>>> vlm = lh.load_vlm()                                                        # doctest: +SKIP
>>> res = lh.train.tfhh(vlm, [(0, 0), (1, 7)], training_examples(vlm.path), steps=150)  # doctest: +SKIP
>>> res.losses.tail(1)                        # DataFrame: step, loss, ce, ...  # doctest: +SKIP
>>> res.save("runs/retrain/tfhh")                                              # doctest: +SKIP
>>> again = lh.load_vlm("runs/retrain/tfhh")                                    # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .causal import CausalConfig, ConfounderAttention, attach_causal_module, build_confounder_dictionary, train_causal
from .data import TrainExample
from .distill import DistillConfig, train_seed_distillation
from .loop import TrainResult
from .separability import separability_summary
from ._tfhh import TFHHConfig, train_tfhh


@dataclass
class Retrained:
    """A re-trained model and its training record.

    Attributes
    ----------
    vlm : the trained :class:`~lens_halluc.models.LoadedVLM` (the object passed in, trained in place).
    record : the :class:`~lens_halluc.training.loop.TrainResult` (per-step losses and parts,
        config, seconds, trained parameters, method facts in ``info``).
    source : the checkpoint it was trained from (its ``organism.json`` is copied on save).

    Example
    -------
    >>> res = tfhh(vlm, heads, examples, steps=2)                               # doctest: +SKIP
    >>> res.trained_params, res.seconds, res.losses.columns.tolist()            # doctest: +SKIP
    (4096, 1.2, ['step', 'loss', 'ce', 'text_attention_log', 'text_attention'])
    >>> res.save("runs/retrain/tfhh")                                           # doctest: +SKIP
    """

    vlm: Any
    record: TrainResult
    source: Path | None = None

    @property
    def method(self) -> str:
        """``"tfhh"``, ``"seed-distill"`` or ``"causal"``."""
        return self.record.method

    @property
    def config(self) -> dict:
        """The method's config as a dict (the ``config`` of ``training.json``)."""
        return self.record.config

    @property
    def seconds(self) -> float:
        """Wall time of the training loop."""
        return self.record.seconds

    @property
    def trained_params(self) -> int:
        """Elements that could change (TFHH: the listed rows; LoRA: adapter weights; causal: the module)."""
        return self.record.trained_params

    @property
    def info(self) -> dict:
        """Method facts recorded in ``training.json`` (heads, LoRA rank, sites, separability, n_examples, ...)."""
        return self.record.info

    @property
    def losses(self):
        """DataFrame, one row per step: ``step``, ``loss`` and each part of the loss (the ``losses.csv`` table)."""
        return self.record.to_frame()

    @property
    def separability(self) -> dict | None:
        """``{"before": ..., "after": ...}`` of :func:`~lens_halluc.training.separability.separability_summary`,
        or None when no confounder export was given."""
        return self.record.info.get("separability")

    @property
    def summary(self) -> dict:
        """method, steps, seconds, trained_params, initial_loss, final_loss (what the CLI prints)."""
        d = self.record.to_dict()
        return {k: d[k] for k in ("method", "steps", "seconds", "trained_params", "initial_loss", "final_loss")}

    def save(self, out: str | Path, source: str | Path | None = None) -> Path:
        """Write the checkpoint (``save_pretrained`` + add-ons), ``training.json`` and ``losses.csv`` in ``out``.

        ``source`` (default :attr:`source`): the checkpoint trained from. Returns ``out`` as a Path.

        Example
        -------
        >>> res.save("runs/retrain/tfhh")                                       # doctest: +SKIP
        PosixPath('runs/retrain/tfhh')
        """
        return self.record.save(self.vlm, out, self.source if source is None else source)


def _config(cls, options: Mapping[str, Any], method: str):
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise TypeError(f"{method}: unknown option(s) {unknown}; the options are {names}.")
    return cls(**options)


def _separability(vlm, confounders, n_images: int) -> dict | None:
    return separability_summary(vlm, confounders, n_images) if confounders is not None and n_images else None


def _finish(vlm, record: TrainResult, examples, confounders, n_images: int, before, info, source) -> Retrained:
    record.info.update(info or {})
    if before is not None:
        record.info["separability"] = {"before": before, "after": separability_summary(vlm, confounders, n_images)}
    record.info["n_examples"] = len(examples)
    return Retrained(vlm, record, Path(source) if source is not None else None)


def tfhh(vlm, heads: Sequence[tuple[int, int]], examples: Sequence[TrainExample], *,
         confounders: str | Path | None = None, separability_images: int = 200, info: Mapping | None = None,
         progress: bool = True, **options) -> Retrained:
    """TFHH: fine-tune only the listed heads' query/key rows to look less at text (Yang et al., ICLR 2025).

    Parameters
    ----------
    vlm : LoadedVLM, trained in place.
    heads : ``(layer, head)`` pairs, e.g. ``attribution.top_heads(5)`` or ``read_heads("top_heads.json")``.
    examples : :class:`~lens_halluc.training.data.TrainExample` s (``coco_caption_examples``, or the
        organism's ``lens_halluc.organism.examples.training_examples``).
    confounders : optional export with ``objects.json``: separability before/after is measured on
        its first ``separability_images`` images (0 skips).
    info : extra entries for the record's ``info`` (e.g. ``{"control": "random"}``).
    progress : show a progress bar.
    **options : :class:`~lens_halluc.training._tfhh.TFHHConfig` fields — ``steps`` (150), ``lr``
        (1e-3), ``lam`` (λ of the text-attention term, 2), ``batch_size`` (16), ``train_lm_head``
        (False), ``seed`` (0), ``eps`` (1e-8).

    Returns
    -------
    :class:`Retrained` (``info``: heads, text attention before/after, n_examples).

    Example
    -------
    >>> res = tfhh(vlm, [(0, 0), (1, 7)], examples, steps=150, lam=2.0)         # doctest: +SKIP
    >>> res.info["text_attention_after"] < res.info["text_attention_before"]    # doctest: +SKIP
    True
    """
    cfg = _config(TFHHConfig, options, "tfhh")
    source = vlm.path
    before = _separability(vlm, confounders, separability_images)
    record = train_tfhh(vlm, examples, heads, cfg, progress)
    return _finish(vlm, record, examples, confounders, separability_images, before, info, source)


def seed_distill(vlm, examples: Sequence[TrainExample], *, confounders: str | Path | None = None,
                 separability_images: int = 200, info: Mapping | None = None, progress: bool = True,
                 **options) -> Retrained:
    """SEED-style self-distillation with noise-contrastive logit purification, as LoRA adapters merged afterwards.

    Parameters
    ----------
    vlm : LoadedVLM, trained in place (``vlm.model`` becomes the merged model, same architecture).
    examples, confounders, separability_images, info, progress : as in :func:`tfhh`.
    **options : :class:`~lens_halluc.training.distill.DistillConfig` fields — ``steps`` (150),
        ``lr`` (5e-4), ``batch_size`` (16), ``rank`` (8), ``lora_alpha`` (16), ``targets``
        (q/k/v/o_proj), ``noise`` (α, 0.3), ``temperature`` (T, 2), ``w`` (KL weight, 0.7),
        ``beta_max`` (β_max, 1), ``seed`` (0).

    Returns
    -------
    :class:`Retrained` (parts ``kl``, ``ce``, ``beta``; ``trained_params`` = adapter elements).

    Example
    -------
    >>> res = seed_distill(vlm, examples, steps=150, noise=0.3)                 # doctest: +SKIP
    >>> res.losses[["kl", "ce"]].iloc[-1]                                       # doctest: +SKIP
    """
    cfg = _config(DistillConfig, options, "seed_distill")
    source = vlm.path
    before = _separability(vlm, confounders, separability_images)
    record = train_seed_distillation(vlm, examples, cfg, progress)
    return _finish(vlm, record, examples, confounders, separability_images, before, info, source)


def causal_module(vlm, examples: Sequence[TrainExample], confounders: str | Path | None = None, *,
                  dictionaries: Mapping[str, torch.Tensor] | None = None, dict_images: int = 200,
                  separability_images: int = 200, info: Mapping | None = None, progress: bool = True,
                  **options) -> Retrained:
    """Causal-LLaVA's module: attach a zero-initialised cross-attention over a confounder dictionary and train it.

    The model's own weights stay frozen (the projector trains too with ``train_projector=True``);
    the module is saved beside the checkpoint and re-attached by ``load_vlm``.

    Parameters
    ----------
    vlm : LoadedVLM, trained in place (modules attached with forward hooks).
    examples : training examples, as in :func:`tfhh`.
    confounders : export with ``objects.json``: the per-site dictionary is built from its first
        ``dict_images`` images, separability measured on its first ``separability_images`` (0 skips).
    dictionaries : ``{site: FloatTensor [C, d]}`` to use instead of building them from ``confounders``.
    info, progress : as in :func:`tfhh`.
    **options : :class:`~lens_halluc.training.causal.CausalConfig` fields — ``steps`` (150),
        ``lr`` (1e-3), ``batch_size`` (16), ``n_heads`` (module heads, 4), ``sites`` (``("lm",)``;
        ``"projector"`` too), ``train_projector`` (False), ``seed`` (0, also seeds the module's
        initialisation).

    Returns
    -------
    :class:`Retrained` (``info``: sites, dictionary rows per site, n_examples).

    Example
    -------
    >>> res = causal_module(vlm, examples, "runs/_data/data/normal-200", sites=("lm",))  # doctest: +SKIP
    >>> res.save("runs/retrain/causal")                                         # doctest: +SKIP
    """
    cfg = _config(CausalConfig, options, "causal_module")
    if dictionaries is None and confounders is None:
        raise ValueError("causal_module needs a confounder export (confounders=DIR with objects.json) "
                         "or dictionaries={site: tensor}.")
    missing = [s for s in cfg.sites if dictionaries is not None and s not in dictionaries]
    if missing:
        raise ValueError(f"dictionaries has no entry for site(s) {missing}.")
    source = vlm.path
    before = _separability(vlm, confounders, separability_images)
    torch.manual_seed(cfg.seed)  # the module's q/k/v initialisation
    for site in cfg.sites:
        D = dictionaries[site] if dictionaries is not None else build_confounder_dictionary(vlm, confounders, site, dict_images)
        attach_causal_module(vlm, ConfounderAttention(D, n_heads=cfg.n_heads), site)
    record = train_causal(vlm, examples, cfg, progress)
    return _finish(vlm, record, examples, confounders, separability_images, before, info, source)
