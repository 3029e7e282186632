"""Run one hallucination intervention: caption, answer POPE, score, time, and append a row to a results table.

Examples
--------
On the shipped organism (break and normal splits captioned, POPE on its mixed split)::

    python -m lens_halluc.intervene --method greedy --out runs/interventions
    python -m lens_halluc.intervene --method adhh --tau 0.45 --heads figures/top_heads.json --out runs/interventions
    python -m lens_halluc.intervene --method adhh --heads figures/top_heads.json --control random --draws 5 \\
        --out runs/interventions
    python -m lens_halluc.intervene --method vcd --alpha 1 --beta 0.1 --out runs/interventions

On a real LLaVA with real COCO::

    python -m lens_halluc.intervene --method adhh --heads top_heads.json --model llava-hf/llava-1.5-7b-hf \\
        --device cuda --instances instances_val2014.json --references captions_val2014.json \\
        --image-dir val2014 --pope-random pope_random.jsonl --pope-popular pope_popular.jsonl \\
        --pope-adversarial pope_adversarial.jsonl --n 500 --out runs/interventions_llava

``python -m lens_halluc.intervene --method NAME --help`` lists that method's options.

Each configuration's captions and answers live (resumable) under ``OUT/runs/<slug>/``; one row per
configuration is appended to ``OUT/results.jsonl`` and ``OUT/results.csv`` (rewritten from the
JSONL; an identical configuration is never added twice). The greedy baseline is run once per out
dir (same model, n and token budget) and its seconds per caption are the reference of ``rel_time``.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Sequence

from .cli.common import add_model_args, friendly_errors, load_model_from_args
from .interventions.registry import (METHODS, Option, build_strategy, control_strategies, get_method,
                                     needs_editable_attention, resolve_options)

PROG = "python -m lens_halluc.intervene"
CAPTION_METRICS = ("CHAIR_s", "CHAIR_i", "Recall", "Len", "partner_rate")
POPE_SPLITS = ("random", "popular", "adversarial")
POPE_METRICS = ("accuracy", "f1", "yes_ratio")
ID_COLUMNS = ("method", "options", "heads_source", "n_heads", "control", "draw", "heads", "model", "n", "max_new_tokens")
ORGANISM_SPLITS = ("break", "normal")


def columns(caption_splits: Sequence[str] = ORGANISM_SPLITS) -> list[str]:
    """Columns of a results row for the given caption splits."""
    cols = list(ID_COLUMNS)
    cols += [f"{s}_{m}" for s in caption_splits for m in CAPTION_METRICS]
    cols += [f"pope_{s}_{m}" for s in POPE_SPLITS for m in POPE_METRICS]
    cols += ["captions_timed", "sec_per_caption", "rel_time"]
    return cols


KEY_COLUMNS = ("method", "options", "heads", "control", "draw", "model", "n", "max_new_tokens")


def row_key(row: dict) -> str:
    return json.dumps([row.get(k) for k in KEY_COLUMNS], sort_keys=True, default=str)


# ---------------------------------------------------------------------------- results table
def read_rows(out: Path) -> list[dict]:
    p = Path(out) / "results.jsonl"
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def write_csv(rows: list[dict], path: Path) -> None:
    cols = list(ID_COLUMNS)
    for r in rows:
        cols += [k for k in r if k not in cols]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})


def append_row(out: Path, row: dict) -> bool:
    """Append ``row`` to results.jsonl unless an identical configuration is there; rewrite results.csv. True if added."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = read_rows(out)
    added = row_key(row) not in {row_key(r) for r in rows}
    if added:
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        rows.append(row)
    write_csv(rows, out / "results.csv")
    return added


