"""Does attribution patching rank heads like exact global ablation? (organism, break split)

Attributes the same captions twice (``scope="global"``, exact vs AtP) and writes
``figures/atp_agreement.json`` with Spearman / Kendall / top-k overlap.

    python analyses/atp_agreement.py [--n-images 200] [--out figures]
"""
import argparse
import json
from pathlib import Path

import lens_halluc as lh
from lens_halluc.attribution.compare import rank_agreement

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--n-images", type=int, default=200)
p.add_argument("--out", type=Path, default=Path("figures"))
p.add_argument("--runs", type=Path, default=Path("runs/atp_agreement"))
args = p.parse_args()

vlm = lh.load_vlm()
ds = lh.organism.split("break", n=args.n_images, seed=1)
caps = lh.caption(vlm, ds, max_new_tokens=128, batch_size=16, cache_dir=args.runs / "cache", progress=False)
fits = {m: lh.Attribution(scope="global", method=m, progress=False).fit(vlm, caps, ds, cache_dir=args.runs / "cache")
        for m in ("exact", "atp")}
top_k = fits["exact"].top_k_
result = rank_agreement(fits["exact"].scores_, fits["atp"].scores_, top_k=top_k)
result.update(scope="global", ablation="zero", n_images=args.n_images)
args.out.mkdir(parents=True, exist_ok=True)
(args.out / "atp_agreement.json").write_text(json.dumps(result, indent=1))
print(json.dumps(result))
