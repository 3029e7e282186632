"""Batched captioning and yes/no answering over datasets: in memory, cached, or written to a file.

One batch loop (:func:`_run`) serves every entry point:

- :func:`caption` / :func:`answer` return :class:`Captions` / :class:`Answers`; in memory by
  default; with ``cache_dir`` the rows go to a JSONL file whose name is a hash of everything that
  changes them (model, template, prompt, ``max_new_tokens``, strategy and its parameters, the
  images, the package version), so a rerun with other options never returns stale rows and an
  interrupted run resumes;
- :func:`caption_dataset` / :func:`answer_questions` append to a file you name (what the
  ``python -m lens_halluc.caption`` / ``answer`` commands do) and resume it.

``strategy=`` is ``None`` (greedy), a :class:`~lens_halluc.generation.DecodingStrategy` or an
intervention such as ``lens_halluc.ADHH(heads)`` (see :func:`resolve_strategy`).

``sampling=`` is the token choice (:mod:`lens_halluc.generation.sampling`): ``"strategy"`` (default:
the strategy's own, argmax for plain greedy), ``None`` (argmax), a ``Sampling(temperature, top_k,
top_p, seed)`` or a ``Beams(num_beams, length_penalty, early_stopping)``. When sampling, every item
draws from its own generator seeded from ``(seed, image id)`` / ``(seed, question id)``
(:func:`~lens_halluc.generation.sampling.row_seed`), so its text does not depend on the batch size,
the batch it falls in or the order of the items. The same keys reach the strategy
(``decode(..., keys=)``): VCD / SEED noise and CausalMM's random counterfactual maps are drawn per
item from ``row_seed(strategy seed, key)``, so they do not depend on the batch either. The resolved choice is part of every cache key and
is recorded as ``config["decoding"]``.

Example
-------
>>> vlm = load_vlm()                                                      # doctest: +SKIP
>>> ds = CocoDataset.load("instances.json", image_dir="images")           # doctest: +SKIP
>>> caps = caption(vlm, ds, max_new_tokens=32)                            # doctest: +SKIP
>>> caption_dataset(vlm, ds, "captions.jsonl", max_new_tokens=32)         # doctest: +SKIP
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from PIL import Image
from tqdm.auto import tqdm

from ..data.coco import CocoDataset, DataError
from ..data.images import check_image, open_image, resolve_image
from ..data.options import check_int
from ..models.loading import LoadedVLM
from ..models.prompts import CAPTION_PROMPT
from .cache import answer_identity, cache_file, caption_identity, guard_output, model_label, strategy_label, version
from .decoding import decode, resolve_strategy
from .sampling import STRATEGY_CHOICE, Sampling, choice_label, resolve_choice, row_generators
from .jsonl import ResumableJsonl
from .results import Answers, Captions

__all__ = ["Answers", "Captions", "answer", "answer_questions", "caption", "caption_dataset", "generate",
           "load_image"]


def load_image(path: str | Path, max_image_pixels: int | None = None) -> Image.Image:
    """An RGB image; a missing, undecodable or too large file raises :class:`DataError` naming it
    (and, for size, the limit and ``--max-image-pixels``; see :func:`lens_halluc.data.images.open_image`).

    Example
    -------
    >>> load_image("world/images/000001.png").size                        # doctest: +SKIP
    (64, 64)
    """
    return open_image(path, max_image_pixels)


def generate(
    vlm: LoadedVLM,
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    max_new_tokens: int = 128,
    strategy=None,
    sampling=STRATEGY_CHOICE,
    keys: Sequence[Any] | None = None,
) -> list[dict]:
    """Generation for one batch (greedy unless the strategy or ``sampling`` chooses otherwise).

    ``strategy``: None, a :class:`DecodingStrategy` or an intervention with ``bind(vlm)``.
    ``sampling``: ``"strategy"`` (default), ``None`` (argmax), a :class:`Sampling` or a ``Beams``
    (see :mod:`lens_halluc.generation.sampling`). ``keys``: one key per input (e.g. image ids); row
    ``i`` then draws its tokens (when sampling) from a generator seeded with ``row_seed(seed, keys[i])``
    and the strategy draws its noise / random maps for row ``i`` (VCD, SEED, CausalMM) from
    ``row_seed(strategy seed, keys[i])`` (``decode(..., keys=)``), so its text does not depend on the
    rest of the batch. Without ``keys`` one generator seeded with ``seed`` serves the batch (a batch
    of one then draws like ``model.generate(do_sample=True)``).
    Returns one dict per input: ``text`` (decoded, special tokens skipped, stripped),
    ``token_ids`` (generated ids, EOS excluded) and ``prompt_ids`` (prompt ids without padding).

    Example
    -------
    >>> generate(vlm, [image], ["Please describe this image in detail."], 16)[0]["text"]   # doctest: +SKIP
    """
    strategy = resolve_strategy(strategy, vlm)
    choice = resolve_choice(sampling, strategy)
    generators = None
    if keys is not None:
        keys = list(keys)
        if len(keys) != len(prompts):
            raise ValueError(f"generate: {len(keys)} keys for {len(prompts)} prompts.")
        if isinstance(choice, Sampling):
            generators = row_generators(choice, keys)
    enc = vlm.encode(images, prompts)  # the whole processor output: decode keeps what the forward takes
    out = decode(vlm.model, enc, max_new_tokens=max_new_tokens, strategy=strategy,
                 eos_token_ids=vlm.spec.eos_token_ids,
                 pad_token_id=vlm.spec.pad_token_id if vlm.spec.pad_token_id is not None else 0,
                 sampling=choice, generators=generators, keys=keys)
    results = []
    for i in range(len(prompts)):
        ids = out.tokens(i)
        mask = enc["attention_mask"][i].bool()
        results.append({
            "text": vlm.tokenizer.decode(ids, skip_special_tokens=True).strip(),
            "token_ids": ids,
            "prompt_ids": enc["input_ids"][i][mask].tolist(),
        })
    return results


def _batches(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i: i + size]


class _MemorySink:
    """In-memory stand-in for :class:`ResumableJsonl` (same ``done`` / ``write`` / ``rows``)."""

    def __init__(self, key: str):
        self.key, self.done, self._rows = key, set(), []

    def write(self, rows: Iterable[dict]) -> None:
        rows = list(rows)
        self._rows += rows
        self.done.update(r[self.key] for r in rows)

    def rows(self) -> list[dict]:
        return list(self._rows)


def _run(vlm: LoadedVLM, items: list, sink, *, key: Callable[[Any], Any], image_path: Callable[[Any], Path],
         prompt: Callable[[Any], str], row: Callable[[Any, str, dict], dict], max_new_tokens: int, batch_size: int,
         strategy, desc: str, progress: bool, max_image_pixels: int | None = None,
         sampling=STRATEGY_CHOICE) -> int:
    """The batch loop of every runner: generate for the items not yet in ``sink``; returns how many it made.

    Sampled items draw from their own generator seeded from ``(seed, key(item))``; the keys also reach the
    strategy (its per-item noise / random maps).
    """
    batch_size = check_int("batch_size", batch_size, minimum=1)
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, minimum=1)
    strategy = resolve_strategy(strategy, vlm)  # bind an intervention once, not per batch
    todo = [it for it in items if key(it) not in sink.done]
    # every image checked (inside its folder, present, an image, within the size limit) before the
    # first batch: a bad file is reported at once, not when the run reaches it
    paths = [image_path(it) for it in todo]
    for p in dict.fromkeys(paths):
        check_image(p, max_image_pixels)
    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc=desc, disable=not progress)
    try:
        for chunk, chunk_paths in zip(_batches(todo, batch_size), _batches(paths, batch_size)):
            images = [load_image(p, max_image_pixels) for p in chunk_paths]
            prompts = [prompt(it) for it in chunk]
            results = generate(vlm, images, prompts, max_new_tokens, strategy, sampling=sampling,
                               keys=[key(it) for it in chunk])
            sink.write(row(it, p, r) for it, p, r in zip(chunk, prompts, results))
            bar.update(len(chunk))
    finally:
        bar.close()
    return len(todo)


# ------------------------------------------------------------------------------- captions
def _select_ids(dataset: CocoDataset, image_ids: Sequence[int] | None, limit: int | None) -> list[int]:
    ids = [int(i) for i in image_ids] if image_ids is not None else dataset.image_ids
    if limit is not None:
        ids = ids[:limit]
    unknown = [i for i in ids if i not in dataset.images]
    if unknown:
        raise DataError(f"image id(s) {unknown[:5]} are not in the dataset; pass ids of its images.")
    return ids


def _caption_into(sink, vlm: LoadedVLM, dataset: CocoDataset, ids: list[int], prompt: str, max_new_tokens: int,
                  batch_size: int, strategy, progress: bool, sampling=STRATEGY_CHOICE) -> int:
    return _run(vlm, ids, sink, key=lambda i: i, image_path=dataset.image_path, prompt=lambda i: prompt,
                row=lambda i, p, r: {"image_id": i, "caption": r["text"], "image": dataset.images[i].file_name,
                                     "prompt": p, "token_ids": r["token_ids"]},
                max_new_tokens=max_new_tokens, batch_size=batch_size, strategy=strategy, desc="captioning",
                progress=progress, max_image_pixels=dataset.max_image_pixels, sampling=sampling)


def caption(
    vlm: LoadedVLM,
    dataset: CocoDataset,
    strategy=None,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    prompt: str = CAPTION_PROMPT,
    image_ids: Sequence[int] | None = None,
    limit: int | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    sampling=STRATEGY_CHOICE,
) -> Captions:
    """Caption a dataset's images with greedy decoding (or a strategy / intervention).

    Parameters
    ----------
    vlm : the model (:func:`lens_halluc.load_vlm`).
    dataset : a :class:`CocoDataset` with an image directory.
    strategy : None (greedy), a :class:`DecodingStrategy`, or an intervention (``lh.ADHH(heads)``).
    max_new_tokens, batch_size, prompt : decoding options (the batch size never changes a caption).
    image_ids, limit : caption these images only (default all, in dataset order) / the first ``limit``.
    cache_dir : None keeps everything in memory. A directory caches the captions in
        ``cache_dir/captions-<hash>.jsonl``, the hash covering the model (path, template, dtype,
        config, weights), prompt, ``max_new_tokens``, the strategy's class and ``get_params()``, the
        dataset's images and the package version; a rerun reuses (and an interrupted one resumes)
        only captions made the same way. A strategy without ``get_params()`` raises ``ValueError``.
        The token choice is part of the key: sampled, beam-searched and greedy captions never share a file.
    progress : show a progress bar.
    sampling : the token choice: ``"strategy"`` (default: the strategy's own, argmax for plain
        greedy; VCD/CausalMM sample), ``None`` (argmax), ``Sampling(temperature, top_k, top_p, seed)``
        (each image draws from a generator seeded from ``(seed, image id)``) or ``Beams(num_beams)``.

    Returns
    -------
    :class:`Captions`, one row per requested image, in request order.

    Example
    -------
    >>> caps = caption(vlm, ds, max_new_tokens=40)                                   # doctest: +SKIP
    >>> caps = caption(vlm, ds, strategy=lh.ADHH(heads), cache_dir="runs/cache")     # doctest: +SKIP
    >>> caps[0]["caption"]                                                           # doctest: +SKIP
    'there is a dog , a frisbee .'
    """
    ids = _select_ids(dataset, image_ids, limit)
    bound = resolve_strategy(strategy, vlm)  # bound once; the unbound one keys the cache (its get_params)
    choice = resolve_choice(sampling, bound)
    config: dict[str, Any] = {
        "kind": "captions", "model": model_label(vlm), "prompt": prompt, "max_new_tokens": int(max_new_tokens),
        "strategy": strategy_label(strategy), "decoding": choice_label(choice), "dataset": {"source": dataset.source, "image_dir": (
            str(Path(dataset.image_dir).resolve()) if dataset.image_dir is not None else None), "n_images": len(ids)},
        "version": version(),
    }
    if cache_dir is None:
        sink = _MemorySink("image_id")
        made = _caption_into(sink, vlm, dataset, ids, prompt, max_new_tokens, batch_size, bound, progress, choice)
        return Captions(sink.rows(), config, generated=made)
    path = cache_file(cache_dir, "captions", caption_identity(vlm, dataset, prompt, max_new_tokens, strategy,
                                                              choice))
    sink = ResumableJsonl(path, key="image_id")
    made = _caption_into(sink, vlm, dataset, ids, prompt, max_new_tokens, batch_size, bound, progress, choice)
    by_id = {r["image_id"]: r for r in sink.rows()}
    config.update(key=path.stem.split("-", 1)[1], path=str(path))
    return Captions([by_id[i] for i in ids], config, generated=made)


def caption_dataset(
    vlm: LoadedVLM,
    dataset: CocoDataset,
    out: str | Path,
    prompt: str = CAPTION_PROMPT,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    limit: int | None = None,
    image_ids: Sequence[int] | None = None,
    strategy=None,
    overwrite: bool = False,
    progress: bool = True,
    check_options: bool = False,
    sampling=STRATEGY_CHOICE,
) -> Path:
    """Caption images and append ``{"image_id", "caption", "image", "prompt", "token_ids"}`` lines to ``out``.

    Images already in ``out`` are skipped, so an interrupted run resumes where it stopped. With
    ``check_options`` (what ``python -m lens_halluc.caption`` does) the options are recorded in
    ``<out>.config.json`` and resuming a file made with other options (model, prompt,
    ``max_new_tokens``, strategy, images) raises ``ValueError`` instead of mixing old and new
    captions; :func:`caption` with ``cache_dir`` keys its files by those options instead.
    ``sampling`` is the token choice, as for :func:`caption` (and part of the recorded options).

    Example
    -------
    >>> caption_dataset(vlm, ds, "runs/captions.jsonl", max_new_tokens=40)   # doctest: +SKIP
    PosixPath('runs/captions.jsonl')
    """
    ids = _select_ids(dataset, image_ids, limit)
    bound = resolve_strategy(strategy, vlm)
    choice = resolve_choice(sampling, bound)
    if check_options:
        guard_output(out, caption_identity(vlm, dataset, prompt, max_new_tokens, strategy, choice), overwrite)
    sink = ResumableJsonl(out, key="image_id", overwrite=overwrite)
    _caption_into(sink, vlm, dataset, ids, prompt, max_new_tokens, batch_size, bound, progress, choice)
    return Path(out)


# -------------------------------------------------------------------------------- answers
def _check_image_dir(image_dir: str | Path) -> Path:
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise DataError(f"image directory not found: {image_dir}. Pass --image-dir.")
    return image_dir


def _answer_into(sink, vlm: LoadedVLM, qs: list[dict], image_dir: Path, prompt_suffix: str, max_new_tokens: int,
                 batch_size: int, strategy, progress: bool, allow_outside_image_dir: bool = False,
                 max_image_pixels: int | None = None, sampling=STRATEGY_CHOICE) -> int:
    def image_path(q: dict) -> Path:  # a question's image stays inside image_dir unless allowed
        return resolve_image(image_dir, q["image"], allow_outside_image_dir, source=f"question {q['question_id']!r}")

    return _run(vlm, qs, sink, key=lambda q: q["question_id"], image_path=image_path,
                prompt=lambda q: q["text"] + prompt_suffix,
                row=lambda q, p, r: {"question_id": q["question_id"], "image": q["image"], "prompt": p, "text": r["text"]},
                max_new_tokens=max_new_tokens, batch_size=batch_size, strategy=strategy, desc="answering",
                progress=progress, max_image_pixels=max_image_pixels, sampling=sampling)


def answer(
    vlm: LoadedVLM,
    questions: Sequence[dict] | str | Path,
    image_dir: str | Path,
    strategy=None,
    max_new_tokens: int = 16,
    batch_size: int = 8,
    prompt_suffix: str = "",
    limit: int | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    allow_outside_image_dir: bool = False,
    max_image_pixels: int | None = None,
    sampling=STRATEGY_CHOICE,
) -> Answers:
    """Answer POPE-style yes/no questions about images.

    Parameters
    ----------
    questions : rows ``{"question_id", "image", "text", ...}`` (as :func:`lens_halluc.pope.build`
        makes them) or the path of a POPE question file.
    image_dir : the folder of the questions' ``image`` files.
    strategy, max_new_tokens, batch_size, cache_dir, progress : as for :func:`caption` (the cache
        key covers the questions and their image files instead of a dataset).
    prompt_suffix : appended to each question (LLaVA's evaluations add " Answer the question using
        a single word or phrase.").
    limit : answer only the first ``limit`` questions.
    allow_outside_image_dir : open question images outside ``image_dir`` (``../x``, absolute
        paths); refused by default.
    max_image_pixels : refuse larger images (default: PIL's limit, :data:`lens_halluc.data.images.MAX_IMAGE_PIXELS`).
    sampling : the token choice, as for :func:`caption` (sampled answers draw from a generator seeded
        from ``(seed, question_id)``).

    Returns
    -------
    :class:`Answers`, one row ``{"question_id", "image", "prompt", "text"}`` per question, in order.

    Example
    -------
    >>> qs = lh.pope.build(ds, "adversarial", n_images=50)                   # doctest: +SKIP
    >>> answers = answer(vlm, qs, ds.image_dir, max_new_tokens=3)            # doctest: +SKIP
    >>> lh.pope.score(qs, answers).summary["f1"]                             # doctest: +SKIP
    """
    if isinstance(questions, (str, Path)):
        from ..data.pope import read_questions

        questions = read_questions(questions)
    image_dir = _check_image_dir(image_dir)
    questions = list(questions)
    qs = questions[:limit] if limit is not None else questions
    bound = resolve_strategy(strategy, vlm)
    choice = resolve_choice(sampling, bound)
    config: dict[str, Any] = {
        "kind": "answers", "model": model_label(vlm), "prompt_suffix": prompt_suffix,
        "max_new_tokens": int(max_new_tokens), "strategy": strategy_label(strategy), "decoding": choice_label(choice),
        "image_dir": str(image_dir.resolve()), "n_questions": len(qs), "version": version(),
    }
    if cache_dir is None:
        sink = _MemorySink("question_id")
        made = _answer_into(sink, vlm, qs, image_dir, prompt_suffix, max_new_tokens, batch_size, bound, progress,
                            allow_outside_image_dir, max_image_pixels, choice)
        return Answers(sink.rows(), config, generated=made)
    identity = answer_identity(vlm, questions, image_dir, prompt_suffix, max_new_tokens, strategy, choice)
    path = cache_file(cache_dir, "answers", identity)
    sink = ResumableJsonl(path, key="question_id")
    made = _answer_into(sink, vlm, qs, image_dir, prompt_suffix, max_new_tokens, batch_size, bound, progress,
                        allow_outside_image_dir, max_image_pixels, choice)
    by_id = {r["question_id"]: r for r in sink.rows()}
    config.update(key=path.stem.split("-", 1)[1], path=str(path))
    return Answers([by_id[q["question_id"]] for q in qs], config, generated=made)


def answer_questions(
    vlm: LoadedVLM,
    questions: Sequence[dict],
    image_dir: str | Path,
    out: str | Path,
    max_new_tokens: int = 16,
    batch_size: int = 8,
    limit: int | None = None,
    prompt_suffix: str = "",
    strategy=None,
    overwrite: bool = False,
    progress: bool = True,
    check_options: bool = False,
    allow_outside_image_dir: bool = False,
    max_image_pixels: int | None = None,
    sampling=STRATEGY_CHOICE,
) -> Path:
    """Answer POPE-style questions (``question_id``, ``image``, ``text``); append ``{"question_id", "text", ...}``.

    ``prompt_suffix`` is appended to each question. Resumable (and ``check_options``) like
    :func:`caption_dataset`; ``allow_outside_image_dir`` / ``max_image_pixels`` / ``sampling`` as for :func:`answer`.

    Example
    -------
    >>> answer_questions(vlm, qs, "world/images", "runs/answers.jsonl", max_new_tokens=3)  # doctest: +SKIP
    PosixPath('runs/answers.jsonl')
    """
    image_dir = _check_image_dir(image_dir)
    questions = list(questions)
    qs = questions[:limit] if limit is not None else questions
    bound = resolve_strategy(strategy, vlm)
    choice = resolve_choice(sampling, bound)
    if check_options:
        guard_output(out, answer_identity(vlm, questions, image_dir, prompt_suffix, max_new_tokens, strategy, choice),
                     overwrite)
    sink = ResumableJsonl(out, key="question_id", overwrite=overwrite)
    _answer_into(sink, vlm, qs, image_dir, prompt_suffix, max_new_tokens, batch_size, bound, progress,
                 allow_outside_image_dir, max_image_pixels, choice)
    return Path(out)
