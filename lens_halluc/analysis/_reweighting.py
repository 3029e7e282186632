"""Attention re-weighting (Fig. 6): scale one key group of chosen heads and measure CHAIR.

For the hallucination heads and for the same number of random heads, the post-softmax weights on
one key group are multiplied by α at every forward (prefill and each decoding step) by the
intervention :class:`lens_halluc.interventions.Reweight` (``heads, alpha, keys, renormalize``):

* text keys (TEXT role after the image) × α, α ∈ {1.0, 0.8, …, 0.0} — less language prior;
* image keys × α, α ∈ {1.0, 1.5, …, 3.5} — more visual evidence.

The reference does not renormalise the rows; ``renormalize=True`` (the option) divides each edited
row by its new sum. α = 1.0 is the unedited model: it is captioned once with plain greedy decoding
and reused for every curve. Random heads are drawn uniformly (seeded) as many as there are
hallucination heads (k = 20 in the reference, ``HA_K["reweight"]``: the ``top_k=20`` of
``attention_reweight_{txt,img}.sh``): among *all* heads in the ``reference`` flavour
(``analyze_attention_reweight.py --random_heads``: ``random.sample`` of every head, so a draw may
contain hallucination heads), among the heads that are *not* hallucination heads in the
``corrected`` flavour (the comparison then isolates the heads' identity from their number).
:data:`FLAVOURS_REWEIGHTING` holds the two.

With ``cache_dir`` each configuration's captions go to a resumable JSONL there; a ``manifest.json``
records the heads and settings so that a resumed run cannot silently mix captions of other heads.
Without it, captions live in a temporary folder for the call only.

Example
-------
>>> res = lh.analysis.reweighting(vlm, lh.organism.split("break", n=100, seed=1002),
...                               lh.Attribution.load("runs/attribution_heads").top_heads(5))   # doctest: +SKIP
>>> res.summary.query("alpha == 0.0")                                                          # doctest: +SKIP
"""
from __future__ import annotations

import json
import math
import tempfile
from itertools import product
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..data.flavour import check_flavour, resolve
from ..models.heads import random_heads
from ._groups import HALLUCINATION, RANDOM, Head
from ._result import AnalysisResult, frame

ALPHAS_TEXT = (1.0, 0.8, 0.6, 0.4, 0.2, 0.0)
ALPHAS_IMAGE = (1.0, 1.5, 2.0, 2.5, 3.0, 3.5)
METRICS = ("CHAIR_s", "CHAIR_i", "Recall", "Len", "partner_rate", "repeat_rate")
COLUMNS = ("group", "draw", "key_group", "alpha", "renormalize", "n_heads", "heads", *METRICS, "n")
SUMMARY_COLUMNS = ("group", "key_group", "alpha", "renormalize", "n_draws", *METRICS,
                   *(f"{m}_min" for m in METRICS), *(f"{m}_max" for m in METRICS))
#: Where random control heads are drawn from: every head (the reference) or the heads that are
#: not hallucination heads.
RANDOM_POOLS = ("all", "others")
FLAVOURS_REWEIGHTING = {"reference": {"random_pool": "all"}, "corrected": {"random_pool": "others"}}


# ---------------------------------------------------------------------------- scoring one configuration
def _dataset(dataset):
    """A :class:`CocoDataset` and its split directory (None for an in-memory dataset)."""
    from ..data.coco import CocoDataset

    if isinstance(dataset, CocoDataset):
        return dataset, (dataset.image_dir.parent if dataset.image_dir is not None else None)
    d = Path(dataset)
    return CocoDataset.load(d / "instances.json", d / "captions.json", d / "images"), d


def chair_scorer(vlm, dataset, out: Path, strategy, max_new_tokens: int, batch_size: int) -> dict:
    """Caption ``dataset`` into ``out`` (resumable JSONL) with ``strategy`` and score it with CHAIR.

    Returns :func:`lens_halluc.data.chair.chair`'s summary: ``CHAIR_s``, ``CHAIR_i``, ``Recall``,
    ``Len``, ``repeat_rate``, ``n`` and, for a dataset with probes, ``partner_rate``. This is the
    default ``scorer`` of :func:`reweighting`; any callable with this signature can replace it.

    Example
    -------
    >>> chair_scorer(vlm, ds, Path("/tmp/base.jsonl"), None, 40, 50)["CHAIR_i"]     # doctest: +SKIP
    """
    from ..data.chair import chair
    from ..generation.jsonl import read_jsonl
    from ..generation.runner import caption_dataset

    caption_dataset(vlm, dataset, out, max_new_tokens=max_new_tokens, batch_size=batch_size, strategy=strategy,
                    progress=False)
    return dict(chair(read_jsonl(out), dataset).summary)


def _score(scorer, vlm, dataset, out: Path, strategy, max_new_tokens: int, batch_size: int) -> dict:
    res = scorer(vlm, dataset, out, strategy, max_new_tokens, batch_size)
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


