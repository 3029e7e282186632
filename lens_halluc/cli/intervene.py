"""Run one hallucination intervention: caption, answer POPE, score, time, and append a row to a results table.

Examples
--------
On the shipped organism (break and normal splits captioned, POPE on its mixed split)::

    python -m lens_halluc.intervene --method greedy --out runs/interventions
    python -m lens_halluc.intervene --method adhh --heads figures/top_heads.json --out runs/interventions
    python -m lens_halluc.intervene --method adhh --flavour corrected --heads figures/top_heads.json --out runs/interventions
    python -m lens_halluc.intervene --method adhh --heads figures/top_heads.json --control random --draws 5 \\
        --out runs/interventions
    python -m lens_halluc.intervene --method vcd --alpha 1 --beta 0.1 --out runs/interventions
    python -m lens_halluc.intervene --method dola --out runs/interventions                  # original DoLa
    python -m lens_halluc.intervene --method dola --flavour corrected --out runs/interventions

On a real LLaVA with real COCO::

    python -m lens_halluc.intervene --method adhh --heads top_heads.json --model llava-hf/llava-1.5-7b-hf \\
        --device cuda --instances instances_val2014.json --references captions_val2014.json \\
        --image-dir val2014 --pope-random pope_random.jsonl --pope-popular pope_popular.jsonl \\
        --pope-adversarial pope_adversarial.jsonl --n 500 --out runs/interventions_llava

``python -m lens_halluc.intervene --method NAME --help`` lists that method's options. A method with
two flavours takes ``--flavour reference`` (the paper's code, the default) or ``--flavour corrected``;
its options left unset take the flavour's values (the help lists both). ``--k`` takes the first k
heads of ``--heads`` (default: the reference's k, ADHH and re-weighting 20, capped at the heads the
file lists; ablate: all of them). ``--metric-flavour`` chooses CHAIR's and POPE's flavour.

A thin adapter over :func:`lens_halluc.evaluation.compare`: captions and answers are cached
(resumable) under ``OUT/cache/``, keyed by everything that changes them; one row per configuration
is appended to ``OUT/results.jsonl`` and ``OUT/results.csv`` (rewritten from the JSONL; an
identical configuration on the same data is never added twice: a row's ``data`` key covers the
dataset and POPE files' contents, their generation options and the model's weights). ``OUT``
carries a marker (``.lens_halluc.json``): a directory with other files is refused, and so is a
second process writing the same ``OUT``. The greedy baseline is run once per
out dir (same model, data, n and token budget) and its seconds per caption (timed after a warm-up
caption) are the reference of ``rel_time``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Sequence

from .common import (add_image_args, add_model_args, float_range, friendly_errors, image_kwargs, int_range, load_heads,
                     load_model_from_args, non_negative_int, positive_int)

PROG = "python -m lens_halluc.intervene"
ORGANISM_SPLITS = ("break", "normal")
KEY_COLUMNS = ("method", "options", "heads", "control", "draw", "model", "n", "max_new_tokens", "data")


def columns(caption_splits: Sequence[str] = ORGANISM_SPLITS) -> list[str]:
    """Columns of a results row for the given caption splits."""
    from ..evaluation.compare import columns as compare_columns

    return compare_columns(caption_splits)


def row_key(row: dict) -> str:
    return json.dumps([row.get(k) for k in KEY_COLUMNS], sort_keys=True, default=str)


# ---------------------------------------------------------------------------- results table
def read_rows(out: str | Path) -> list[dict]:
    """Rows of ``OUT/results.jsonl`` (a torn last line, from a killed run, is skipped)."""
    p = Path(out) / "results.jsonl"
    if not p.is_file():
        return []
    rows = []
    lines = p.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # interrupted while appending: the row is recomputed from the cache
                continue
            raise ValueError(f"{p}, line {i + 1} is not JSON; remove that line (the row is recomputed).") from None
    return rows


def append_row(out: Path, row: dict) -> bool:
    """Append ``row`` to results.jsonl unless an identical configuration is there; rewrite results.csv. True if added."""
    from ..data.tables import write_table

    from ..data.outputs import write_text_atomic

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = read_rows(out)
    added = row_key(row) not in {row_key(r) for r in rows}
    if added:
        rows.append(row)
    # rewritten whole through a temporary file (fsync, rename): a torn line left by a killed run is dropped,
    # never glued to the next row
    write_text_atomic(out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    cols = columns(_splits(rows))
    cols += [k for r in rows for k in r if k not in cols]
    write_table(rows, out / "results.csv", list(dict.fromkeys(cols)))
    return added


def _splits(rows: list[dict]) -> tuple[str, ...]:
    found = []
    for r in rows:
        found += [k[: -len("_CHAIR_s")] for k in r if k.endswith("_CHAIR_s") and k[: -len("_CHAIR_s")] not in found]
    return tuple(found) or ORGANISM_SPLITS


# ---------------------------------------------------------------------------- data
def evaluation_data(args, vlm):
    """``(datasets, pope sets, data key)``: the organism's splits, or a real COCO set and POPE files."""
    from ..data.coco import CocoDataset
    from ..evaluation.compare import POPE_SPLITS, PopeSet, pope_sets

    if args.instances or args.image_dir:
        if not (args.instances and args.image_dir):
            raise ValueError("a real dataset needs both --instances and --image-dir (and --references for captions).")
        from ..data.pope import check_question_images, read_questions

        datasets = {"coco": CocoDataset.load(args.instances, args.references, args.image_dir, **image_kwargs(args))}
        pope = {}
        for s in POPE_SPLITS:
            path = getattr(args, f"pope_{s}")
            if path:
                qs = read_questions(path)
                check_question_images(qs, args.image_dir, **image_kwargs(args))  # before any work
                pope[s] = PopeSet(qs, Path(args.image_dir), **image_kwargs(args))
        ident = {"instances": str(args.instances), "references": str(args.references), "image_dir": str(args.image_dir),
                 "pope": {s: str(getattr(args, f"pope_{s}")) for s in POPE_SPLITS if getattr(args, f"pope_{s}")}}
    else:
        from ..organism.evaluate import export_eval_splits
        from ..organism.recipe import read_organism_meta

        try:
            read_organism_meta(vlm.path)
        except Exception:
            raise ValueError(f"{vlm.path} is not a model organism: pass a dataset with --instances/--references/"
                             "--image-dir (and --pope-random/--pope-popular/--pope-adversarial).") from None
        dirs = export_eval_splits(vlm.path, Path(args.data or Path(args.out) / "data"), args.n)
        load = {s: CocoDataset.load(d / "instances.json", d / "captions.json", d / "images") for s, d in dirs.items()}
        datasets = {s: load[s] for s in ORGANISM_SPLITS}
        pope = pope_sets(load["mixed"], datasets, flavour=args.metric_flavour)
        ident = {"organism_world": str(vlm.path), "splits": [f"{s}-{args.n}" for s in (*ORGANISM_SPLITS, "mixed")]}
    if args.no_pope:
        pope = {}
        ident["pope"] = None
    ident["pope_max_new_tokens"] = args.pope_max_new_tokens
    ident["metric_flavour"] = args.metric_flavour  # CHAIR / POPE flavour: other numbers, another row
    ident["contents"] = _contents(datasets, pope)
    ident["weights"] = _weights(vlm)
    return datasets, pope, hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]


