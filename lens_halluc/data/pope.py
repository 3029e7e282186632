"""POPE: polling-based object probing (Li et al., EMNLP 2023) -- question building and scoring.

POPE asks a model yes/no questions "Is there a {object} in the image?" about objects that are
in the image (label ``yes``) and objects that are not (label ``no``). Three splits differ only in
how the absent objects (negatives) are chosen: *random*, *popular* (frequent among the images)
and *adversarial* (frequently co-occurring with the object that is present).

Example
-------
>>> from lens_halluc.data import CocoDataset
>>> from lens_halluc.data.pope import build_questions, write_jsonl, read_questions, score
>>> ds = CocoDataset.load("instances_val2014.json")                          # doctest: +SKIP
>>> qs = build_questions(ds, "adversarial", n_images=500, seed=0)            # doctest: +SKIP
>>> qs[0]                                                                   # doctest: +SKIP
{'question_id': 1, 'image': 'COCO_val2014_000000310196.jpg', 'image_id': 310196,
 'text': 'Is there a snowboard in the image?', 'label': 'yes', 'object': 'snowboard'}
>>> write_jsonl(qs, "pope_adversarial.jsonl")                               # doctest: +SKIP
>>> answers = [{"question_id": q["question_id"], "text": "Yes."} for q in qs]  # doctest: +SKIP
>>> score(read_questions("pope_adversarial.jsonl"), answers)["yes_ratio"]   # doctest: +SKIP
1.0

Building: the two flavours (``flavour=``, ``--flavour``)
-------------------------------------------------------
``flavour="reference"`` (the default) is ``AoiDragon/POPE`` ``main.py`` + ``utils.py`` (the
RUCAIBox POPE code), step for step, so that for one seed it writes the very questions the
reference writes after ``random.seed(seed)`` (the reference itself never seeds; pinned against
the reference code's own output in ``tests/data/pope_reference/``, made by
``bench/pope_reference.py``):

- an image's objects are its distinct annotated categories in annotation (file) order; eligible
  images are those with ``len(objects) >= n_per_image`` (``sample_num``, 3), in file order; if
  fewer than ``n_images`` (``img_num``, 500) are eligible the reference stops (``assert``; here
  :class:`PopeError`); otherwise ``random.sample(eligible, n_images)`` with
  ``random.Random(seed)``.
- frequencies (``generate_ground_truth_objects``) and co-occurrences (``compute_co_occurrence``)
  are counted over the *sampled* images (``stats_from="sample"``); the pool of negatives is every
  object seen there, in first-seen order.
- positives: the first ``n_per_image`` objects of each image, in annotation order; after each
  positive its negative, never present and never already used for that image.
- random: ``random.choice`` over the pool, redrawn until absent and unused. popular: the pool
  sorted by frequency, descending (a stable sort: ties in first-seen order); the first absent,
  unused one. adversarial: the objects co-occurring with the positive sorted by count,
  descending (stable: ties in the order they were first counted); the first absent, unused one;
  if none is left, a random one as for *random* (reported with a warning).
- the reference builds random, popular, adversarial in this order from one unseeded stream, so
  the adversarial split's random fallbacks come after the random split's draws; building one
  split here replays the draws of the splits before it, so each file equals the reference's.
- question ids are 1-based and sequential in each file (as in the released
  ``output/coco/coco_pope_*.json``; an early release, replaced in Aug 2023, was 0-based with
  ``image_id``). Rows are ``{"question_id", "image", "text", "label"}`` as in the reference plus
  ``image_id`` and ``object`` (extra keys every reader ignores).

``flavour="corrected"``: frequencies and co-occurrences over the whole dataset
(``stats_from="dataset"``); positives sampled; eligibility needs ``max(3, n_per_image)``
categories; sampling with ``numpy.random.Generator`` streams spawned from ``seed`` (images,
positives, random negatives: for one seed all three splits share images and positives and each
split is independent of the others); ties broken by category id (popular: lower id; adversarial:
higher frequency, then lower id).

``stats_from`` (``"sample"`` / ``"dataset"``) overrides the flavour's statistics in either flavour.

Fixed in both flavours (accidents, not part of the method): the reference loops forever when no
absent, unused object is left (here :class:`PopeError`); its ``template.replace("a", "an")`` also
turns "image" into "imange" (``Is there an umbrella in the imange?``: the 57 such lines of the
adversarial file VCD and CausalMM copied; the POPE authors fixed the released files in Nov 2023
and so do we: "Is there an oven in the image?"). The article test is on the lower-cased first
character (the reference's is case-sensitive; COCO names are lower case, so equal there).

Answering: :data:`POPE_PROMPTS` names the prompt suffixes the reference evaluations append to
each question (``"vcd"``: VCD's and CausalMM's " Please answer this question with one word.");
:func:`prompt_suffix` turns a name (or a literal suffix) into the text.

*Scoring* -- ``AoiDragon/POPE`` ``evaluate.py`` (the same code as LLaVA's ``eval_pope.py``):
keep the text before the first ``"."``, delete commas, ``split(" ")``; if ``"No"``, ``"not"`` or
``"no"`` is one of the words the answer is *no*, otherwise *yes*. Case-sensitive and single-space
split, so "Not sure" and "NO" count as *yes*. Positive class = yes; ``yes_ratio`` is the share of
*yes* predictions.

``DAMO-NLP-SG/VCD`` ``experiments/eval/eval_pope.py``: lower-case and strip the answer, then a
*label-dependent* substring test: for a ``yes`` question the answer is *yes* iff ``"yes"`` is a
substring; for a ``no`` question it is *no* iff ``"no"`` is a substring ("i don't know", "not",
"cannot", even "snowboard" all contain "no"). An answer containing neither word is therefore
always wrong, and one containing both always right. :func:`score` passes each question's label
so the counts match VCD exactly; :func:`parse_answer` without a label returns the verdict VCD
gives on a ``yes`` question (``"yes"`` substring test).

Scoring choices (both flavours): precision/recall/F1 are 0.0 when their denominator is 0 (the
reference divides by zero); answers are joined to questions by ``question_id`` (VCD zips by line
order and asserts ids).
"""
from __future__ import annotations