# ---------------------------------------------------------------------------- data
class Evaluation:
    """Where the captions are scored and POPE asked: the organism's splits or a real COCO set."""

    def __init__(self, args, vlm):
        from .data.coco import CocoDataset

        self.n, self.pope = args.n, {}
        if args.instances or args.image_dir:
            if not (args.instances and args.image_dir):
                raise ValueError("a real dataset needs both --instances and --image-dir (and --references for captions).")
            self.kind = "coco"
            self.splits = {"coco": CocoDataset.load(args.instances, args.references, args.image_dir)}
            self.caption_ids = {"coco": self.splits["coco"].image_ids[: args.n]}
            from .data.pope import read_questions

            for s in POPE_SPLITS:
                path = getattr(args, f"pope_{s}")
                if path:
                    self.pope[s] = (read_questions(path), Path(args.image_dir))
        else:
            from .organism.evaluate import export_eval_splits
            from .organism.recipe import read_organism_meta

            try:
                read_organism_meta(vlm.path)
            except Exception:
                raise ValueError(f"{vlm.path} is not a model organism: pass a dataset with --instances/--references/"
                                 "--image-dir (and --pope-random/--pope-popular/--pope-adversarial).") from None
            self.kind = "organism"
            dirs = export_eval_splits(vlm.path, Path(args.data or Path(args.out) / "data"), args.n)
            self.split_dirs = dirs
            self.caption_ids = {s: None for s in ORGANISM_SPLITS}
            if not args.no_pope:
                from .data.pope import build_questions
                from .organism.evaluate import _dataset

                mixed = _dataset(dirs["mixed"])
                for s in POPE_SPLITS:
                    self.pope[s] = (build_questions(mixed, s, n_images=None, seed=0), dirs["mixed"] / "images")
        if args.no_pope:
            self.pope = {}

    @property
    def caption_splits(self) -> tuple[str, ...]:
        return tuple(self.caption_ids)

    def caption(self, vlm, split: str, out: Path, args, strategy) -> tuple[dict, float, int]:
        """Caption (resumable) and score one split. Returns (metrics, seconds spent, captions generated now)."""
        from .generation.jsonl import read_jsonl

        before = len(read_jsonl(out)) if out.is_file() else 0
        start = time.perf_counter()
        if self.kind == "organism":
            from .organism.evaluate import EvalConfig, caption_and_score

            res = caption_and_score(vlm, self.split_dirs[split], out,
                                    EvalConfig(n=args.n, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size),
                                    strategy=strategy)
        else:
            from .data.chair import ChairEvaluator
            from .generation.runner import caption_dataset

            ds = self.splits[split]
            caption_dataset(vlm, ds, out, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                            image_ids=self.caption_ids[split], strategy=strategy, progress=False)
            res = dict(ChairEvaluator().evaluate(read_jsonl(out), ds).summary)
        seconds = time.perf_counter() - start
        return res, seconds, len(read_jsonl(out)) - before

    def answer(self, vlm, split: str, out: Path, args, strategy) -> dict:
        from .data.pope import score
        from .generation.jsonl import read_jsonl
        from .generation.runner import answer_questions

        qs, image_dir = self.pope[split]
        answer_questions(vlm, qs, image_dir, out, max_new_tokens=args.pope_max_new_tokens, batch_size=args.batch_size,
                         strategy=strategy, progress=False)
        return score(qs, read_jsonl(out), parser="pope")