def _contents(datasets, pope) -> str:
    """Digest of what the rows are computed from: annotations, references, image files, POPE questions.

    Part of the ``data`` key of a row: the same paths with other contents (a re-exported split, an
    edited question file) never report the old numbers.
    """
    from ..generation.cache import digest, files_identity

    parts = {}
    for name, ds in sorted(datasets.items()):
        images = [[i, r.file_name, ds.category_ids(i), ds.captions.get(i, [])] for i, r in ds.images.items()]
        categories = {str(k): v for k, v in ds.categories.items()}
        files = files_identity(Path(ds.image_dir), [r.file_name for r in ds.images.values()])
        parts[name] = digest([images, categories, files])
    for name, ps in sorted(pope.items()):
        qs = [[q.get("question_id"), q.get("image"), q.get("text"), q.get("label")] for q in ps.questions]
        parts[f"pope_{name}"] = digest([qs, files_identity(Path(ps.image_dir), sorted({q[1] for q in qs}))])
    return digest(parts)


def _weights(vlm) -> str:
    """Fingerprint of the weights in memory: a model re-trained into the same path gets new rows."""
    from ..generation.cache import model_identity

    return model_identity(vlm)["weights"]


def _training_summary(model_dir) -> dict | None:
    """What ``python -m lens_halluc.retrain`` recorded in a re-trained checkpoint (None for other models)."""
    if model_dir is None:
        return None
    from ..training.loop import load_training_info

    info = load_training_info(model_dir)
    if info is None:
        return None
    extra = info.get("info") or {}
    return {"method": info["method"], "steps": info.get("steps"), "seconds": info.get("seconds"),
            "trained_params": info.get("trained_params"), "control": extra.get("control", "none"),
            "n_heads": extra.get("n_heads"), "separability": extra.get("separability"),
            "flavour": (info.get("config") or {}).get("flavour")}


