"""Inheritance: is a head's text-to-text attention the one its base language model already had?

The VLM runs on image + prompt + caption; the base LM (before visual instruction tuning: the
organism's ``base`` stage, Vicuna for LLaVA-1.5) runs on the same prompt with the image token
replaced by the template's text placeholder (``template.format_text_only``) + the same caption
ids. With ``N`` = number of text tokens after the image in the VLM sequence, the last ``N``
token ids of both sequences must agree (checked; :class:`AlignmentError` otherwise). Per head,
the statistic is the cosine similarity of the flattened last ``N × N`` attention blocks.

Groups (:data:`FLAVOURS_INHERITANCE`): the top ``k`` heads (``k = 1`` in the reference,
``HA_K["inheritance"]``) against the ``k`` lowest-scoring heads (``against="lowest"``, the
reference: ``analyze_attention_inheritance.py`` compares ``hal_heads[:1]`` with
``non_hal_heads[:1]``) or against every other head (``against="others"``, the ``corrected``
flavour). The summary's mean is over the heads of a group of their per-sample means; the
reference averages over the group's heads per sample, then over samples: the same number when
every sample has every head.

Example
-------
>>> from lens_halluc.models.default import organism_path
>>> res = lh.analysis.inheritance(lh.load_vlm(), organism_path("base"), "runs/attribution_heads")  # doctest: +SKIP
>>> res.summary                                                                                    # doctest: +SKIP
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import torch

from ..models.adapters import require_defined
from ..models.prompts import render_text_only
from ..models.spec import TokenRole
from ..data.flavour import check_flavour, resolve
from ._attention import as_attribution, attention_maps, mean, prompt_length, resolve_k, sample_inputs, select_samples
from ._groups import HALLUCINATION, LOWEST, OTHER, Head, comparison_groups, group_of
from ._result import AnalysisResult, frame

COLUMNS = ("sample_id", "layer", "head", "n_text", "cosine", "group")
SUMMARY_COLUMNS = ("group", "n_heads", "n_samples", "mean_cosine", "min_head_cosine", "max_head_cosine")

#: ``reference``: the hallucination heads vs the k lowest-scoring heads (HA's Fig. 4);
#: ``corrected``: vs every other head. ``k`` is the reference's (1) in both unless given.
FLAVOURS_INHERITANCE = {"reference": {"against": "lowest"}, "corrected": {"against": "others"}}


class AlignmentError(ValueError):
    """The base LM's sequence does not end with the VLM's text tokens."""


@dataclass(frozen=True)
class InheritanceConfig:
    """``n_samples``: first N captions (None = all)."""

    n_samples: int | None = None


def block_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity per head of two stacks of attention blocks.

    ``a``, ``b``: ``[L, H, N, N]`` (any trailing shape) → ``[L, H]``: cosine of the flattened
    trailing blocks. An all-zero block gives NaN (undefined), not 0.

    Example
    -------
    >>> a = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]])          # [1, 1, 2, 2]
    >>> round(float(block_cosine(a, a)[0, 0]), 6)
    1.0
    """
    fa, fb = a.flatten(2).double(), b.flatten(2).double()
    num = (fa * fb).sum(-1)
    den = fa.norm(dim=-1) * fb.norm(dim=-1)
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.full_like(num, float("nan")))


def text_only_ids(vlm, base_lm, sample: dict) -> tuple[list[int], int]:
    """The base LM's input ids for ``sample`` and ``N``, the number of text tokens after the image.

    Prompt: ``vlm.template.format_text_only(sample["prompt"])`` (for the ``"chat"`` template: the
    base LM tokenizer's chat template on a text-only turn) tokenised by the base LM's tokenizer;
    then the caption ids of the sample. Raises :class:`AlignmentError` if the last
    ``N`` ids differ from the VLM sequence's (e.g. the placeholder merges with the next word). With the
    ``"chat"`` template, text the chat template writes around the image only (Gemma 3's ``"\n\n"``) is
    left out: ``N`` is then the common tail of both sequences, at least the caption and the token before it.

    Example
    -------
    >>> ids, n = text_only_ids(vlm, base, run.samples[0])          # doctest: +SKIP
    """
    vlm_ids = list(sample["input_ids"])
    caption = vlm_ids[prompt_length(vlm, sample):]
    prompt_ids = base_lm.tokenizer(render_text_only(vlm.template, sample["prompt"], base_lm.tokenizer,
                                                   vlm.spec.adapter))["input_ids"]
    base_ids = list(prompt_ids) + caption
    roles = vlm.spec.token_roles(torch.tensor(vlm_ids))[0]
    # the image ends with its last image or structure token (an end-of-image marker is not text)
    in_image = (roles == int(TokenRole.IMAGE)) | (roles == int(TokenRole.IMAGE_STRUCTURE))
    last_image = int(torch.nonzero(in_image).max())
    n = len(vlm_ids) - last_image - 1
    if vlm.template.chat and n > 0:
        # A chat template may write text of its own around the image (Gemma 3's "\n\n" after <end_of_image>)
        # that a text-only turn does not have: the compared text is then the common tail of both sequences
        # (the user prompt and the caption), which must still cover the whole caption and the token before it.
        common = 0
        while common < min(n, len(base_ids)) and base_ids[-1 - common] == vlm_ids[-1 - common]:
            common += 1
        if common >= len(caption) + 1:
            n = common
    if n < 1 or len(base_ids) < n or base_ids[-n:] != vlm_ids[-n:]:
        tok = base_lm.tokenizer
        raise AlignmentError(
            f"sample {sample['sample_id']}: the last {n} token ids (text after the image) differ between the VLM "
            f"sequence {tok.convert_ids_to_tokens(vlm_ids[-n:])} and the base LM sequence "
            f"{tok.convert_ids_to_tokens(base_ids[-n:])}. The text-only prompt must tokenise the text after the "
            "image exactly as the VLM does: check the template's image_placeholder and that both models share a tokenizer.")
    return base_ids, n


