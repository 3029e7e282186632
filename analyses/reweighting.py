"""Figure: CHAIR vs attention re-weighting of hallucination heads vs random heads (figures/reweighting.{html,png,csv}).

    python analyses/reweighting.py [--attribution runs/attribution_heads] [--out figures] [extra flags of
        `python -m lens_halluc.analysis reweighting`, e.g. --n-images 100 --n-random 3]

Needs an attribution run: `python analyses/attribution_heads.py` writes runs/attribution_heads.
Captions are kept (resumable) under runs/reweighting.
"""
import argparse
import sys
import time
from pathlib import Path

from lens_halluc.analysis.__main__ import main

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--attribution", type=Path, default=Path("runs/attribution_heads"))
p.add_argument("--out", type=Path, default=Path("figures"))
args, rest = p.parse_known_args()
if not (args.attribution / "top_heads.json").is_file():
    sys.exit(f"{args.attribution} holds no attribution run; run `python analyses/attribution_heads.py` first.")
start = time.perf_counter()
main(["reweighting", "--attribution", str(args.attribution), "--out", str(args.out), *rest])
print(f"figures written to {args.out} ({time.perf_counter() - start:.0f} s)")
