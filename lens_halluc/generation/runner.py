"""Batched captioning and yes/no answering over datasets, written line by line and resumable.

Example
-------
>>> vlm = load_vlm()                                                      # doctest: +SKIP
>>> ds = CocoDataset.load("instances.json", image_dir="images")           # doctest: +SKIP
>>> caption_dataset(vlm, ds, "captions.jsonl", max_new_tokens=32)         # doctest: +SKIP
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

from PIL import Image
from tqdm.auto import tqdm

from ..data.coco import CocoDataset, DataError
from ..models.loading import LoadedVLM
from ..models.prompts import CAPTION_PROMPT
from .decoding import DecodingStrategy, greedy_decode
from .jsonl import ResumableJsonl


def load_image(path: str | Path) -> Image.Image:
    """An RGB image; a missing or unreadable file raises naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file not found: {path}. Check --image-dir.")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except OSError as e:
        raise DataError(f"cannot read image {path} ({e}).") from e


def generate(
    vlm: LoadedVLM,
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    max_new_tokens: int = 128,
    strategy: DecodingStrategy | None = None,
) -> list[dict]:
    """Greedy generation for one batch.

    Returns one dict per input: ``text`` (decoded, special tokens skipped, stripped),
    ``token_ids`` (generated ids, EOS excluded) and ``prompt_ids`` (prompt ids without padding).
    """
    enc = vlm.encode(images, prompts)
    out = greedy_decode(vlm.model, enc, max_new_tokens=max_new_tokens, strategy=strategy,
                        eos_token_ids=vlm.spec.eos_token_ids,
                        pad_token_id=vlm.spec.pad_token_id if vlm.spec.pad_token_id is not None else 0)
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


def caption_dataset(
    vlm: LoadedVLM,
    dataset: CocoDataset,
    out: str | Path,
    prompt: str = CAPTION_PROMPT,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    limit: int | None = None,
    image_ids: Sequence[int] | None = None,
    strategy: DecodingStrategy | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Caption images and append ``{"image_id", "caption", "image", "prompt", "token_ids"}`` lines to ``out``.

    Images already in ``out`` are skipped, so an interrupted run resumes where it stopped.
    """
    ids = list(image_ids) if image_ids is not None else dataset.image_ids
    if limit is not None:
        ids = ids[:limit]
    sink = ResumableJsonl(out, key="image_id", overwrite=overwrite)
    todo = [i for i in ids if i not in sink.done]
    bar = tqdm(total=len(ids), initial=len(ids) - len(todo), desc="captioning", disable=not progress)
    for chunk in _batches(todo, batch_size):
        images = [load_image(dataset.image_path(i)) for i in chunk]
        results = generate(vlm, images, [prompt] * len(chunk), max_new_tokens, strategy)
        sink.write({"image_id": i, "caption": r["text"], "image": dataset.images[i].file_name, "prompt": prompt,
                    "token_ids": r["token_ids"]} for i, r in zip(chunk, results))
        bar.update(len(chunk))
    bar.close()
    return Path(out)


def answer_questions(
    vlm: LoadedVLM,
    questions: Sequence[dict],
    image_dir: str | Path,
    out: str | Path,
    max_new_tokens: int = 16,
    batch_size: int = 8,
    limit: int | None = None,
    prompt_suffix: str = "",
    strategy: DecodingStrategy | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Answer POPE-style questions (``question_id``, ``image``, ``text``); append ``{"question_id", "text", ...}``.

    ``prompt_suffix`` is appended to each question (LLaVA's evaluations add
    " Answer the question using a single word or phrase."). Resumable like :func:`caption_dataset`.
    """
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise DataError(f"image directory not found: {image_dir}. Pass --image-dir.")
    qs = list(questions)[:limit] if limit is not None else list(questions)
    sink = ResumableJsonl(out, key="question_id", overwrite=overwrite)
    todo = [q for q in qs if q["question_id"] not in sink.done]
    bar = tqdm(total=len(qs), initial=len(qs) - len(todo), desc="answering", disable=not progress)
    for chunk in _batches(todo, batch_size):
        images = [load_image(image_dir / q["image"]) for q in chunk]
        prompts = [q["text"] + prompt_suffix for q in chunk]
        results = generate(vlm, images, prompts, max_new_tokens, strategy)
        sink.write({"question_id": q["question_id"], "image": q["image"], "prompt": p, "text": r["text"]}
                   for q, p, r in zip(chunk, prompts, results))
        bar.update(len(chunk))
    bar.close()
    return Path(out)
