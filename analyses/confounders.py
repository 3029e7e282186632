"""Figures: visual and text confounders of the organism per layer (figures/confounders_*.{html,png,csv}).

    python analyses/confounders.py [--runs runs/confounders] [--n-images 300] [--highlight dog]

On the organism's normal split (seed 1, with object boxes); the full result is saved under --runs and
the figures and tables are copied to --out with a ``confounders_`` prefix.
"""
import argparse
import shutil
from pathlib import Path

import lens_halluc as lh

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--runs", type=Path, default=Path("runs/confounders"))
p.add_argument("--out", type=Path, default=Path("figures"))
p.add_argument("--n-images", type=int, default=300)
p.add_argument("--highlight", default="dog")
args = p.parse_args()

ds = lh.organism.split("normal", n=args.n_images, seed=1, cache_dir=args.runs / "data")
res = lh.analysis.confounders(lh.load_vlm(), ds, highlight=args.highlight)
res.save(args.runs)
print(res.table.to_string(index=False))
args.out.mkdir(parents=True, exist_ok=True)
for f in sorted(args.runs.glob("confounders_*")) + [args.runs / "plotly.min.js"]:
    if f.is_file():
        shutil.copy(f, args.out / f.name)
for name in ["separability.csv", "pca_visual_2d.csv", "pca_visual_3d.csv", "pca_text_2d.csv", "pca_text_3d.csv"]:
    if (args.runs / name).is_file():
        shutil.copy(args.runs / name, args.out / f"confounders_{name}")
print(f"figures written to {args.out}")