def reweighting_curves(vlm, dataset, heads: Sequence[Head],
                       alphas_text: Sequence[float] = ALPHAS_TEXT, alphas_image: Sequence[float] = ALPHAS_IMAGE,
                       n_random: int = 3, renormalize: Sequence[bool] = (False, True), seed: int = 0,
                       out_dir: str | Path = "runs/reweighting/captions", max_new_tokens: int = 40,
                       batch_size: int = 50, progress: bool = True, scorer: Callable | None = None,
                       random_pool: str = "all") -> list[dict]:
    """CHAIR (and partner rate) as a function of α for hallucination heads vs random heads.

    Parameters
    ----------
    vlm : :class:`~lens_halluc.models.loading.LoadedVLM`. Its text tower is switched to the editable
        ``"lens_halluc"`` attention for the edited runs and restored afterwards.
    dataset : a :class:`~lens_halluc.data.coco.CocoDataset` or a split directory (``instances.json``,
        ``captions.json``, ``images/``); with probes (the organism's break split) ``partner_rate`` is
        measured (CocoDataset.probes), else it is NaN.
    heads : the hallucination heads, ``(layer, head)`` pairs; ``k = len(heads)`` random heads per draw.
    alphas_text, alphas_image : α values per key group; 1.0 (if listed) is the shared unedited baseline.
    n_random : number of random-head draws; ``seed`` fixes them
        (:func:`lens_halluc.models.heads.random_heads`).
    random_pool : ``"all"`` (draw among every head, the reference) or ``"others"`` (among the heads
        not in ``heads``).
    renormalize : which renormalisation settings to run (False = the reference).
    out_dir : one resumable captions JSONL per configuration, plus ``baseline.jsonl`` and ``manifest.json``.
    scorer : ``scorer(vlm, dataset, out_path, strategy, max_new_tokens, batch_size) -> dict`` of metrics
        and ``n``, given the :class:`CocoDataset` (default :func:`chair_scorer`).

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

    from ..hooks.attention import editable_attention
    from ..interventions import Reweight

    if random_pool not in RANDOM_POOLS:
        raise ValueError(f"random_pool must be one of {RANDOM_POOLS}, got {random_pool!r}.")
    heads = [tuple(h) for h in vlm.spec.check_heads(heads)]
    exclude = heads if random_pool == "others" else ()
    draws = random_heads(vlm, len(heads), exclude=exclude, seed=seed, draws=n_random) if n_random else []
    head_sets = [(HALLUCINATION, 0, heads)] + [(RANDOM, d, hs) for d, hs in enumerate(draws)]
    scorer = scorer or chair_scorer
    ds, split_dir = _dataset(dataset)
    out_dir = Path(out_dir)
    where = str(split_dir.resolve()) if split_dir is not None else f"in-memory dataset of {len(ds.image_ids)} images"
    _check_manifest(out_dir, {"dataset": where, "max_new_tokens": int(max_new_tokens),
                              "seed": int(seed), "hallucination_heads": [list(h) for h in heads],
                              "random_pool": random_pool})
    # n_random may grow between runs: draw d depends only on the seed, the pool and d

    def score(name, strategy):
        return _score(scorer, vlm, ds, out_dir / name, strategy, max_new_tokens, batch_size)

    configs = [(kg, float(a), bool(r)) for kg, alphas in (("text", alphas_text), ("image", alphas_image))
               for a, r in product(alphas, renormalize)]
    todo = [(g, d, hs, kg, a, r) for g, d, hs in head_sets for kg, a, r in configs if a != 1.0]
    rows: list[dict] = []
    # one bar for the whole sweep, the unedited baseline included (it is one more captioning run)
    bar = tqdm(total=len(todo) + 1, desc="re-weighting", unit="config", disable=not progress)
    bar.set_postfix_str("baseline")
    baseline = score("baseline.jsonl", None)
    bar.update()
    with editable_attention(vlm):  # switched once for the whole sweep, not per configuration
        for g, d, hs, kg, a, r in todo:
            bar.set_postfix_str(f"{g}{d} {kg} α={a:g}{' renorm' if r else ''}")
            name = f"{g}{d}-{kg}-a{a:g}-{'renorm' if r else 'raw'}.jsonl"
            res = score(name, Reweight(hs, alpha=a, keys=kg, renormalize=r))
            rows.append({"group": g, "draw": d, "key_group": kg, "alpha": a, "renormalize": r,
                         "n_heads": len(hs), "heads": _heads_str(hs), **res})
            bar.update()
    bar.close()
    for g, d, hs in head_sets:
        for kg, a, r in configs:
            if a == 1.0:
                rows.append({"group": g, "draw": d, "key_group": kg, "alpha": a, "renormalize": r,
                             "n_heads": len(hs), "heads": _heads_str(hs), **baseline})
    order = {HALLUCINATION: 0, RANDOM: 1}
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


# ---------------------------------------------------------------------------- API
class ReweightingResult(AnalysisResult):
    """:func:`reweighting` result: ``table`` (:data:`COLUMNS`, one row per head set × key group × α ×
    renormalisation), ``summary`` (:data:`SUMMARY_COLUMNS`, mean/min/max over random draws); files
    ``reweighting.csv``, ``reweighting_summary.csv``, ``reweighting.html/.png``.

    Example
    -------
    >>> res.summary.query("key_group == 'text' and not renormalize")[["group", "alpha", "CHAIR_i"]]  # doctest: +SKIP
    """

    name = "reweighting"
    figure_size = (900, 1000)

    def figure(self, metrics: Sequence[str] = ("CHAIR_i", "partner_rate", "Recall"), title: str | None = None):
        """Metric vs α per key group, hallucination vs random heads (:func:`lens_halluc.figures.reweighting.reweighting_figure`)."""
        from ..figures.reweighting import reweighting_figure

        return reweighting_figure(self.summary, metrics=metrics, title=title)


def _chosen_heads(heads, k: int | None) -> list[Head]:
    """The hallucination heads: the top ``k`` of an attribution (default ``HA_K["reweight"]``), or a list's first ``k``."""
    from ._attention import AttributionRun, as_attribution, resolve_k

    if isinstance(heads, (str, Path, AttributionRun)) or hasattr(heads, "scores_"):
        run = as_attribution(heads)
        return run.heads(resolve_k(run, "reweight", k))
    heads = [tuple(h) for h in heads]
    if k is None:
        return heads
    if isinstance(k, bool) or not 1 <= int(k) <= len(heads):
        raise ValueError(f"k = {k} heads requested from a list of {len(heads)}; choose 1 ≤ k ≤ {len(heads)}.")
    return heads[: int(k)]


