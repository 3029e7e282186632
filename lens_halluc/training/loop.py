"""The one training loop (re-training methods and the organism recipe), its record, and checkpoints the model layer loads.

Example
-------
>>> import torch
>>> w = torch.nn.Parameter(torch.tensor([3.0]))
>>> res = run_training("toy", 20, lambda s: (w ** 2).sum(), [w], lr=0.1, progress=False)
>>> res.final_loss < res.initial_loss
True
>>> res.save(vlm, "runs/retrain/tfhh")        # save_pretrained + training.json + losses.csv  # doctest: +SKIP
>>> load_training_info("runs/retrain/tfhh")["trained_params"]                   # doctest: +SKIP
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.tables import write_table

TRAINING_INFO = "training.json"


@dataclass
class TrainResult:
    """What a training run did: per-step losses (and their parts), wall time, trained parameters.

    ``losses`` ``[steps]`` total loss per step; ``parts`` name -> ``[steps]`` (e.g. ``ce``,
    ``text_attention_log``); ``trained_params`` counts the elements that could change (for TFHH
    the listed rows only, for LoRA the adapter weights); ``info``: method-specific facts (heads,
    separability before/after, ...), written to ``training.json``.

    Example
    -------
    >>> r = TrainResult("tfhh", {"steps": 2}, losses=[2.0, 1.5], parts={"ce": [2.0, 1.5]})
    >>> r.to_frame().columns.tolist(), r.to_dict()["final_loss"]
    (['step', 'loss', 'ce'], 1.5)
    """

    method: str
    config: dict
    losses: list[float] = field(default_factory=list)
    parts: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0
    trained_params: int = 0
    info: dict = field(default_factory=dict)

    @property
    def initial_loss(self) -> float:
        return float(np.mean(self.losses[: max(1, min(5, len(self.losses) // 4 or 1))]))

    @property
    def final_loss(self) -> float:
        return float(np.mean(self.losses[-max(1, min(5, len(self.losses) // 4 or 1)):]))

    def to_frame(self):
        """Losses per step as a DataFrame: ``step``, ``loss`` and one column per part (the ``losses.csv`` table)."""
        import pandas as pd

        return pd.DataFrame({"step": range(len(self.losses)), "loss": self.losses, **self.parts})

    def to_dict(self) -> dict:
        """The ``training.json`` record: every field but the per-step lists, plus steps and initial/final loss."""
        d = asdict(self)
        d.pop("losses")
        d.pop("parts")
        d.update(steps=len(self.losses), initial_loss=self.initial_loss if self.losses else None,
                 final_loss=self.final_loss if self.losses else None)
        return d

    def save(self, vlm, out: str | Path, source: str | Path | None = None) -> Path:
        """Save the trained model where :func:`~lens_halluc.models.load_vlm` loads it, plus ``training.json`` and
        ``losses.csv``. ``source``: the checkpoint it was trained from (its ``organism.json`` is copied)."""
        return save_checkpoint(vlm, out, self, source)


def adamw_warmup_cosine(params: list[torch.nn.Parameter], lr: float, weight_decay: float, steps: int):
    """AdamW with linear warm-up over the first 5 % of ``steps``, then cosine decay to 0: ``(optimizer, scheduler)``.

    Example
    -------
    >>> opt, sched = adamw_warmup_cosine([torch.nn.Parameter(torch.zeros(1))], 1e-3, 0.0, 100)
    """
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(1, steps))))
    return opt, sched


def run_training(method: str, steps: int, step_fn: Callable[[int], torch.Tensor | tuple[torch.Tensor, dict[str, float]]],
                 params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float = 0.0, config: dict | None = None,
                 progress: bool = True, max_grad_norm: float = 1.0,
                 after_step: Callable[[int], None] | None = None) -> TrainResult:
    """AdamW with warm-up + cosine decay over ``steps`` steps of ``step_fn(step)``: the one training loop.

    ``step_fn`` returns the loss, or ``(loss, parts)`` with ``parts`` a dict of floats to record
    per step (e.g. the loss's terms). Only ``params`` with ``requires_grad`` are handed to the
    optimiser, so nothing else can move; gradients are clipped to ``max_grad_norm``.
    ``after_step(step)`` runs after each update (the organism recipe saves checkpoints there).
    ``weight_decay`` defaults to 0: decoupled decay would shrink parameter elements whose gradient
    is masked to zero (TFHH's frozen rows). A non-finite loss raises ``FloatingPointError``.

    Example
    -------
    >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    >>> res = run_training("toy", 10, lambda s: ((w ** 2).sum(), {"w0": w[0].item()}), [w], lr=0.1,
    ...                    progress=False)
    >>> len(res.losses), sorted(res.parts)
    (10, ['w0'])
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}.")
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError(f"{method}: nothing to train (no parameter requires grad).")
    opt, sched = adamw_warmup_cosine(params, lr, weight_decay, steps)
    res = TrainResult(method=method, config=dict(config or {}))
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=method, disable=not progress)
    for s in bar:
        out = step_fn(s)
        loss, parts = out if isinstance(out, tuple) else (out, {})
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{method}: loss is {loss.item()} at step {s}; lower the learning rate.")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        sched.step()
        res.losses.append(float(loss.detach()))
        for k, v in parts.items():
            res.parts.setdefault(k, []).append(float(v))
        if after_step is not None:
            after_step(s)
        if s % 10 == 0 or s == steps - 1:
            bar.set_postfix(loss=f"{np.mean(res.losses[-10:]):.3f}")
    res.seconds = time.perf_counter() - start
    return res


def count_trainable(params: Iterable[torch.nn.Parameter]) -> int:
    """Elements of the parameters that require grad (what an optimiser over them may change).

    Example
    -------
    >>> count_trainable([torch.nn.Parameter(torch.zeros(2, 3)), torch.zeros(4)])
    6
    """
    return int(sum(p.numel() for p in params if p.requires_grad))


def save_checkpoint(vlm, out: str | Path, result: TrainResult, source: str | Path | None = None) -> Path:
    """``save_pretrained`` model + processor in ``out``; ``training.json``, ``losses.csv``; attached causal modules;
    the source's ``organism.json`` (so organism evaluations recognise the re-trained model).

    Example
    -------
    >>> save_checkpoint(vlm, "runs/retrain/tfhh", result)                       # doctest: +SKIP
    """
    from .causal import save_attached

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = vlm.model
    was_training = model.training
    model.eval()
    model.save_pretrained(out)
    vlm.processor.save_pretrained(out)
    save_attached(model, out)
    src = Path(source) if source is not None else (Path(vlm.path) if vlm.path is not None else None)
    if src is not None and (src / "organism.json").is_file() and src.resolve() != out.resolve():
        shutil.copy(src / "organism.json", out / "organism.json")
    info = result.to_dict() | {"source": str(src) if src is not None else None}
    (out / TRAINING_INFO).write_text(json.dumps(info, indent=1, default=str))
    write_table(result.to_frame(), out / "losses.csv")
    if was_training:
        model.train()
    return out


def load_training_info(model_dir: str | Path) -> dict | None:
    """``training.json`` of a re-trained checkpoint, or None for a model that was not re-trained here.

    >>> load_training_info("runs/retrain/tfhh")["method"]                       # doctest: +SKIP
    'tfhh'
    """
    p = Path(model_dir) / TRAINING_INFO
    return json.loads(p.read_text()) if p.is_file() else None
