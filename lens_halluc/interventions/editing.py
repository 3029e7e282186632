"""Interventions that edit the post-softmax attention of chosen heads: ADHH and attention re-weighting.

Both bind to :class:`~lens_halluc.hooks.attention.AttentionEditing` with an edit of
:mod:`lens_halluc.hooks.attention` (:class:`~lens_halluc.hooks.attention.ThresholdZeroText`,
:class:`~lens_halluc.hooks.attention.ScaleKeys`). The bound strategy switches the text tower to
the editable ``"lens_halluc"`` attention for each decoding call and restores it afterwards.

Example
-------
>>> from lens_halluc.interventions import ADHH, Reweight
>>> ADHH([(3, 1)], tau=0.3)
ADHH(heads=[[3, 1]], tau=0.3)
>>> ADHH([(3, 1)], flavour="corrected")
ADHH(heads=[[3, 1]], flavour='corrected')
>>> Reweight([(3, 1)], alpha=0.2, keys="image")
Reweight(heads=[[3, 1]], alpha=0.2, keys='image')
>>> caps = lh.caption(vlm, ds, strategy=ADHH(heads))                         # doctest: +SKIP
"""
from __future__ import annotations

from ..data.flavour import FLAVOURS, check_flavour
from ..hooks.attention import AttentionEditing, ScaleKeys, ThresholdZeroText
from .base import Intervention, Param, check_bool, check_choice, check_heads, check_number

__all__ = ["ADHH", "KEY_GROUPS", "Reweight"]

KEY_GROUPS = ("text", "image")
"""Key groups :class:`Reweight` may scale (TEXT-role keys after the image, or the image patches)."""


class ADHH(Intervention):
    """ADHH: in each of ``heads``, a query row whose attention mass on text keys is ≥ τ gets that text attention zeroed.

    Text keys are the TEXT-role tokens after the image (the generated ones included), as the
    reference's ``img_start_pos + img_length`` to the end. The reference does not renormalise the
    edited rows (they then sum to less than 1).

    Flavours (``flavour=``; an explicit ``tau`` / ``rows`` always wins):

    * ``"reference"`` (default) — what TianyunYoung/Hallucination-Attribution runs: only the
      **last query row** of each forward is tested and edited (the last prompt row in the prefill,
      the current row at each decoding step; ``attn_weights[:, head, -1, text_start:]``), and
      τ = 0.5, the paper's evaluation setting (``baselines/bash_scripts/eval_adhh.sh``:
      ``adhh_threshold=0.5``; the LLaVA folder's ``LLaVA/bash_scripts/decoding.sh`` uses 0.4).
    * ``"corrected"`` — every query row of every forward is tested and edited (``rows="all"``), τ = 0.5.

    Parameters
    ----------
    heads : (layer, head) pairs (the hallucination heads); checked against the model at :meth:`bind`.
    tau : threshold τ in [0, 1] on a row's text-attention mass. Default: the flavour's (0.5).
    renormalize : divide edited rows by their remaining mass (the reference does not). Default False.
    rows : ``"last"`` (the last query row of each forward) or ``"all"``. Default: the flavour's
        (reference ``"last"``, corrected ``"all"``).
    flavour : ``"reference"`` or ``"corrected"`` (see above).

    Example
    -------
    >>> from lens_halluc.interventions import ADHH
    >>> adhh = ADHH([(3, 1), (5, 0)])
    >>> adhh.tau, adhh.rows
    (0.5, 'last')
    >>> ADHH([(3, 1)], flavour="corrected").rows
    'all'
    >>> adhh.needs_editable_attention
    True
    >>> caps = lh.caption(vlm, ds, strategy=adhh)          # switches to the editable attention by itself  # doctest: +SKIP
    """

    name = "adhh"
    description = "ADHH: zero the heads' text attention where it is >= tau"
    editable = True
    flavours = {"reference": {"tau": 0.5, "rows": "last"},
                "corrected": {"tau": 0.5, "rows": "all"}}
    options = {
        "tau": Param("float", "text-attention threshold (the paper's evaluation: 0.5; the LLaVA folder: 0.4)"),
        "renormalize": Param("bool", "renormalise edited rows (the reference does not)"),
        "rows": Param("str", "query rows tested and edited: last (of each forward, the reference) or all",
                      ThresholdZeroText.ROWS),
        "flavour": Param("str", "reference (the paper's code: last row only) or corrected (every row)", FLAVOURS),
    }

    def __init__(self, heads, tau: float | None = None, renormalize: bool = False, rows: str | None = None,
                 flavour: str = "reference"):
        self.heads = check_heads(heads, "ADHH")
        self.flavour = check_flavour(flavour, "ADHH")
        self.tau = check_number(self._flavoured("tau", tau), "tau", "ADHH", 0.0, 1.0)
        self.renormalize = check_bool(renormalize, "renormalize", "ADHH")
        self.rows = check_choice(self._flavoured("rows", rows), "rows", "ADHH", ThresholdZeroText.ROWS)

    def bind(self, vlm) -> AttentionEditing:
        return self._bound(AttentionEditing(vlm, ThresholdZeroText(self.tau, self.renormalize, self.rows), self.heads))


class Reweight(Intervention):
    """Attention re-weighting: in each of ``heads`` the post-softmax weights of one key group are scaled by α.

    Parameters
    ----------
    heads : (layer, head) pairs; checked against the model at :meth:`bind`.
    alpha : scale α ≥ 0 (``keys="text"``: α < 1 lowers the language prior; ``keys="image"``: α > 1
        raises the image's share). Default 0.4.
    keys : ``"text"`` (TEXT-role keys after the image) or ``"image"``. Default ``"text"``.
    renormalize : divide each row by its new sum (the reference does not). Default False.

    Every query row of every forward is scaled (prefill and each decoding step), text keys = after
    the image to the end, image keys = the image positions: the reference's computation
    (``LLaVA/llava/model/language_model/modeling_llama.py`` lines 583-593,
    ``attn_weights[:, head, :, text_start:] *= reweight_alpha``), so there is one flavour.

    Example
    -------
    >>> from lens_halluc.interventions import Reweight
    >>> Reweight([(3, 1)], alpha=2.5, keys="image").get_params()
    {'heads': [[3, 1]], 'alpha': 2.5, 'keys': 'image', 'renormalize': False}
    >>> caps = lh.caption(vlm, ds, strategy=Reweight(heads, alpha=0.4))          # doctest: +SKIP
    """

    name = "reweight"
    description = "attention re-weighting: scale one key group of the heads by alpha"
    editable = True
    options = {
        "alpha": Param("float", "scale (text: < 1 lowers the prior; image: > 1)"),
        "keys": Param("str", "key group to scale", KEY_GROUPS, aliases=("--key-group",)),
        "renormalize": Param("bool", "renormalise rows after scaling (the reference does not)"),
    }

    def __init__(self, heads, alpha: float = 0.4, keys: str = "text", renormalize: bool = False):
        self.heads = check_heads(heads, "Reweight")
        self.alpha = check_number(alpha, "alpha", "Reweight", low=0.0)
        self.keys = check_choice(keys, "keys", "Reweight", KEY_GROUPS)
        self.renormalize = check_bool(renormalize, "renormalize", "Reweight")

    def bind(self, vlm) -> AttentionEditing:
        return self._bound(AttentionEditing(vlm, ScaleKeys(self.keys, self.alpha, self.renormalize), self.heads))
