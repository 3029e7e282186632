"""Inheritance: is a head's text-to-text attention the one its base language model already had?

The VLM runs on image + prompt + caption; the base LM (before visual instruction tuning: the
organism's ``base`` stage, Vicuna for LLaVA-1.5) runs on the same prompt with the image token
replaced by the template's text placeholder (``template.format_text_only``) + the same caption
ids. With ``N`` = number of text tokens after the image in the VLM sequence, the last ``N``
token ids of both sequences must agree (checked; :class:`AlignmentError` otherwise). Per head,
the statistic is the cosine similarity of the flattened last ``N × N`` attention blocks.

Example
-------
>>> table = inheritance(load_vlm(), load_causal_lm(organism_path("base")), run.samples)   # doctest: +SKIP
>>> summarize_inheritance(table)                                                          # doctest: +SKIP
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import torch

from ..models.spec import TokenRole
from .attention import Head, attention_maps, group_of, mean, prompt_length, sample_pixels, select_samples

COLUMNS = ("sample_id", "layer", "head", "n_text", "cosine", "group")
SUMMARY_COLUMNS = ("group", "n_heads", "n_samples", "mean_cosine", "min_head_cosine", "max_head_cosine")


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

    Prompt: ``vlm.template.format_text_only(sample["prompt"])`` tokenised by the base LM's
    tokenizer; then the caption ids of the sample. Raises :class:`AlignmentError` if the last
    ``N`` ids differ from the VLM sequence's (e.g. the placeholder merges with the next word).

    Example
    -------
    >>> ids, n = text_only_ids(vlm, base, run.samples[0])          # doctest: +SKIP
    """
    vlm_ids = list(sample["input_ids"])
    caption = vlm_ids[prompt_length(vlm, sample):]
    prompt_ids = base_lm.tokenizer(vlm.template.format_text_only(sample["prompt"]))["input_ids"]
    base_ids = list(prompt_ids) + caption
    roles = vlm.spec.token_roles(torch.tensor(vlm_ids))[0]
    last_image = int(torch.nonzero(roles == int(TokenRole.IMAGE)).max())
    n = len(vlm_ids) - last_image - 1
    if n < 1 or len(base_ids) < n or base_ids[-n:] != vlm_ids[-n:]:
        tok = base_lm.tokenizer
        raise AlignmentError(
            f"sample {sample['sample_id']}: the last {n} token ids (text after the image) differ between the VLM "
            f"sequence {tok.convert_ids_to_tokens(vlm_ids[-n:])} and the base LM sequence "
            f"{tok.convert_ids_to_tokens(base_ids[-n:])}. The text-only prompt must tokenise the text after the "
            "image exactly as the VLM does: check the template's image_placeholder and that both models share a tokenizer.")
    return base_ids, n


