"""The attribution job: caption → CHAIR targets → per-caption influences → head scores.

Each caption's result is written to ``parts/{sample_id:06d}.npz`` as soon as it is computed, so
an interrupted run resumes where it stopped; the final tables are assembled from the parts in
``sample_id`` order, so a resumed (or sharded) run ends with byte-identical files.

Example
-------
>>> samples = collect_samples(vlm, dataset, captions_jsonl)                 # doctest: +SKIP
>>> for s in samples: attribute_sample(vlm, s, parts_dir, cfg)               # doctest: +SKIP
>>> tables = assemble(parts_dir, samples, vlm.spec)                          # doctest: +SKIP
>>> scores = head_scores(tables.influence, tables.tokens["hallucinated"])    # doctest: +SKIP
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..data.chair import ChairEvaluator
from ..data.coco import CocoDataset
from ..generation.jsonl import read_jsonl
from ..generation.runner import load_image
from ..models.loading import LoadedVLM
from . import influences


class NoTargetsError(ValueError):
    """No caption has a hallucinated object (or none a real one): nothing to attribute."""


@dataclass(frozen=True)
class AttributionConfig:
    """Options of the attribution job (the CLI flags)."""

    scope: str = "local"
    ablation: str = "zero"
    metric: str = "prob_diff"
    method: str = "exact"
    top_k: int = 20
    keep: str = "hallucinated"  # captions kept: "hallucinated" (≥ 1 hallucination, the reference) or "all"
    chunk_size: int = 1024


@dataclass
class Sample:
    """One teacher-forced caption and its CHAIR targets.

    ``input_ids``: prompt (with the expanded image tokens) + generated caption ids; the first
    ``n_prompt`` are the prompt. ``targets``:
    one dict per object mention with ``position`` (index in ``input_ids`` of the word's first
    sub-token), ``token_id``, ``token``, ``word`` and ``hallucinated``.
    """

    sample_id: int
    image_id: int
    image: str
    prompt: str
    caption: str
    input_ids: list[int]
    n_prompt: int
    targets: list[dict] = field(default_factory=list)


def collect_samples(vlm: LoadedVLM, dataset: CocoDataset, captions: str | Path | list[dict],
                    keep: str = "hallucinated") -> list[Sample]:
    """Teacher-forced samples from captioning results (``{"image_id", "caption", "token_ids", "prompt"}`` rows).

    Target positions come from CHAIR's token alignment (never from matching decoded strings).
    ``keep="hallucinated"`` keeps captions with at least one hallucinated object, as the reference does.
    """
    rows = read_jsonl(captions) if isinstance(captions, (str, Path)) else list(captions)
    chair = ChairEvaluator()
    result = chair.evaluate(rows, dataset, tokenizer=vlm.tokenizer)
    samples = []
    for row, per in zip(rows, result.captions):
        mentions = [m for m in per["mentions"] if m["token_position"] is not None]
        if keep == "hallucinated" and not any(m["hallucinated"] for m in mentions):
            continue
        image = dataset.image_path(row["image_id"])
        enc = vlm.encode([load_image(image)], [row["prompt"]])
        prompt_ids = enc["input_ids"][0].tolist()
        ids = prompt_ids + list(row["token_ids"])
        targets = []
        for m in mentions:
            pos = len(prompt_ids) + int(m["token_position"])
            targets.append({"position": pos, "token_id": ids[pos], "token": vlm.tokenizer.convert_ids_to_tokens(ids[pos]),
                            "word": m["word"], "hallucinated": bool(m["hallucinated"])})
        samples.append(Sample(len(samples), int(row["image_id"]), str(image), row["prompt"], row["caption"], ids,
                              len(prompt_ids), targets))
    if not any(t["hallucinated"] for s in samples for t in s.targets):
        raise NoTargetsError(
            f"none of the {len(rows)} captions has a hallucinated object that CHAIR can align to a token: nothing to "
            "attribute. Use more images (--n-images), a split where the model hallucinates, or check the annotations.")
    return samples


def sample_pixels(vlm: LoadedVLM, sample: Sample) -> torch.Tensor:
    return vlm.encode([load_image(sample.image)], [sample.prompt])["pixel_values"]


def attribute_sample(vlm: LoadedVLM, sample: Sample, parts_dir: Path, cfg: AttributionConfig,
                     means: torch.Tensor | None = None) -> Path:
    """Influences of every head on every target of one sample, saved to ``parts_dir`` (skipped if present)."""
    path = Path(parts_dir) / f"{sample.sample_id:06d}.npz"
    if path.is_file():
        return path
    res = influences(vlm, torch.tensor(sample.input_ids), sample_pixels(vlm, sample),
                     [t["position"] for t in sample.targets], scope=cfg.scope, ablation=cfg.ablation,
                     metric=cfg.metric, means=means, chunk_size=cfg.chunk_size, method=cfg.method)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, influence=res.influence.numpy().astype(np.float32), clean=res.clean.numpy())
    tmp.replace(path)  # atomic: a part on disk is always complete
    return path


@dataclass
class AttributionTables:
    """Assembled results. ``tokens``: dict of columns (one row per target token);
    ``influence``: float32 ``[n_tokens, n_layers, n_heads]`` (row i = token i)."""

    tokens: dict[str, list]
    influence: np.ndarray


TOKEN_COLUMNS = ("index", "sample_id", "image_id", "position", "token_id", "token", "word", "hallucinated")


def assemble(parts_dir: Path, samples: Sequence[Sample], n_layers: int, n_heads: int) -> AttributionTables:
    """Stack the per-sample parts in ``sample_id`` order (missing parts raise)."""
    cols: dict[str, list] = {c: [] for c in TOKEN_COLUMNS}
    blocks = []
    for s in sorted(samples, key=lambda s: s.sample_id):
        path = Path(parts_dir) / f"{s.sample_id:06d}.npz"
        if not path.is_file():
            raise FileNotFoundError(f"missing result part {path}; rerun the job to finish it.")
        inf = np.load(path)["influence"]
        if inf.shape != (len(s.targets), n_layers, n_heads):
            raise ValueError(f"{path} has shape {inf.shape}, expected {(len(s.targets), n_layers, n_heads)}.")
        blocks.append(inf)
        for t in s.targets:
            cols["index"].append(len(cols["index"]))
            cols["sample_id"].append(s.sample_id)
            cols["image_id"].append(s.image_id)
            for k in ("position", "token_id", "token", "word", "hallucinated"):
                cols[k].append(t[k])
    influence = np.concatenate(blocks) if blocks else np.zeros((0, n_layers, n_heads), np.float32)
    return AttributionTables(tokens=cols, influence=influence)


def head_scores(influence: np.ndarray, hallucinated: Sequence[bool]) -> list[dict]:
    """``S_{l,h} = mean_{Hal} I − mean_{NonHal} I`` per head, ranked by score (ties: layer, head).

    ``influence``: ``[n_tokens, n_layers, n_heads]``; ``hallucinated``: ``[n_tokens]`` bools.
    Returns rows ``{"layer", "head", "score", "mean_hal", "mean_nonhal"}``. A set with no tokens
    contributes a mean of 0 (so the score is the other set's mean, negated for NonHal).
    """
    hal = np.asarray(hallucinated, dtype=bool)
    inf = np.asarray(influence, dtype=np.float64)
    mean_hal = inf[hal].mean(0) if hal.any() else np.zeros(inf.shape[1:])
    mean_non = inf[~hal].mean(0) if (~hal).any() else np.zeros(inf.shape[1:])
    score = mean_hal - mean_non
    rows = [{"layer": l, "head": h, "score": float(score[l, h]), "mean_hal": float(mean_hal[l, h]),
             "mean_nonhal": float(mean_non[l, h])} for l in range(score.shape[0]) for h in range(score.shape[1])]
    return sorted(rows, key=lambda r: (-r["score"], r["layer"], r["head"]))


def to_csv(rows: Sequence[dict] | dict[str, list], columns: Sequence[str]) -> str:
    """CSV text with fixed float formatting (``repr``), so equal results give equal bytes."""
    if isinstance(rows, dict):
        rows = [dict(zip(rows, vals)) for vals in zip(*rows.values())]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([repr(r[c]) if isinstance(r[c], float) else r[c] for c in columns])
    return buf.getvalue()


def samples_jsonl(samples: Sequence[Sample]) -> str:
    keys = ("sample_id", "image_id", "image", "prompt", "caption", "input_ids")
    return "".join(json.dumps({k: asdict(s)[k] for k in keys}) + "\n" for s in samples)
