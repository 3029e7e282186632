"""Shared plumbing of the attention analyses: attention maps, attribution runs, head groups.

The analyses (bias, inheritance, drift) all read post-softmax attention weights of a
teacher-forced sequence (prompt + caption). The text tower is loaded on eager attention
(:func:`lens_halluc.models.load_vlm` does that by default), so ``output_attentions=True`` returns
one ``[B, H, T, T]`` tensor per layer; under ``sdpa`` transformers returns none and
:func:`attention_maps` raises instead of silently giving nothing.

Example
-------
>>> run = load_attribution_run("runs/attribution_heads")                     # doctest: +SKIP
>>> groups = head_groups(run.head_scores, k=run.k)                            # doctest: +SKIP
>>> att = attention_maps(vlm.model, run.samples[0]["input_ids"], pixels)      # doctest: +SKIP
>>> att.shape                                                                 # [L, H, T, T]  # doctest: +SKIP
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

Head = tuple[int, int]


class AttentionUnavailableError(RuntimeError):
    """The model returned no attention weights (text tower not on eager attention)."""


# ---------------------------------------------------------------------------- attention maps
@torch.no_grad()
def attention_maps(model: nn.Module, input_ids: Sequence[int] | torch.Tensor,
                   pixel_values: torch.Tensor | None = None) -> torch.Tensor:
    """Post-softmax attention of one teacher-forced sequence, every layer and head.

    Parameters
    ----------
    model : a VLM (``LlavaForConditionalGeneration``) or a causal LM, text tower on eager attention.
    input_ids : ``[T]`` token ids (image tokens already expanded, as in ``samples.jsonl``).
    pixel_values : ``[1, 3, H, W]`` for a VLM; None for a text-only LM.

    Returns
    -------
    float32 tensor ``[L, H, T, T]`` on the CPU; row ``q`` is query position ``q``'s distribution
    over keys (zero above the diagonal).

    Example
    -------
    >>> att = attention_maps(vlm.model, sample["input_ids"], pixels)     # doctest: +SKIP
    >>> att[3, 5, -1].sum()                                               # tensor(1.)  # doctest: +SKIP
    """
    device = next(model.parameters()).device
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=device).reshape(1, -1)
    kwargs = {}
    if pixel_values is not None:
        kwargs["pixel_values"] = pixel_values.to(device=device, dtype=next(model.parameters()).dtype)
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_attentions=True, use_cache=False, **kwargs)
    atts = getattr(out, "attentions", None)
    if not atts or any(a is None for a in atts):
        raise AttentionUnavailableError(
            "the model returned no attention weights; load it with the text tower on eager attention "
            "(load_vlm(..., attn_implementation='eager'), the default) — sdpa/flash attention return none.")
    # float32 on the CPU: the analyses sum and compare small probabilities
    return torch.stack([a[0] for a in atts]).float().cpu()


# ---------------------------------------------------------------------------- attribution runs
@dataclass
class AttributionRun:
    """The files of a ``python -m lens_halluc.attribute --out DIR`` run.

    ``samples``: rows of samples.jsonl (``sample_id, image_id, image, prompt, caption, input_ids``);
    ``tokens``: rows of tokens.csv (ints, bool ``hallucinated``); ``head_scores``: rows of
    head_scores.csv, ranked (``layer, head, score, mean_hal, mean_nonhal``); ``top_heads``: the
    hallucination heads as ``(layer, head)``; ``k``: their number; ``model``: the checkpoint the
    run used (None if not recorded).
    """

    path: Path
    samples: list[dict]
    tokens: list[dict]
    head_scores: list[dict]
    top_heads: list[Head]
    k: int
    model: str | None = None
    extra: dict = field(default_factory=dict)

    def sample(self, sample_id: int) -> dict:
        """The samples.jsonl row with this id."""
        for s in self.samples:
            if int(s["sample_id"]) == int(sample_id):
                return s
        raise KeyError(f"sample {sample_id} is not in {self.path / 'samples.jsonl'}.")


def _as_bool(v: str) -> bool:
    if v in ("True", "true", "1"):
        return True
    if v in ("False", "false", "0"):
        return False
    raise ValueError(f"cannot read {v!r} as a boolean in tokens.csv (expected True/False).")


def load_attribution_run(run_dir: str | Path) -> AttributionRun:
    """Read samples.jsonl, tokens.csv, head_scores.csv and top_heads.json of an attribution run.

    Example
    -------
    >>> run = load_attribution_run("/tmp/attr")                      # doctest: +SKIP
    >>> run.k, run.top_heads[:2], len(run.tokens)                    # doctest: +SKIP
    (5, [(0, 0), (0, 4)], 444)
    """
    d = Path(run_dir)
    needed = ["samples.jsonl", "tokens.csv", "head_scores.csv", "top_heads.json"]
    missing = [n for n in needed if not (d / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{d} lacks {', '.join(missing)}; point --attribution at the --out directory of "
            "`python -m lens_halluc.attribute` (or run `python analyses/attribution_heads.py`).")
    samples = [json.loads(line) for line in (d / "samples.jsonl").read_text().splitlines() if line.strip()]
    with open(d / "tokens.csv", newline="") as f:
        tokens = []
        for r in csv.DictReader(f):
            for key in ("index", "sample_id", "image_id", "position", "token_id"):
                r[key] = int(r[key])
            r["hallucinated"] = _as_bool(r["hallucinated"])
            tokens.append(r)
    with open(d / "head_scores.csv", newline="") as f:
        scores = [{"layer": int(r["layer"]), "head": int(r["head"]), "score": float(r["score"]),
                   "mean_hal": float(r["mean_hal"]), "mean_nonhal": float(r["mean_nonhal"])}
                  for r in csv.DictReader(f)]
    scores.sort(key=lambda r: (-r["score"], r["layer"], r["head"]))
    top = json.loads((d / "top_heads.json").read_text())
    heads = [(int(l), int(h)) for l, h in top["heads"]]
    extra = {k: v for k, v in top.items() if k not in ("heads", "k", "model")}
    return AttributionRun(path=d, samples=samples, tokens=tokens, head_scores=scores, top_heads=heads,
                          k=int(top.get("k", len(heads))), model=top.get("model"), extra=extra)


# ---------------------------------------------------------------------------- head groups
def head_groups(scores: Sequence[dict], k: int) -> dict[str, list[Head]]:
    """Hallucination heads (top-k score), the k lowest-scoring heads, and all heads.

    ``scores``: rows with ``layer, head, score`` (any order). Returns
    ``{"hallucination": [...k], "lowest": [...k], "all": [...]}`` of ``(layer, head)`` pairs; ties
    break by (layer, head) so the groups are deterministic.

    Example
    -------
    >>> head_groups([{"layer": 0, "head": 0, "score": 1.0}, {"layer": 0, "head": 1, "score": -1.0},
    ...              {"layer": 1, "head": 0, "score": 0.0}], k=1)
    {'hallucination': [(0, 0)], 'lowest': [(0, 1)], 'all': [(0, 0), (0, 1), (1, 0)]}
    """
    if k < 1 or k > len(scores):
        raise ValueError(f"k = {k} heads requested from {len(scores)} scored heads; choose 1 ≤ k ≤ {len(scores)}.")
    ranked = sorted(scores, key=lambda r: (-float(r["score"]), int(r["layer"]), int(r["head"])))
    pairs = [(int(r["layer"]), int(r["head"])) for r in ranked]
    return {"hallucination": pairs[:k], "lowest": pairs[-k:],
            "all": sorted(pairs)}


def group_of(head: Head, hallucination_heads: Sequence[Head]) -> str:
    """``"hallucination"`` if ``head`` is one of ``hallucination_heads``, else ``"other"``."""
    return "hallucination" if tuple(head) in {tuple(h) for h in hallucination_heads} else "other"


def mean(values: Sequence[float]) -> float:
    """Mean of a sequence (NaN when empty, so a missing group shows as such, not as 0)."""
    values = list(values)
    return float(sum(values) / len(values)) if values else float("nan")


# ---------------------------------------------------------------------------- shared CLI/runtime helpers
def sample_pixels(vlm, sample: dict) -> torch.Tensor:
    """``pixel_values [1, 3, H, W]`` of a samples.jsonl row, through ``vlm``'s own processor.

    Example
    -------
    >>> px = sample_pixels(vlm, run.samples[0])                      # doctest: +SKIP
    """
    from ..generation.runner import load_image

    return vlm.encode([load_image(sample["image"])], [sample["prompt"]])["pixel_values"]


def prompt_length(vlm, sample: dict) -> int:
    """Number of prompt ids (with expanded image tokens) at the start of ``sample["input_ids"]``.

    The caption is what follows. Raises if the sample's ids do not start with the prompt as
    ``vlm`` encodes it (a run made with another template or model).
    """
    from ..generation.runner import load_image

    enc = vlm.encode([load_image(sample["image"])], [sample["prompt"]])
    prompt_ids = enc["input_ids"][0][enc["attention_mask"][0].bool()].tolist()
    if list(sample["input_ids"][: len(prompt_ids)]) != prompt_ids:
        raise ValueError(
            f"sample {sample['sample_id']}: its input_ids do not start with the prompt as this model encodes it; "
            "use the model and --template of the attribution run.")
    return len(prompt_ids)


def select_samples(samples: Sequence[dict], n_samples: int | None) -> list[dict]:
    """The first ``n_samples`` samples in ``sample_id`` order (all when None)."""
    ordered = sorted(samples, key=lambda s: int(s["sample_id"]))
    return ordered if n_samples is None else ordered[: int(n_samples)]


def write_table(rows: Sequence[dict], path: str | Path, columns: Sequence[str] | None = None) -> Path:
    """Write rows as CSV (floats as ``repr``, so equal results give equal bytes)."""
    from ..attribution.pipeline import to_csv

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(columns or (rows[0].keys() if rows else []))
    path.write_text(to_csv(list(rows), columns))
    return path


def add_common_args(p) -> None:
    """Options shared by every analysis subcommand (``--attribution``, ``--out``, model, sampling)."""
    from ..cli.common import add_model_args

    p.add_argument("--attribution", type=Path, required=True,
                   help="--out directory of `python -m lens_halluc.attribute` (samples, tokens, head scores)")
    p.add_argument("--out", type=Path, required=True, help="directory for the CSV tables and figures")
    add_model_args(p)
    p.add_argument("--n-samples", type=int, default=None, help="use the first N captions (default: all)")
    p.add_argument("--k", type=int, default=None, help="number of hallucination heads (default: the run's k)")
    p.add_argument("--no-png", action="store_true", help="skip the static PNG figures")


def model_for(args, run: AttributionRun) -> str | None:
    """The VLM to analyse: ``--model`` if given, else the attribution run's model, else the organism."""
    if args.model is not None:
        return args.model
    if run.model is not None and Path(run.model).is_dir():
        return run.model
    return None


def is_organism(path) -> bool:
    """Whether a checkpoint path (None = default) is part of the shipped organism."""
    if path is None:
        return True
    from ..organism.shipped import SHIPPED_DIR

    try:
        Path(path).resolve().relative_to(SHIPPED_DIR.resolve())
        return True
    except ValueError:
        return False
