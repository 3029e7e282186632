"""Figure: hallucination score per head on the organism's break split (figures/heads.{html,png,csv}).

The attribution of ``python -m lens_halluc.attribute`` with its defaults (200 images, 128 new
tokens), through the API; the run directory is the CLI's (same files, byte for byte).

    python analyses/attribution_heads.py [--runs runs/attribution_heads] [--out figures]
"""
import argparse
import shutil
from pathlib import Path

import lens_halluc as lh

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--runs", type=Path, default=Path("runs/attribution_heads"))
p.add_argument("--out", type=Path, default=Path("figures"))
args = p.parse_args()

vlm = lh.load_vlm()
ds = lh.organism.split("break", n=200, seed=1)
caps = lh.caption(vlm, ds, max_new_tokens=128, batch_size=16, cache_dir=args.runs / "cache", progress=False)
attr = lh.Attribution(progress=False).fit(vlm, caps, ds, cache_dir=args.runs / "cache")
attr.save(args.runs)
args.out.mkdir(parents=True, exist_ok=True)
for name in ("heads.html", "heads.png", "head_scores.csv", "top_heads.json", "plotly.min.js"):
    if (args.runs / name).is_file():
        shutil.copy(args.runs / name, args.out / name)
print("top heads:", attr.top_heads(), f"\nfigures written to {args.out}")
