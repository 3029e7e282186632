"""SEED-style self-distillation with noise-contrastive logit purification, trained as LoRA adapters (peft).

Teacher: the frozen model itself (adapters disabled). Per answer position it runs on the clean
image ``x`` and on a noised one ``x' = √(1−α)·x + √α·ε`` (``α`` = ``noise``, the noise fraction, 0.3
by default; ``ε ~ N(0, I)`` on the processor's pixel values), and purifies its logits::

    l_pur = (1 + β) · l_clean − β · l_noisy,      β = β_max · (1 − max softmax(l_clean))

β is confidence-dependent: where the clean teacher is already confident, little is subtracted;
where it hesitates (where language priors take over), the noise contrast weighs most. The
student (LoRA on the text tower's attention projections) minimises::

    w · KL(p_student^T ‖ p_pur^T) · T²  +  (1 − w) · CE

with ``p^T = softmax(l / T)``, over answer-predicting positions; defaults from the reproduction
(noise 0.3, T = 2, w = 0.7). After training the adapters are merged, so the saved checkpoint is a
plain model of the same architecture.

Example
-------
>>> res = lh.train.seed_distill(vlm, examples, steps=150)                       # doctest: +SKIP
>>> res.save("runs/retrain/seed")                                                # doctest: +SKIP
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .data import TrainExample, answer_query_mask, collate, example_batches
from .loop import TrainResult, count_trainable, run_training


@dataclass(frozen=True)
class DistillConfig:
    """LoRA rank/alpha/targets, noise fraction, temperature T, KL weight w, β_max, schedule.

    The options of :func:`lens_halluc.training.seed_distill`.

    Example
    -------
    >>> DistillConfig(rank=4).noise
    0.3
    """

    steps: int = 150
    lr: float = 5e-4
    batch_size: int = 16
    rank: int = 8
    lora_alpha: int = 16
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    noise: float = 0.3
    temperature: float = 2.0
    w: float = 0.7
    beta_max: float = 1.0
    seed: int = 0


def purified_logits(clean: torch.Tensor, noisy: torch.Tensor, beta_max: float) -> torch.Tensor:
    """``(1+β)·clean − β·noisy`` with ``β = beta_max·(1 − max softmax(clean))`` per position; ``[..., V]``.

    >>> c = torch.tensor([[10.0, 0.0], [0.0, 0.0]]); n = torch.tensor([[0.0, 5.0], [1.0, 0.0]])
    >>> purified_logits(c, n, 1.0)[1]        # uncertain row: β = 0.5
    tensor([-0.5000,  0.0000])
    """
    beta = beta_max * (1.0 - torch.softmax(clean.float(), -1).amax(-1, keepdim=True))
    return (1.0 + beta) * clean.float() - beta * noisy.float()


def noised_pixels(pixel_values: torch.Tensor, noise: float, generator: torch.Generator) -> torch.Tensor:
    """``√(1−noise)·x + √noise·ε`` with ε drawn on CPU (device-independent) from ``generator``.

    Example
    -------
    >>> noised_pixels(torch.zeros(1, 3, 2, 2), 0.3, torch.Generator().manual_seed(0)).shape
    torch.Size([1, 3, 2, 2])
    """
    eps = torch.randn(pixel_values.shape, generator=generator, dtype=torch.float32)
    out = math.sqrt(1.0 - noise) * pixel_values.float() + math.sqrt(noise) * eps.to(pixel_values.device)
    return out.to(pixel_values.dtype)


def _lora_model(vlm, cfg: DistillConfig):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ImportError("SEED distillation needs peft: pip install 'lens_halluc[train]'.") from e
    lm_prefix = _module_name(vlm.model, vlm.spec.language_model(vlm.model))
    names = "|".join(re.escape(t) for t in cfg.targets)
    target = rf"^{re.escape(lm_prefix)}\..*\.({names})$"  # text tower only: CLIP has q_proj/k_proj too
    config = LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=target, bias="none")
    return get_peft_model(vlm.model, config)


def _module_name(root: torch.nn.Module, module: torch.nn.Module) -> str:
    for name, m in root.named_modules():
        if m is module:
            return name
    raise ValueError("the language model is not a submodule of the model.")


def train_seed_distillation(vlm, examples: Sequence[TrainExample], config: DistillConfig | None = None,
                            progress: bool = True) -> TrainResult:
    """Train LoRA adapters by purified self-distillation, merge them into ``vlm.model`` (in place).

    Returns the :class:`TrainResult` (parts: ``kl``, ``ce``, ``beta``; ``trained_params`` = adapter elements).
    The building block of :func:`lens_halluc.training.seed_distill`.

    Example
    -------
    >>> record = train_seed_distillation(vlm, examples, DistillConfig(steps=2))  # doctest: +SKIP
    """
    cfg = config or DistillConfig()
    if not 0.0 < cfg.noise < 1.0:
        raise ValueError(f"noise must be in (0, 1), got {cfg.noise}.")
    if not 0.0 <= cfg.w <= 1.0:
        raise ValueError(f"w must be in [0, 1], got {cfg.w}.")
    torch.manual_seed(cfg.seed)
    peft_model = _lora_model(vlm, cfg)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    n_trained = count_trainable(params)
    batches = example_batches(examples, cfg.batch_size, cfg.steps, cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    T = cfg.temperature

    def step(_):
        batch = collate(vlm, next(batches))
        where = answer_query_mask(batch["labels"])
        with torch.no_grad(), peft_model.disable_adapter():
            clean = peft_model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits[where]
            noisy_in = {k: v for k, v in batch.items() if k != "labels"}
            noisy_in["pixel_values"] = noised_pixels(batch["pixel_values"], cfg.noise, gen)
            noisy = peft_model(**noisy_in, use_cache=False).logits[where]
            target = purified_logits(clean, noisy, cfg.beta_max)
        out = peft_model(**batch, use_cache=False)
        student = out.logits[where].float()
        log_s, log_t = F.log_softmax(student / T, -1), F.log_softmax(target / T, -1)
        kl = (log_s.exp() * (log_s - log_t)).sum(-1).mean() * T * T  # KL(student ‖ purified teacher)
        loss = cfg.w * kl + (1.0 - cfg.w) * out.loss
        beta = (cfg.beta_max * (1 - torch.softmax(clean.float(), -1).amax(-1))).mean()
        return loss, {"kl": kl.item(), "ce": out.loss.item(), "beta": beta.item()}

    peft_model.train()
    try:
        res = run_training("seed-distill", cfg.steps, step, params, cfg.lr, 0.0, asdict(cfg), progress)
    finally:
        vlm.model = peft_model.merge_and_unload()
        vlm.model.eval()
        for p in vlm.model.parameters():
            p.requires_grad_(False)
    res.trained_params = n_trained
    res.info = {"lora_rank": cfg.rank, "targets": list(cfg.targets)}
    return res