# ---------------------------------------------------------------------------- one configuration
def _slug(method: str, ident: dict) -> str:
    h = hashlib.sha1(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{method}-{h}"


def run_config(vlm, ev: Evaluation, args, method: str, opts: dict, heads, heads_source: str | None,
               control: str = "none", draw: int | None = None, strategy=None, greedy_sec: float | None = None) -> dict:
    """Caption + POPE + timing of one configuration (resumable); the results row (not yet appended)."""
    row = {"method": method, "options": json.dumps(opts, sort_keys=True), "heads_source": heads_source,
           "n_heads": len(heads) if heads else 0, "control": control, "draw": draw,
           "heads": json.dumps([list(h) for h in heads]) if heads else "", "model": str(vlm.path),
           "n": args.n, "max_new_tokens": args.max_new_tokens}
    retrained = _training_summary(vlm.path)
    if retrained:
        row["retrained"] = retrained
    run_dir = Path(args.out) / "runs" / _slug(method, {k: row[k] for k in KEY_COLUMNS} | {"data": ev.kind})
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(row, indent=1))
    timing_path = run_dir / "timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {"seconds": 0.0, "captions": 0}
    switch = needs_editable_attention(method, **opts)
    if switch:
        from .hooks.attention import editable_attention

        ctx = editable_attention(vlm)
    else:
        ctx = nullcontext()
    with ctx:
        for split in ev.caption_splits:
            res, sec, made = ev.caption(vlm, split, run_dir / f"captions-{split}.jsonl", args, strategy)
            if made:
                timing["seconds"] += sec
                timing["captions"] += made
                timing_path.write_text(json.dumps(timing))
            for m in CAPTION_METRICS:
                row[f"{split}_{m}"] = res.get(m)
        for split in POPE_SPLITS:
            if split in ev.pope:
                res = ev.answer(vlm, split, run_dir / f"pope-{split}.jsonl", args, strategy)
                for m in POPE_METRICS:
                    row[f"pope_{split}_{m}"] = res[m]
            else:
                for m in POPE_METRICS:
                    row[f"pope_{split}_{m}"] = None
    sec = timing["seconds"] / timing["captions"] if timing["captions"] else None
    row["captions_timed"] = timing["captions"]
    row["sec_per_caption"] = sec
    row["rel_time"] = 1.0 if method == "greedy" and control == "none" else (
        sec / greedy_sec if sec is not None and greedy_sec else None)
    return row


def _training_summary(model_dir) -> dict | None:
    """What ``python -m lens_halluc.retrain`` recorded in a re-trained checkpoint (None for other models)."""
    if model_dir is None:
        return None
    from .training.loop import load_training_info

    info = load_training_info(model_dir)
    if info is None:
        return None
    extra = info.get("info") or {}
    return {"method": info["method"], "steps": info.get("steps"), "seconds": info.get("seconds"),
            "trained_params": info.get("trained_params"), "control": extra.get("control", "none"),
            "n_heads": extra.get("n_heads"), "separability": extra.get("separability")}


def greedy_baseline(vlm, ev: Evaluation, args) -> dict:
    """The greedy row of this out dir (same model, n, budget): read it if present, else run and append it."""
    probe = {"method": "greedy", "options": json.dumps({}), "heads": "", "control": "none", "draw": None,
             "model": str(vlm.path), "n": args.n, "max_new_tokens": args.max_new_tokens}
    for r in read_rows(Path(args.out)):
        if row_key(r) == row_key(probe):
            return r
    row = run_config(vlm, ev, args, "greedy", {}, None, None)
    append_row(Path(args.out), row)
    return row


# ---------------------------------------------------------------------------- CLI
def read_heads(path: str | Path) -> list[tuple[int, int]]:
    """Heads of a top_heads.json (``{"heads": [[l, h], ...], "k": ...}``) or a plain ``[[l, h], ...]`` list."""
    p = Path(path)
    if p.is_dir():
        p = p / "top_heads.json"
    if not p.is_file():
        raise FileNotFoundError(f"heads file not found: {path}. Pass a top_heads.json written by lens_halluc.attribute.")
    data = json.loads(p.read_text())
    heads = data["heads"] if isinstance(data, dict) else data
    if isinstance(data, dict) and data.get("k"):
        heads = heads[: int(data["k"])]
    return [(int(l), int(h)) for l, h in heads]


def _add_option(g, o: Option) -> None:
    if o.kind == "bool":
        g.add_argument(o.flag, dest=f"opt_{o.name}", action="store_true", default=o.default, help=o.help)
        return
    typ = {"float": float, "int": int}.get(o.kind, str)
    choices = None
    if o.choices is not None:
        choices = ["none" if c is None else c for c in o.choices]
    default = "none" if o.default is None and o.choices is not None else o.default
    shown = "" if default is None else f" (default: {default})"
    g.add_argument(o.flag, dest=f"opt_{o.name}", type=typ, default=default, choices=choices,
                   metavar=None if choices else o.name.upper(), help=o.help + shown)


