"""Table + figure: hallucination interventions compared on the organism (figures/interventions.{md,csv,html,png}).

    python analyses/interventions.py [--heads figures/top_heads.json] [--n 100] [--draws 5] [--out figures]
        [--runs runs/interventions] [--max-new-tokens 40] [--methods adhh vcd ...]

Compares greedy and every registered method with its defaults — the ``reference`` flavour, the
papers' code — and, where it differs, its ``corrected`` flavour (``lh.compare``), plus ADHH and
re-weighting on k random heads (``--draws`` draws excluding the attributed heads) as the control,
on the organism's break and normal splits with POPE on its mixed split; captions are cached
(resumable) under ``--runs``. Re-trained models scored by ``analyses/retrain.py`` (rows in
``--runs/results.jsonl``) join the table. Heads: runs/attribution_heads/top_heads.json, else
figures/top_heads.json.
"""
import argparse
import sys
import time
from pathlib import Path

import lens_halluc as lh
from lens_halluc.data.outputs import output_dir
from lens_halluc.data.tables import write_table
from lens_halluc.evaluation.compare import Comparison, pope_sets
from lens_halluc.figures.interventions import interventions_figure, markdown_table, separability_markdown
from lens_halluc.figures.io import save_figure
from lens_halluc.intervene import read_rows
from lens_halluc.interventions.registry import METHODS, MethodUnavailableError, build_intervention
from lens_halluc.organism.detector import train_detector

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--heads", type=Path, default=None)
p.add_argument("--n", type=int, default=100, help="images per caption split (default 100)")
p.add_argument("--draws", type=int, default=5, help="random-head draws of the ADHH / re-weighting control")
p.add_argument("--max-new-tokens", type=int, default=40)
p.add_argument("--out", type=Path, default=Path("figures"))
p.add_argument("--runs", type=Path, default=Path("runs/interventions"))
p.add_argument("--methods", nargs="*", default=None, help="subset of methods (default: all registered)")
args = p.parse_args()

heads_file = args.heads or next((h for h in (Path("runs/attribution_heads/top_heads.json"),
                                             Path("figures/top_heads.json")) if h.is_file()), None)
if heads_file is None:
    print("no top_heads.json (run `python analyses/attribution_heads.py`): head methods are skipped.", file=sys.stderr)
heads = lh.read_heads(heads_file) if heads_file else None

start = time.perf_counter()
vlm = lh.load_vlm()
def describe(iv, ref=None) -> str:
    """A row label: the method, its flavour and what sets it apart (sampled; the options that differ)."""
    params = iv.get_params()
    sampled = ", sampled" if params.get("sample") else ""
    if ref is None:
        return f"{iv.name} ({params['flavour']}{sampled})" if "flavour" in params else iv.name
    base = ref.get_params()
    diff = [f"{k}={v}" for k, v in params.items()
            if k not in ("flavour", "heads", "sample", "detector", "scorer") and base.get(k) != v]
    return f"{iv.name} (corrected{sampled}{': ' if diff else ''}{', '.join(diff)})"


detector = train_detector(seed=0)
entries, problems = {"greedy": None}, []
for name in args.methods or list(METHODS):
    m = METHODS[name]
    try:
        if name == "greedy" or (m.needs_heads and heads is None):
            continue
        # HALC grounds object words with a detector: the organism's own, trained on its scenes (pixels only)
        extra = {"detector": detector} if name == "halc" else {}
        ref = build_intervention(name, heads if m.needs_heads else None, **extra)
        entries[describe(ref)] = ref
        if "flavour" in ref.get_params():
            cor = build_intervention(name, heads if m.needs_heads else None, flavour="corrected", **extra)
            if {**cor.get_params(), "flavour": None} != {**ref.get_params(), "flavour": None}:
                entries[describe(cor, ref)] = cor
        if name in ("adhh", "reweight"):
            draws = lh.random_heads(vlm, len(heads), exclude=heads, seed=0, draws=args.draws)
            entries[f"{name} — random heads"] = [build_intervention(name, h) for h in draws]
    except MethodUnavailableError as e:
        problems.append(f"{name}: {e}")
with output_dir(args.runs, "intervene"):  # the same run directory as `python -m lens_halluc.intervene`
    splits = lh.organism.eval_splits(vlm, args.n, cache_dir=args.runs / "data")
    datasets = {s: splits[s] for s in ("break", "normal")}
    cmp = lh.compare(vlm, entries, datasets, pope=pope_sets(splits["mixed"], datasets), n=args.n,
                     max_new_tokens=args.max_new_tokens, cache_dir=args.runs / "cache")
retrained = [r for r in read_rows(args.runs) if r.get("retrained") and r.get("n") == args.n
             and r.get("max_new_tokens") == args.max_new_tokens]
table = Comparison(cmp.rows + retrained, cmp.caption_splits).summary_rows()

args.out.mkdir(parents=True, exist_ok=True)
write_table(table, args.out / "interventions.csv", list(dict.fromkeys(k for r in table for k in r)))
md = markdown_table(table)
note = (f"\n\nOrganism, {args.n} images per caption split (break: A present, partner B absent; normal), POPE on the "
        f"mixed split (3 new tokens), captions ≤ {args.max_new_tokens} tokens, each method's own token choice (argmax unless 'sampled': "
        f"seeded multinomial at T = 1, one seed; OPERA: beam search). CHAIR and POPE in their reference flavour. "
        f"Each method's options: `{args.out / 'interventions.csv'}` (column `options`). Heads: {heads_file}. "
        f"Random-head rows: mean of {args.draws} draws of k random heads excluding the attributed ones. "
        "Time: seconds per caption relative to greedy, each timed after one warm-up caption.")
if retrained:
    note += ("\n\nRe-trained rows (`python analyses/retrain.py`): greedy decoding of the re-trained checkpoint; "
             "'train s' = training wall time on this machine's CPU, 'trained params' = elements that training could "
             "change. Random-head TFHH: mean of the re-trained draws.")
sep = separability_markdown(table)
if sep:
    note += ("\n\n## Separability of the confounders, last layer, before → after re-training\n\n" + sep +
             "\n\nSilhouette of per-instance representations by category, between/within scatter ratio, and the "
             "distance between planted co-occurring pairs relative to other pairs (lens_halluc.analysis.separability).")
if problems:
    note += "\n\nNot in the table:\n" + "\n".join(f"- {p}" for p in problems)
(args.out / "interventions.md").write_text("# Interventions against hallucination\n\n" + md + note + "\n")
save_figure(interventions_figure(table), args.out / "interventions", width=1200, height=600)
print(md)
if problems:
    print("\n".join(problems))
print(f"figures written to {args.out} ({time.perf_counter() - start:.0f} s)")
