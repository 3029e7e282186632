"""Shared plumbing of the attention analyses: attention maps, attribution runs, head groups.

The analyses (bias, inheritance, drift) all read post-softmax attention weights of a
teacher-forced sequence (prompt + caption). The text tower is loaded on eager attention
(:func:`lens_halluc.models.load_vlm` does that by default), so ``output_attentions=True`` returns
one ``[B, H, T, T]`` tensor per layer; under ``sdpa`` transformers returns none and
:func:`attention_maps` raises instead of silently giving nothing.

The analyses read an attribution through :func:`as_attribution`, which accepts a fitted
:class:`lens_halluc.attribution.Attribution`, an :class:`AttributionRun` or the ``--out`` directory
of ``python -m lens_halluc.attribute``.

Example
-------
>>> run = as_attribution("runs/attribution_heads")                            # doctest: +SKIP
>>> att = attention_maps(vlm.model, run.samples[0]["input_ids"], sample_pixels(vlm, run.samples[0]))  # doctest: +SKIP
>>> att.shape                                                                 # [L, H, T, T]  # doctest: +SKIP
"""
from __future__ import annotations

import csv
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ._groups import Head, head_groups


class AttentionUnavailableError(RuntimeError):
    """The model returned no attention weights (text tower not on eager attention)."""


# ---------------------------------------------------------------------------- attention maps
@torch.no_grad()
def attention_maps(model: nn.Module, input_ids: Sequence[int] | torch.Tensor,
                   pixel_values: torch.Tensor | None = None, **model_kwargs) -> torch.Tensor:
    """Post-softmax attention of one teacher-forced sequence, every layer and head.

    Parameters
    ----------
    model : a VLM (``LlavaForConditionalGeneration``) or a causal LM, text tower on eager attention.
    input_ids : ``[T]`` token ids (image tokens already expanded, as in ``samples.jsonl``).
    pixel_values : the image's ``pixel_values`` for a VLM (``[1, 3, H, W]`` for LLaVA-1.5; the
        family's shape otherwise); None for a text-only LM.
    model_kwargs : every other forward input of the sequence (``image_sizes``, ``image_grid_thw``,
        ``token_type_ids`` ... per-token ones covering all ``T`` positions): :func:`sample_inputs`.

    Returns
    -------
    float32 tensor ``[L, H, T, T]`` on the CPU; row ``q`` is query position ``q``'s distribution
    over keys (zero above the diagonal).

    Example
    -------
    >>> att = attention_maps(vlm.model, sample["input_ids"], **sample_inputs(vlm, sample))   # doctest: +SKIP
    >>> att[3, 5, -1].sum()                                               # tensor(1.)  # doctest: +SKIP
    """
    device = next(model.parameters()).device
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=device).reshape(1, -1)
    kwargs = {}
    if pixel_values is not None:
        kwargs["pixel_values"] = pixel_values.to(device=device, dtype=next(model.parameters()).dtype)
    for key, value in model_kwargs.items():
        if value is None:
            continue
        kwargs[key] = value.to(device) if isinstance(value, torch.Tensor) else value
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_attentions=True, use_cache=False, **kwargs)
    atts = getattr(out, "attentions", None)
    if not atts or any(a is None for a in atts):
        raise AttentionUnavailableError(
            "the model returned no attention weights; load it with the text tower on eager attention "
            "(load_vlm(..., attn_implementation='eager'), the default) — sdpa/flash attention return none.")
    if len({tuple(a.shape[-2:]) for a in atts}) > 1:
        from ..models.adapters import NotDefinedForArchitecture

        raise NotDefinedForArchitecture(
            "the model has cross-attention layers (Mllama) whose maps are over the vision tokens, not the text "
            "positions: [L, H, T, T] attention maps of every layer are not defined; analyses of whole maps "
            "(drift, inheritance) are not available for it.")
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

    def heads(self, k: int | None = None) -> list[Head]:
        """The hallucination heads: the run's ``top_heads`` (``k`` None) or the top ``k`` by score."""
        return list(self.top_heads) if k is None else head_groups(self.head_scores, int(k))["hallucination"]

    def groups(self, k: int | None = None) -> dict[str, list[Head]]:
        """:func:`~lens_halluc.analysis.head_groups` of the scored heads (``k`` default: the run's)."""
        return head_groups(self.head_scores, int(k or self.k))

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


def _records(frame) -> list[dict]:
    from ..data.tables import table_rows

    return table_rows(frame)


def _from_fitted(attr) -> AttributionRun:
    """An :class:`AttributionRun` view of a fitted :class:`lens_halluc.attribution.Attribution`."""
    samples = []
    for s in attr.samples_:
        d = dataclasses.asdict(s) if dataclasses.is_dataclass(s) else dict(s)
        samples.append({k: d[k] for k in ("sample_id", "image_id", "image", "prompt", "caption", "input_ids") if k in d})
    tokens = _records(attr.tokens_)
    for r in tokens:
        for key in ("index", "sample_id", "image_id", "position", "token_id"):
            if key in r:
                r[key] = int(r[key])
        r["hallucinated"] = r["hallucinated"] if isinstance(r["hallucinated"], bool) else _as_bool(str(r["hallucinated"]))
    scores = [{"layer": int(r["layer"]), "head": int(r["head"]), "score": float(r["score"]),
               "mean_hal": float(r.get("mean_hal", float("nan"))), "mean_nonhal": float(r.get("mean_nonhal", float("nan")))}
              for r in _records(attr.scores_)]
    scores.sort(key=lambda r: (-r["score"], r["layer"], r["head"]))
    heads = [(int(l), int(h)) for l, h in attr.top_heads()]  # the attribution's own top_k_
    k = getattr(attr, "top_k_", None)
    model = getattr(attr, "model_", None)
    return AttributionRun(path=Path(getattr(attr, "path_", None) or "."), samples=samples, tokens=tokens,
                          head_scores=scores, top_heads=heads, k=int(k or len(heads)),
                          model=str(model) if model is not None else None)


