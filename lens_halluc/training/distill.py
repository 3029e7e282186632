"""SEED-style self-distillation with noise-contrastive logit purification, trained as LoRA adapters (peft).

Teacher: the frozen model itself (adapters disabled). Per answer position it runs on the clean
image ``x`` and on a noised one ``x' = √α·x + √(1−α)·ε`` (``α`` = ``signal``, the share of the
*signal* kept; ``ε ~ N(0, I)`` on the processor's pixel values), and purifies its logits::

    l_pur = (1 + β) · l_clean − β · l_noisy

The student (LoRA on the text tower's attention projections) minimises::

    w · KL(p_student^T ‖ p_pur^T) · T²  +  (1 − w) · CE

with ``p^T = softmax(l / T)``, over answer-predicting positions. After training the adapters are
merged, so the saved checkpoint is a plain model of the same architecture. The choices that differ
(``flavour=``, table :data:`FLAVOURS_DISTILL`):

- ``signal`` (α) — reference 0.3: ``x' = √0.3·x + √0.7·ε``; corrected 0.7: ``x' = √0.7·x + √0.3·ε``.
- ``beta_schedule`` — reference ``"quantile"``: per sample, β ∈ {1.1, 0.8, 0.6, 0.4} by the
  0.25/0.5/0.75 quantiles of the confidences ``mean(log max softmax(l_clean))`` of the last 1000
  samples (least confident quarter → 1.1, most confident → 0.4); corrected ``"continuous"``: per
  position, ``β = beta_max · (1 − max softmax(l_clean))``.
- ``rank`` / ``lora_alpha`` / ``lora_dropout`` — reference 64 / 128 / 0.05; corrected 8 / 16 / 0.
- ``lr`` — reference 2e-6; corrected 5e-4.

The reference is the SEED reproduction as specified in issue #13 (its code was not available here).

Both: LoRA on q/k/v/o_proj of the text tower, T = 2, w = 0.7.

Example
-------
>>> res = lh.train.seed_distill(vlm, examples, steps=150)                       # doctest: +SKIP
>>> res = lh.train.seed_distill(vlm, examples, flavour="corrected")             # doctest: +SKIP
>>> res.save("runs/retrain/seed")                                                # doctest: +SKIP
"""
from __future__ import annotations

import math
import re
from collections import deque
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.flavour import check_flavour, resolve
from .data import TrainExample, answer_query_mask, collate, example_batches
from .loop import TrainResult, count_trainable, run_training

BETA_SCHEDULES = ("quantile", "continuous")

#: SEED distillation's flavour-dependent defaults (see the module doc).
FLAVOURS_DISTILL = {
    "reference": {"signal": 0.3, "beta_schedule": "quantile", "rank": 64, "lora_alpha": 128, "lora_dropout": 0.05,
                  "lr": 2e-6},
    "corrected": {"signal": 0.7, "beta_schedule": "continuous", "rank": 8, "lora_alpha": 16, "lora_dropout": 0.0,
                  "lr": 5e-4},
}


@dataclass(frozen=True)
class DistillConfig:
    """The options of :func:`lens_halluc.training.seed_distill`; ``None`` fields take the flavour's value.

    LoRA rank / alpha / dropout / targets, ``signal`` (α, signal share of the noised image),
    ``temperature`` T, KL weight ``w``, the β schedule (``"quantile"``: ``beta_levels`` by the
    ``beta_quantiles`` of the last ``beta_history`` confidences; ``"continuous"``: ``beta_max``),
    steps, lr, batch size, seed. The stored config holds the resolved values.

    Example
    -------
    >>> DistillConfig().signal, DistillConfig().rank, DistillConfig(flavour="corrected").beta_schedule
    (0.3, 64, 'continuous')
    """

    steps: int = 150
    lr: Optional[float] = None
    batch_size: int = 16
    rank: Optional[int] = None
    lora_alpha: Optional[int] = None
    lora_dropout: Optional[float] = None
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    signal: Optional[float] = None
    temperature: float = 2.0
    w: float = 0.7
    beta_schedule: Optional[str] = None
    beta_levels: tuple[float, ...] = (1.1, 0.8, 0.6, 0.4)
    beta_quantiles: tuple[float, ...] = (0.25, 0.5, 0.75)
    beta_history: int = 1000
    beta_max: float = 1.0
    seed: int = 0
    flavour: str = "reference"

    def __post_init__(self):
        check_flavour(self.flavour, "SEED distillation")
        for name in ("lr", "rank", "lora_alpha", "lora_dropout", "signal", "beta_schedule"):
            object.__setattr__(self, name, resolve(FLAVOURS_DISTILL, self.flavour, name, getattr(self, name)))
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {self.beta_schedule!r}.")
        if len(self.beta_levels) != len(self.beta_quantiles) + 1:
            raise ValueError("beta_levels needs one more entry than beta_quantiles "
                             f"(got {len(self.beta_levels)} levels, {len(self.beta_quantiles)} quantiles).")
        if list(self.beta_quantiles) != sorted(self.beta_quantiles) or not all(0 < q < 1 for q in self.beta_quantiles):
            raise ValueError(f"beta_quantiles must be increasing and in (0, 1), got {self.beta_quantiles}.")
        if self.beta_history < 1:
            raise ValueError(f"beta_history must be >= 1, got {self.beta_history}.")