import json
import numbers
import random
import warnings
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

import numpy as np

from .coco import CocoDataset, DataError
from .flavour import check_flavour, resolve
from .jsonl import read_jsonl as _read_jsonl
from .jsonl import write_jsonl  # noqa: F401  (re-exported: part of the POPE API)

Split = Literal["random", "popular", "adversarial"]
Parser = Literal["pope", "vcd"]
SPLITS: tuple[str, ...] = ("random", "popular", "adversarial")
PARSERS: tuple[str, ...] = ("pope", "vcd")
STATS_FROM: tuple[str, ...] = ("sample", "dataset")
TEMPLATE = "Is there {article} {object} in the image?"
QUESTION_KEYS: tuple[str, ...] = ("question_id", "image", "text", "label")
MIN_OBJECTS = 3

#: What differs between the flavours of :func:`build_questions` (see the module docstring).
FLAVOURS_POPE: dict[str, dict[str, Any]] = {
    "reference": {"stats_from": "sample"},
    "corrected": {"stats_from": "dataset"},
}

#: Named answer-prompt suffixes (``prompt_suffix=`` of :func:`lens_halluc.answer`): appended to
#: each question text. ``"pope"``: none (the question as written, POPE's own evaluation);
#: ``"vcd"``: VCD's and CausalMM's LLaVA scripts (``qs + " Please answer this question with one word."``).
POPE_PROMPTS: dict[str, str] = {
    "pope": "",
    "vcd": " Please answer this question with one word.",
}


class PopeError(DataError):
    """Raised for impossible POPE requests or malformed POPE files; the message says the fix."""


def prompt_suffix(value: str | None) -> str:
    """The text of a named answer prompt (:data:`POPE_PROMPTS`), or ``value`` itself as a literal suffix.

    ``None`` is ``""``. A value equal to a name is the name (so pass literal text with its leading space).

    >>> prompt_suffix("vcd")
    ' Please answer this question with one word.'
    >>> prompt_suffix(" Answer yes or no.")
    ' Answer yes or no.'
    """
    if value is None:
        return ""
    if not isinstance(value, str):
        raise PopeError(f"a prompt suffix must be a string (a name of {sorted(POPE_PROMPTS)} or literal text), got {value!r}.")
    return POPE_PROMPTS.get(value, value)


