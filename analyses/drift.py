"""Figure: JS divergence of attention across instruction-tuning checkpoints (figures/drift.{html,png,csv}).

    python analyses/drift.py [--attribution runs/attribution_heads] [--out figures] [extra flags of
        `python -m lens_halluc.analysis drift`, e.g. --n-samples 50]

Needs an attribution run: `python analyses/attribution_heads.py` writes runs/attribution_heads.
"""
from lens_halluc.analysis.__main__ import run_figure_script

run_figure_script("drift", __doc__.split("\n\n")[0])