def _run(vlm, args, entries: dict, datasets, pope, data_key: str, heads_source: str | None,
         greedy_sec: float | None) -> list[dict]:
    """Compare ``entries`` (label → strategy or list of draws) and finish their rows as the CLI writes them."""
    from ..evaluation.compare import compare

    cmp = compare(vlm, entries, datasets, pope, n=args.n, max_new_tokens=args.max_new_tokens,
                  pope_max_new_tokens=args.pope_max_new_tokens, batch_size=args.batch_size,
                  cache_dir=Path(args.out) / "cache", progress=not args.no_progress,
                  chair_flavour=args.metric_flavour, pope_flavour=args.metric_flavour)
    retrained = _training_summary(vlm.path)
    rows = []
    for r in cmp.rows:
        r = dict(r, label=None, data=data_key, heads_source=heads_source if r["n_heads"] else None,
                 metric_flavour=args.metric_flavour)
        if retrained:
            r["retrained"] = retrained
        if r["method"] == "greedy" and r["control"] == "none":
            r["rel_time"] = 1.0
        elif r["sec_per_caption"] is not None and greedy_sec:
            r["rel_time"] = r["sec_per_caption"] / greedy_sec
        rows.append(r)
    return rows


def greedy_baseline(vlm, args, datasets, pope, data_key: str) -> dict:
    """The greedy row of this out dir (same model, data, n, budget): read it if present, else run and append it."""
    probe = {"method": "greedy", "options": json.dumps({}), "heads": "", "control": "none", "draw": None,
             "model": str(vlm.path), "n": args.n, "max_new_tokens": args.max_new_tokens, "data": data_key}
    for r in read_rows(Path(args.out)):
        if row_key(r) == row_key(probe):
            return r
    row = _run(vlm, args, {"greedy": None}, datasets, pope, data_key, None, None)[0]
    append_row(Path(args.out), row)
    return row


# ---------------------------------------------------------------------------- CLI
def _default_text(o) -> str:
    if o.flavoured:
        def show(v):
            return "none" if v is None else str(v).lower() if isinstance(v, bool) else str(v)
        return " (default: per --flavour: " + ", ".join(f"{f} {show(v)}" for f, v in o.flavoured) + ")"
    return "" if o.default is None else f" (default: {o.default})"


def _add_option(g, o) -> None:
    if o.kind == "bool":
        if o.default is None:  # the flavour decides unless given: --x / --no-x
            g.add_argument(*o.flags, dest=f"opt_{o.name}", action=argparse.BooleanOptionalAction, default=None,
                           help=o.help + _default_text(o))
        else:
            g.add_argument(*o.flags, dest=f"opt_{o.name}", action="store_true", default=o.default, help=o.help)
        return
    typ = {"float": float_range(), "int": int_range()}.get(o.kind, str)  # finite numbers; ranges: the class's own checks
    choices = None
    if o.choices is not None:
        choices = ["none" if c is None else c for c in o.choices]
    # "none" only where None is a choice; a flavoured option left unset stays None (the flavour's value)
    default = "none" if o.default is None and o.choices is not None and None in o.choices else o.default
    g.add_argument(*o.flags, dest=f"opt_{o.name}", type=typ, default=default, choices=choices,
                   metavar=None if choices else o.name.upper(), help=o.help + _default_text(o))


