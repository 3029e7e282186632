"""The flags shared by the analyses that start from an attribution run (bias, inheritance, drift, reweighting).

    args = parse(__doc__, extra=lambda p: p.add_argument("--rows", default="all"))

``--attribution`` (default ``runs/attribution_heads``, written by ``analyses/attribution_heads.py``),
``--out`` (default ``figures``), ``--k`` (hallucination heads; default the run's k — the library's
defaults are HA's k for LLaVA-1.5-7B's 1024 heads, 20 / 1 / 3, too many or too few for the
organism's 48) and, unless
``samples=False``, ``--n-samples``.
"""
import argparse
from pathlib import Path


def parse(doc: str, extra=None, samples: bool = True) -> argparse.Namespace:
    """Parse the command line of an ``analyses/`` script whose docstring is ``doc``."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--attribution", type=Path, default=Path("runs/attribution_heads"))
    p.add_argument("--out", type=Path, default=Path("figures"))
    p.add_argument("--k", type=int, default=None, help="hallucination heads (default: the run's k)")
    if samples:
        p.add_argument("--n-samples", type=int, default=None, help="first N captions (default: all)")
    if extra is not None:
        extra(p)
    args = p.parse_args()
    if not (args.attribution / "manifest.json").is_file():
        p.exit(2, f"{args.attribution} holds no attribution run; run `python analyses/attribution_heads.py` first.\n")
    return args