# ----------------------------------------------------------------------------- questions
def question_text(object_name: str) -> str:
    """The POPE question for one object, with the right article.

    >>> question_text("apple"), question_text("car")
    ('Is there an apple in the image?', 'Is there a car in the image?')
    """
    # POPE's rule: "an" iff the first character is a vowel letter (so "an umbrella", "a hair
    # drier"); lower() so capitalised names behave the same. Without the reference's "imange".
    article = "an" if object_name[:1].lower() in ("a", "e", "i", "o", "u") else "a"
    return TEMPLATE.format(article=article, object=object_name)


def _presence_matrix(dataset: CocoDataset, image_ids: list[int], cat_ids: list[int]) -> np.ndarray:
    """Binary images x categories matrix: 1 where the category is annotated on the image."""
    col = {c: j for j, c in enumerate(cat_ids)}
    m = np.zeros((len(image_ids), len(cat_ids)), dtype=np.int64)
    for i, img in enumerate(image_ids):
        for c in dataset.category_ids(img):
            m[i, col[c]] = 1
    return m


def _row(dataset: CocoDataset, qid: int, image_id: int, name: str, label: str) -> dict[str, Any]:
    return {"question_id": qid, "image": dataset.images[image_id].file_name, "image_id": image_id,
            "text": question_text(name), "label": label, "object": name}


def _no_negative_left(dataset: CocoDataset, image_id: int, n_used: int, n_pool: int, n_per_image: int,
                      stats_from: str = "dataset") -> PopeError:
    hint = ("; the pool is the categories seen in the sampled images (stats_from='sample', the reference's): "
            "sample more images (--n-images) or count over the whole dataset (stats_from='dataset', --stats-from dataset)"
            if stats_from == "sample" else "")
    return PopeError(
        f"image {image_id} ({dataset.images[image_id].file_name}): no absent category left "
        f"for negative #{n_used + 1}; the dataset has too few categories "
        f"({n_pool} in the pool) for n_per_image={n_per_image}{hint}."
    )


def _fallback_warning(fallbacks: int, n_negatives: int) -> None:
    if fallbacks:
        warnings.warn(
            f"adversarial split: {fallbacks} of {n_negatives} negatives had no absent co-occurring "
            "category left and were drawn at random from the pool (as in the POPE reference).",
            stacklevel=4,  # the caller of build_questions
        )


def _eligible(dataset: CocoDataset, n_images: int | None, min_objects: int, n_per_image: int) -> tuple[list[int], int]:
    """Eligible image ids (file order) and how many to sample; :class:`PopeError` when impossible."""
    eligible = [i for i in dataset.image_ids if len(dataset.category_ids(i)) >= min_objects]
    n = len(eligible) if n_images is None else n_images
    if not eligible and n_per_image > MIN_OBJECTS:
        # the positives per image, not the image count, are what cannot be met
        most = max((len(dataset.category_ids(i)) for i in dataset.image_ids), default=0)
        raise PopeError(
            f"n_per_image={n_per_image} (--n-per-image) needs images with >= {n_per_image} distinct annotated "
            f"categories, but no image has more than {most}; lower --n-per-image to at most {max(most, MIN_OBJECTS)}."
        )
    if not eligible:
        raise PopeError(
            f"no image has >= {min_objects} distinct annotated categories (POPE needs {min_objects} per image); "
            "this dataset cannot make POPE questions. Pass an instances file with richer annotations."
        )
    if n > len(eligible):
        raise PopeError(
            f"only {len(eligible)} image(s) have >= {min_objects} distinct annotated categories, "
            f"but {n} were asked for; lower n_images (--n-images) to at most {len(eligible)}."
        )
    return eligible, n


