"""Figure: text-to-text attention of the VLM vs its base LM, per head (figures/inheritance.{html,png,csv}).

    python analyses/inheritance.py [--attribution runs/attribution_heads] [--out figures] [--n-samples N] [--k K]

Needs an attribution run: `python analyses/attribution_heads.py` writes runs/attribution_heads.
The base LM is the organism's (stage 0 of its recipe).
"""
import time

import lens_halluc as lh
from lens_halluc.models.default import organism_path
from _attribution_args import parse  # analyses/_attribution_args.py (this folder is on sys.path)

args = parse(__doc__)

start = time.perf_counter()
attr = lh.Attribution.load(args.attribution)
res = lh.analysis.inheritance(lh.load_vlm(attr.model_), organism_path("base"), attr, k=args.k or attr.top_k_,
                              n_samples=args.n_samples)
res.save(args.out)
print(res.summary.to_string(index=False))
print(f"figures written to {args.out} ({time.perf_counter() - start:.0f} s)")
