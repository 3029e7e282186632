"""Compare decoding strategies and interventions on one model: CHAIR per caption split, POPE, time.

:func:`compare` is the one owner of "caption + score + POPE + time" for a set of configurations;
``python -m lens_halluc.intervene`` and ``analyses/interventions.py`` are thin adapters over it.

Example
-------
>>> import lens_halluc as lh                                                      # doctest: +SKIP
>>> vlm = lh.load_vlm()                                                           # doctest: +SKIP
>>> ds = lh.organism.split("break", n=100, seed=1)                                # doctest: +SKIP
>>> heads = lh.Attribution().fit(vlm, lh.caption(vlm, ds), ds).top_heads(5)       # doctest: +SKIP
>>> cmp = lh.compare(vlm, {"greedy": None, "adhh": lh.ADHH(heads),                # doctest: +SKIP
...                        "adhh (random heads)": [lh.ADHH(h) for h in lh.random_heads(vlm, 5, exclude=heads, draws=5)]},
...                  datasets={"break": ds})
>>> cmp.table[["label", "break_CHAIR_i", "break_Recall", "rel_time"]]             # doctest: +SKIP
>>> cmp.figure()                                                                  # doctest: +SKIP
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..data.chair import chair
from ..data.flavour import check_flavour
from ..data.pope import build_questions, prompt_suffix, score
from ..data.tables import to_frame, write_table
from ..generation.runner import answer, caption
from ..models.prompts import CAPTION_PROMPT

CAPTION_METRICS = ("CHAIR_s", "CHAIR_i", "Recall", "Len", "partner_rate")
POPE_SPLITS = ("random", "popular", "adversarial")
POPE_METRICS = ("accuracy", "f1", "yes_ratio")
ID_COLUMNS = ("label", "method", "options", "heads_source", "n_heads", "control", "draw", "heads", "model", "n",
              "max_new_tokens")


def columns(caption_splits: Sequence[str]) -> list[str]:
    """Columns of a comparison row for the given caption splits (POPE and timing columns last)."""
    cols = list(ID_COLUMNS)
    cols += [f"{s}_{m}" for s in caption_splits for m in CAPTION_METRICS]
    cols += [f"pope_{s}_{m}" for s in POPE_SPLITS for m in POPE_METRICS]
    cols += ["captions_timed", "sec_per_caption", "rel_time"]
    return cols


def method_name(strategy) -> str:
    """Registry name of a strategy (``greedy`` for None)."""
    if strategy is None:
        return "greedy"
    return str(getattr(strategy, "name", type(strategy).__name__.lower()))


def strategy_params(strategy) -> dict:
    """JSON-able parameters of a strategy without its heads (those have their own column)."""
    if strategy is None:
        return {}
    get = getattr(strategy, "get_params", None)
    params = dict(get()) if callable(get) else {}
    params.pop("heads", None)
    return params


def _heads(strategy) -> list[tuple[int, int]] | None:
    heads = getattr(strategy, "heads", None)
    return [tuple(int(v) for v in h) for h in heads] if heads else None


def _dataset_key(dataset) -> str:
    ident = [str(getattr(dataset, "image_dir", "")), *(f"{i}:{dataset.images[i].file_name}" for i in dataset.image_ids)]
    return hashlib.sha1(json.dumps(ident).encode()).hexdigest()[:12]


@dataclass
class PopeSet:
    """One POPE question set: questions (``question_id``, ``image``, ``text``, ``label``) and their image directory.

    ``allow_outside_image_dir`` / ``max_image_pixels``: as for :func:`lens_halluc.answer` (a set built
    from a dataset takes the dataset's).
    """

    questions: list[dict]
    image_dir: Path
    allow_outside_image_dir: bool = False
    max_image_pixels: int | None = None


def pope_sets(pope, datasets: Mapping[str, Any], seed: int = 0, flavour: str = "reference") -> dict[str, PopeSet]:
    """The POPE question sets of :func:`compare`'s ``pope`` argument.

    ``None``/``False``: none. ``True``: random / popular / adversarial sets built from the first of
    ``datasets`` (every image, seed ``seed``, POPE build ``flavour``). A
    :class:`~lens_halluc.data.CocoDataset`: the three sets built from it. A mapping
    ``{split: PopeSet or (questions, image_dir)}``: those.
    """
    if pope is None or pope is False:
        return {}
    if pope is True:
        if not datasets:
            raise ValueError("pope=True builds POPE from the first dataset, but no dataset was given.")
        pope = next(iter(datasets.values()))
    if hasattr(pope, "image_ids") and hasattr(pope, "image_dir"):
        img = dict(allow_outside_image_dir=getattr(pope, "allow_outside_image_dir", False),
                   max_image_pixels=getattr(pope, "max_image_pixels", None))
        return {s: PopeSet(build_questions(pope, s, n_images=None, seed=seed, flavour=flavour), Path(pope.image_dir),
                           **img) for s in POPE_SPLITS}
    out = {}
    for s, v in dict(pope).items():
        if s not in POPE_SPLITS:
            raise ValueError(f"unknown POPE split {s!r}; use {', '.join(POPE_SPLITS)}.")
        out[s] = v if isinstance(v, PopeSet) else PopeSet(list(v[0]), Path(v[1]))
    return out


@dataclass
class Comparison:
    """What :func:`compare` measured: one row per configuration (and per draw of a control).

    ``rows``: dicts with the :func:`columns`. ``caption_splits``: the names of the captioned datasets.

    Example
    -------
    >>> cmp.table                   # one row per configuration and draw        # doctest: +SKIP
    >>> cmp.summary                 # draws averaged (with CHAIR_i min/max)     # doctest: +SKIP
    >>> cmp.save("runs/compare")    # comparison.csv, summary.csv, comparison.html/.png  # doctest: +SKIP
    """

    rows: list[dict]
    caption_splits: tuple[str, ...] = ("break", "normal")
    captions: dict[tuple[str, int | None, str], Any] = field(default_factory=dict, repr=False)

    @property
    def table(self):
        """DataFrame of every row (columns of :func:`columns`, in that order, then any extra)."""
        cols = columns(self.caption_splits)
        cols += [k for r in self.rows for k in r if k not in cols]
        return to_frame(self.rows, list(dict.fromkeys(cols)))

    def summary_rows(self) -> list[dict]:
        from ..figures.interventions import summary_table

        return summary_table(self.rows, self.caption_splits)

    @property
    def summary(self):
        """DataFrame with one row per configuration: the draws of a control averaged."""
        return to_frame(self.summary_rows())

    def markdown(self) -> str:
        """The summary as a markdown table."""
        from ..figures.interventions import markdown_table

        return markdown_table(self.summary_rows(), self.caption_splits)

    def figure(self, split: str | None = None):
        """CHAIR_i vs Recall on ``split`` (default: the first caption split) and POPE accuracy (plotly)."""
        from ..figures.interventions import interventions_figure

        return interventions_figure(self.summary_rows(), split or self.caption_splits[0])

    def save(self, out_dir: str | Path, png: bool = True) -> list[Path]:
        """Write ``comparison.csv`` (every row), ``summary.csv`` and ``comparison.html``/``.png``."""
        from ..figures.io import save_figure

        out = Path(out_dir)
        files = [write_table(self.table, out / "comparison.csv"), write_table(self.summary, out / "summary.csv")]
        return files + save_figure(self.figure(), out / "comparison", png=png, width=1200, height=600)


class _Timings:
    """Seconds spent captioning per configuration, kept beside the caption cache so resumed runs keep them."""

    def __init__(self, cache_dir: Path | None):
        self.path = Path(cache_dir) / "timings.json" if cache_dir is not None else None
        self.data = json.loads(self.path.read_text()) if self.path and self.path.is_file() else {}

    def add(self, key: str, seconds: float, captions: int) -> None:
        rec = self.data.setdefault(key, {"seconds": 0.0, "captions": 0})
        rec["seconds"] += seconds
        rec["captions"] += captions
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
            tmp.replace(self.path)

    def get(self, key: str) -> dict:
        return self.data.get(key, {"seconds": 0.0, "captions": 0})


def evaluate(vlm, strategy, datasets: Mapping[str, Any], pope: Mapping[str, PopeSet], *, label: str,
             control: str = "none", draw: int | None = None, n: int | None = None, max_new_tokens: int = 40,
             pope_max_new_tokens: int = 3,
             batch_size: int = 50, prompt: str = CAPTION_PROMPT, cache_dir: str | Path | None = None,
             warmup: bool = True, timings: _Timings | None = None, captions_out: dict | None = None,
             chair_flavour: str = "reference", pope_prompt: str = "pope") -> dict:
    """Caption every dataset under ``strategy``, score CHAIR (+ probe rates), answer POPE; one row.

    ``sec_per_caption`` counts only captions generated in this call (a resumed run adds to the
    time stored beside the cache), after one untimed warm-up caption when ``warmup``.
    """
    params = strategy_params(strategy)
    heads = _heads(strategy)
    model = str(getattr(vlm, "path", None))
    row: dict[str, Any] = {
        "label": label, "method": method_name(strategy), "options": json.dumps(params, sort_keys=True),
        "heads_source": None, "n_heads": len(heads) if heads else 0, "control": control, "draw": draw,
        "heads": json.dumps([list(h) for h in heads]) if heads else "", "model": model,
        "n": n if n is not None else max((len(d.image_ids) for d in datasets.values()), default=0),
        "max_new_tokens": max_new_tokens,
    }
    timings = timings or _Timings(None)
    key = hashlib.sha1(json.dumps([model, row["method"], params, row["heads"], max_new_tokens, prompt, n,
                                   {s: _dataset_key(d) for s, d in datasets.items()}], sort_keys=True).encode()).hexdigest()
    warmed = not warmup
    for split, ds in datasets.items():
        if not warmed:
            # the first call pays for kernel selection, attention switches and caches; it is not timed
            caption(vlm, ds, strategy=strategy, max_new_tokens=max_new_tokens, batch_size=1, prompt=prompt,
                    image_ids=ds.image_ids[:1], progress=False)
            warmed = True
        start = time.perf_counter()
        caps = caption(vlm, ds, strategy=strategy, max_new_tokens=max_new_tokens, batch_size=batch_size, prompt=prompt,
                       image_ids=ds.image_ids[:n] if n is not None else None, cache_dir=cache_dir, progress=False)
        made = caps.generated  # captions decoded by this call (cached ones carry no time)
        if made:
            timings.add(key, time.perf_counter() - start, int(made))
        if captions_out is not None:
            captions_out[(label, draw, split)] = caps
        summary = chair(caps, ds, flavour=chair_flavour).summary
        for m in CAPTION_METRICS:
            row[f"{split}_{m}"] = summary.get(m)
    for split in POPE_SPLITS:
        if split in pope:
            ps = pope[split]
            answers = answer(vlm, ps.questions, ps.image_dir, strategy=strategy, max_new_tokens=pope_max_new_tokens,
                             prompt_suffix=prompt_suffix(pope_prompt),
                             batch_size=batch_size, cache_dir=cache_dir, progress=False,
                             allow_outside_image_dir=ps.allow_outside_image_dir, max_image_pixels=ps.max_image_pixels)
            res = score(ps.questions, list(answers), parser="pope")
            res = getattr(res, "summary", res)
            for m in POPE_METRICS:
                row[f"pope_{split}_{m}"] = res[m]
        else:
            for m in POPE_METRICS:
                row[f"pope_{split}_{m}"] = None
    t = timings.get(key)
    row["captions_timed"] = t["captions"]
    row["sec_per_caption"] = t["seconds"] / t["captions"] if t["captions"] else None
    row["rel_time"] = None
    return row


def compare(vlm, methods: Mapping[str, Any], datasets: Mapping[str, Any], pope=None, *, n: int | None = None,
            max_new_tokens: int = 40,
            pope_max_new_tokens: int = 3, batch_size: int = 50, prompt: str = CAPTION_PROMPT,
            cache_dir: str | Path | None = None, warmup: bool = True, pope_seed: int = 0,
            progress: bool = True, chair_flavour: str = "reference", pope_flavour: str = "reference",
            pope_prompt: str = "pope") -> Comparison:
    """Caption, score and time every configuration of ``methods`` on every dataset (and POPE).

    Parameters
    ----------
    vlm : a :class:`~lens_halluc.models.LoadedVLM`.
    methods : ``{label: strategy}``; a strategy is ``None`` (greedy), an intervention
        (``lh.ADHH(heads)``, ``lh.VCD()``, ...) or a decoding strategy; a list of interventions is
        the draws of a random-head control (one row each, ``control="random"``, averaged in
        :attr:`Comparison.summary`).
    datasets : ``{split name: CocoDataset}`` to caption and score with CHAIR (the organism's
        splits add ``partner_rate`` from their probes).
    pope : see :func:`pope_sets` (``None``, ``True``, a dataset or prepared question sets).
    n : caption only the first ``n`` images of each dataset (default: all).
    max_new_tokens, pope_max_new_tokens, batch_size, prompt : generation settings.
    cache_dir : keep captions and answers (keyed by everything that changes them) and timings
        here, so a rerun resumes and never returns another configuration's results.
    warmup : run one untimed caption before timing each configuration.
    chair_flavour, pope_flavour : ``"reference"`` (the papers' CHAIR and POPE build, the default)
        or ``"corrected"`` (see FIDELITY.md); the methods' own flavours are their parameters.
    pope_prompt : the POPE answer prompt, a name of :data:`lens_halluc.data.pope.POPE_PROMPTS`
        (``"pope"``: the question alone; ``"vcd"``: VCD's and CausalMM's " Please answer this
        question with one word.") or a literal suffix.

    Returns a :class:`Comparison`. ``rel_time`` is seconds per caption relative to the entry whose
    strategy is ``None`` (greedy), when there is one.

    Example
    -------
    >>> cmp = compare(vlm, {"greedy": None, "vcd": lh.VCD()}, {"break": ds}, pope=True)   # doctest: +SKIP
    """
    if not datasets:
        raise ValueError("compare needs at least one dataset to caption: datasets={'name': CocoDataset}.")
    if not methods:
        raise ValueError("compare needs at least one configuration: methods={'greedy': None, ...}.")
    from tqdm.auto import tqdm

    check_flavour(chair_flavour, "compare: chair_flavour")
    sets = pope_sets(pope, datasets, pope_seed, check_flavour(pope_flavour, "compare: pope_flavour"))
    timings = _Timings(cache_dir)
    jobs = []
    for label, value in methods.items():
        if isinstance(value, (list, tuple)):
            jobs += [(label, v, "random", d) for d, v in enumerate(value)]
        else:
            jobs.append((label, value, "none", None))
    rows, caps = [], {}
    for label, strat, control, draw in tqdm(jobs, desc="comparing", disable=not progress):
        rows.append(evaluate(vlm, strat, datasets, sets, label=label, control=control, draw=draw, n=n,
                             max_new_tokens=max_new_tokens, pope_max_new_tokens=pope_max_new_tokens,
                             batch_size=batch_size, prompt=prompt, cache_dir=cache_dir, warmup=warmup,
                             timings=timings, captions_out=caps, chair_flavour=chair_flavour,
                             pope_prompt=pope_prompt))
    base = next((r["sec_per_caption"] for r in rows if r["method"] == "greedy" and r["control"] == "none"), None)
    for r in rows:
        r["rel_time"] = r["sec_per_caption"] / base if base and r["sec_per_caption"] is not None else None
    return Comparison(rows=rows, caption_splits=tuple(datasets), captions=caps)
