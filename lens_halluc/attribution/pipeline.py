"""The attribution job: captions → CHAIR targets → per-caption influences → head scores.

The steps behind :class:`lens_halluc.attribution.result.Attribution`. An :class:`AttributionJob`
holds the teacher-forced samples of one set of captions and, with a cache directory, writes each
caption's result to ``{cache_dir}/{key}/{sample_id:06d}.npz`` as soon as it is computed (fsync,
then rename: a part on disk is always complete), so an interrupted run resumes where it stopped.
A part damaged anyway (zero bytes, garbage, another shape: a full disk, a copy gone wrong) is
reported on stderr and recomputed; :func:`assemble` names it with the command that redoes it.
``key`` is a hash of everything that changes the numbers (model weights and path, options, the
caption rows, the dataset), so a rerun with other options never reuses stale parts. Tables are
assembled in ``sample_id`` order, so a resumed (or sharded) run ends with byte-identical files.

Example
-------
>>> samples = collect_samples(vlm, dataset, caption_rows)                     # doctest: +SKIP
>>> job = AttributionJob(vlm, samples, AttributionConfig(), key, cache_dir)    # doctest: +SKIP
>>> job.run()                                                                  # doctest: +SKIP
>>> tables = job.assemble()                                                    # doctest: +SKIP
>>> scores = head_scores(tables.influence, tables.tokens["hallucinated"])      # doctest: +SKIP
"""
from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from ..data.chair import ChairEvaluator
from ..data.coco import CocoDataset
from ..data.jsonl import read_jsonl
from ..data.outputs import write_bytes_atomic
from ..generation.runner import load_image
from ..models.loading import LoadedVLM
from . import influences

CAPTION_KEYS = ("image_id", "caption", "token_ids", "prompt")
KEY_VERSION = 1  # bump when the part format or the meaning of a part changes


class NoTargetsError(ValueError):
    """No caption has a hallucinated object (or none a real one): nothing to attribute."""


@dataclass(frozen=True)
class AttributionConfig:
    """Options of the attribution job (the parameters of ``Attribution`` that change the numbers)."""

    scope: str = "local"
    ablation: str = "zero"
    metric: str = "prob_diff"
    method: str = "exact"
    top_k: int | None = None
    keep: str = "hallucinated"  # captions kept: "hallucinated" (≥ 1 hallucination, the reference) or "all"
    chunk_size: int = 1024


@dataclass
class Sample:
    """One teacher-forced caption and its CHAIR targets.

    ``input_ids``: prompt (with the expanded image tokens) + generated caption ids; the first
    ``n_prompt`` are the prompt. ``targets``:
    one dict per object mention with ``position`` (index in ``input_ids`` of the word's first
    sub-token), ``token_id``, ``token``, ``word`` and ``hallucinated``.
    """

    sample_id: int
    image_id: int
    image: str
    prompt: str
    caption: str
    input_ids: list[int]
    n_prompt: int
    targets: list[dict] = field(default_factory=list)


def caption_rows(captions) -> list[dict]:
    """``[{"image_id", "caption", "token_ids", "prompt", ...}]`` from a JSONL path or an iterable of rows.

    Example
    -------
    >>> caption_rows([{"image_id": 1, "caption": "a cat .", "token_ids": [5, 6], "prompt": "Describe."}])[0]["image_id"]
    1
    """
    if isinstance(captions, (str, Path)):
        return read_jsonl(captions)
    rows = [dict(r) for r in captions]
    for k, r in enumerate(rows):
        missing = [c for c in CAPTION_KEYS if c not in r]
        if missing:
            raise ValueError(f"caption row #{k} lacks {', '.join(missing)}; captions must be the rows of "
                             "lh.caption (or of a captions JSONL) with image_id, caption, token_ids and prompt.")
    return rows


