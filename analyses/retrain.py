"""Re-train the organism three ways (TFHH, SEED-style distillation, causal module) and score each model.

    python analyses/retrain.py [--heads figures/top_heads.json] [--draws 5] [--n 100] [--runs runs/retrain]
        [--results runs/interventions] [--out figures] [--steps 150]

Trains (resumable: a finished model is not trained again) TFHH on the attributed heads, TFHH on
``--draws`` draws of k random heads (the control), SEED-style LoRA distillation and the causal
module, through ``lens_halluc.train``, each in its reference flavour (the papers' settings; their
learning rates are LLaVA-7B's) and its corrected flavour (FIDELITY.md); the random-head control
is trained in the reference flavour; then scores each re-trained model with
``python -m lens_halluc.intervene --method greedy`` into the interventions results (``--results``),
where ``analyses/interventions.py`` puts them in figures/interventions.md. Writes
figures/retrain_losses.{html,png}.
"""
import argparse
import time
from pathlib import Path

import lens_halluc as lh
from lens_halluc.figures.io import save_figure
from lens_halluc.figures.retrain import training_curves
from lens_halluc.intervene import main as intervene
from lens_halluc.organism import split_dir
from lens_halluc.organism.examples import training_examples
from lens_halluc.training import load_training_info

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--heads", type=Path, default=None)
p.add_argument("--draws", type=int, default=5, help="random-head TFHH controls")
p.add_argument("--n", type=int, default=100, help="images per caption split for scoring")
p.add_argument("--steps", type=int, default=150)
p.add_argument("--n-train", type=int, default=2000, help="training examples (the organism's training scenes)")
p.add_argument("--max-new-tokens", type=int, default=40)
p.add_argument("--runs", type=Path, default=Path("runs/retrain"))
p.add_argument("--results", type=Path, default=Path("runs/interventions"))
p.add_argument("--out", type=Path, default=Path("figures"))
args = p.parse_args()

heads_file = args.heads or next((h for h in (Path("runs/attribution_heads/top_heads.json"),
                                             Path("figures/top_heads.json")) if h.is_file()), None)
if heads_file is None:
    raise SystemExit("no top_heads.json: run `python analyses/attribution_heads.py` first.")
heads = lh.read_heads(heads_file)
start = time.perf_counter()
examples = training_examples(n=args.n_train)
confounders = split_dir("normal", n=200, seed=1, cache_dir=args.runs / "_data")  # dictionary + separability
common = dict(steps=args.steps, confounders=confounders, progress=False)


def tfhh(control_seed=None, flavour="reference"):
    def train(vlm):
        if control_seed is None:
            return lh.train.tfhh(vlm, heads, examples, info={"control": "none", "heads_source": str(heads_file)},
                                 flavour=flavour, **common)
        draw = lh.random_heads(vlm, len(heads), exclude=heads, seed=control_seed)
        return lh.train.tfhh(vlm, draw, examples, info={"control": "random", "heads_source": str(heads_file)},
                             flavour=flavour, **common)
    return train


jobs = {"tfhh": tfhh(), "tfhh-corrected": tfhh(flavour="corrected")}
jobs |= {f"tfhh-random{d}": tfhh(d) for d in range(args.draws)}
for f, suffix in (("reference", ""), ("corrected", "-corrected")):
    jobs |= {f"seed{suffix}": lambda vlm, f=f: lh.train.seed_distill(vlm, examples, flavour=f, **common),
             f"causal{suffix}": lambda vlm, f=f: lh.train.causal_module(vlm, examples, flavour=f, **common)}
for name, train in jobs.items():
    t = time.perf_counter()
    out = args.runs / name
    if load_training_info(out) is None:  # resumable: a finished model is not trained again
        res = train(lh.load_vlm())
        res.save(out)
        print(f"[{name}] {res.summary}")
    intervene(["--method", "greedy", "--model", str(out), "--out", str(args.results), "--n", str(args.n),
               "--max-new-tokens", str(args.max_new_tokens)])
    print(f"[{name}] trained and scored in {time.perf_counter() - t:.0f} s")
save_figure(training_curves({k: args.runs / k for k in ("tfhh", "tfhh-corrected", "seed", "seed-corrected", "causal",
                                                       "causal-corrected")}), args.out / "retrain_losses",
            width=2400, height=450)
print(f"re-trained models scored into {args.results}; figure in {args.out} ({time.perf_counter() - start:.0f} s)")