def heads_k(method: str, listed: int, k: int | None = None) -> int:
    """How many heads ``method`` takes from a heads file that lists ``listed``: ``k``, or the default.

    Default: the reference's k (:data:`~lens_halluc.models.heads.HA_K`: ADHH 20, re-weighting 20)
    capped at ``listed``; methods without a reference k (static ablation) take every listed head.
    HA's static removal of heads (``newer_models/decoding.sh``) takes 10, for Llama-3.2 and
    Chameleon only, so there is no LLaVA-1.5 k for it.

    Example
    -------
    >>> heads_k("adhh", 5), heads_k("adhh", 30), heads_k("ablate", 7), heads_k("adhh", 5, k=3)
    (5, 20, 7, 3)
    """
    from ..models.heads import HA_K

    if k is not None:
        return int(k)
    return min(HA_K[method], listed) if method in HA_K else listed


def select_heads(args) -> tuple[list[tuple[int, int]] | None, int | None]:
    """``(heads, k)`` of ``--heads`` / ``--k`` for ``--method`` (``(None, None)`` without ``--heads``).

    The first :func:`heads_k` heads of the file; a ``--k`` beyond the heads it lists is read by
    :func:`~lens_halluc.models.heads.read_heads` from the ``head_scores.csv`` beside it (the same
    attribution run's ranking), and is a :class:`~lens_halluc.models.heads.HeadsFileError` naming
    the file when there is none.
    """
    from ..models.heads import read_heads

    if not args.heads:
        return None, None
    listed = read_heads(args.heads)
    k = heads_k(args.method, len(listed), args.k)
    return (listed[:k] if k <= len(listed) else read_heads(args.heads, k=k)), k


def build_parser(method: str | None = None) -> argparse.ArgumentParser:
    from ..data.flavour import FLAVOURS
    from ..interventions.registry import METHODS
    from ..models.heads import HA_K

    K_METHODS = [m for m in METHODS if m in HA_K]

    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="methods: " + "; ".join(f"{n} ({m.description})" for n, m in METHODS.items()))
    p.add_argument("--method", required=True, help=f"one of: {', '.join(METHODS)}")
    p.add_argument("--out", required=True, help="results directory (results.csv, results.jsonl, cache/)")
    p.add_argument("--heads", default=None, help="top_heads.json of the hallucination heads (ablate, adhh, reweight)")
    p.add_argument("--k", type=positive_int, default=None,
                   help="use the first k heads of --heads (default: the reference's k, "
                        + ", ".join(f"{m} {HA_K[m]}" for m in K_METHODS)
                        + ", capped at the heads the file lists; ablate: all of them). A k beyond the list is "
                        "taken from the head_scores.csv beside the file (same attribution run), else an error")
    p.add_argument("--control", choices=("none", "random"), default="none",
                   help="random: run the method on --draws sets of k random heads (excluding the attributed ones)")
    p.add_argument("--draws", type=positive_int, default=5, help="random-head draws with --control random (>= 1; default 5)")
    p.add_argument("--control-seed", type=non_negative_int, default=0, help="seed of the random-head draws (>= 0; default 0)")
    p.add_argument("--n", type=positive_int, default=200, help="images per caption split (>= 1; default 200)")
    p.add_argument("--max-new-tokens", type=positive_int, default=40, help="caption token budget (>= 1; default 40)")
    p.add_argument("--pope-max-new-tokens", type=positive_int, default=3, help="POPE answer token budget (>= 1; default 3)")
    p.add_argument("--batch-size", type=positive_int, default=50, help="generation batch size (>= 1; default 50)")
    p.add_argument("--no-pope", action="store_true", help="skip POPE")
    p.add_argument("--metric-flavour", choices=FLAVOURS, default="reference",
                   help="CHAIR and POPE flavour: reference (the papers' code, default) or corrected (see FIDELITY.md)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--data", default=None, help="where the organism's eval splits are exported (default OUT/data)")
    d = p.add_argument_group("real dataset (instead of the organism's splits)")
    d.add_argument("--instances", default=None, help="COCO instances JSON")
    d.add_argument("--references", default=None, help="COCO captions JSON")
    d.add_argument("--image-dir", default=None, help="directory of the images")
    for s in ("random", "popular", "adversarial"):
        d.add_argument(f"--pope-{s}", default=None, help=f"POPE {s} question file (JSONL)")
    add_model_args(p)
    add_image_args(p)
    if method in METHODS and METHODS[method].options:
        g = p.add_argument_group(f"options of {method}")
        for o in METHODS[method].options:
            _add_option(g, o)
        if method == "halc":
            g.add_argument("--detector", default="organism",
                           help="'organism' (default: a detector the package trains in seconds on the organism world's "
                                "scenes; it reads pixels only) or a Grounding DINO / OWLv2 model id or directory "
                                "(transformers zero-shot detection, loaded like any model)")
    return p


