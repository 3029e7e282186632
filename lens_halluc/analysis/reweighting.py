"""Attention re-weighting (Fig. 6): scale one key group of chosen heads and measure CHAIR.

For the hallucination heads and for the same number of random heads, the post-softmax weights on
one key group are multiplied by α at every forward (prefill and each decoding step) through
:class:`~lens_halluc.hooks.attention.ScaleKeys` inside
:class:`~lens_halluc.hooks.attention.AttentionEditing`:

* text keys (TEXT role after the image) × α, α ∈ {1.0, 0.8, …, 0.0} — less language prior;
* image keys × α, α ∈ {1.0, 1.5, …, 3.5} — more visual evidence.

The reference does not renormalise the rows; ``renormalize=True`` (the option) divides each edited
row by its new sum. α = 1.0 is the unedited model: it is captioned once with plain greedy decoding
and reused for every curve. Random heads are drawn uniformly (seeded) among the heads that are *not*
hallucination heads, so the comparison isolates the heads' identity from the number of edited heads.

Each configuration's captions go to a resumable JSONL under ``out_dir``; a ``manifest.json`` there
records the heads and settings so that a resumed run cannot silently mix captions of other heads.

Example
-------
>>> run = load_attribution_run("runs/attribution_heads")                         # doctest: +SKIP
>>> rows = reweighting_curves(vlm, "runs/reweighting/data/break-100", run.top_heads,
...                           out_dir="runs/reweighting/captions")               # doctest: +SKIP
>>> summary = summarize_curves(rows)                                              # doctest: +SKIP
"""
from __future__ import annotations

import json
import math
from itertools import product
from pathlib import Path
from typing import Sequence

import numpy as np

from .attention import Head

ALPHAS_TEXT = (1.0, 0.8, 0.6, 0.4, 0.2, 0.0)
ALPHAS_IMAGE = (1.0, 1.5, 2.0, 2.5, 3.0, 3.5)
METRICS = ("CHAIR_s", "CHAIR_i", "Recall", "Len", "partner_rate", "repeat_rate")
COLUMNS = ("group", "draw", "key_group", "alpha", "renormalize", "n_heads", "heads", *METRICS, "n")
SUMMARY_COLUMNS = ("group", "key_group", "alpha", "renormalize", "n_draws", *METRICS,
                   *(f"{m}_min" for m in METRICS), *(f"{m}_max" for m in METRICS))


# ---------------------------------------------------------------------------- random heads
def random_heads(n_layers: int, n_heads: int, exclude: Sequence[Head], k: int, n_draws: int,
                 seed: int = 0) -> list[list[Head]]:
    """``n_draws`` sets of ``k`` heads drawn uniformly, without replacement, among heads not in ``exclude``.

    Returns a list of ``n_draws`` lists of ``(layer, head)`` pairs, each sorted. The same ``seed``
    gives the same draws (``numpy.random.default_rng``); draws are independent of each other.

    Example
    -------
    >>> random_heads(2, 4, exclude=[(0, 0), (1, 3)], k=2, n_draws=2, seed=0)      # doctest: +SKIP
    [[(0, 2), (1, 1)], [(0, 1), (1, 2)]]
    """
    excluded = {(int(l), int(h)) for l, h in exclude}
    pool = [(l, h) for l in range(n_layers) for h in range(n_heads) if (l, h) not in excluded]
    if not 1 <= k <= len(pool):
        raise ValueError(f"cannot draw {k} random heads from the {len(pool)} heads that are not hallucination heads.")
    rng = np.random.default_rng(seed)
    return [sorted(pool[int(i)] for i in rng.choice(len(pool), size=k, replace=False)) for _ in range(n_draws)]


# ---------------------------------------------------------------------------- scoring one configuration
def _score(vlm, dataset, out: Path, strategy, max_new_tokens: int, batch_size: int) -> dict:
    """Caption (resumable) and score one configuration: CHAIR summary + partner_rate (NaN without probes)."""
    from ..organism.evaluate import EvalConfig, caption_and_score

    split_dir = Path(dataset)
    if (split_dir / "probes.json").is_file():
        # the organism's evaluation path: the same numbers as evaluate_organism reports
        res = caption_and_score(vlm, split_dir, out, EvalConfig(max_new_tokens=max_new_tokens, batch_size=batch_size),
                                strategy=strategy)
    else:
        from ..data.chair import ChairEvaluator, repeated_object_rate
        from ..data.coco import CocoDataset
        from ..generation.jsonl import read_jsonl
        from ..generation.runner import caption_dataset

        ds = CocoDataset.load(split_dir / "instances.json", split_dir / "captions.json", split_dir / "images")
        caption_dataset(vlm, ds, out, max_new_tokens=max_new_tokens, batch_size=batch_size, strategy=strategy,
                        progress=False)
        chair = ChairEvaluator().evaluate(read_jsonl(out), ds)
        res = {**chair.summary, "repeat_rate": repeated_object_rate(chair.captions), "n": len(chair.captions)}
    return {m: float(res.get(m, math.nan)) for m in METRICS} | {"n": int(res["n"])}


