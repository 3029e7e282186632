"""Figure: hallucination score per head on the organism's break split (figures/heads.{html,png,csv}).

    python analyses/attribution_heads.py [--runs runs/attribution_heads]
"""
import argparse
import shutil
import subprocess
import sys
from pathlib import Path

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--runs", type=Path, default=Path("runs/attribution_heads"))
p.add_argument("--out", type=Path, default=Path("figures"))
args = p.parse_args()

subprocess.run([sys.executable, "-m", "lens_halluc.attribute", "--out", str(args.runs), "--no-progress"], check=True)
args.out.mkdir(parents=True, exist_ok=True)
for name, target in [("heads.html", "heads.html"), ("heads.png", "heads.png"), ("head_scores.csv", "head_scores.csv"),
                     ("top_heads.json", "top_heads.json"), ("plotly.min.js", "plotly.min.js")]:
    if (args.runs / name).is_file():
        shutil.copy(args.runs / name, args.out / target)
print(f"figures written to {args.out}")