@torch.no_grad()
def inheritance_rows(vlm, base_lm, samples: Sequence[dict], heads: Sequence[Head] | None = None,
                hallucination_heads: Sequence[Head] = (), config: InheritanceConfig = InheritanceConfig(),
                lowest_heads: Sequence[Head] = ()) -> list[dict]:
    """Cosine similarity of the VLM's and the base LM's text-to-text attention, per sample and head.

    Parameters
    ----------
    vlm : :class:`~lens_halluc.models.loading.LoadedVLM`.
    base_lm : :class:`~lens_halluc.models.loading.LoadedLM` with the VLM's decoder shape.
    samples : samples.jsonl rows.
    heads : ``(layer, head)`` pairs (None = all).
    hallucination_heads : heads labelled ``"hallucination"`` in the ``group`` column; ``lowest_heads``
        (not hallucination heads) ``"lowest"``; the rest ``"other"``.

    Returns
    -------
    Rows ``{sample_id, layer, head, n_text, cosine, group}``.

    Example
    -------
    >>> rows = inheritance_rows(vlm, base, run.samples[:10], hallucination_heads=run.top_heads)   # doctest: +SKIP
    """
    if (base_lm.spec.n_layers, base_lm.spec.n_heads) != (vlm.spec.n_layers, vlm.spec.n_heads):
        raise ValueError(f"the base LM has {base_lm.spec.n_layers}×{base_lm.spec.n_heads} heads, the VLM "
                         f"{vlm.spec.n_layers}×{vlm.spec.n_heads}: pass the VLM's own base language model.")
    heads = vlm.spec.check_heads(heads) if heads is not None else [
        (l, h) for l in range(vlm.spec.n_layers) for h in range(vlm.spec.n_heads)]
    li = torch.tensor([l for l, _ in heads])
    hi = torch.tensor([h for _, h in heads])
    out = []
    for s in select_samples(samples, config.n_samples):
        base_ids, n = text_only_ids(vlm, base_lm, s)
        a_vlm = attention_maps(vlm.model, s["input_ids"], **sample_inputs(vlm, s))[li, hi, -n:, -n:]  # [K, N, N]
        a_base = attention_maps(base_lm.model, base_ids)[li, hi, -n:, -n:]
        cos = block_cosine(a_vlm[None], a_base[None])[0]  # [K]
        for j, (layer, head) in enumerate(heads):
            out.append({"sample_id": int(s["sample_id"]), "layer": layer, "head": head, "n_text": n,
                        "cosine": float(cos[j]), "group": group_of((layer, head), hallucination_heads, lowest_heads)})
    return out


def per_head_cosine(table: Sequence[dict]) -> list[dict]:
    """Mean cosine over samples per head: rows ``{layer, head, group, cosine}`` (for heatmaps)."""
    acc = defaultdict(list)
    grp = {}
    for r in table:
        acc[(r["layer"], r["head"])].append(r["cosine"])
        grp[(r["layer"], r["head"])] = r["group"]
    return [{"layer": l, "head": h, "group": grp[(l, h)], "cosine": mean(v)} for (l, h), v in sorted(acc.items())]


def summarize_inheritance(table: Sequence[dict], groups: dict[str, Sequence[Head]] | None = None) -> list[dict]:
    """Mean cosine per head group (over the group's heads of their per-sample means).

    ``groups``: ``{name: heads}`` (e.g. :func:`~lens_halluc.analysis.comparison_groups`; a head may
    be in two); None: the table's ``group`` column, ``hallucination`` and ``other``.
    Returns rows ``{group, n_heads, n_samples, mean_cosine, min_head_cosine, max_head_cosine}``.

    Example
    -------
    >>> summarize_inheritance(table)[0]["mean_cosine"]             # doctest: +SKIP
    """
    heads = per_head_cosine(table)
    n_samples = len({r["sample_id"] for r in table})
    out = []
    if groups is None:
        groups = {g: [(r["layer"], r["head"]) for r in heads if r["group"] == g] for g in (HALLUCINATION, OTHER)}
    for g, members in groups.items():
        members = {tuple(m) for m in members}
        vals = [r["cosine"] for r in heads if (r["layer"], r["head"]) in members]
        out.append({"group": g, "n_heads": len(vals), "n_samples": n_samples, "mean_cosine": mean(vals),
                    "min_head_cosine": min(vals) if vals else float("nan"),
                    "max_head_cosine": max(vals) if vals else float("nan")})
    return out