def build_questions(
    dataset: CocoDataset,
    split: Split,
    n_images: int | None = 500,
    n_per_image: int = 3,
    seed: int = 0,
    stats_from: Literal["dataset", "sample"] | None = None,
    flavour: str = "reference",
) -> list[dict[str, Any]]:
    """Build one POPE split from a COCO-format dataset.

    Parameters
    ----------
    dataset : the :class:`CocoDataset` giving images, annotations and category names.
    split : ``"random"``, ``"popular"`` or ``"adversarial"`` -- how negatives are chosen.
    n_images : how many eligible images to sample (``None``: all eligible images, shuffled).
    n_per_image : positives per image; each is followed by one negative.
    seed : the seed (``reference``: of ``random.Random``, as the reference after
        ``random.seed(seed)``; ``corrected``: of the ``numpy.random.Generator`` streams).
    stats_from : count frequencies / co-occurrences over the ``"sample"``d images only or over
        all ``"dataset"`` images; ``None``: the flavour's (reference ``"sample"``, corrected
        ``"dataset"``).
    flavour : ``"reference"`` (default: AoiDragon/POPE's ``main.py`` exactly: positives in
        annotation order, Python ``random``, stable-sort ties) or ``"corrected"`` (sampled
        positives, independent numpy streams, ties by category id). See the module docstring.

    Returns
    -------
    Rows ``{"question_id", "image", "image_id", "text", "label", "object"}``, question ids 1-based
    and sequential, ordered image by image as positive, negative, positive, negative, ...

    Example
    -------
    >>> qs = build_questions(ds, "popular", n_images=500, seed=0)   # doctest: +SKIP
    >>> [(q["object"], q["label"]) for q in qs[:2]]                 # doctest: +SKIP
    [('snowboard', 'yes'), ('dining table', 'no')]
    """
    flavour = check_flavour(flavour, "POPE build")
    stats_from = resolve(FLAVOURS_POPE, flavour, "stats_from", stats_from)
    if split not in SPLITS:
        raise PopeError(f"unknown POPE split {split!r}; choose one of {', '.join(SPLITS)}.")
    if stats_from not in STATS_FROM:
        raise PopeError(f"stats_from must be 'sample' or 'dataset' (or None for the flavour's), not {stats_from!r}.")
    if isinstance(n_per_image, bool) or not isinstance(n_per_image, numbers.Integral) or n_per_image < 1:
        raise PopeError(f"n_per_image must be an integer >= 1 (got {n_per_image!r}).")
    if n_images is not None and (isinstance(n_images, bool) or not isinstance(n_images, numbers.Integral) or n_images < 1):
        raise PopeError(f"n_images must be an integer >= 1 (got {n_images!r}); pass None for all eligible images.")
    n_per_image, n_images = int(n_per_image), (None if n_images is None else int(n_images))
    if flavour == "reference":
        return _build_reference(dataset, split, n_images, n_per_image, seed, stats_from)
    return _build_corrected(dataset, split, n_images, n_per_image, seed, stats_from)