def collect_samples(vlm: LoadedVLM, dataset: CocoDataset, captions: str | Path | Iterable[Mapping],
                    keep: str = "hallucinated") -> list[Sample]:
    """Teacher-forced samples from captioning results (``{"image_id", "caption", "token_ids", "prompt"}`` rows).

    Target positions come from CHAIR's token alignment (never from matching decoded strings).
    ``keep="hallucinated"`` keeps captions with at least one hallucinated object, as the reference does.

    Example
    -------
    >>> samples = collect_samples(vlm, ds, caps)                     # doctest: +SKIP
    >>> samples[0].targets[0]["word"], samples[0].targets[0]["hallucinated"]   # doctest: +SKIP
    ('knife', True)
    """
    if keep not in ("hallucinated", "all"):
        raise ValueError(f"unknown keep={keep!r}; choose 'hallucinated' or 'all'.")
    rows = caption_rows(captions)
    # A caption holding an image token cannot be teacher-forced: the model would take that position for an
    # image slot (and refuse the mismatch of image features and tokens). Random tiny models produce them.
    image_ids = set(int(i) for i in vlm.spec.image_token_ids)
    bad = [r for r in rows if image_ids & set(int(t) for t in r["token_ids"])]
    if bad:
        _say(f"{len(bad)} caption(s) contain the image token (ids {sorted(image_ids)}) and cannot be teacher-forced; "
             f"left out: image ids {[int(r['image_id']) for r in bad]}.")
        rows = [r for r in rows if not image_ids & set(int(t) for t in r["token_ids"])]
    chair = ChairEvaluator()
    result = chair.evaluate(rows, dataset, tokenizer=vlm.tokenizer)
    samples = []
    for row, per in zip(rows, result.captions):
        mentions = [m for m in per["mentions"] if m["token_position"] is not None]
        if keep == "hallucinated" and not any(m["hallucinated"] for m in mentions):
            continue
        image = dataset.image_path(row["image_id"])
        enc = vlm.encode([load_image(image)], [row["prompt"]])
        prompt_ids = enc["input_ids"][0].tolist()
        ids = prompt_ids + list(row["token_ids"])
        targets = []
        for m in mentions:
            pos = len(prompt_ids) + int(m["token_position"])
            targets.append({"position": pos, "token_id": ids[pos], "token": vlm.tokenizer.convert_ids_to_tokens(ids[pos]),
                            "word": m["word"], "hallucinated": bool(m["hallucinated"])})
        samples.append(Sample(len(samples), int(row["image_id"]), str(image), row["prompt"], row["caption"], ids,
                              len(prompt_ids), targets))
    if not any(t["hallucinated"] for s in samples for t in s.targets):
        raise NoTargetsError(
            f"none of the {len(rows)} captions has a hallucinated object that CHAIR can align to a token: nothing to "
            "attribute. Use more images (--n-images), a split where the model hallucinates, or check the annotations.")
    return samples


def sample_inputs(vlm: LoadedVLM, sample: Sample) -> dict[str, torch.Tensor]:
    """Every forward input of a sample's whole sequence (prompt + caption), batch 1.

    ``input_ids``/``attention_mask`` ``[1, T]``, ``pixel_values`` and whatever else the family's
    processor returns for the image (``image_sizes``, ``image_grid_thw``, ``token_type_ids``,
    ``aspect_ratio_ids``, ``cross_attention_mask`` ...), per-token inputs extended over the caption
    (:meth:`LoadedVLM.sequence_inputs`).

    Example
    -------
    >>> sorted(sample_inputs(vlm, samples[0]))                       # doctest: +SKIP
    ['attention_mask', 'image_grid_thw', 'input_ids', 'mm_token_type_ids', 'pixel_values']
    """
    return vlm.sequence_inputs(load_image(sample.image), sample.prompt, sample.input_ids)


