"""Figures: visual and text confounders of the organism per layer (figures/confounders_*.{html,png,csv}).

    python analyses/confounders.py [--runs runs/confounders] [--n-images 300] [--highlight dog]
"""
import argparse
import shutil
from pathlib import Path

from lens_halluc.analysis.confounders import build_parser, run

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--runs", type=Path, default=Path("runs/confounders"))
p.add_argument("--out", type=Path, default=Path("figures"))
p.add_argument("--n-images", type=int, default=300)
p.add_argument("--highlight", default="dog")
args = p.parse_args()

run(build_parser().parse_args(["--out", str(args.runs), "--n-images", str(args.n_images),
                               "--highlight", args.highlight, "--no-progress"]))
args.out.mkdir(parents=True, exist_ok=True)
for f in sorted(args.runs.glob("confounders_*")) + [args.runs / "plotly.min.js"]:
    if f.is_file():
        shutil.copy(f, args.out / f.name)
for name in ["separability.csv", "pca_visual_2d.csv", "pca_visual_3d.csv", "pca_text_2d.csv", "pca_text_3d.csv"]:
    if (args.runs / name).is_file():
        shutil.copy(args.runs / name, args.out / f"confounders_{name}")
print(f"figures written to {args.out}")