# ----------------------------------------------------------------------------- reference flavour
def _build_reference(dataset: CocoDataset, split: str, n_images: int | None, n_per_image: int, seed: int,
                     stats_from: str) -> list[dict[str, Any]]:
    """AoiDragon/POPE ``main.py`` + ``utils.pope`` with ``random.Random(seed)`` for the global stream."""
    eligible, n = _eligible(dataset, n_images, n_per_image, n_per_image)  # reference: len(objects) >= sample_num
    rng = random.Random(seed)
    sampled = rng.sample(eligible, n)
    objects = {i: [dataset.categories[c] for c in dataset.category_ids(i)] for i in dataset.image_ids}

    # generate_ground_truth_objects / compute_co_occurrence over the statistics images, in order:
    # dict insertion order is first-seen order, which the stable sorts below keep for ties.
    stats_images = sampled if stats_from == "sample" else dataset.image_ids
    freq: dict[str, int] = {}
    co: dict[str, dict[str, int]] = {}
    for img in stats_images:
        objs = objects[img]
        for o in objs:
            freq[o] = freq.get(o, 0) + 1
            row = co.setdefault(o, {})
            for other in objs:
                if other != o:
                    row[other] = row.get(other, 0) + 1
    pool = list(freq)
    by_freq = [o for o, _ in sorted(freq.items(), key=lambda x: x[1], reverse=True)]
    by_co = {o: [x for x, _ in sorted(others.items(), key=lambda x: x[1], reverse=True)] for o, others in co.items()}

    # The reference builds random, popular, adversarial from one stream in this order: replay the
    # splits before the requested one so its draws start where the reference's do.
    for s in SPLITS[: SPLITS.index(split) + 1]:
        rows, fallbacks = _reference_split(dataset, s, sampled, objects, n_per_image, rng, pool, by_freq, by_co,
                                           stats_from)
    _fallback_warning(fallbacks, len(rows) // 2)
    return rows


def _reference_split(dataset, split, sampled, objects, n_per_image, rng, pool, by_freq, by_co, stats_from):
    rows: list[dict[str, Any]] = []
    fallbacks = 0

    def draw(image_id: int, history: list[str]) -> str:
        # random.choice until absent and unused; the reference loops forever when nothing is left.
        objs = objects[image_id]
        if all(o in history or o in objs for o in pool):
            n_used = sum(1 for o in history if o not in objs)
            raise _no_negative_left(dataset, image_id, n_used, len(pool), n_per_image, stats_from)
        pick = rng.choice(pool)
        while pick in history or pick in objs:
            pick = rng.choice(pool)
        return pick

    for image_id in sampled:
        objs = objects[image_id]
        history: list[str] = []
        for pos in objs[:n_per_image]:
            history.append(pos)
            rows.append(_row(dataset, len(rows) + 1, image_id, pos, "yes"))
            if split == "random":
                neg = draw(image_id, history)
            else:
                ranked = by_freq if split == "popular" else by_co.get(pos, [])
                neg = next((o for o in ranked if o not in history and o not in objs), None)
                if neg is None:  # popular: only when nothing is left (draw raises); adversarial: a random one
                    neg = draw(image_id, history)
                    fallbacks += 1
            history.append(neg)
            rows.append(_row(dataset, len(rows) + 1, image_id, neg, "no"))
    return rows, fallbacks


# ----------------------------------------------------------------------------- corrected flavour
def _build_corrected(dataset: CocoDataset, split: str, n_images: int | None, n_per_image: int, seed: int,
                     stats_from: str) -> list[dict[str, Any]]:
    """Whole-dataset statistics (by default), sampled positives, independent numpy streams, id ties."""
    eligible, n = _eligible(dataset, n_images, max(MIN_OBJECTS, n_per_image), n_per_image)
    # Three independent streams: the image sample and the positives do not depend on the split,
    # so one seed gives the three splits the same images and positives.
    img_ss, pos_ss, neg_ss = np.random.SeedSequence(seed).spawn(3)
    img_rng, pos_rng, neg_rng = (np.random.default_rng(s) for s in (img_ss, pos_ss, neg_ss))
    sampled = [eligible[k] for k in img_rng.choice(len(eligible), size=n, replace=False)]

    # Frequency = number of images containing the category; co-occurrence = number of images
    # containing both. One presence matrix gives both (M.T @ M; its diagonal is the frequency).
    stats_images = dataset.image_ids if stats_from == "dataset" else sampled
    all_cats = sorted(dataset.categories)
    m = _presence_matrix(dataset, stats_images, all_cats)
    freq_arr = m.sum(axis=0)
    co_arr = m.T @ m
    col = {c: j for j, c in enumerate(all_cats)}
    freq = {c: int(freq_arr[col[c]]) for c in all_cats}
    # The pool: categories seen at least once (POPE's ground_truth_objects); sorted by id so
    # random draws are reproducible regardless of dict order.
    pool = [c for c in all_cats if freq[c] > 0]

    rows: list[dict[str, Any]] = []
    fallbacks = 0
    for image_id in sampled:
        cats = dataset.category_ids(image_id)
        present = set(cats)
        used: set[int] = set()
        positives = [cats[k] for k in pos_rng.choice(len(cats), size=n_per_image, replace=False)]
        for pos in positives:
            candidates = [c for c in pool if c not in present and c not in used]
            if not candidates:
                raise _no_negative_left(dataset, image_id, len(used), len(pool), n_per_image, stats_from)
            if split == "random":
                neg = candidates[int(neg_rng.integers(len(candidates)))]
            elif split == "popular":
                neg = min(candidates, key=lambda c: (-freq[c], c))
            else:
                p = col[pos]
                co_cands = [c for c in candidates if co_arr[p, col[c]] > 0]
                if co_cands:
                    neg = min(co_cands, key=lambda c: (-int(co_arr[p, col[c]]), -freq[c], c))
                else:
                    # As the reference: nothing co-occurring is left -> a random absent object.
                    neg = candidates[int(neg_rng.integers(len(candidates)))]
                    fallbacks += 1
            used.add(neg)
            for cat, label in ((pos, "yes"), (neg, "no")):
                rows.append(_row(dataset, len(rows) + 1, image_id, dataset.categories[cat], label))
    _fallback_warning(fallbacks, len(rows) // 2)
    return rows


# ----------------------------------------------------------------------------- JSONL files
def read_jsonl(path: str | Path, what: str = "JSONL") -> list[dict[str, Any]]:
    """Read a JSON-lines file of objects (POPE's format; a JSON array is accepted too) raising :class:`PopeError`.

    >>> rows = read_jsonl("answers.jsonl", "answers")   # doctest: +SKIP
    """
    return _read_jsonl(path, what, error=PopeError, allow_array=True)


def _norm_qid(value: Any, where: str) -> int | str:
    """Question ids are ints in POPE files; accept digit strings too and make them ints."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise PopeError(f"{where}: question_id must be an integer, got {value!r}.")
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return value


def check_question_images(questions: Sequence[dict], image_dir: str | Path, allow_outside_image_dir: bool = False,
                          max_image_pixels: int | None = None) -> None:
    """Check, before any work, every question's ``image``: inside ``image_dir`` (no ``..``, no
    absolute path, unless ``allow_outside_image_dir``), present, an image, within ``max_image_pixels``.

    Raises :class:`~lens_halluc.data.coco.DataError` naming the question and the file.

    Example
    -------
    >>> check_question_images(read_questions("pope_random.jsonl"), "world/images")   # doctest: +SKIP
    """
    from .images import check_image, resolve_image

    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise DataError(f"image directory not found: {image_dir}. Pass --image-dir.")
    paths = {}
    for q in questions:
        where = f"question {q.get('question_id')!r}"
        paths.setdefault(resolve_image(image_dir, q.get("image"), allow_outside_image_dir, source=where), where)
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"{len(missing)} image file(s) named by the questions are missing from {image_dir} "
                        f"(first: {missing[0].name}, {paths[missing[0]]}). Point --image-dir at the folder that holds them.")
    for p in paths:
        check_image(p, max_image_pixels)


def read_questions(path: str | Path) -> list[dict[str, Any]]:
    """Read POPE questions: the official files (RUCAIBox/POPE, LLaVA, VCD copies) or ours.

    Each line needs ``question_id``, ``image``, ``text`` and ``label`` (``yes``/``no``, any case);
    other keys are kept. Labels are normalised to lower case; duplicate ids are an error.

    >>> qs = read_questions("coco_pope_adversarial.json")   # doctest: +SKIP
    >>> qs[0]["label"]                                     # doctest: +SKIP
    'yes'
    """
    rows = read_jsonl(path, "questions")
    seen: set[int | str] = set()
    line_of = _line_numbers(path)
    for k, row in enumerate(rows):
        where = f"questions file {path}, line {line_of(k)}"
        for key in QUESTION_KEYS:
            if key not in row:
                raise PopeError(
                    f"{where}: missing key '{key}' (a POPE question needs {', '.join(QUESTION_KEYS)})."
                )
        row["question_id"] = _norm_qid(row["question_id"], where)
        if not isinstance(row["image"], str) or not row["image"].strip():
            raise PopeError(f"{where}: 'image' must be a file name relative to the image directory, got {row['image']!r}.")
        label = row["label"]
        if not isinstance(label, str) or label.strip().lower() not in ("yes", "no"):
            raise PopeError(f"{where}: label must be 'yes' or 'no', got {label!r}.")
        row["label"] = label.strip().lower()
        if row["question_id"] in seen:
            raise PopeError(f"{where}: duplicate question_id {row['question_id']!r}.")
        seen.add(row["question_id"])
    return rows


def read_answers(path: str | Path) -> list[dict[str, Any]]:
    """Read model answers: one ``{"question_id", "text"}`` per line.

    ``"answer"`` is accepted in place of ``"text"`` (the key of POPE's own ``answer/`` files).

    >>> answers = read_answers("llava_pope_random_answers.jsonl")   # doctest: +SKIP
    """
    rows = read_jsonl(path, "answers")
    line_of = _line_numbers(path)
    for k, row in enumerate(rows):
        where = f"answers file {path}, line {line_of(k)}"
        if "question_id" not in row:
            raise PopeError(f"{where}: missing key 'question_id' (an answer needs question_id and text).")
        if "text" not in row and "answer" in row:
            row["text"] = row["answer"]
        if "text" not in row:
            raise PopeError(f"{where}: missing key 'text' (an answer needs question_id and text).")
        if not isinstance(row["text"], str):
            raise PopeError(f"{where}: 'text' must be a string, got {row['text']!r}.")
        row["question_id"] = _norm_qid(row["question_id"], where)
    return rows


def _line_numbers(path: str | Path):
    """Map the k-th object read from a JSONL file back to its 1-based line number."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return lambda k: k + 1
    if "".join(lines).lstrip().startswith("["):
        return lambda k: f"(array item {k + 1})"
    numbers = [i for i, line in enumerate(lines, 1) if line.strip()]
    return lambda k: numbers[k] if k < len(numbers) else k + 1


# ----------------------------------------------------------------------------- scoring
def parse_answer(text: str, parser: Parser = "pope", label: str | None = None) -> str:
    """Turn a free-text answer into ``"yes"`` or ``"no"`` exactly as the reference scripts do.

    ``parser="pope"`` (POPE ``evaluate.py`` / LLaVA ``eval_pope.py``): text before the first
    ``"."``, commas removed, split on single spaces; ``"No"``, ``"not"`` or ``"no"`` among the words
    -> ``"no"``, else ``"yes"``. ``label`` is ignored.

    ``parser="vcd"`` (VCD ``eval_pope.py``): lower-cased, stripped, substring test that depends on
    the question's label: label ``"yes"`` -> ``"yes"`` iff ``"yes"`` occurs; label ``"no"`` ->
    ``"no"`` iff ``"no"`` occurs. Without a label the ``"yes"``-question rule is used.

    >>> parse_answer("Yes, there is a knife. No other objects.")
    'yes'
    >>> parse_answer("I don't know"), parse_answer("I don't know", "vcd")
    ('yes', 'no')
    >>> parse_answer("Yes, a snowboard.", "vcd", label="no")   # "snowboard" contains "no"
    'no'
    """
    if not isinstance(text, str):
        raise PopeError(f"an answer must be a string, got {text!r}.")
    if parser == "pope":
        # Verbatim logic of the reference: only the first sentence counts, and the word test is
        # case-sensitive on a single-space split (so "NO" or "Not sure" are read as yes).
        if text.find(".") != -1:
            text = text.split(".")[0]
        words = text.replace(",", "").split(" ")
        return "no" if ("No" in words or "not" in words or "no" in words) else "yes"
    if parser == "vcd":
        t = text.lower().strip()
        if label is None or label.strip().lower() == "yes":
            return "yes" if "yes" in t else "no"
        if label.strip().lower() == "no":
            return "no" if "no" in t else "yes"
        raise PopeError(f"label must be 'yes' or 'no', got {label!r}.")
    raise PopeError(f"unknown answer parser {parser!r}; choose one of {', '.join(PARSERS)}.")


def _metrics(tp: int, fp: int, tn: int, fn: int) -> dict[str, float]:
    """POPE metrics with yes as the positive class; 0.0 where a denominator is 0."""
    n = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / n if n else 0.0,
    }


class PopeResult(dict):
    """POPE scores: a dict of the summary (so ``result["accuracy"]`` and ``json.dumps`` work) with
    the per-question table beside it.

    ``summary``: ``accuracy``, ``precision``, ``recall``, ``f1``, ``yes_ratio``, ``tp``, ``fp``,
    ``tn``, ``fn``, ``n``, ``parser``. ``per_question``: a DataFrame with ``question_id``,
    ``label``, ``answer``, ``prediction``, ``correct`` (and ``image``, ``object`` when the
    questions have them).

    Example
    -------
    >>> res = score([{"question_id": 1, "label": "yes"}], {1: "No."})
    >>> res.summary["accuracy"], res.per_question["prediction"].tolist()
    (0.0, ['no'])
    """

    def __init__(self, summary: Mapping[str, Any], per_question: Iterable[Mapping[str, Any]] = ()):
        super().__init__(summary)
        self._per_question = [dict(r) for r in per_question]

    @property
    def summary(self) -> dict[str, Any]:
        """The metrics as a plain dict."""
        return dict(self)

    @property
    def per_question(self):
        """One row per question (``pandas.DataFrame``)."""
        import pandas as pd

        return pd.DataFrame(self._per_question,
                            columns=None if self._per_question else ["question_id", "label", "answer", "prediction", "correct"])


def score(
    questions: list[Mapping[str, Any]],
    answers: Iterable[Mapping[str, Any]] | Mapping[Any, str],
    parser: Parser = "pope",
) -> PopeResult:
    """Score answers against POPE questions.

    Parameters
    ----------
    questions : rows with ``question_id`` and ``label`` (as from :func:`read_questions`).
    answers : rows with ``question_id`` and ``text`` (or ``answer``), or a ``{question_id: text}``
        mapping. Every question needs exactly one answer and every answer a known question.
    parser : ``"pope"`` or ``"vcd"`` (see :func:`parse_answer`).

    answers : also an :class:`~lens_halluc.generation.Answers` (any iterable of such rows).

    Returns
    -------
    A :class:`PopeResult`: the dict ``{"accuracy", "precision", "recall", "f1", "yes_ratio", "tp",
    "fp", "tn", "fn", "n", "parser"}`` with ``.summary`` and ``.per_question``.

    Example
    -------
    >>> qs = [{"question_id": 1, "label": "yes"}, {"question_id": 2, "label": "no"}]
    >>> score(qs, {1: "Yes.", 2: "Yes, there is."})["accuracy"]
    0.5
    """
    if parser not in PARSERS:
        raise PopeError(f"unknown answer parser {parser!r}; choose one of {', '.join(PARSERS)}.")
    labels: dict[Any, str] = {}
    extra: dict[Any, dict] = {}
    for q in questions:
        qid = _norm_qid(q["question_id"], "questions")
        if qid in labels:
            raise PopeError(f"duplicate question_id {qid!r} among the questions.")
        lab = str(q["label"]).strip().lower()
        if lab not in ("yes", "no"):
            raise PopeError(f"question {qid!r}: label must be 'yes' or 'no', got {q['label']!r}.")
        labels[qid] = lab
        extra[qid] = {k: q[k] for k in ("image", "object") if k in q}

    if isinstance(answers, Mapping):
        pairs = [(_norm_qid(k, "answers"), v) for k, v in answers.items()]
    else:
        pairs = []
        for a in answers:
            if "question_id" not in a or ("text" not in a and "answer" not in a):
                raise PopeError(f"each answer needs 'question_id' and 'text'; got keys {sorted(a)}.")
            pairs.append((_norm_qid(a["question_id"], "answers"), a["text"] if "text" in a else a["answer"]))
    texts: dict[Any, str] = {}
    for qid, text in pairs:
        if qid in texts:
            raise PopeError(f"question_id {qid!r} is answered more than once; keep one answer per question.")
        texts[qid] = text

    unknown = [qid for qid in texts if qid not in labels]
    if unknown:
        raise PopeError(
            f"{len(unknown)} answer(s) refer to question ids not in the questions file "
            f"(first: {unknown[0]!r}); check that answers and questions come from the same split."
        )
    missing = [qid for qid in labels if qid not in texts]
    if missing:
        raise PopeError(
            f"{len(missing)} question(s) have no answer (first id: {missing[0]!r}); "
            "answer every question before scoring."
        )

    tp = fp = tn = fn = 0
    rows = []
    for qid, label in labels.items():
        pred = parse_answer(texts[qid], parser, label=label)
        if pred == "yes":
            tp, fp = (tp + 1, fp) if label == "yes" else (tp, fp + 1)
        else:
            tn, fn = (tn + 1, fn) if label == "no" else (tn, fn + 1)
        rows.append({"question_id": qid, **extra[qid], "label": label, "answer": texts[qid], "prediction": pred,
                     "correct": pred == label})
    return PopeResult({**_metrics(tp, fp, tn, fn), "tp": tp, "fp": fp, "tn": tn, "fn": fn, "n": tp + fp + tn + fn,
                       "parser": parser}, rows)


def build(
    dataset: CocoDataset | str | Path,
    split: Split = "adversarial",
    n_images: int | None = 500,
    n_per_image: int = 3,
    seed: int = 0,
    stats_from: Literal["dataset", "sample"] | None = None,
    flavour: str = "reference",
) -> list[dict[str, Any]]:
    """POPE questions for one split of a dataset (or of an instances JSON path): :func:`build_questions`.

    ``flavour``: ``"reference"`` (default, AoiDragon/POPE's build) or ``"corrected"``;
    ``stats_from`` overrides the flavour's statistics (``None``: the flavour's).

    Example
    -------
    >>> import lens_halluc as lh                                          # doctest: +SKIP
    >>> qs = lh.pope.build(ds, "popular", n_images=50, seed=0)           # doctest: +SKIP
    >>> answers = lh.answer(vlm, qs, ds.image_dir, max_new_tokens=3)     # doctest: +SKIP
    >>> lh.pope.score(qs, answers).summary["accuracy"]                   # doctest: +SKIP
    """
    if isinstance(dataset, (str, Path)):
        dataset = CocoDataset.load(dataset)
    return build_questions(dataset, split, n_images=n_images, n_per_image=n_per_image, seed=seed,
                           stats_from=stats_from, flavour=flavour)