def purified_logits(clean: torch.Tensor, noisy: torch.Tensor, beta) -> torch.Tensor:
    """``(1+β)·clean − β·noisy``; ``β`` a number or a tensor broadcasting to ``[..., 1]``.

    >>> c = torch.tensor([[10.0, 0.0], [0.0, 0.0]]); n = torch.tensor([[0.0, 5.0], [1.0, 0.0]])
    >>> purified_logits(c, n, torch.tensor([[0.0], [0.5]]))[1]
    tensor([-0.5000,  0.0000])
    """
    beta = torch.as_tensor(beta, dtype=torch.float32, device=clean.device)
    return (1.0 + beta) * clean.float() - beta * noisy.float()


def continuous_beta(clean: torch.Tensor, beta_max: float) -> torch.Tensor:
    """``corrected`` β per position: ``beta_max · (1 − max softmax(clean))``, shape ``[..., 1]``.

    >>> continuous_beta(torch.tensor([[0.0, 0.0]]), 1.0)
    tensor([[0.5000]])
    """
    return beta_max * (1.0 - torch.softmax(clean.float(), -1).amax(-1, keepdim=True))


def sample_confidence(clean: torch.Tensor) -> torch.Tensor:
    """Confidence of one sample: ``mean over its positions of log max softmax(clean)``; ``clean [P, V]`` → scalar.

    >>> round(float(sample_confidence(torch.tensor([[0.0, 0.0], [0.0, 0.0]]))), 4)
    -0.6931
    """
    return torch.log_softmax(clean.float(), -1).amax(-1).mean()


class QuantileBeta:
    """``reference`` β: per sample, a level chosen by where its confidence falls among the quantiles of a history.

    ``update(confidences)`` appends the batch's per-sample confidences to the history (the last
    ``history`` samples, the current batch included) and returns their β: ``levels[i]`` where ``i``
    counts the quantiles (``np.quantile``, linear) the confidence reaches — the least confident
    quarter gets ``levels[0]`` = 1.1, the most confident ``levels[-1]`` = 0.4.

    >>> qb = QuantileBeta()
    >>> qb.update([-4.0, -3.0, -2.0, -1.0]).tolist()
    [1.1, 0.8, 0.6, 0.4]
    """

    def __init__(self, levels=(1.1, 0.8, 0.6, 0.4), quantiles=(0.25, 0.5, 0.75), history: int = 1000):
        self.levels = np.asarray(levels, dtype=np.float64)
        self.quantiles = tuple(quantiles)
        self.history: deque[float] = deque(maxlen=history)

    def update(self, confidences) -> np.ndarray:
        conf = np.asarray([float(c) for c in confidences], dtype=np.float64)
        self.history.extend(conf.tolist())
        cuts = np.quantile(np.asarray(self.history), self.quantiles)
        return self.levels[(conf[:, None] >= cuts[None, :]).sum(1)]


def noised_pixels(pixel_values: torch.Tensor, signal: float, generator: torch.Generator) -> torch.Tensor:
    """``√signal·x + √(1−signal)·ε`` with ε drawn on CPU (device-independent) from ``generator``.

    Example
    -------
    >>> noised_pixels(torch.zeros(1, 3, 2, 2), 0.3, torch.Generator().manual_seed(0)).shape
    torch.Size([1, 3, 2, 2])
    """
    eps = torch.randn(pixel_values.shape, generator=generator, dtype=torch.float32)
    out = math.sqrt(signal) * pixel_values.float() + math.sqrt(1.0 - signal) * eps.to(pixel_values.device)
    return out.to(pixel_values.dtype)