def make_detector(spec: str):
    """HALC's detector from ``--detector``: the organism's own (trained, seeded) or a transformers zero-shot model."""
    if spec == "organism":
        from ..organism.detector import train_detector

        return train_detector(seed=0)
    from ..models.detectors import HFZeroShotDetector

    return HFZeroShotDetector(spec)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    from ..interventions.registry import METHODS, build_intervention, get_method, resolve_options
    from ..models.heads import random_heads

    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", default=None)
    known, _ = pre.parse_known_args(argv)
    parser = build_parser(known.method)
    args = parser.parse_args(argv)
    if args.method not in METHODS:
        parser.error(f"unknown method {args.method!r}; choose one of {', '.join(METHODS)}.")
    m = get_method(args.method)
    if m.needs_heads and not args.heads:
        parser.error(f"method {args.method!r} needs the hallucination heads: pass --heads top_heads.json "
                     "(written by `python -m lens_halluc.attribute`, e.g. figures/top_heads.json).")
    if args.k is not None and not args.heads:
        parser.error("--k takes the first k heads of --heads; pass --heads top_heads.json too.")
    if args.control == "random" and not m.needs_heads:
        parser.error(f"--control random needs a method that acts on heads (ablate, adhh, reweight), not {args.method!r}.")
    from ..data.outputs import output_dir

    with friendly_errors(PROG), output_dir(args.out, "intervene", adopt=(
            "results.jsonl", "results.csv", "cache", "data")):  # ours, one writer at a time
        opts = resolve_options(args.method, **{o.name: getattr(args, f"opt_{o.name}") for o in m.options})
        m.load()  # unavailable module: a clear error before loading the model
        if args.method == "halc":
            opts["detector"] = make_detector(args.detector)
        heads, k = select_heads(args)  # a bad file, or a k it cannot give, is reported before the model loads
        build_intervention(args.method, heads, **opts)  # and so are options that do not go together
        heads_source = str(args.heads) if heads else None
        vlm = load_model_from_args(args)
        if heads:
            heads = load_heads(args.heads, vlm, k=k)  # and checked against the model's layers and heads
        datasets, pope, data_key = evaluation_data(args, vlm)
        greedy = greedy_baseline(vlm, args, datasets, pope, data_key)
        if args.method == "greedy":
            rows = [greedy]
        else:
            if args.control == "random":
                draws = random_heads(vlm, len(heads), exclude=heads, seed=args.control_seed, draws=args.draws)
                entry = [build_intervention(args.method, hs, **opts) for hs in draws]
            else:
                entry = build_intervention(args.method, heads, **opts)
            rows = _run(vlm, args, {args.method: entry}, datasets, pope, data_key, heads_source,
                        greedy["sec_per_caption"])
            for row in rows:
                append_row(Path(args.out), row)
        for r in rows:
            print(json.dumps({k: r.get(k) for k in columns(tuple(datasets)) if k in r}))
        print(f"results: {Path(args.out) / 'results.csv'}")
        return rows


if __name__ == "__main__":
    main()
