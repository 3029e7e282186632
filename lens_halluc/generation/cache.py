"""Cache keys of the generation runners: a hash of everything that changes a caption or an answer.

The model (path, template, dtype, config and a fingerprint of the weights in memory), the prompt,
``max_new_tokens``, the strategy's class and ``get_params()``, the token choice (greedy, sampling
with its parameters and seed, or beam search: :func:`~lens_halluc.generation.sampling.choice_label`), the images (names, sizes,
modification times) and the package version. :func:`lens_halluc.generation.caption` names its
cache files by this hash; the command lines record it beside ``--out`` to refuse a resume made
with other options.

Example
-------
>>> from lens_halluc.generation.cache import digest
>>> digest({"b": 1, "a": [1, 2]}) == digest({"a": [1, 2], "b": 1})
True
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..data.coco import CocoDataset, DataError
from ..models.loading import LoadedVLM
from .decoding import DecodingStrategy
from .sampling import choice_label


def jsonable(value: Any, where: str) -> Any:
    """``value`` as plain JSON types (tuples -> lists, sets sorted, arrays listed); else ValueError."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v, where) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, where) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((jsonable(v, where) for v in value), key=json.dumps)
    if hasattr(value, "tolist"):  # numpy / torch scalars and arrays
        return jsonable(value.tolist(), where)
    raise ValueError(f"{where} holds a {type(value).__name__} ({value!r:.60}), which cannot key a cache; "
                     "get_params() must return JSON-able values.")


def digest(obj: Any) -> str:
    """SHA-256 of the canonical JSON of ``obj``."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def strategy_identity(strategy) -> dict | None:
    """Class and parameters of a strategy, for a cache key; ValueError when it has no ``get_params``."""
    if strategy is None:
        return None
    cls = type(strategy)
    name = f"{cls.__module__}.{cls.__qualname__}"
    if cls is DecodingStrategy:
        return {"class": name, "params": {}}
    get_params = getattr(strategy, "get_params", None)
    if not callable(get_params):
        raise ValueError(f"cannot key cached results by a {cls.__name__} strategy: it has no get_params() saying "
                         "what it does. Pass cache_dir=None (in memory), or use an intervention class "
                         "(lens_halluc.ADHH, VCD, ...), or give it get_params() returning its JSON-able parameters.")
    return {"class": name, "params": jsonable(get_params(), f"{cls.__name__}.get_params()")}


def strategy_label(strategy) -> dict | None:
    """Class (and parameters when available) of a strategy, for ``config``; never raises."""
    try:
        return strategy_identity(strategy)
    except ValueError:
        cls = type(strategy)
        return {"class": f"{cls.__module__}.{cls.__qualname__}", "params": None}


def model_label(vlm: LoadedVLM) -> dict:
    template = vlm.template
    return {"path": str(Path(vlm.path).resolve()) if vlm.path is not None else None,
            "template": {"name": template.name, "text": template.text, "image_token": template.image_token,
                         "image_placeholder": template.image_placeholder},
            "dtype": str(vlm.dtype).replace("torch.", "")}


def model_identity(vlm: LoadedVLM) -> dict:
    """Path, template, dtype, config and a fingerprint of the weights as they are in memory.

    The weights are fingerprinted (per-tensor float64 sum and sum of squares), not only the path:
    a model re-trained or edited in place keeps its path but must not reuse old captions.
    """
    import torch

    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in vlm.model.named_parameters():
            t = p.detach().to(torch.float64)
            h.update(f"{name}:{tuple(p.shape)}:{float(t.sum())!r}:{float((t * t).sum())!r};".encode())
    config = vlm.model.config.to_json_string(use_diff=False) if hasattr(vlm.model, "config") else ""
    return {**model_label(vlm), "config": hashlib.sha256(config.encode()).hexdigest(), "weights": h.hexdigest()}


def files_identity(image_dir: Path, names: Iterable[str]) -> str:
    """Digest of image files by name, size and modification time (a re-export changes it)."""
    stats = []
    for name in names:
        try:
            st = (image_dir / name).stat()
            stats.append([name, st.st_size, st.st_mtime_ns])
        except OSError:
            stats.append([name, None, None])
    return digest(stats)


def version() -> str:
    from .. import __version__

    return __version__


def cache_file(cache_dir: str | Path, kind: str, identity: dict) -> Path:
    """``cache_dir/<kind>-<hash>.jsonl``, with the identity beside it as ``.config.json`` for humans."""
    key = digest(identity)[:20]
    path = Path(cache_dir) / f"{kind}-{key}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = path.with_suffix(".config.json")
    if not meta.exists():
        from ..data.outputs import write_text_atomic

        write_text_atomic(meta, json.dumps(identity, indent=1, sort_keys=True) + "\n")
    return path


def caption_identity(vlm: LoadedVLM, dataset: CocoDataset, prompt: str, max_new_tokens: int, strategy,
                     choice=None) -> dict:
    """Everything that changes a caption: the cache key of :func:`caption` and of checked output files.

    ``choice``: the resolved token choice (``None`` greedy, a ``Sampling`` or a ``Beams``).
    """
    if dataset.image_dir is None:
        raise DataError("this dataset was loaded without an image directory; pass image_dir / --image-dir.")
    image_dir = Path(dataset.image_dir).resolve()
    return {
        "kind": "captions", "model": model_identity(vlm), "prompt": prompt, "max_new_tokens": int(max_new_tokens),
        "strategy": strategy_identity(strategy), "decoding": choice_label(choice), "version": version(),
        # the whole dataset, not the selection: another image_ids/limit reuses the same file
        "dataset": {"image_dir": str(image_dir), "images": digest(
            [[i, r.file_name] for i, r in dataset.images.items()]),
                    "files": files_identity(image_dir, (r.file_name for r in dataset.images.values()))},
    }


def guard_output(out: str | Path, identity: dict, overwrite: bool) -> None:
    """Refuse ``out`` when it is not ours, or (without ``overwrite``) was made with other options.

    Ours: absent, empty, or with ``<out>.config.json`` of the same kind beside it
    (:func:`lens_halluc.data.outputs.check_results_file`); a file that is not ours is never truncated
    nor appended to, ``overwrite`` or not. The options are then recorded in ``<out>.config.json``.
    """
    from ..data.outputs import check_results_file, config_path, write_text_atomic

    out = Path(out)
    check_results_file(out, identity["kind"])
    meta = config_path(out)
    if meta.is_file() and not overwrite and out.exists():
        old = json.loads(meta.read_text())
        if old != identity:
            changed = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
            shown = ", ".join(f"{k}={_short(old.get(k))}" for k in changed)
            raise ValueError(f"--out {out} holds {identity['kind']} made with other options ({shown}; see "
                             f"{meta.name}); use a new --out or --overwrite.")
    write_text_atomic(meta, json.dumps(identity, indent=1, sort_keys=True) + "\n")


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


def answer_identity(vlm: LoadedVLM, questions: Sequence[dict], image_dir: Path, prompt_suffix: str,
                     max_new_tokens: int, strategy, choice=None) -> dict:
    """Everything that changes an answer (all the questions, not a ``limit`` of them; ``choice`` the token choice)."""
    return {
        "kind": "answers", "model": model_identity(vlm), "prompt_suffix": prompt_suffix,
        "max_new_tokens": int(max_new_tokens), "strategy": strategy_identity(strategy),
        "decoding": choice_label(choice), "version": version(),
        "questions": digest([[q["question_id"], q["image"], q["text"]] for q in questions]),
        "image_dir": str(image_dir.resolve()),
        "files": files_identity(image_dir, sorted({q["image"] for q in questions})),
    }
