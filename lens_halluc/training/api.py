"""Re-training as three calls: :func:`tfhh`, :func:`seed_distill`, :func:`causal_module`, each returning a :class:`Retrained`.

Each call trains ``vlm`` **in place** (for :func:`seed_distill`, ``vlm.model`` becomes the merged
model) and returns the trained model with its training record; :meth:`Retrained.save` writes the
checkpoint :func:`~lens_halluc.models.load_vlm` loads, with ``training.json`` and ``losses.csv``
(what ``python -m lens_halluc.retrain`` writes). Options are the fields of the method's config
(:class:`~lens_halluc.training._tfhh.TFHHConfig`, :class:`~lens_halluc.training.distill.DistillConfig`,
:class:`~lens_halluc.training.causal.CausalConfig`): their defaults are defined there, once, and the
ones that differ between the ``reference`` flavour (the paper's code, the default) and our
``corrected`` one in each method's table (``FLAVOURS_TFHH``, ``FLAVOURS_DISTILL``,
``FLAVOURS_CAUSAL``); ``flavour=`` picks the table, an explicit option always wins.

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

from .causal import (CausalConfig, attach_causal_module, build_confounder_dictionaries, build_confounder_dictionary,
                     make_module, train_causal)
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


def _config(cls, options: Mapping[str, Any], method: str, flavour: str):
    names = [f.name for f in dataclasses.fields(cls) if f.name != "flavour"]
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise TypeError(f"{method}: unknown option(s) {unknown}; the options are {names}.")
    return cls(**options, flavour=flavour)


def _separability(vlm, confounders, n_images: int) -> dict | None:
    return separability_summary(vlm, confounders, n_images) if confounders is not None and n_images else None


def _finish(vlm, record: TrainResult, examples, confounders, n_images: int, before, info, source) -> Retrained:
    record.info.update(info or {})
    if before is not None:
        record.info["separability"] = {"before": before, "after": separability_summary(vlm, confounders, n_images)}
    record.info["n_examples"] = len(examples)
    return Retrained(vlm, record, Path(source) if source is not None else None)


def tfhh(vlm, heads: Sequence[tuple[int, int]], examples: Sequence[TrainExample], *, flavour: str = "reference",
         confounders: str | Path | None = None, separability_images: int = 200, info: Mapping | None = None,
         progress: bool = True, **options) -> Retrained:
    """TFHH: fine-tune only the listed heads' query/key rows to look less at text (Yang et al., ICLR 2025).

    Parameters
    ----------
    vlm : LoadedVLM, trained in place.
    heads : ``(layer, head)`` pairs in rank order, e.g. ``attribution.top_heads(30)`` or
        ``read_heads("top_heads.json")``; the first ``k`` are trained.
    flavour : ``"reference"`` (HA's code: text term = 1 − image mass, rows = answer tokens, LM head
        trained, k = 30, per-layer means, lr 2e-5) or ``"corrected"`` (TEXT-role mass, rows that
        predict the answer, LM head frozen, every listed head, one pooled mean, lr 1e-3).
    examples : :class:`~lens_halluc.training.data.TrainExample` s (``coco_caption_examples``, or the
        organism's ``lens_halluc.organism.examples.training_examples``).
    confounders : optional export with ``objects.json``: separability before/after is measured on
        its first ``separability_images`` images (0 skips).
    info : extra entries for the record's ``info`` (e.g. ``{"control": "random"}``).
    progress : show a progress bar.
    **options : :class:`~lens_halluc.training._tfhh.TFHHConfig` fields — ``steps`` (150), ``lr``
        (flavour), ``lam`` (λ of the text-attention term, 2), ``batch_size`` (16), ``train_lm_head``,
        ``k``, ``text_mass``, ``rows``, ``loss_mean`` (flavour), ``seed`` (0), ``eps`` (1e-8).

    Returns
    -------
    :class:`Retrained` (``info``: heads, text attention before/after, n_examples).

    Example
    -------
    >>> res = tfhh(vlm, [(0, 0), (1, 7)], examples, steps=150, lam=2.0)         # doctest: +SKIP
    >>> res = tfhh(vlm, [(0, 0), (1, 7)], examples, flavour="corrected")        # doctest: +SKIP
    >>> res.info["text_attention_after"] < res.info["text_attention_before"]    # doctest: +SKIP
    True
    """
    cfg = _config(TFHHConfig, options, "tfhh", flavour)
    source = vlm.path
    before = _separability(vlm, confounders, separability_images)
    record = train_tfhh(vlm, examples, heads, cfg, progress)
    return _finish(vlm, record, examples, confounders, separability_images, before, info, source)


def seed_distill(vlm, examples: Sequence[TrainExample], *, flavour: str = "reference",
                 confounders: str | Path | None = None,
                 separability_images: int = 200, info: Mapping | None = None, progress: bool = True,
                 **options) -> Retrained:
    """SEED-style self-distillation with noise-contrastive logit purification, as LoRA adapters merged afterwards.

    Parameters
    ----------
    vlm : LoadedVLM, trained in place (``vlm.model`` becomes the merged model, same architecture).
    examples, confounders, separability_images, info, progress : as in :func:`tfhh`.
    flavour : ``"reference"`` (the SEED reproduction of issue #13: ``x' = √0.3·x + √0.7·ε``, β per
        sample from {1.1, 0.8, 0.6, 0.4} by confidence quantiles over the last 1000 samples, LoRA
        r 64 / α 128 / dropout 0.05, lr 2e-6) or ``"corrected"`` (``√0.7·x + √0.3·ε``, continuous
        ``β = β_max(1 − max p)``, LoRA r 8 / α 16 / no dropout, lr 5e-4).
    **options : :class:`~lens_halluc.training.distill.DistillConfig` fields — ``steps`` (150),
        ``lr``, ``rank``, ``lora_alpha``, ``lora_dropout``, ``signal`` (α, signal share),
        ``beta_schedule`` (flavour), ``batch_size`` (16), ``targets`` (q/k/v/o_proj),
        ``temperature`` (T, 2), ``w`` (KL weight, 0.7), ``beta_levels``, ``beta_quantiles``,
        ``beta_history``, ``beta_max`` (1), ``seed`` (0).

    Returns
    -------
    :class:`Retrained` (parts ``kl``, ``ce``, ``beta``; ``trained_params`` = adapter elements).

    Example
    -------
    >>> res = seed_distill(vlm, examples, steps=150, signal=0.3)                # doctest: +SKIP
    >>> res.losses[["kl", "ce"]].iloc[-1]                                       # doctest: +SKIP
    """
    cfg = _config(DistillConfig, options, "seed_distill", flavour)
    source = vlm.path
    before = _separability(vlm, confounders, separability_images)
    record = train_seed_distillation(vlm, examples, cfg, progress)
    return _finish(vlm, record, examples, confounders, separability_images, before, info, source)


def causal_module(vlm, examples: Sequence[TrainExample], confounders: str | Path | None = None, *,
                  flavour: str = "reference", dictionaries: Mapping[str, Any] | None = None, dict_images: int = 200,
                  separability_images: int = 200, info: Mapping | None = None, progress: bool = True,
                  **options) -> Retrained:
    """Causal-LLaVA's module: attach zero-initialised cross-attention over confounder dictionaries and train.

    ``reference`` flavour (Causal-LLaVA's code): two cross-attentions (visual, text) summed, no q/o
    projections, one shared zero-initialised k/v projection each, the model's number of heads, an
    RMSNorm on the query; the language model, LM head, projector and module train (lr 2e-5).
    ``corrected``: one cross-attention with q/k/v/o over the stacked dictionary, 4 heads; only the
    module trains (the projector too with ``train_projector=True``), lr 1e-3. The module is saved
    beside the checkpoint and re-attached by ``load_vlm``.

    Parameters
    ----------
    vlm : LoadedVLM, trained in place (modules attached with forward hooks).
    examples : training examples, as in :func:`tfhh`.
    confounders : export with ``objects.json``: the per-site dictionary is built from its first
        ``dict_images`` images, separability measured on its first ``separability_images`` (0 skips).
    flavour : ``"reference"`` or ``"corrected"`` (above).
    dictionaries : to use instead of building them from ``confounders``: ``{site: {modality:
        FloatTensor [C, d]}}`` for the reference module (``"visual"``/``"text"``), ``{site:
        FloatTensor [C, d]}`` for the corrected one (a per-modality mapping is stacked).
    info, progress : as in :func:`tfhh`.
    **options : :class:`~lens_halluc.training.causal.CausalConfig` fields — ``steps`` (150),
        ``lr``, ``module``, ``n_heads``, ``trainable`` (flavour), ``batch_size`` (16), ``sites``
        (``("lm",)``; ``"projector"`` too), ``train_projector`` (False), ``seed`` (0, also seeds the
        module's initialisation).

    Returns
    -------
    :class:`Retrained` (``info``: sites, dictionary rows per site, n_examples).

    Example
    -------
    >>> res = causal_module(vlm, examples, "runs/_data/data/normal-200", sites=("lm",))  # doctest: +SKIP
    >>> res.save("runs/retrain/causal")                                         # doctest: +SKIP
    """
    cfg = _config(CausalConfig, options, "causal_module", flavour)
    if cfg.n_heads == "model":
        cfg = dataclasses.replace(cfg, n_heads=int(vlm.spec.n_heads))
    if dictionaries is None and confounders is None:
        raise ValueError("causal_module needs a confounder export (confounders=DIR with objects.json) "
                         "or dictionaries={site: tensor}.")
    missing = [s for s in cfg.sites if dictionaries is not None and s not in dictionaries]
    if missing:
        raise ValueError(f"dictionaries has no entry for site(s) {missing}.")
    source = vlm.path
    before = _separability(vlm, confounders, separability_images)
    torch.manual_seed(cfg.seed)  # the module's initialisation
    eps = float(getattr(vlm.model.config.get_text_config(), "rms_norm_eps", 1e-6))
    for site in cfg.sites:
        if dictionaries is not None:
            D = dictionaries[site]
        elif cfg.module == "reference":
            D = build_confounder_dictionaries(vlm, confounders, site, dict_images)
        else:
            D = build_confounder_dictionary(vlm, confounders, site, dict_images)
        attach_causal_module(vlm, make_module(cfg.module, D, cfg.n_heads, site, eps), site)
    record = train_causal(vlm, examples, cfg, progress)
    return _finish(vlm, record, examples, confounders, separability_images, before, info, source)