def _lora_model(vlm, cfg: DistillConfig):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ImportError("SEED distillation needs peft: pip install 'lens_halluc[train]'.") from e
    lm_prefix = _module_name(vlm.model, vlm.spec.language_model(vlm.model))
    names = "|".join(re.escape(t) for t in cfg.targets)
    target = rf"^{re.escape(lm_prefix)}\..*\.({names})$"  # text tower only: CLIP has q_proj/k_proj too
    config = LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=target,
                        bias="none")
    return get_peft_model(vlm.model, config)


def _module_name(root: torch.nn.Module, module: torch.nn.Module) -> str:
    for name, m in root.named_modules():
        if m is module:
            return name
    raise ValueError("the language model is not a submodule of the model.")


def train_seed_distillation(vlm, examples: Sequence[TrainExample], config: DistillConfig | None = None,
                            progress: bool = True) -> TrainResult:
    """Train LoRA adapters by purified self-distillation, merge them into ``vlm.model`` (in place).

    Returns the :class:`TrainResult` (parts: ``kl``, ``ce``, ``beta`` (mean β of the step);
    ``trained_params`` = adapter elements). The building block of :func:`lens_halluc.training.seed_distill`.

    Example
    -------
    >>> record = train_seed_distillation(vlm, examples, DistillConfig(steps=2))  # doctest: +SKIP
    """
    cfg = config or DistillConfig()
    if not 0.0 < cfg.signal < 1.0:
        raise ValueError(f"signal must be in (0, 1), got {cfg.signal}.")
    if not 0.0 <= cfg.w <= 1.0:
        raise ValueError(f"w must be in [0, 1], got {cfg.w}.")
    torch.manual_seed(cfg.seed)
    peft_model = _lora_model(vlm, cfg)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    n_trained = count_trainable(params)
    batches = example_batches(examples, cfg.batch_size, cfg.steps, cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    T = cfg.temperature
    schedule = QuantileBeta(cfg.beta_levels, cfg.beta_quantiles, cfg.beta_history)

    def step(_):
        batch = collate(vlm, next(batches))
        where = answer_query_mask(batch["labels"])
        with torch.no_grad(), peft_model.disable_adapter():
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            clean = peft_model(**inputs, use_cache=False).logits[where]
            noisy_in = inputs | {"pixel_values": noised_pixels(batch["pixel_values"], cfg.signal, gen)}
            noisy = peft_model(**noisy_in, use_cache=False).logits[where]
            if cfg.beta_schedule == "quantile":
                sample = torch.arange(where.shape[0], device=where.device)[:, None].expand_as(where)[where]  # row of each position
                conf = [sample_confidence(clean[sample == b]) for b in range(where.shape[0])]
                beta_b = torch.as_tensor(schedule.update(conf), dtype=torch.float32, device=clean.device)
                beta = beta_b[sample][:, None]
            else:
                beta = continuous_beta(clean, cfg.beta_max)
            target = purified_logits(clean, noisy, beta)
        out = peft_model(**batch, use_cache=False)
        student = out.logits[where].float()
        log_s, log_t = F.log_softmax(student / T, -1), F.log_softmax(target / T, -1)
        kl = (log_s.exp() * (log_s - log_t)).sum(-1).mean() * T * T  # KL(student ‖ purified teacher)
        loss = cfg.w * kl + (1.0 - cfg.w) * out.loss
        return loss, {"kl": kl.item(), "ce": out.loss.item(), "beta": float(beta.mean())}

    peft_model.train()
    try:
        res = run_training("seed-distill", cfg.steps, step, params, cfg.lr, 0.0, asdict(cfg), progress)
    finally:
        vlm.model = peft_model.merge_and_unload()
        vlm.model.eval()
        for p in vlm.model.parameters():
            p.requires_grad_(False)
    res.trained_params = n_trained
    res.info = {"lora_rank": cfg.rank, "targets": list(cfg.targets), "flavour": cfg.flavour}
    return res