def _check_manifest(out_dir: Path, manifest: dict) -> None:
    # Captions are resumed by file name; a folder made with other heads or settings would be
    # silently mixed in, so refuse it instead.
    path = out_dir / "manifest.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != manifest:
            diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
            raise ValueError(f"{out_dir} holds captions of another re-weighting run (differs in {', '.join(diff)}); "
                             "use a fresh out_dir or delete it.")
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(manifest, indent=1))


def _heads_str(heads: Sequence[Head]) -> str:
    return " ".join(f"{l}:{h}" for l, h in heads)


def reweighting_curves(vlm, dataset: str | Path, heads: Sequence[Head],
                       alphas_text: Sequence[float] = ALPHAS_TEXT, alphas_image: Sequence[float] = ALPHAS_IMAGE,
                       n_random: int = 3, renormalize: Sequence[bool] = (False, True), seed: int = 0,
                       out_dir: str | Path = "runs/reweighting/captions", max_new_tokens: int = 40,
                       batch_size: int = 50, progress: bool = True) -> list[dict]:
    """CHAIR (and partner rate) as a function of α for hallucination heads vs random heads.

    Parameters
    ----------
    vlm : :class:`~lens_halluc.models.loading.LoadedVLM`. Its text tower is switched to the editable
        ``"lens_halluc"`` attention for the edited runs and restored afterwards.
    dataset : a split directory (``instances.json``, ``captions.json``, ``images/``); with a
        ``probes.json`` (the organism's break split) ``partner_rate`` is measured, else it is NaN.
    heads : the hallucination heads, ``(layer, head)`` pairs; ``k = len(heads)`` random heads per draw.
    alphas_text, alphas_image : α values per key group; 1.0 (if listed) is the shared unedited baseline.
    n_random : number of random-head draws; ``seed`` fixes them (see :func:`random_heads`).
    renormalize : which renormalisation settings to run (False = the reference).
    out_dir : one resumable captions JSONL per configuration, plus ``baseline.jsonl`` and ``manifest.json``.

    Returns
    -------
    Tidy rows ``{group, draw, key_group, alpha, renormalize, n_heads, heads, CHAIR_s, CHAIR_i, Recall,
    Len, partner_rate, n}``: ``group`` is "hallucination" (draw 0) or "random" (draw 0..n_random-1);
    α = 1.0 rows repeat the baseline for every curve so each curve starts there.

    Example
    -------
    >>> rows = reweighting_curves(vlm, split_dir, [(0, 0), (0, 4)], alphas_text=(1.0, 0.0),
    ...                           alphas_image=(1.0, 3.5), n_random=2, out_dir=tmp)     # doctest: +SKIP
    >>> len(rows)        # (1 + 2 groups) × 2 key groups × 2 α × 2 renormalisations       # doctest: +SKIP
    24
    """
    from tqdm.auto import tqdm

    from ..hooks.attention import AttentionEditing, ScaleKeys, editable_attention

    heads = [tuple(h) for h in vlm.spec.check_heads(heads)]
    draws = random_heads(vlm.spec.n_layers, vlm.spec.n_heads, heads, len(heads), n_random, seed)
    head_sets = [("hallucination", 0, heads)] + [("random", d, hs) for d, hs in enumerate(draws)]
    out_dir = Path(out_dir)
    _check_manifest(out_dir, {"dataset": str(Path(dataset).resolve()), "max_new_tokens": int(max_new_tokens),
                              "seed": int(seed), "hallucination_heads": [list(h) for h in heads]})
    # n_random may grow between runs: draw d depends only on the seed, the excluded heads and d

    baseline = _score(vlm, dataset, out_dir / "baseline.jsonl", None, max_new_tokens, batch_size)
    configs = [(kg, float(a), bool(r)) for kg, alphas in (("text", alphas_text), ("image", alphas_image))
               for a, r in product(alphas, renormalize)]
    todo = [(g, d, hs, kg, a, r) for g, d, hs in head_sets for kg, a, r in configs if a != 1.0]
    rows: list[dict] = []
    with editable_attention(vlm):
        for g, d, hs, kg, a, r in tqdm(todo, desc="re-weighting", disable=not progress):
            name = f"{g}{d}-{kg}-a{a:g}-{'renorm' if r else 'raw'}.jsonl"
            res = _score(vlm, dataset, out_dir / name, AttentionEditing(vlm, ScaleKeys(kg, a, r), hs),
                         max_new_tokens, batch_size)
            rows.append({"group": g, "draw": d, "key_group": kg, "alpha": a, "renormalize": r,
                         "n_heads": len(hs), "heads": _heads_str(hs), **res})
    for g, d, hs in head_sets:
        for kg, a, r in configs:
            if a == 1.0:
                rows.append({"group": g, "draw": d, "key_group": kg, "alpha": a, "renormalize": r,
                             "n_heads": len(hs), "heads": _heads_str(hs), **baseline})
    order = {"hallucination": 0, "random": 1}
    rows.sort(key=lambda x: (order[x["group"]], x["draw"], x["key_group"] != "text", x["renormalize"],
                             x["alpha"] if x["key_group"] == "image" else -x["alpha"]))
    return rows