HEAD_COLUMNS = ("layer", "head", "group", "cosine")


# ---------------------------------------------------------------------------- API
class InheritanceResult(AnalysisResult):
    """:func:`inheritance` result: ``table`` (:data:`COLUMNS`, sample × head), ``heads``
    (:data:`HEAD_COLUMNS`, mean cosine per head), ``summary`` (:data:`SUMMARY_COLUMNS`, hallucination
    heads vs the comparison group: ``lowest`` or ``other``); files ``inheritance.csv``, ``inheritance_heads.csv``, ``inheritance_summary.csv``,
    ``inheritance.html/.png``.

    Example
    -------
    >>> res.heads.sort_values("cosine").tail(3)                          # doctest: +SKIP
    """

    name = "inheritance"

    def __init__(self, table, summary, heads, params=None):
        super().__init__(table, summary, params or {})
        self.heads = heads

    def tables(self):
        return {"inheritance": self.table, "inheritance_heads": self.heads, "inheritance_summary": self.summary}

    def figure(self, title: str | None = None):
        """Heatmap of cosine per head + box per group (:func:`lens_halluc.figures.inheritance.inheritance_figure`)."""
        from ..figures.inheritance import inheritance_figure

        return inheritance_figure(self.heads, n_layers=self.params["n_layers"], n_heads=self.params["n_heads"],
                                  title=title)


def inheritance(vlm, base_lm, attribution, k: int | None = None, n_samples: int | None = None,
                heads: Sequence[Head] | None = None, device: str | None = None, dtype=None,
                against: str | None = None, flavour: str = "reference") -> InheritanceResult:
    """Cosine of the VLM's and its base LM's text-to-text attention, per head, on an attribution's captions.

    Parameters
    ----------
    vlm : :class:`~lens_halluc.models.loading.LoadedVLM`.
    base_lm : :class:`~lens_halluc.models.loading.LoadedLM` with the VLM's decoder shape, or its path
        (loaded with ``device``/``dtype``, default the VLM's device; the organism's is
        ``lens_halluc.models.default.organism_path("base")``; for LLaVA-1.5 ``lmsys/vicuna-7b-v1.5``).
    attribution : a fitted :class:`lens_halluc.attribution.Attribution` or its run directory.
    k : hallucination heads, and lowest-scoring heads they are compared with (default 1, the
        reference's: ``HA_K["inheritance"]``, ``analyze_attention_inheritance.py --top_k``).
        n_samples : first N captions (None = all). heads : heads in the table (None = all).
    against : ``"lowest"`` (the k lowest-scoring heads; ``reference`` flavour) or ``"others"``
        (every other head; ``corrected``). Default: the flavour's (:data:`FLAVOURS_INHERITANCE`).
    flavour : ``"reference"`` (default) or ``"corrected"``.

    Returns
    -------
    :class:`InheritanceResult`.

    Example
    -------
    >>> res = inheritance(vlm, organism_path("base"), attr, n_samples=20)     # doctest: +SKIP
    >>> res.summary.set_index("group")["mean_cosine"]                          # doctest: +SKIP
    """
    require_defined(vlm, "inheritance")  # NotDefinedForArchitecture with the family's reason
    flavour = check_flavour(flavour, "inheritance")
    against = resolve(FLAVOURS_INHERITANCE, flavour, "against", against)
    run = as_attribution(attribution)
    k = resolve_k(run, "inheritance", k)
    groups = comparison_groups(run.head_scores, k, against)  # checked before a base LM is loaded
    if not hasattr(base_lm, "spec"):
        from ..models.loading import load_causal_lm

        base_lm = load_causal_lm(base_lm, device=device or vlm.device, dtype=dtype, template=vlm.template)
    hal = groups[HALLUCINATION]
    rows = inheritance_rows(vlm, base_lm, run.samples, heads=heads, hallucination_heads=hal,
                            config=InheritanceConfig(n_samples=n_samples), lowest_heads=groups.get(LOWEST, ()))
    return InheritanceResult(frame(rows, COLUMNS), frame(summarize_inheritance(rows, groups), SUMMARY_COLUMNS),
                             frame(per_head_cosine(rows), HEAD_COLUMNS),
                             params={"k": k, "against": against, "flavour": flavour, "n_samples": n_samples,
                                     "hallucination_heads": hal, "comparison_heads": groups.get(LOWEST, groups.get(OTHER)),
                                     "n_layers": vlm.spec.n_layers, "n_heads": vlm.spec.n_heads})
