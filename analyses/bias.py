"""Figure: image vs text attention of hallucination heads at object tokens (figures/bias.{html,png,csv}).

    python analyses/bias.py [--attribution runs/attribution_heads] [--out figures] [extra flags of
        `python -m lens_halluc.analysis bias`, e.g. --n-samples 50]

Needs an attribution run: `python analyses/attribution_heads.py` writes runs/attribution_heads.
"""
from lens_halluc.analysis.__main__ import run_figure_script

run_figure_script("bias", __doc__.split("\n\n")[0])
