"""Does attribution patching rank heads like exact global ablation? (organism, break split)

Runs ``python -m lens_halluc.attribute`` twice on the same captions (``--scope global``, exact vs
AtP) and writes ``figures/atp_agreement.json`` with Spearman / Kendall / top-k overlap.

    python analyses/atp_agreement.py [--n-images 200] [--out figures]
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

from lens_halluc.attribution.compare import rank_agreement

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--n-images", type=int, default=200)
p.add_argument("--out", type=Path, default=Path("figures"))
p.add_argument("--runs", type=Path, default=Path("runs/atp_agreement"))
args = p.parse_args()

dirs = {}
for method in ("exact", "atp"):
    dirs[method] = args.runs / method
    subprocess.run([sys.executable, "-m", "lens_halluc.attribute", "--scope", "global", "--method", method,
                    "--n-images", str(args.n_images), "--out", str(dirs[method]), "--no-png", "--no-progress"],
                   check=True)
top_k = json.loads((dirs["exact"] / "top_heads.json").read_text())["k"]
result = rank_agreement(dirs["exact"] / "head_scores.csv", dirs["atp"] / "head_scores.csv", top_k=top_k)
result.update(scope="global", ablation="zero", n_images=args.n_images)
args.out.mkdir(parents=True, exist_ok=True)
(args.out / "atp_agreement.json").write_text(json.dumps(result, indent=1))
print(json.dumps(result))
