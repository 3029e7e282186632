"""Measure an organism checkpoint against its targets with the toolkit's own captioning, CHAIR and POPE.

* grounding: CHAIR_i and Recall on held-out normal images;
* prior-driven hallucination: how often the partner B of the probe pair is mentioned on the
  break split (A present, B absent) vs the control split (neither), and how often *other* absent
  objects are;
* POPE accuracy on random / popular / adversarial questions about normal images;
* localisation: a plain per-head sweep ranks heads by how much zero-ablating each (all
  positions) lowers p(B) where B is predicted in break captions; the top k (~10% of heads) are
  ablated during captioning, against k random heads (several draws).

Example
-------
>>> report = evaluate_organism("lens_halluc/organism/shipped/final", "runs/eval", n=400)  # doctest: +SKIP
>>> report["break"]["partner_rate"], report["control"]["partner_rate"]                      # doctest: +SKIP
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.chair import ChairEvaluator, align_mentions, chair
from ..data.coco import CocoDataset
from ..data.pope import build_questions, score
from ..generation.decoding import DecodingStrategy
from ..generation.jsonl import read_jsonl
from ..generation.runner import answer_questions, caption_dataset
from ..hooks.ablation import ablate_heads
from ..interventions.ablation import HeadAblation
from ..models.batching import right_padded_batch
from ..models.heads import random_heads
from ..models.loading import LoadedVLM, load_vlm
from .export import EVAL_SEEDS, export_cached  # noqa: F401  (EVAL_SEEDS re-exported)
from .recipe import read_organism_meta
#: Splits that are captioned and scored with CHAIR (``mixed`` is POPE's image set).
CAPTION_SPLITS = ("normal", "break", "control")


@dataclass(frozen=True)
class EvalConfig:
    """What to measure and how much of it."""

    n: int = 400
    max_new_tokens: int = 40
    batch_size: int = 50
    k_fraction: float = 0.1
    n_random: int = 5
    seed: int = 0
    pope: bool = True
    localisation: bool = True
    rank_by: str = "specific"  # "specific": partner effect − real-object effect; "partner": partner effect only
    heads: tuple[tuple[int, int], ...] | None = None  # ablate these (e.g. from top_heads.json) instead of the sweep's


def export_eval_splits(model_dir: str | Path, out_dir: str | Path, n: int) -> dict[str, Path]:
    """Export the held-out splits (:data:`EVAL_SEEDS`) of the checkpoint's world into ``out_dir/<split>-<n>``
    if missing; returns ``{split: folder}``. (From Python, :func:`lens_halluc.organism.eval_splits`
    gives the same splits as datasets, cached by their arguments.)
    """
    world, _ = read_organism_meta(model_dir)
    return {split: export_cached(world, split, n, seed, Path(out_dir) / f"{split}-{n}")
            for split, seed in EVAL_SEEDS.items()}


def _dataset(d: Path) -> CocoDataset:
    return CocoDataset.load(d / "instances.json", d / "captions.json", d / "images")


def caption_and_score(vlm: LoadedVLM, split_dir: Path, out: Path, cfg: EvalConfig,
                      strategy: DecodingStrategy | None = None) -> dict:
    """Caption a split into ``out`` (resumable) and score it: ``chair(...).summary`` (CHAIR, repeat_rate,
    partner_rate / other_absent_rate from the split's probes, n)."""
    ds = _dataset(split_dir)
    caption_dataset(vlm, ds, out, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                    strategy=strategy, progress=False)
    return chair(read_jsonl(out), ds).summary


def _object_targets(vlm: LoadedVLM, rows: list[dict], split_dir: Path,
                    controls: str = "tokens") -> tuple[list[list[int]], list[int], list[tuple]]:
    """Teacher-forced sequences of break captions and their targets.

    Returns (sequences, image ids, targets) where each target is ``(row, predicting position,
    token id, is_partner)``: ``is_partner`` marks the hallucinated partner B (position from CHAIR's
    token alignment). The controls are every other caption token (``controls="tokens"``: words,
    commas, "and", "." — heads that break a caption's structure show up there) or only the objects
    really in the image (``controls="objects"``, the attribution score's NonHal set).
    """
    ds = _dataset(split_dir)
    probes = ds.probes
    evaluator = ChairEvaluator()
    seqs, image_ids, targets = [], [], []
    for r in rows:
        truth = evaluator.ground_truth(ds, r["image_id"])
        b = probes[r["image_id"]]["B"]
        mentions = evaluator.caption_objects(r["caption"])
        positions = align_mentions(mentions, r["caption"], r["token_ids"], vlm.tokenizer)
        prompt_ids = vlm.encode([_image(ds, r["image_id"])], [r["prompt"]])["input_ids"][0].tolist()
        row = len(seqs)
        partner_pos = {pos for m, pos in zip(mentions, positions) if pos is not None and m.node == b}
        if controls == "tokens":
            chosen = [(pos, pos in partner_pos) for pos in range(len(r["token_ids"]))]
        else:
            chosen = [(pos, m.node == b) for m, pos in zip(mentions, positions)
                      if pos is not None and (m.node == b or m.node in truth)]
        for pos, is_b in chosen:
            if len(prompt_ids) + pos >= 1:
                targets.append((row, len(prompt_ids) + pos - 1, r["token_ids"][pos], is_b))
        seqs.append(prompt_ids + r["token_ids"])
        image_ids.append(r["image_id"])
    return seqs, image_ids, targets


def _image(ds: CocoDataset, image_id: int):
    from ..generation.runner import load_image

    return load_image(ds.image_path(image_id))


@torch.no_grad()
def head_sweep(vlm: LoadedVLM, split_dir: Path, rows: list[dict], progress: bool = True,
               batch_size: int = 100, controls: str = "tokens") -> tuple[np.ndarray, np.ndarray]:
    """Per-head mean drop of p(token) on partner targets and on control targets of break captions.

    Each head is zero-ablated at every position, one head at a time (a plain loop). Returns two
    ``[n_layers, n_heads]`` arrays: effect on the hallucinated partner B, effect on the controls
    (see :func:`_object_targets`).
    """
    seqs, image_ids, targets = _object_targets(vlm, rows, split_dir, controls)
    if not any(t[3] for t in targets):
        raise ValueError("no break caption mentions its partner B: nothing to attribute.")
    ds = _dataset(split_dir)
    # right padding: positions of real tokens are unchanged
    batch = right_padded_batch(seqs, pad_token_id=vlm.spec.pad_token_id)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pix = vlm.encode([_image(ds, i) for i in image_ids], [rows[0]["prompt"]] * len(image_ids))["pixel_values"]
    t_row = torch.tensor([t[0] for t in targets])
    t_pos = torch.tensor([t[1] for t in targets])
    t_tok = torch.tensor([t[2] for t in targets])
    is_partner = torch.tensor([t[3] for t in targets])

    def probs() -> torch.Tensor:
        out = torch.empty(len(targets))
        for start in range(0, len(seqs), batch_size):
            sl = slice(start, start + batch_size)
            logits = vlm.model(input_ids=ids[sl].to(vlm.device), attention_mask=mask[sl].to(vlm.device),
                               pixel_values=pix[sl]).logits.float().cpu()
            sel = (t_row >= start) & (t_row < start + batch_size)
            lp = logits[t_row[sel] - start, t_pos[sel]].softmax(-1)
            out[sel] = lp[torch.arange(int(sel.sum())), t_tok[sel]]
        return out

    clean = probs()
    shape = (vlm.spec.n_layers, vlm.spec.n_heads)
    eff_partner, eff_real = np.zeros(shape), np.zeros(shape)
    heads = [(l, h) for l in range(shape[0]) for h in range(shape[1])]
    for l, h in tqdm(heads, desc="per-head sweep", disable=not progress):
        with ablate_heads(vlm.model, vlm.spec, [(l, h)]):
            drop = clean - probs()
        eff_partner[l, h] = float(drop[is_partner].mean())
        eff_real[l, h] = float(drop[~is_partner].mean()) if bool((~is_partner).any()) else 0.0
    return eff_partner, eff_real


def evaluate_organism(model_dir: str | Path, out_dir: str | Path, cfg: EvalConfig | None = None,
                      progress: bool = True) -> dict:
    """All target measurements for one checkpoint; writes ``report.json`` in ``out_dir`` and returns it."""
    cfg = cfg or EvalConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits = export_eval_splits(model_dir, out / "data", cfg.n)
    vlm = load_vlm(model_dir)
    report: dict = {"model": str(model_dir), "config": cfg.__dict__}
    for split in CAPTION_SPLITS:
        report[split] = caption_and_score(vlm, splits[split], out / f"captions-{split}.jsonl", cfg)
    report["partner_ratio_break_vs_control"] = report["break"]["partner_rate"] / max(report["control"]["partner_rate"], 1e-9)

    if cfg.pope:
        # POPE's images: held-out normal scenes with bias-breaking ones among them, as a real
        # validation set holds atypical scenes; co-occurrence statistics come from the same set.
        ds = _dataset(splits["mixed"])
        report["pope"] = {}
        for split in ("random", "popular", "adversarial"):
            qs = build_questions(ds, split, n_images=None, seed=cfg.seed)
            a = out / f"pope-{split}-answers.jsonl"
            answer_questions(vlm, qs, splits["mixed"] / "images", a, max_new_tokens=3, batch_size=cfg.batch_size,
                             progress=False)
            report["pope"][split] = dict(score(qs, read_jsonl(a), parser="pope").summary)

    if cfg.localisation:
        if cfg.heads is None:
            rows = read_jsonl(out / "captions-break.jsonl")
            eff_partner, eff_real = head_sweep(vlm, splits["break"], rows, progress)
            np.savez(out / "head_effects.npz", partner=eff_partner, real=eff_real)
            # The paper's score: effect on the hallucinated token minus effect on real objects, so that
            # heads every prediction needs (which would also erase real objects) do not rank first.
            score_ = eff_partner - eff_real if cfg.rank_by == "specific" else eff_partner
            k = max(1, int(round(cfg.k_fraction * vlm.spec.n_total_heads)))
            order = np.argsort(-score_, axis=None)[:k]
            top = [(int(i // vlm.spec.n_heads), int(i % vlm.spec.n_heads)) for i in order]
            source = f"per-head sweep, ranked by {cfg.rank_by}"
        else:
            top = vlm.spec.check_heads(cfg.heads)
            k, source = len(top), "given heads"
        loc = {"k": k, "source": source, "top_heads": top}
        tag = "given" if cfg.heads is not None else "top"
        loc["break_partner_rate"] = caption_and_score(vlm, splits["break"], out / f"captions-break-{tag}.jsonl", cfg,
                                                      HeadAblation(top))["partner_rate"]
        loc["normal_recall"] = caption_and_score(vlm, splits["normal"], out / f"captions-normal-{tag}.jsonl", cfg,
                                                 HeadAblation(top))["Recall"]
        rand_rates = []
        # draws over all heads (the top heads not excluded), as the original control did
        for r, heads in enumerate(random_heads(vlm, k, seed=cfg.seed, draws=cfg.n_random) if cfg.n_random else []):
            rand_rates.append(caption_and_score(vlm, splits["break"], out / f"captions-break-random{r}.jsonl", cfg,
                                                HeadAblation(heads))["partner_rate"])
        loc["random_break_partner_rates"] = rand_rates
        base = report["break"]["partner_rate"]
        loc["relative_cut_top"] = 1 - loc["break_partner_rate"] / base if base else None
        loc["relative_change_random"] = float(np.mean(rand_rates)) / base - 1 if base else None
        loc["normal_recall_drop"] = report["normal"]["Recall"] - loc["normal_recall"]
        report["localisation"] = loc
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report
