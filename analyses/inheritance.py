"""Figure: text-to-text attention of the VLM vs its base LM, per head (figures/inheritance.{html,png,csv}).

    python analyses/inheritance.py [--attribution runs/attribution_heads] [--out figures] [extra flags of
        `python -m lens_halluc.analysis inheritance`, e.g. --n-samples 50]

Needs an attribution run: `python analyses/attribution_heads.py` writes runs/attribution_heads.
"""
from lens_halluc.analysis.__main__ import run_figure_script

run_figure_script("inheritance", __doc__.split("\n\n")[0])
