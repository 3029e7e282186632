"""Attention bias: do heads look at the image or at earlier text when an object word is predicted?

For every object token at position ``t`` (tokens.csv), the query row is ``q = t − 1`` (the
position whose output predicts the word's first sub-token). Per head:

* ``image_mass`` = attention of row ``q`` on IMAGE-role keys;
* ``text_mass``  = attention on TEXT-role keys ``≤ q`` (instruction, "ASSISTANT:", caption prefix);
* the SYSTEM prompt before the image is excluded from both, so the two need not sum to 1;
* ``text_share`` = ``text_mass / (text_mass + image_mass)``.

Roles come from :meth:`ModelSpec.token_roles` (the adapter's image and structure token ids), never offsets;
image-structure tokens (separators, row markers, begin/end of image) count as neither image nor text.

Example
-------
>>> res = lh.analysis.bias(lh.load_vlm(), "runs/attribution_heads", n_samples=40)   # doctest: +SKIP
>>> res.summary[["group", "hallucinated", "text_share"]]                            # doctest: +SKIP
>>> res.figure().show()                                                              # doctest: +SKIP
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import torch

from ..models.adapters import require_defined
from ..models.spec import TokenRole
from ._attention import as_attribution, attention_maps, mean, resolve_k, sample_inputs, select_samples
from ._groups import Head
from ._result import AnalysisResult, frame

COLUMNS = ("sample_id", "index", "position", "hallucinated", "layer", "head", "image_mass", "text_mass", "text_share")
SUMMARY_COLUMNS = ("group", "hallucinated", "n_tokens", "n_heads", "image_mass", "text_mass", "text_share")


@dataclass(frozen=True)
class BiasConfig:
    """``n_samples``: analyse the first N captions (None = all)."""

    n_samples: int | None = None


def role_masses(rows: torch.Tensor, roles: torch.Tensor, q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Image and text attention mass of query row ``q``.

    Parameters
    ----------
    rows : ``[..., T]`` attention of query ``q`` over the ``T`` keys (e.g. ``att[:, :, q]`` of an
        ``[L, H, T, T]`` map).
    roles : ``[T]`` :class:`TokenRole` values of the keys.
    q : the query position; keys after it are ignored (they are masked in a causal model anyway).

    Returns
    -------
    ``(image_mass, text_mass)``, each ``[...]``.

    Example
    -------
    >>> roles = torch.tensor([0, 1, 1, 2, 2])          # system, image, image, text, text
    >>> im, tx = role_masses(torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0]), roles, q=3)
    >>> round(float(im), 3), round(float(tx), 3)
    (0.5, 0.4)
    """
    roles = torch.as_tensor(roles)
    upto = torch.arange(roles.shape[-1]) <= q
    image = ((roles == int(TokenRole.IMAGE)) & upto).to(rows.dtype)
    text = ((roles == int(TokenRole.TEXT)) & upto).to(rows.dtype)
    return (rows * image).sum(-1), (rows * text).sum(-1)


@torch.no_grad()
def attention_bias(vlm, samples: Sequence[dict], tokens: Sequence[dict], heads: Sequence[Head] | None = None,
                   config: BiasConfig = BiasConfig()) -> list[dict]:
    """Image vs text attention mass of every head at every object token (one teacher-forced pass per caption).

    Parameters
    ----------
    vlm : :class:`~lens_halluc.models.loading.LoadedVLM` (text tower on eager attention).
    samples : samples.jsonl rows (``sample_id, image, prompt, input_ids``).
    tokens : tokens.csv rows (``index, sample_id, position, hallucinated``).
    heads : ``(layer, head)`` pairs to report (None = all heads).
    config : :class:`BiasConfig`.

    Returns
    -------
    Rows ``{sample_id, index, position, hallucinated, layer, head, image_mass, text_mass, text_share}``,
    one per (token, head), in (sample, token, layer, head) order.

    Example
    -------
    >>> rows = attention_bias(vlm, run.samples, run.tokens, heads=[(0, 0)])       # doctest: +SKIP
    >>> rows[0]["text_share"]                                                      # doctest: +SKIP
    """
    heads = vlm.spec.check_heads(heads) if heads is not None else [
        (l, h) for l in range(vlm.spec.n_layers) for h in range(vlm.spec.n_heads)]
    by_sample = defaultdict(list)
    for t in tokens:
        by_sample[int(t["sample_id"])].append(t)
    li = torch.tensor([l for l, _ in heads])
    hi = torch.tensor([h for _, h in heads])
    out: list[dict] = []
    for s in select_samples(samples, config.n_samples):
        targets = sorted(by_sample.get(int(s["sample_id"]), []), key=lambda t: int(t["index"]))
        if not targets:
            continue
        ids = torch.tensor(s["input_ids"])
        roles = vlm.spec.token_roles(ids)[0]
        att = attention_maps(vlm.model, ids, **sample_inputs(vlm, s))  # [L, H, T, T]
        for t in targets:
            pos = int(t["position"])
            if not 0 < pos < len(ids) or roles[pos] != int(TokenRole.TEXT):
                raise ValueError(f"token {t['index']} of sample {s['sample_id']} sits at position {pos}, "
                                 "which is not a caption position of that sample; tokens.csv and samples.jsonl "
                                 "come from different runs?")
            q = pos - 1  # the row whose output predicts the object token
            image, text = role_masses(att[li, hi, q], roles, q)  # [n_heads] each
            for j, (layer, head) in enumerate(heads):
                im, tx = float(image[j]), float(text[j])
                out.append({"sample_id": int(s["sample_id"]), "index": int(t["index"]), "position": pos,
                            "hallucinated": bool(t["hallucinated"]), "layer": layer, "head": head,
                            "image_mass": im, "text_mass": tx,
                            "text_share": tx / (tx + im) if tx + im > 0 else float("nan")})
    if not out:
        raise ValueError("no object tokens matched the samples; check that tokens.csv and samples.jsonl belong together.")
    return out