def as_attribution(attribution) -> AttributionRun:
    """The one adapter from what analyses accept as ``attribution`` to an :class:`AttributionRun`.

    ``attribution``: a fitted :class:`lens_halluc.attribution.Attribution` (``samples_``,
    ``tokens_``, ``scores_``, ``top_heads(k)``), an :class:`AttributionRun`, or the ``--out``
    directory of ``python -m lens_halluc.attribute`` (read by ``Attribution.load``; a run of an
    older version without its manifest by :func:`load_attribution_run`).

    Example
    -------
    >>> run = as_attribution("runs/attribution_heads")                  # doctest: +SKIP
    >>> run.heads(3)                                                     # doctest: +SKIP
    [(0, 0), (0, 4), (1, 7)]
    """
    if isinstance(attribution, AttributionRun):
        return attribution
    if isinstance(attribution, (str, Path)):
        from ..attribution import Attribution

        try:
            fitted = Attribution.load(attribution)
        except FileNotFoundError:  # a run of an older version (no manifest/influences): its tables suffice
            return load_attribution_run(attribution)
        run = _from_fitted(fitted)
        run.path = Path(attribution)
        return run
    if all(hasattr(attribution, a) for a in ("samples_", "tokens_", "scores_", "top_heads")):
        return _from_fitted(attribution)
    raise TypeError(f"attribution must be a fitted Attribution, an AttributionRun or a run directory, "
                    f"got {type(attribution).__name__}.")


def resolve_k(run: AttributionRun, consumer: str, k: int | None) -> int:
    """``k``, or the reference's k for ``consumer`` (:data:`lens_halluc.models.heads.HA_K`), checked
    against the heads the attribution scored (a clear ``ValueError`` when it does not fit).

    Example
    -------
    >>> resolve_k(run, "drift", None)                                 # doctest: +SKIP
    3
    """
    from ..models.heads import ha_k

    value = ha_k(consumer, k)
    n = len(run.head_scores)
    if isinstance(value, bool) or not 1 <= value <= n:
        what = (f"the reference's k for {consumer} (HA_K[{consumer!r}] = {value}, chosen for LLaVA-1.5-7B's "
                f"1024 heads)" if k is None else f"k = {value}")
        raise ValueError(f"{what} does not fit the {n} heads scored in the attribution; pass k between 1 and {n} "
                         f"(e.g. the attribution's own k, {run.k}).")
    return value


def hallucination_heads(attribution, k: int | None = None) -> list[Head]:
    """The hallucination heads of an attribution (see :func:`as_attribution`): its top heads, or the top ``k``.

    Example
    -------
    >>> hallucination_heads("runs/attribution_heads", k=3)              # doctest: +SKIP
    """
    return as_attribution(attribution).heads(k)


# ---------------------------------------------------------------------------- small helpers
def mean(values: Sequence[float]) -> float:
    """Mean of a sequence (NaN when empty, so a missing group shows as such, not as 0)."""
    values = list(values)
    return float(sum(values) / len(values)) if values else float("nan")


# ---------------------------------------------------------------------------- samples
def _image(sample: dict):
    # samples.jsonl holds a path; a fitted Attribution's Sample may hold the image itself
    img = sample["image"]
    if isinstance(img, (str, Path)):
        from ..generation.runner import load_image

        return load_image(img)
    return img


def sample_inputs(vlm, sample: dict) -> dict:
    """The forward inputs, besides ``input_ids``/``attention_mask``, of a samples.jsonl row's whole sequence.

    Through ``vlm``'s own processor: ``pixel_values`` and whatever else the family takes with the
    image (``image_sizes``, ``image_grid_thw``, ``token_type_ids``, ``cross_attention_mask`` ...),
    per-token ones extended over the caption (:meth:`LoadedVLM.sequence_inputs`). Raises if the
    row's ids do not start with the prompt as ``vlm`` encodes it.

    Example
    -------
    >>> att = attention_maps(vlm.model, s["input_ids"], **sample_inputs(vlm, s))   # doctest: +SKIP
    """
    inputs = vlm.sequence_inputs(_image(sample), sample["prompt"], sample["input_ids"])
    inputs.pop("input_ids")
    inputs.pop("attention_mask", None)
    return inputs


def sample_pixels(vlm, sample: dict) -> torch.Tensor:
    """``pixel_values`` of a samples.jsonl row, through ``vlm``'s own processor (the other image inputs:
    :func:`sample_inputs`, which every analysis here uses).

    Example
    -------
    >>> px = sample_pixels(vlm, run.samples[0])                      # doctest: +SKIP
    """
    return vlm.encode([_image(sample)], [sample["prompt"]])["pixel_values"]


def prompt_length(vlm, sample: dict) -> int:
    """Number of prompt ids (with expanded image tokens) at the start of ``sample["input_ids"]``.

    The caption is what follows. Raises if the sample's ids do not start with the prompt as
    ``vlm`` encodes it (a run made with another template or model).
    """
    enc = vlm.encode([_image(sample)], [sample["prompt"]])
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