def build_parser(method: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="methods: " + "; ".join(f"{n} ({m.description})" for n, m in METHODS.items()))
    p.add_argument("--method", required=True, help=f"one of: {', '.join(METHODS)}")
    p.add_argument("--out", required=True, help="results directory (results.csv, results.jsonl, runs/)")
    p.add_argument("--heads", default=None, help="top_heads.json of the hallucination heads (ablate, adhh, reweight)")
    p.add_argument("--control", choices=("none", "random"), default="none",
                   help="random: run the method on --draws sets of k random heads (excluding the attributed ones)")
    p.add_argument("--draws", type=int, default=5, help="random-head draws with --control random (default 5)")
    p.add_argument("--control-seed", type=int, default=0, help="seed of the random-head draws (default 0)")
    p.add_argument("--n", type=int, default=200, help="images per caption split (default 200)")
    p.add_argument("--max-new-tokens", type=int, default=40, help="caption token budget (default 40)")
    p.add_argument("--pope-max-new-tokens", type=int, default=3, help="POPE answer token budget (default 3)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--no-pope", action="store_true", help="skip POPE")
    p.add_argument("--data", default=None, help="where the organism's eval splits are exported (default OUT/data)")
    d = p.add_argument_group("real dataset (instead of the organism's splits)")
    d.add_argument("--instances", default=None, help="COCO instances JSON")
    d.add_argument("--references", default=None, help="COCO captions JSON")
    d.add_argument("--image-dir", default=None, help="directory of the images")
    for s in POPE_SPLITS:
        d.add_argument(f"--pope-{s}", default=None, help=f"POPE {s} question file (JSONL)")
    add_model_args(p)
    if method in METHODS and METHODS[method].options:
        g = p.add_argument_group(f"options of {method}")
        for o in METHODS[method].options:
            _add_option(g, o)
    return p


def main(argv: Sequence[str] | None = None) -> list[dict]:
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
    if args.control == "random" and not m.needs_heads:
        parser.error(f"--control random needs a method that acts on heads (ablate, adhh, reweight), not {args.method!r}.")
    if args.draws < 1 or args.n < 1:
        parser.error("--draws and --n must be positive.")
    with friendly_errors(PROG):
        opts = resolve_options(args.method, **{o.name: getattr(args, f"opt_{o.name}") for o in m.options})
        m.load()  # unavailable module: a clear error before loading the model
        heads = read_heads(args.heads) if args.heads else None
        heads_source = str(args.heads) if heads else None
        vlm = load_model_from_args(args)
        if heads:
            heads = [tuple(h) for h in vlm.spec.check_heads(heads)]
        ev = Evaluation(args, vlm)
        greedy = greedy_baseline(vlm, ev, args)
        if args.method == "greedy":
            rows = [greedy]
        elif args.control == "random":
            rows = []
            for draw, hs, strat in control_strategies(args.method, vlm, heads, args.draws, args.control_seed, **opts):
                row = run_config(vlm, ev, args, args.method, opts, hs, heads_source, "random", draw, strat,
                                 greedy["sec_per_caption"])
                append_row(Path(args.out), row)
                rows.append(row)
        else:
            strat = build_strategy(args.method, vlm, heads, **opts)
            row = run_config(vlm, ev, args, args.method, opts, heads, heads_source, "none", None, strat,
                             greedy["sec_per_caption"])
            append_row(Path(args.out), row)
            rows = [row]
        for r in rows:
            print(json.dumps({k: r.get(k) for k in columns(ev.caption_splits) if k in r}))
        print(f"results: {Path(args.out) / 'results.csv'}")
        return rows


if __name__ == "__main__":
    main()
