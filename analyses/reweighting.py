"""Figure: CHAIR vs attention re-weighting of hallucination heads vs random heads (figures/reweighting.{html,png,csv}).

    python analyses/reweighting.py [--attribution runs/attribution_heads] [--out figures] [--n-images 100]
        [--n-random 3] [--seed 0] [--k K] [--work runs/reweighting]

Needs an attribution run: `python analyses/attribution_heads.py` writes runs/attribution_heads.
Measured on the organism's held-out break split (seed 1002); captions are kept (resumable) under --work.
"""
import time
from pathlib import Path

import lens_halluc as lh
from _attribution_args import parse  # analyses/_attribution_args.py (this folder is on sys.path)


def _extra(p):
    p.add_argument("--n-images", type=int, default=100)
    p.add_argument("--n-random", type=int, default=3, help="random-head draws")
    p.add_argument("--seed", type=int, default=0, help="seed of the random-head draws")
    p.add_argument("--work", type=Path, default=Path("runs/reweighting"))


args = parse(__doc__, extra=_extra, samples=False)

start = time.perf_counter()
attr = lh.Attribution.load(args.attribution)
vlm = lh.load_vlm(attr.model_)
ds = lh.organism.split("break", n=args.n_images, seed=lh.organism.EVAL_SEEDS["break"], cache_dir=args.work / "data")
res = lh.analysis.reweighting(vlm, ds, attr.top_heads(args.k or attr.top_k_), n_random=args.n_random, seed=args.seed,
                              cache_dir=args.work / f"captions-break-{args.n_images}", progress=True)
res.save(args.out)
print(res.summary.query("not renormalize and alpha in (0.0, 3.5)")[
    ["group", "key_group", "alpha", "CHAIR_s", "CHAIR_i", "Recall", "partner_rate"]].to_string(index=False))
print(f"figures written to {args.out} ({time.perf_counter() - start:.0f} s)")
