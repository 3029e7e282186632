"""Table + figure: hallucination interventions compared on the organism (figures/interventions.{md,csv,html,png}).

    python analyses/interventions.py [--heads figures/top_heads.json] [--n 100] [--draws 5] [--out figures]
        [--runs runs/interventions] [--max-new-tokens 40]

Runs greedy and every available method of lens_halluc.interventions.registry with its defaults
(``python -m lens_halluc.intervene``), plus ADHH and re-weighting on k random heads (the mean of
``--draws`` draws, excluding the attributed heads) as the control; captions are kept (resumable)
under ``--runs``. Heads: runs/attribution_heads/top_heads.json, else figures/top_heads.json.
"""
import argparse
import sys
import time
import traceback
from pathlib import Path

from lens_halluc.figures.interventions import (interventions_figure, markdown_table, separability_markdown,
                                              summary_table)
from lens_halluc.figures.io import save_figure
from lens_halluc.intervene import main as intervene, read_rows
from lens_halluc.interventions.registry import METHODS, MethodUnavailableError

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--heads", type=Path, default=None)
p.add_argument("--n", type=int, default=100, help="images per caption split (default 100)")
p.add_argument("--draws", type=int, default=5, help="random-head draws of the ADHH / re-weighting control")
p.add_argument("--max-new-tokens", type=int, default=40)
p.add_argument("--out", type=Path, default=Path("figures"))
p.add_argument("--runs", type=Path, default=Path("runs/interventions"))
p.add_argument("--methods", nargs="*", default=None, help="subset of methods (default: all registered)")
args, rest = p.parse_known_args()

heads = args.heads
if heads is None:
    heads = next((h for h in (Path("runs/attribution_heads/top_heads.json"), Path("figures/top_heads.json")) if h.is_file()),
                 None)
if heads is None:
    print("no top_heads.json (run `python analyses/attribution_heads.py`): head methods are skipped.", file=sys.stderr)

start = time.perf_counter()
common = ["--out", str(args.runs), "--n", str(args.n), "--max-new-tokens", str(args.max_new_tokens), *rest]
jobs = []
for name in args.methods or list(METHODS):
    m = METHODS[name]
    if m.needs_heads and heads is None:
        continue
    h = ["--heads", str(heads)] if m.needs_heads else []
    jobs.append((name, ["--method", name, *h, *common]))
    if name in ("adhh", "reweight"):
        jobs.append((f"{name} (random heads)", ["--method", name, *h, "--control", "random", "--draws", str(args.draws),
                                                *common]))
problems = []
for label, argv in jobs:
    t = time.perf_counter()
    try:
        m = METHODS[argv[1]]
        m.load()
        intervene(argv)
        print(f"[{label}] done in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    except MethodUnavailableError as e:
        problems.append(f"{label}: {e}")
        print(f"[{label}] skipped: {e}", file=sys.stderr)
    except (Exception, SystemExit) as e:  # one broken method must not hide the others' results
        traceback.print_exc()
        problems.append(f"{label}: failed ({type(e).__name__}: {e})")

rows = [r for r in read_rows(args.runs) if r.get("n") == args.n and r.get("max_new_tokens") == args.max_new_tokens]
table = summary_table(rows)
args.out.mkdir(parents=True, exist_ok=True)
cols = list(dict.fromkeys(k for r in table for k in r))
import csv  # noqa: E402

with open(args.out / "interventions.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=cols)
    w.writeheader()
    w.writerows(table)
md = markdown_table(table)
note = (f"\n\nOrganism, {args.n} images per caption split (break: A present, partner B absent; normal), POPE on the "
        f"mixed split (3 new tokens), captions ≤ {args.max_new_tokens} tokens, greedy decoding. Heads: {heads}. "
        f"Random-head rows: mean of {args.draws} draws of k random heads excluding the attributed ones. "
        "Time: seconds per caption relative to greedy.")
if any(r.get("train_seconds") is not None for r in table):
    note += ("\n\nRe-trained rows (`python analyses/retrain.py`): greedy decoding of the re-trained checkpoint; "
             "'train s' = training wall time on this machine's CPU, 'trained params' = elements that training could "
             "change. Random-head TFHH: mean of the re-trained draws.")
sep = separability_markdown(table)
if sep:
    note += ("\n\n## Separability of the confounders, last layer, before → after re-training\n\n" + sep +
             "\n\nSilhouette of per-instance representations by category, between/within scatter ratio, and the "
             "distance between planted co-occurring pairs relative to other pairs (analysis.confounders).")
if problems:
    note += "\n\nNot in the table:\n" + "\n".join(f"- {p}" for p in problems)
(args.out / "interventions.md").write_text("# Interventions against hallucination\n\n" + md + note + "\n")
save_figure(interventions_figure(table), args.out / "interventions", width=1200, height=600)
print(md)
if problems:
    print("\n".join(problems))
print(f"figures written to {args.out} ({time.perf_counter() - start:.0f} s)")
