"""Figure: CHAIR vs attention re-weighting of hallucination heads vs random heads (figures/reweighting.{html,png,csv}).

    python analyses/reweighting.py [--attribution runs/attribution_heads] [--out figures] [extra flags of
        `python -m lens_halluc.analysis reweighting`, e.g. --n-images 100 --n-random 3]

Needs an attribution run: `python analyses/attribution_heads.py` writes runs/attribution_heads.
Captions are kept (resumable) under runs/reweighting.
"""
from lens_halluc.analysis.__main__ import run_figure_script

run_figure_script("reweighting", __doc__.split("\n\n")[0])