@torch.no_grad()
def inheritance(vlm, base_lm, samples: Sequence[dict], heads: Sequence[Head] | None = None,
                hallucination_heads: Sequence[Head] = (), config: InheritanceConfig = InheritanceConfig()) -> list[dict]:
    """Cosine similarity of the VLM's and the base LM's text-to-text attention, per sample and head.

    Parameters
    ----------
    vlm : :class:`~lens_halluc.models.loading.LoadedVLM`.
    base_lm : :class:`~lens_halluc.models.loading.LoadedLM` with the VLM's decoder shape.
    samples : samples.jsonl rows.
    heads : ``(layer, head)`` pairs (None = all).
    hallucination_heads : heads labelled ``"hallucination"`` in the ``group`` column (others ``"other"``).

    Returns
    -------
    Rows ``{sample_id, layer, head, n_text, cosine, group}``.

    Example
    -------
    >>> rows = inheritance(vlm, base, run.samples[:10], hallucination_heads=run.top_heads)   # doctest: +SKIP
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
        a_vlm = attention_maps(vlm.model, s["input_ids"], sample_pixels(vlm, s))[li, hi, -n:, -n:]  # [K, N, N]
        a_base = attention_maps(base_lm.model, base_ids)[li, hi, -n:, -n:]
        cos = block_cosine(a_vlm[None], a_base[None])[0]  # [K]
        for j, (layer, head) in enumerate(heads):
            out.append({"sample_id": int(s["sample_id"]), "layer": layer, "head": head, "n_text": n,
                        "cosine": float(cos[j]), "group": group_of((layer, head), hallucination_heads)})
    return out


def per_head_cosine(table: Sequence[dict]) -> list[dict]:
    """Mean cosine over samples per head: rows ``{layer, head, group, cosine}`` (for heatmaps)."""
    acc = defaultdict(list)
    grp = {}
    for r in table:
        acc[(r["layer"], r["head"])].append(r["cosine"])
        grp[(r["layer"], r["head"])] = r["group"]
    return [{"layer": l, "head": h, "group": grp[(l, h)], "cosine": mean(v)} for (l, h), v in sorted(acc.items())]


def summarize_inheritance(table: Sequence[dict]) -> list[dict]:
    """Hallucination heads vs other heads: mean cosine (over heads of per-head sample means).

    Returns rows ``{group, n_heads, n_samples, mean_cosine, min_head_cosine, max_head_cosine}``.

    Example
    -------
    >>> summarize_inheritance(table)[0]["mean_cosine"]             # doctest: +SKIP
    """
    heads = per_head_cosine(table)
    n_samples = len({r["sample_id"] for r in table})
    out = []
    for g in ("hallucination", "other"):
        vals = [r["cosine"] for r in heads if r["group"] == g]
        out.append({"group": g, "n_heads": len(vals), "n_samples": n_samples, "mean_cosine": mean(vals),
                    "min_head_cosine": min(vals) if vals else float("nan"),
                    "max_head_cosine": max(vals) if vals else float("nan")})
    return out


# ---------------------------------------------------------------------------- CLI
def add_cli(subparsers) -> None:
    """Register ``python -m lens_halluc.analysis inheritance``."""
    from .attention import add_common_args

    p = subparsers.add_parser("inheritance", help="text-to-text attention: VLM vs its base language model",
                              description=__doc__.split("\n\n")[0])
    add_common_args(p)
    p.add_argument("--base", default=None,
                   help="base language model (default: the organism's base LM; for LLaVA-1.5 pass lmsys/vicuna-7b-v1.5)")
    p.set_defaults(func=run_cli)


def run_cli(args) -> dict:
    """Compute, write ``inheritance.csv``, ``inheritance_heads.csv``, ``inheritance_summary.csv`` and the figure."""
    from ..cli.common import load_model_from_args
    from ..figures.inheritance import inheritance_figure
    from ..figures.io import save_figure
    from ..models.loading import load_causal_lm
    from ..organism.shipped import organism_path
    from .attention import head_groups, is_organism, load_attribution_run, model_for, write_table

    run = load_attribution_run(args.attribution)
    args.model = model_for(args, run)
    base = args.base
    if base is None:
        if not is_organism(args.model):
            raise ValueError("--base is required for a model other than the organism (LLaVA-1.5: lmsys/vicuna-7b-v1.5).")
        base = organism_path("base")
    vlm = load_model_from_args(args)
    base_lm = load_causal_lm(base, device=args.device, dtype=args.dtype, template=args.template,
                             trust_remote_code=args.trust_remote_code)
    hal = head_groups(run.head_scores, args.k or run.k)["hallucination"]
    table = inheritance(vlm, base_lm, run.samples, hallucination_heads=hal,
                        config=InheritanceConfig(n_samples=args.n_samples))
    heads, summary = per_head_cosine(table), summarize_inheritance(table)
    write_table(table, args.out / "inheritance.csv", COLUMNS)
    write_table(heads, args.out / "inheritance_heads.csv", ("layer", "head", "group", "cosine"))
    write_table(summary, args.out / "inheritance_summary.csv", SUMMARY_COLUMNS)
    save_figure(inheritance_figure(heads, n_layers=vlm.spec.n_layers, n_heads=vlm.spec.n_heads),
                args.out / "inheritance", png=not args.no_png)
    for r in summary:
        print(f"{r['group']:>13}: mean cosine {r['mean_cosine']:.3f} over {r['n_heads']} heads, {r['n_samples']} samples")
    return {"summary": summary}