def split_inputs(inputs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """``(input_ids [T], pixel_values or None, model_kwargs)``: the attribution signature's three parts.

    ``attention_mask`` is dropped (one unpadded sequence: all ones); everything else the forward
    takes stays in ``model_kwargs`` for ``influences(vlm, input_ids, pixel_values, targets, **model_kwargs)``."""
    rest = dict(inputs)
    ids = rest.pop("input_ids")[0]
    rest.pop("attention_mask", None)
    return ids, rest.pop("pixel_values", None), rest


def sample_means(vlm: LoadedVLM, samples: Sequence[Sample]) -> torch.Tensor:
    """Mean-ablation reference ``[n_layers, n_heads, head_dim]``: every caption position of ``samples``."""
    from .exact import head_means

    seqs = [sample_inputs(vlm, s) for s in samples]
    pos = [list(range(s.n_prompt, len(s.input_ids))) for s in samples]
    return head_means(vlm, seqs, pos)


def sample_influence(vlm: LoadedVLM, sample: Sample, cfg: AttributionConfig,
                     means: torch.Tensor | None = None) -> np.ndarray:
    """Influences ``[n_targets, n_layers, n_heads]`` (float32) of every head on every target of one sample."""
    L, H = vlm.spec.n_layers, vlm.spec.n_heads
    if not sample.targets:
        return np.zeros((0, L, H), np.float32)
    ids, pixels, model_kwargs = split_inputs(sample_inputs(vlm, sample))
    res = influences(vlm, ids, pixels, [t["position"] for t in sample.targets], scope=cfg.scope,
                     ablation=cfg.ablation, metric=cfg.metric, means=means, chunk_size=cfg.chunk_size,
                     method=cfg.method, **model_kwargs)
    return res.influence.numpy().astype(np.float32)


# ------------------------------------------------------------------------------ files
def write_npz(path: str | Path, **arrays: np.ndarray) -> Path:
    """``np.savez`` with fixed zip timestamps (equal arrays → equal bytes), fsynced, then renamed into place.

    Example
    -------
    >>> write_npz("/tmp/lens_halluc_a.npz", x=np.zeros(2)).name
    'lens_halluc_a.npz'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as z:
        for name, value in arrays.items():
            # numpy's savez stamps the current time into every member; a fixed date keeps the bytes
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with z.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(value), allow_pickle=False)
    write_bytes_atomic(path, buf.getvalue())
    return path


class DamagedPartError(ValueError):
    """A cached part that cannot be read (zero bytes, garbage, wrong shape): named, with how to redo it."""


REDO = ("rerun the same command (python -m lens_halluc.attribute with the same options, or Attribution.fit with "
        "the same cache_dir): a damaged part is recomputed")


def read_part(path: str | Path, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """The ``influence`` array of a part file; :class:`DamagedPartError` naming the file when it is damaged.

    Example
    -------
    >>> read_part(write_npz("/tmp/lens_halluc_p.npz", influence=np.zeros((1, 2, 3), np.float32))).shape
    (1, 2, 3)
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            inf = z["influence"]
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as e:
        size = path.stat().st_size if path.exists() else 0
        raise DamagedPartError(f"damaged result part {path} ({size} bytes; {type(e).__name__}: {e}); {REDO}.") from None
    if shape is not None and inf.shape != tuple(shape):
        raise DamagedPartError(f"damaged result part {path}: shape {inf.shape}, expected {tuple(shape)}; {REDO}.")
    return inf


def _say(msg: str) -> None:
    import sys

    print(f"lens_halluc: {msg}", file=sys.stderr, flush=True)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def model_fingerprint(vlm: LoadedVLM) -> str:
    """A digest of the model's weights (a strided sample of every parameter) and dtype.

    A re-trained model keeps its checkpoint path but not its weights; the cache must tell them apart.
    """
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in vlm.model.named_parameters():
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // 4096)
            h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
            h.update(flat[::step].double().cpu().numpy().tobytes())
    return h.hexdigest()


def dataset_digest(dataset: CocoDataset, image_ids: Iterable[int]) -> str:
    """A digest of what CHAIR and the images give for ``image_ids``: categories, objects, references, pixels."""
    h = hashlib.sha256(_digest({str(k): v for k, v in dataset.categories.items()}).encode())
    for i in image_ids:
        h.update(_digest([i, dataset.images[i].file_name, dataset.category_ids(i),
                          dataset.captions.get(i, [])]).encode())
        h.update(hashlib.sha256(dataset.image_path(i).read_bytes()).digest())
    return h.hexdigest()


def cache_key(vlm: LoadedVLM, rows: Sequence[Mapping], dataset: CocoDataset, cfg: AttributionConfig) -> dict:
    """What a cached part depends on, and its hash (``"key"``, 16 hex digits).

    Example
    -------
    >>> cache_key(vlm, rows, ds, AttributionConfig())["key"]          # doctest: +SKIP
    '70ab28211660606d'
    """
    from .exact import attn_implementation

    inputs = {
        "version": KEY_VERSION,
        "model": str(vlm.path) if vlm.path is not None else None,
        "weights": model_fingerprint(vlm),
        "device": torch.device(vlm.device).type,
        "attn_implementation": attn_implementation(vlm),
        "options": {k: v for k, v in asdict(cfg).items() if k != "top_k"},  # top_k only cuts the table
        "captions": _digest([[r[c] for c in CAPTION_KEYS] for r in rows]),
        "dataset": dataset_digest(dataset, [int(r["image_id"]) for r in rows]),
    }
    return {"key": _digest(inputs)[:16], **inputs}


@dataclass
class AttributionTables:
    """Assembled results. ``tokens``: dict of columns (one row per target token);
    ``influence``: float32 ``[n_tokens, n_layers, n_heads]`` (row i = token i)."""

    tokens: dict[str, list]
    influence: np.ndarray


TOKEN_COLUMNS = ("index", "sample_id", "image_id", "position", "token_id", "token", "word", "hallucinated")


def assemble(parts: Path | Mapping[int, np.ndarray], samples: Sequence[Sample], n_layers: int,
             n_heads: int) -> AttributionTables:
    """Stack the per-sample influences in ``sample_id`` order (missing parts raise).

    ``parts``: a directory of ``{sample_id:06d}.npz`` files or a mapping ``sample_id → array``.
    """
    cols: dict[str, list] = {c: [] for c in TOKEN_COLUMNS}
    blocks = []
    for s in sorted(samples, key=lambda s: s.sample_id):
        if isinstance(parts, Mapping):
            where, inf = f"sample {s.sample_id}", parts[s.sample_id]
        else:
            path = Path(parts) / f"{s.sample_id:06d}.npz"
            if not path.is_file():
                raise FileNotFoundError(f"missing result part {path}; rerun the job to finish it.")
            where, inf = str(path), read_part(path, (len(s.targets), n_layers, n_heads))
        if inf.shape != (len(s.targets), n_layers, n_heads):
            raise ValueError(f"{where} has shape {inf.shape}, expected {(len(s.targets), n_layers, n_heads)}.")
        blocks.append(inf)
        for t in s.targets:
            cols["index"].append(len(cols["index"]))
            cols["sample_id"].append(s.sample_id)
            cols["image_id"].append(s.image_id)
            for k in ("position", "token_id", "token", "word", "hallucinated"):
                cols[k].append(t[k])
    influence = np.concatenate(blocks) if blocks else np.zeros((0, n_layers, n_heads), np.float32)
    return AttributionTables(tokens=cols, influence=influence)


class AttributionJob:
    """The influences of every sample of one attribution, computed in memory or into a cache directory.

    Parameters
    ----------
    vlm : the model.
    samples : from :func:`collect_samples`.
    cfg : the options.
    key : from :func:`cache_key` (``key["key"]`` names the cache subdirectory).
    cache_dir : None (in memory) or the directory under which ``{key}/`` holds the parts.
    rows : the caption rows the samples came from (kept for the result's record).

    Example
    -------
    >>> job = AttributionJob(vlm, samples, cfg, cache_key(vlm, rows, ds, cfg), "runs/x/parts")   # doctest: +SKIP
    >>> job.run(rank=0, world=2)      # this process's half of the captions                       # doctest: +SKIP
    """

    def __init__(self, vlm: LoadedVLM, samples: Sequence[Sample], cfg: AttributionConfig, key: dict,
                 cache_dir: str | Path | None = None, rows: Sequence[Mapping] = ()):
        self.vlm, self.samples, self.cfg, self.key, self.rows = vlm, list(samples), cfg, key, list(rows)
        self.dir = Path(cache_dir) / key["key"] if cache_dir is not None else None
        self.results: dict[int, np.ndarray] = {}
        self._means: torch.Tensor | None = None
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            info = self.dir / "key.json"  # for people: what these parts were computed from
            if not info.is_file():
                write_bytes_atomic(info, json.dumps(key, indent=1).encode())

    def part(self, sample: Sample) -> Path | None:
        return self.dir / f"{sample.sample_id:06d}.npz" if self.dir is not None else None

    def _done(self, sample: Sample) -> bool:
        """Whether the sample's part is on disk and readable; a damaged one is removed (and recomputed)."""
        if self.dir is None or not self.part(sample).is_file():
            return False
        spec = self.vlm.spec
        try:
            read_part(self.part(sample), (len(sample.targets), spec.n_layers, spec.n_heads))
        except DamagedPartError as e:
            _say(f"{str(e).split('; rerun')[0]}: recomputing it.")
            self.part(sample).unlink()
            return False
        return True

    def means(self) -> torch.Tensor | None:
        """The mean-ablation reference (None for zero ablation); cached as ``means.npy`` beside the parts."""
        if self.cfg.ablation != "mean":
            return None
        if self._means is None:
            path = self.dir / "means.npy" if self.dir is not None else None
            if path is not None and path.is_file():
                try:
                    self._means = torch.from_numpy(np.load(path, allow_pickle=False))
                except (OSError, EOFError, ValueError) as e:
                    _say(f"damaged mean-ablation reference {path} ({type(e).__name__}: {e}): recomputing it.")
            if self._means is None:
                self._means = sample_means(self.vlm, self.samples)
                if path is not None:
                    buf = io.BytesIO()
                    np.save(buf, self._means.numpy())
                    write_bytes_atomic(path, buf.getvalue())
        return self._means

    def run(self, rank: int = 0, world: int = 1, progress: bool = False) -> None:
        """Compute the samples with ``sample_id % world == rank`` that are not done yet."""
        from tqdm.auto import tqdm

        mine = [s for s in self.samples if s.sample_id % world == rank]
        todo = [s for s in mine if s.sample_id not in self.results and not self._done(s)]
        means = self.means() if todo else None
        for s in tqdm(todo, desc="attributing", disable=not progress):
            inf = sample_influence(self.vlm, s, self.cfg, means)
            if self.dir is not None:
                write_npz(self.part(s), influence=inf)
            else:
                self.results[s.sample_id] = inf

    def assemble(self) -> AttributionTables:
        """The tables of every sample (all parts must be done)."""
        spec = self.vlm.spec
        return assemble(self.dir if self.dir is not None else self.results, self.samples, spec.n_layers, spec.n_heads)


def head_scores(influence: np.ndarray, hallucinated: Sequence[bool]) -> list[dict]:
    """``S_{l,h} = mean_{Hal} I − mean_{NonHal} I`` per head, ranked by score (ties: layer, head).

    ``influence``: ``[n_tokens, n_layers, n_heads]``; ``hallucinated``: ``[n_tokens]`` bools.
    Returns rows ``{"layer", "head", "score", "mean_hal", "mean_nonhal"}``. A set with no tokens
    contributes a mean of 0 (so the score is the other set's mean, negated for NonHal).

    Example
    -------
    >>> rows = head_scores(np.array([[[0.5, 0.0]], [[0.1, 0.2]]]), [True, False])
    >>> [(r["layer"], r["head"], round(r["score"], 2)) for r in rows]
    [(0, 0, 0.4), (0, 1, -0.2)]
    """
    hal = np.asarray(hallucinated, dtype=bool)
    inf = np.asarray(influence, dtype=np.float64)
    mean_hal = inf[hal].mean(0) if hal.any() else np.zeros(inf.shape[1:])
    mean_non = inf[~hal].mean(0) if (~hal).any() else np.zeros(inf.shape[1:])
    score = mean_hal - mean_non
    rows = [{"layer": l, "head": h, "score": float(score[l, h]), "mean_hal": float(mean_hal[l, h]),
             "mean_nonhal": float(mean_non[l, h])} for l in range(score.shape[0]) for h in range(score.shape[1])]
    return sorted(rows, key=lambda r: (-r["score"], r["layer"], r["head"]))


SAMPLE_KEYS = ("sample_id", "image_id", "image", "prompt", "caption", "input_ids", "n_prompt")


def samples_jsonl(samples: Sequence[Sample]) -> str:
    """The ``samples.jsonl`` text: one line per sample (targets are in ``tokens.csv``).

    Example
    -------
    >>> samples_jsonl([Sample(0, 1, "1.png", "Describe.", "a cat .", [3, 4], 1)])[:31]
    '{"sample_id": 0, "image_id": 1,'
    """
    return "".join(json.dumps({k: asdict(s)[k] for k in SAMPLE_KEYS}) + "\n" for s in samples)
