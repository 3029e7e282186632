"""``Attribution``: head attribution as a fitted result object (scikit-learn style).

``Attribution(...).fit(vlm, captions, dataset)`` finds the CHAIR object mentions of the captions,
computes the influence ``I_{l,h}(t)`` of every head on every mention (:func:`lens_halluc.attribution.influences`)
and ranks heads by ``S = mean_Hal I − mean_NonHal I``. :meth:`Attribution.save` writes the files
of ``python -m lens_halluc.attribute`` (byte-identical for the same inputs);
:meth:`Attribution.load` reads them back.

Example
-------
>>> import lens_halluc as lh                                                      # doctest: +SKIP
>>> attr = lh.Attribution(scope="local", ablation="zero").fit(vlm, caps, ds)      # doctest: +SKIP
>>> attr.top_heads(5)                                                             # doctest: +SKIP
[(0, 0), (0, 4), (1, 2), (0, 7), (2, 5)]
>>> attr.scores_.head(3)              # layer, head, score, mean_hal, mean_nonhal, ranked   # doctest: +SKIP
>>> attr.save("runs/attr"); lh.Attribution.load("runs/attr").top_heads(5)        # doctest: +SKIP
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ..data.tables import write_table
from .naive import ABLATIONS, METHODS, METRICS, SCOPES
from .pipeline import (SAMPLE_KEYS, TOKEN_COLUMNS, AttributionConfig, AttributionJob, Sample, cache_key,
                       caption_rows, collect_samples, head_scores, samples_jsonl, write_bytes_atomic, write_npz)

SCORE_COLUMNS = ("layer", "head", "score", "mean_hal", "mean_nonhal")
FILES = ("head_scores.csv", "top_heads.json", "tokens.csv", "influences.npz", "samples.jsonl", "heads.html",
         "heads.png", "manifest.json")
TIMINGS = "timings.json"  # the one file of a run directory that differs between equal runs


def default_top_k(n_total_heads: int) -> int:
    """``min(20, 10 % of all heads)`` (at least 1): the number of hallucination heads reported.

    Example
    -------
    >>> default_top_k(48), default_top_k(1024)
    (5, 20)
    """
    return min(20, max(1, round(0.1 * n_total_heads)))


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("lens_halluc", "torch", "transformers", "nnsight", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _json(obj) -> bytes:
    return json.dumps(obj, indent=1).encode()


class Attribution:
    """Which attention heads raise the probability of hallucinated objects.

    Parameters
    ----------
    scope : ``"local"`` (ablate a head at the predicting position only; the reference) or ``"global"``.
    ablation : ``"zero"`` or ``"mean"`` (the head's mean output over every caption position).
    metric : ``"prob_diff"`` (the reference's default: ``p − p_ablated``), ``"abs_prob_diff"``
        (``|p − p_ablated|``) or ``"log_prob_diff"`` (the reference's three ``influence_score`` options).
    method : ``"exact"`` (batched, equal to the naive loop), ``"naive"`` (one forward per head) or
        ``"atp"`` (attribution patching, a gradient estimate).
    keep : captions attributed: ``"hallucinated"`` (≥ 1 hallucinated object; reference) or ``"all"``.
    top_k : hallucination heads reported by :meth:`top_heads` (default ``min(20, 10 % of heads)``).
    chunk_size : exact/local: most copy rows in one decoder-layer call (memory bound).
    progress : show a progress bar.

    Fitted attributes
    -----------------
    scores_ : DataFrame, one row per head ranked by score: ``layer, head, score, mean_hal,
        mean_nonhal, ranked`` (0 = top).
    tokens_ : DataFrame, one row per attributed object token: ``index, sample_id, image_id,
        position, token_id, token, word, hallucinated`` (``position`` indexes the sample's ``input_ids``).
    influence_ : float32 ``[n_tokens, n_layers, n_heads]``; row ``i`` is token ``i`` of ``tokens_``.
    samples_ : list of :class:`~lens_halluc.attribution.pipeline.Sample` (teacher-forced captions).
    top_k_ : the ``k`` of :meth:`top_heads`.
    model_ : checkpoint path (str, or None); spec_ : the model's sizes (dict, ``ModelSpec`` fields).
    n_captions_ : captions given to ``fit``; prompt_ : their prompt (a list if they differ).
    data_ : the dataset's image directory, size and content digest; cache_key_ : the hash of the inputs.
    versions_ : package versions; timings_ : seconds spent (``attribution_s``).

    Example
    -------
    >>> attr = Attribution(method="exact").fit(vlm, caps, ds, cache_dir="runs/cache")   # doctest: +SKIP
    >>> attr.influence_.shape, attr.top_k_                                              # doctest: +SKIP
    ((444, 6, 8), 5)
    >>> attr.figure().show()                                                            # doctest: +SKIP
    """

    def __init__(self, scope: str = "local", ablation: str = "zero", metric: str = "prob_diff",
                 method: str = "exact", keep: str = "hallucinated", top_k: int | None = None,
                 chunk_size: int = 1024, progress: bool = True):
        self.scope = scope
        self.ablation = ablation
        self.metric = metric
        self.method = method
        self.keep = keep
        self.top_k = top_k
        self.chunk_size = chunk_size
        self.progress = progress

    _PARAMS = ("scope", "ablation", "metric", "method", "keep", "top_k", "chunk_size", "progress")

    def get_params(self) -> dict:
        """The constructor parameters.

        Example
        -------
        >>> Attribution(scope="global").get_params()["scope"]
        'global'
        """
        return {k: getattr(self, k) for k in self._PARAMS}

    def __repr__(self) -> str:
        defaults = Attribution().get_params()
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items() if v != defaults[k])
        return f"Attribution({args})"

    # ------------------------------------------------------------------ fitting
    def _config(self) -> AttributionConfig:
        for name, value, allowed in (("scope", self.scope, SCOPES), ("ablation", self.ablation, ABLATIONS),
                                     ("metric", self.metric, METRICS), ("method", self.method, METHODS),
                                     ("keep", self.keep, ("hallucinated", "all"))):
            if value not in allowed:
                raise ValueError(f"unknown {name}={value!r}; choose one of {allowed}.")
        return AttributionConfig(scope=self.scope, ablation=self.ablation, metric=self.metric, method=self.method,
                                 top_k=self.top_k, keep=self.keep, chunk_size=self.chunk_size)

    def plan(self, vlm, captions, dataset, cache_dir=None) -> AttributionJob:
        """The job behind :meth:`fit`, not run yet (for a run sharded over processes).

        Each process calls ``plan(...).run(rank=r, world=n)`` with the same ``cache_dir``; then
        one calls :meth:`fit` with that ``cache_dir``, which finds every part done and assembles.

        Example
        -------
        >>> Attribution().plan(vlm, caps, ds, cache_dir="runs/x/parts").run(rank=1, world=2)   # doctest: +SKIP
        """
        cfg = self._config()
        rows = caption_rows(captions)
        samples = collect_samples(vlm, dataset, rows, keep=cfg.keep)
        return AttributionJob(vlm, samples, cfg, cache_key(vlm, rows, dataset, cfg), cache_dir, rows=rows)

    def fit(self, vlm, captions, dataset, cache_dir=None) -> "Attribution":
        """Attribute the object mentions of ``captions`` to every head of ``vlm``.

        Parameters
        ----------
        vlm : a :class:`~lens_halluc.models.LoadedVLM` (or a model :func:`influences` accepts).
        captions : :class:`lens_halluc.Captions`, an iterable of rows with ``image_id``, ``caption``,
            ``token_ids``, ``prompt``, or the path of such a JSONL.
        dataset : the :class:`~lens_halluc.data.CocoDataset` the captions describe (CHAIR ground truth, images).
        cache_dir : None (everything in memory) or a directory: each caption's influences are kept
            under ``cache_dir/<hash of every input>/`` so an interrupted fit resumes; other options,
            captions, data or weights get another hash, never stale parts.

        Returns self.

        Example
        -------
        >>> attr = Attribution().fit(vlm, caps, ds)                                     # doctest: +SKIP
        """
        import pandas as pd

        t0 = time.perf_counter()
        job = self.plan(vlm, captions, dataset, cache_dir)
        job.run(progress=self.progress)
        tables = job.assemble()
        spec = vlm.spec
        self.samples_ = job.samples
        self.influence_ = tables.influence.astype(np.float32, copy=False)
        self.tokens_ = _tokens_frame(pd.DataFrame({c: tables.tokens[c] for c in TOKEN_COLUMNS}))
        self.scores_ = _scores_frame(pd.DataFrame(head_scores(self.influence_, tables.tokens["hallucinated"]),
                                                  columns=list(SCORE_COLUMNS)))
        self.top_k_ = int(self.top_k) if self.top_k else default_top_k(spec.n_layers * spec.n_heads)
        self.model_ = str(vlm.path) if getattr(vlm, "path", None) is not None else None
        self.spec_ = spec.to_dict()
        rows = job.rows
        prompts = list(dict.fromkeys(r["prompt"] for r in rows))
        self.n_captions_ = len(rows)
        self.prompt_ = prompts[0] if len(prompts) == 1 else prompts
        self.data_ = {"image_dir": str(dataset.image_dir) if dataset.image_dir is not None else None,
                      "n_images": len(dataset.image_ids), "digest": job.key["dataset"]}
        self.cache_key_ = job.key["key"]
        self.versions_ = _versions()
        self.timings_ = {"attribution_s": round(time.perf_counter() - t0, 2)}
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "scores_"):
            raise AttributeError("this Attribution is not fitted yet: call .fit(vlm, captions, dataset) "
                                 "or Attribution.load(run_dir).")

    # ------------------------------------------------------------------ results
    def top_heads(self, k: int | None = None) -> list[tuple[int, int]]:
        """The ``k`` highest-scoring heads (default ``top_k_``) as ``(layer, head)``, best first.

        Example
        -------
        >>> attr.top_heads(3)                                  # doctest: +SKIP
        [(0, 0), (0, 4), (1, 2)]
        """
        self._check_fitted()
        k = self.top_k_ if k is None else int(k)
        top = self.scores_.iloc[:k]
        return [(int(l), int(h)) for l, h in zip(top["layer"], top["head"])]

    def figure(self, title: str | None = None):
        """The plotly heatmap of ``score`` per (layer, head), the ``top_k_`` heads outlined.

        Example
        -------
        >>> attr.figure().show()                               # doctest: +SKIP
        """
        from ..figures.heads import heads_heatmap

        self._check_fitted()
        rows = self.scores_[list(SCORE_COLUMNS)].to_dict(orient="records")
        return heads_heatmap(rows, self.spec_["n_layers"], self.spec_["n_heads"], self.top_k_, title=title)

    @property
    def n_hallucinated_(self) -> int:
        """Hallucinated tokens among ``tokens_``."""
        self._check_fitted()
        return int(self.tokens_["hallucinated"].sum())

    def manifest(self, figures: list[str]) -> dict:
        """The ``manifest.json`` content (deterministic: no paths of the run directory, no times)."""
        self._check_fitted()
        return {
            "model": self.model_, "spec": self.spec_, "data": self.data_,
            "config": {k: getattr(self, k) for k in ("scope", "ablation", "metric", "method", "keep", "chunk_size")}
            | {"top_k": self.top_k_},
            "n_captions": self.n_captions_, "n_captions_attributed": len(self.samples_),
            "n_tokens": len(self.tokens_), "n_hallucinated": self.n_hallucinated_, "prompt": self.prompt_,
            "cache_key": self.cache_key_, "versions": self.versions_, "figures": figures,
        }

    def save(self, out_dir, png: bool = True) -> Path:
        """Write the run directory of ``python -m lens_halluc.attribute``; returns it.

        Files: ``head_scores.csv``, ``top_heads.json``, ``tokens.csv``, ``influences.npz``,
        ``samples.jsonl``, ``heads.html`` (+ ``plotly.min.js``), ``heads.png`` (when ``png`` and a
        Chromium is found), ``manifest.json``: equal results give byte-equal files; and
        ``timings.json``, the one file that differs between equal runs.

        Example
        -------
        >>> attr.save("runs/attr", png=False)                  # doctest: +SKIP
        PosixPath('runs/attr')
        """
        from ..figures.io import save_figure

        self._check_fitted()
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_table(self.scores_, out / "head_scores.csv", columns=SCORE_COLUMNS)
        write_table(self.tokens_, out / "tokens.csv", columns=TOKEN_COLUMNS)
        write_npz(out / "influences.npz", influence=self.influence_)
        write_bytes_atomic(out / "samples.jsonl", samples_jsonl(self.samples_).encode())
        top = self.scores_.iloc[: self.top_k_]
        write_bytes_atomic(out / "top_heads.json", _json({
            "heads": [list(h) for h in self.top_heads()], "k": self.top_k_, "scores": [float(s) for s in top["score"]],
            "scope": self.scope, "ablation": self.ablation, "metric": self.metric, "method": self.method,
            "model": self.model_}))
        figures = save_figure(self.figure(), out / "heads", png=png)
        write_bytes_atomic(out / "manifest.json", _json(self.manifest([f.name for f in figures])))
        write_bytes_atomic(out / TIMINGS, _json({"timings": getattr(self, "timings_", {})}))
        return out

    @classmethod
    def load(cls, run_dir) -> "Attribution":
        """A fitted ``Attribution`` from a run directory (of :meth:`save` or the CLI).

        Example
        -------
        >>> attr = Attribution.load("runs/attribute"); attr.top_heads(5)     # doctest: +SKIP
        """
        import pandas as pd

        d = Path(run_dir)
        needed = [f for f in ("head_scores.csv", "tokens.csv", "influences.npz", "samples.jsonl", "manifest.json")
                  if not (d / f).is_file()]
        if needed:
            raise FileNotFoundError(f"{d} lacks {', '.join(needed)}: not the directory of Attribution.save or of "
                                    "`python -m lens_halluc.attribute --out DIR`.")
        man = json.loads((d / "manifest.json").read_text())
        cfg = man["config"]
        self = cls(scope=cfg["scope"], ablation=cfg["ablation"], metric=cfg["metric"], method=cfg["method"],
                   keep=cfg.get("keep", "hallucinated"), top_k=cfg["top_k"], chunk_size=cfg.get("chunk_size", 1024))
        # floats are parsed by Python's float() (pandas' fast parser can be 1 ulp off): equal doubles come
        # back, so a loaded result saves to the same bytes; tokens stay strings ("nan", "1" are tokens too)
        floats = {c: str for c in ("score", "mean_hal", "mean_nonhal")}
        scores = pd.read_csv(d / "head_scores.csv", dtype=floats, keep_default_na=False)
        for c in floats:
            scores[c] = [float(v) for v in scores[c]]
        self.scores_ = _scores_frame(scores)
        self.tokens_ = _tokens_frame(pd.read_csv(d / "tokens.csv", keep_default_na=False,
                                                 dtype={"token": str, "word": str}))
        self.influence_ = np.load(d / "influences.npz")["influence"]
        targets: dict[int, list[dict]] = {}
        for r in self.tokens_.to_dict(orient="records"):
            targets.setdefault(int(r["sample_id"]), []).append(
                {"position": int(r["position"]), "token_id": int(r["token_id"]), "token": str(r["token"]),
                 "word": str(r["word"]), "hallucinated": bool(r["hallucinated"])})
        self.samples_ = []
        for line in (d / "samples.jsonl").read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                # runs of older versions have no n_prompt: None
                self.samples_.append(Sample(**{k: row.get(k) for k in SAMPLE_KEYS},
                                            targets=targets.get(int(row["sample_id"]), [])))
        self.top_k_ = int(cfg["top_k"])
        self.model_, self.spec_, self.data_ = man.get("model"), man["spec"], man.get("data")
        self.n_captions_ = man.get("n_captions", man.get("n_images"))
        self.prompt_, self.versions_ = man.get("prompt"), man.get("versions", {})
        self.cache_key_ = man.get("cache_key")  # None: a run of an older version
        timings = d / TIMINGS
        self.timings_ = json.loads(timings.read_text()).get("timings", {}) if timings.is_file() else {}
        return self


def _tokens_frame(df):
    df = df[list(TOKEN_COLUMNS)].copy()
    for c in ("index", "sample_id", "image_id", "position", "token_id"):
        df[c] = df[c].astype("int64")
    for c in ("token", "word"):
        df[c] = df[c].astype(object)
    df["hallucinated"] = df["hallucinated"].astype(bool)
    return df


def _scores_frame(df):
    df = df[list(SCORE_COLUMNS)].copy()
    df["layer"], df["head"] = df["layer"].astype("int64"), df["head"].astype("int64")
    for c in ("score", "mean_hal", "mean_nonhal"):
        df[c] = df[c].astype("float64")
    df = df.sort_values(["score", "layer", "head"], ascending=[False, True, True], kind="stable")
    df = df.reset_index(drop=True)
    df["ranked"] = np.arange(len(df), dtype="int64")
    return df
