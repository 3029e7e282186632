"""Figure: JS divergence of attention across instruction-tuning checkpoints (figures/drift.{html,png,csv}).

    python analyses/drift.py [--attribution runs/attribution_heads] [--out figures] [--n-samples N] [--k K]

Needs an attribution run: `python analyses/attribution_heads.py` writes runs/attribution_heads.
The initial model is the organism's projector stage; the checkpoints are its instruction-tuning ones.
"""
import time

import lens_halluc as lh
from lens_halluc.models.default import list_checkpoints, organism_path
from _attribution_args import parse  # analyses/_attribution_args.py (this folder is on sys.path)

args = parse(__doc__, extra=lambda p: p.add_argument("--rows", choices=("all", "text"), default="all",
                                                      help="query rows averaged"))

start = time.perf_counter()
attr = lh.Attribution.load(args.attribution)
res = lh.analysis.drift(organism_path("projector"), list_checkpoints(), attr, k=args.k or attr.top_k_,
                        n_samples=args.n_samples, rows=args.rows)
res.save(args.out)
print(res.summary.to_string(index=False))
print(f"figures written to {args.out} ({time.perf_counter() - start:.0f} s)")