def summarize_curves(rows: Sequence[dict]) -> list[dict]:
    """Mean, min and max over random draws per (group, key_group, alpha, renormalize).

    Returns rows ``{group, key_group, alpha, renormalize, n_draws, <metric>, <metric>_min,
    <metric>_max}`` for every metric of :data:`METRICS` (the hallucination group has one draw, so
    its min = max = mean). NaN metrics (no partner rate) stay NaN.

    Example
    -------
    >>> summarize_curves([{"group": "random", "draw": d, "key_group": "text", "alpha": 0.0, "renormalize": False,
    ...                    **{m: float(d) for m in METRICS}} for d in range(3)])[0]["CHAIR_i"]
    1.0
    """
    keys: dict[tuple, list[dict]] = {}
    for r in rows:
        keys.setdefault((r["group"], r["key_group"], float(r["alpha"]), bool(r["renormalize"])), []).append(r)
    out = []
    for (g, kg, a, ren), members in keys.items():
        row = {"group": g, "key_group": kg, "alpha": a, "renormalize": ren, "n_draws": len(members)}
        for m in METRICS:
            vals = [float(x[m]) for x in members]
            ok = [v for v in vals if not math.isnan(v)]
            row[m] = float(np.mean(ok)) if ok else math.nan
            row[f"{m}_min"] = float(min(ok)) if ok else math.nan
            row[f"{m}_max"] = float(max(ok)) if ok else math.nan
        out.append(row)
    return out


# ---------------------------------------------------------------------------- CLI
def add_cli(subparsers) -> None:
    """Register ``python -m lens_halluc.analysis reweighting``."""
    from .attention import add_common_args

    p = subparsers.add_parser("reweighting", help="CHAIR vs attention re-weighting of hallucination / random heads",
                              description=__doc__.split("\n\n")[0])
    add_common_args(p)
    p.add_argument("--data", type=Path, default=None,
                   help="split directory (instances.json, captions.json, images/, optional probes.json); default: "
                        "the organism's held-out break split, exported under --work")
    p.add_argument("--n-images", type=int, default=100, help="images of the exported break split (default: 100)")
    p.add_argument("--n-random", type=int, default=3, help="random-head draws (default: 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random-head draws (default: 0)")
    p.add_argument("--max-new-tokens", type=int, default=40, help="caption length limit (default: 40)")
    p.add_argument("--batch-size", type=int, default=50, help="captioning batch size (default: 50)")
    p.add_argument("--work", type=Path, default=Path("runs/reweighting"),
                   help="folder for the exported split and the resumable captions (default: runs/reweighting)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_cli)


def run_cli(args) -> dict:
    """Compute, write ``reweighting.csv``, ``reweighting_summary.csv``, ``reweighting.html/.png``; return both tables."""
    from ..cli.common import load_model_from_args
    from ..figures.io import save_figure
    from ..figures.reweighting import reweighting_figure
    from .attention import head_groups, load_attribution_run, model_for, write_table

    run = load_attribution_run(args.attribution)
    args.model = model_for(args, run)
    vlm = load_model_from_args(args)
    heads = head_groups(run.head_scores, args.k)["hallucination"] if args.k else run.top_heads
    if args.data is not None:
        data = args.data
    else:
        from ..organism.evaluate import export_eval_splits
        from ..organism.shipped import organism_path

        data = export_eval_splits(args.model or organism_path("final"), args.work / "data", args.n_images)["break"]
    # one captions folder per (data, model) so runs on other splits never share resumed files
    tag = f"{Path(data).name}-{Path(str(args.model or 'organism')).name}"
    rows = reweighting_curves(vlm, data, heads, n_random=args.n_random, seed=args.seed,
                              out_dir=args.work / f"captions-{tag}", max_new_tokens=args.max_new_tokens,
                              batch_size=args.batch_size, progress=not args.no_progress)
    summary = summarize_curves(rows)
    write_table(rows, args.out / "reweighting.csv", COLUMNS)
    write_table(summary, args.out / "reweighting_summary.csv", SUMMARY_COLUMNS)
    save_figure(reweighting_figure(summary), args.out / "reweighting", png=not args.no_png, height=1000)
    for r in summary:
        if r["renormalize"] or r["alpha"] not in (0.0, 3.5):
            continue
        print(f"{r['key_group']:>5} α={r['alpha']:<4g} {r['group']:>13}: CHAIR_s {r['CHAIR_s']:.3f} "
              f"CHAIR_i {r['CHAIR_i']:.3f} Recall {r['Recall']:.3f} partner {r['partner_rate']:.3f}")
    return {"rows": rows, "summary": summary}