def reweighting(vlm, dataset, heads, alphas_text: Sequence[float] = ALPHAS_TEXT,
                alphas_image: Sequence[float] = ALPHAS_IMAGE, n_random: int = 3,
                renormalize: Sequence[bool] = (False, True), seed: int = 0, cache_dir: str | Path | None = None,
                max_new_tokens: int = 40, batch_size: int = 50, progress: bool = True,
                scorer: Callable | None = None, k: int | None = None, random_pool: str | None = None,
                flavour: str = "reference") -> ReweightingResult:
    """CHAIR (and partner rate) vs attention re-weighting α of the hallucination heads and of random heads.

    Parameters
    ----------
    vlm : :class:`~lens_halluc.models.loading.LoadedVLM`.
    dataset : :class:`~lens_halluc.data.coco.CocoDataset` (e.g. ``lh.organism.split("break", ...)``) or
        a split directory.
    heads : the hallucination heads (e.g. ``attribution.top_heads(5)``), or an attribution (a fitted
        :class:`~lens_halluc.attribution.Attribution`, an ``AttributionRun`` or a run directory) whose
        top ``k`` are taken; as many random heads per draw.
    k : with an attribution, its top ``k`` heads (default 20, the reference's: ``HA_K["reweight"]``);
        with a list of heads, keep its first ``k`` (default: all of them).
    random_pool : ``"all"`` (random heads among every head; ``reference``) or ``"others"`` (among the
        heads that are not hallucination heads; ``corrected``). Default: the flavour's.
    flavour : ``"reference"`` (default) or ``"corrected"`` (:data:`FLAVOURS_REWEIGHTING`).
    alphas_text, alphas_image, n_random, renormalize, seed, max_new_tokens, batch_size, scorer :
        see :func:`reweighting_curves`.
    cache_dir : folder for the resumable captions of every configuration (None: a temporary
        folder, removed after the call).

    Returns
    -------
    :class:`ReweightingResult`.

    Example
    -------
    >>> res = reweighting(vlm, ds, heads, alphas_text=(1.0, 0.0), alphas_image=(1.0, 3.5), n_random=2)  # doctest: +SKIP
    >>> res.figure().show()                                                                            # doctest: +SKIP
    """
    flavour = check_flavour(flavour, "reweighting")
    random_pool = resolve(FLAVOURS_REWEIGHTING, flavour, "random_pool", random_pool)
    heads = _chosen_heads(heads, k)
    kwargs = dict(alphas_text=alphas_text, alphas_image=alphas_image, n_random=n_random, renormalize=renormalize,
                  seed=seed, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress, scorer=scorer,
                  random_pool=random_pool)
    if cache_dir is None:
        with tempfile.TemporaryDirectory(prefix="lens_halluc-reweighting-") as tmp:
            rows = reweighting_curves(vlm, dataset, heads, out_dir=tmp, **kwargs)
    else:
        rows = reweighting_curves(vlm, dataset, heads, out_dir=cache_dir, **kwargs)
    params = {n: v for n, v in kwargs.items() if n != "scorer"} | {"heads": [tuple(h) for h in heads],
                                                                  "k": len(heads), "flavour": flavour}
    return ReweightingResult(frame(rows, COLUMNS), frame(summarize_curves(rows), SUMMARY_COLUMNS), params=params)