def summarize_bias(table: Sequence[dict], groups: dict[str, Sequence[Head]]) -> list[dict]:
    """Mean image/text mass and text share per head group × hallucinated/real.

    ``groups``: e.g. :func:`~lens_halluc.analysis.head_groups` output
    (``hallucination``, ``lowest``, ``all``). Means run over every (token, head) pair of the group.
    Returns rows ``{group, hallucinated, n_tokens, n_heads, image_mass, text_mass, text_share}``.

    Example
    -------
    >>> summarize_bias(table, {"hallucination": [(0, 0)], "all": all_heads})      # doctest: +SKIP
    """
    out = []
    for name, members in groups.items():
        members = {tuple(m) for m in members}
        for hal in (True, False):
            rows = [r for r in table if r["hallucinated"] == hal and (r["layer"], r["head"]) in members]
            out.append({"group": name, "hallucinated": hal,
                        "n_tokens": len({r["index"] for r in rows}), "n_heads": len({(r["layer"], r["head"]) for r in rows}),
                        "image_mass": mean(r["image_mass"] for r in rows), "text_mass": mean(r["text_mass"] for r in rows),
                        "text_share": mean(r["text_share"] for r in rows if r["text_share"] == r["text_share"])})
    return out


# ---------------------------------------------------------------------------- API
class BiasResult(AnalysisResult):
    """:func:`bias` result: ``table`` (:data:`COLUMNS`, one row per object token × head), ``summary``
    (:data:`SUMMARY_COLUMNS`, per head group × hallucinated/real); files ``bias.csv``,
    ``bias_summary.csv``, ``bias.html/.png``.

    Example
    -------
    >>> res.summary.query("group == 'hallucination'")                  # doctest: +SKIP
    """

    name = "bias"

    def figure(self, title: str | None = None):
        """Grouped bars of image/text mass per head group (:func:`lens_halluc.figures.bias.bias_figure`)."""
        from ..figures.bias import bias_figure

        return bias_figure(self.summary, title=title)


def bias(vlm, attribution, k: int | None = None, n_samples: int | None = None,
         heads: Sequence[Head] | None = None) -> BiasResult:
    """Image vs text attention of every head at the object tokens of an attribution run.

    Parameters
    ----------
    vlm : :class:`~lens_halluc.models.loading.LoadedVLM` (text tower on eager attention), the model
        the attribution ran on.
    attribution : a fitted :class:`lens_halluc.attribution.Attribution`, or its run directory
        (see :func:`~lens_halluc.analysis.as_attribution`): samples, object tokens, head scores.
    k : number of hallucination heads, and of lowest-scoring heads they are compared with (default
        20, the reference's: ``HA_K["bias"]``, ``analyze_attention_bias.py --top_k``; a model with
        fewer heads needs its own, e.g. the attribution's ``top_k_``). Groups: ``hallucination``
        (top k), ``lowest`` (k lowest) and ``all``.
    n_samples : analyse the first N captions (None = all).
    heads : heads in the table (None = all; the ``all``/``lowest`` groups need all).

    Returns
    -------
    :class:`BiasResult`.

    Example
    -------
    >>> res = bias(vlm, attr, n_samples=40)                                 # doctest: +SKIP
    >>> res.save("runs/bias")                                              # doctest: +SKIP
    """
    require_defined(vlm, "bias")  # NotDefinedForArchitecture with the family's reason
    run = as_attribution(attribution)
    k = resolve_k(run, "bias", k)
    rows = attention_bias(vlm, run.samples, run.tokens, heads=heads, config=BiasConfig(n_samples=n_samples))
    groups = run.groups(k)
    return BiasResult(frame(rows, COLUMNS), frame(summarize_bias(rows, groups), SUMMARY_COLUMNS),
                      params={"k": len(groups["hallucination"]), "n_samples": n_samples,
                              "hallucination_heads": groups["hallucination"]})
