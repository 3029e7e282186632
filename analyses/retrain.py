"""Re-train the organism three ways (TFHH, SEED-style distillation, causal module) and score each model.

    python analyses/retrain.py [--heads figures/top_heads.json] [--draws 5] [--n 100] [--runs runs/retrain]
        [--results runs/interventions] [--out figures] [--steps 150]

Trains (resumable: a finished model is not trained again) TFHH on the attributed heads, TFHH on
``--draws`` draws of k random heads (the control), SEED-style LoRA distillation and the causal
module; then scores each re-trained model with ``python -m lens_halluc.intervene --method greedy``
into the interventions results (``--results``), where ``analyses/interventions.py`` puts them in
figures/interventions.md. Writes figures/retrain_losses.{html,png}.
"""
import argparse
import time
from pathlib import Path

from lens_halluc.figures.io import save_figure
from lens_halluc.figures.retrain import training_curves
from lens_halluc.intervene import main as intervene
from lens_halluc.retrain import main as retrain

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--heads", type=Path, default=None)
p.add_argument("--draws", type=int, default=5, help="random-head TFHH controls")
p.add_argument("--n", type=int, default=100, help="images per caption split for scoring")
p.add_argument("--steps", type=int, default=150)
p.add_argument("--max-new-tokens", type=int, default=40)
p.add_argument("--runs", type=Path, default=Path("runs/retrain"))
p.add_argument("--results", type=Path, default=Path("runs/interventions"))
p.add_argument("--out", type=Path, default=Path("figures"))
args = p.parse_args()

heads = args.heads or next((h for h in (Path("runs/attribution_heads/top_heads.json"), Path("figures/top_heads.json"))
                            if h.is_file()), None)
if heads is None:
    raise SystemExit("no top_heads.json: run `python analyses/attribution_heads.py` first.")
start = time.perf_counter()
common = ["--steps", str(args.steps), "--no-progress"]
jobs = {"tfhh": ["--method", "tfhh", "--heads", str(heads)]}
jobs |= {f"tfhh-random{d}": ["--method", "tfhh", "--heads", str(heads), "--control", "random", "--control-seed", str(d)]
         for d in range(args.draws)}
jobs |= {"seed": ["--method", "seed"], "causal": ["--method", "causal"]}
for name, argv in jobs.items():
    t = time.perf_counter()
    out = args.runs / name
    retrain([*argv, *common, "--out", str(out)])
    intervene(["--method", "greedy", "--model", str(out), "--out", str(args.results), "--n", str(args.n),
               "--max-new-tokens", str(args.max_new_tokens)])
    print(f"[{name}] trained and scored in {time.perf_counter() - t:.0f} s")
save_figure(training_curves({k: args.runs / k for k in ("tfhh", "seed", "causal")}), args.out / "retrain_losses",
            width=1400, height=450)
print(f"re-trained models scored into {args.results}; figure in {args.out} ({time.perf_counter() - start:.0f} s)")
