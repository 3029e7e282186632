"""DoLa — decoding by contrasting layers (final layer vs a dynamically chosen premature layer).

At every step, for each candidate layer ``j`` the early-exit distribution is
``q_j = softmax(lm_head(norm(h_j)))`` at the last position (``h_j`` = hidden state with index ``j``
in transformers' ``hidden_states`` convention: 0 = the input embeddings — image features merged —,
``j`` = output of decoder layer ``j − 1``). The premature layer is chosen *per row* as

    M = argmax_j JSD(p_final ‖ q_j),   JSD(p‖q) = ½ KL(p‖m) + ½ KL(q‖m),  m = ½ (p + q)

and the next-token scores are

    strength None (original DoLa):  s = log p_final − log q_M
    strength = λ (interpolated):    s = log p_final + λ · (log p_final − log q_M)
                                      = (1 + λ)·log p_final − λ·log q_M      (λ = 0 ⇒ greedy)
    s(y) = −inf  where  p_final(y) < β · max p_final     (plausibility cut-off ``cutoff`` = β, 0.1)

No extra forward is needed: hooks on the decoder layers capture the last-position hidden states of
the main branch's own forwards (a candidate ``j < n_layers`` is read from the *input* of decoder
layer ``j``). Deviation from transformers' ``dola_layers``: no repetition penalty is added here.

Here λ is ``strength`` and β is ``cutoff`` (the names shared by the contrastive family).

Example
-------
>>> from lens_halluc.interventions import DoLa
>>> DoLa(candidate_layers=[0, 2], cutoff=0.1)
DoLa(candidate_layers=[0, 2])
>>> caps = lh.caption(vlm, ds, strategy=DoLa())                                  # doctest: +SKIP
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import torch

from ..generation.decoding import DecodingStrategy
from ..hooks.ablation import InterventionNotAppliedError
from ..models.loading import LoadedVLM
from .base import Intervention, Param, check_ints, check_number
from .contrastive import apply_plausibility, check_cutoff, contrast

__all__ = ["DoLa", "DoLaStrategy", "jensen_shannon"]


def jensen_shannon(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """JSD between distributions given as log-probabilities ``[..., V]``; returns ``[...]`` (nats)."""
    p, q = logp.exp(), logq.exp()
    logm = torch.log((0.5 * (p + q)).clamp_min(torch.finfo(p.dtype).tiny))
    kl_pm = (p * (logp - logm)).sum(-1)
    kl_qm = (q * (logq - logm)).sum(-1)
    return 0.5 * (kl_pm + kl_qm)


class DoLaStrategy(DecodingStrategy):
    """Decoding by contrasting layers, with a dynamic premature layer per row and step.

    The bound form of :class:`DoLa`.

    Parameters
    ----------
    vlm : the LoadedVLM (or LoadedLM: anything with ``.model`` and ``.spec``).
    candidate_layers : hidden-state indices in ``[0, n_layers)`` (0 = embeddings); None = the lower
        half, ``range(0, n_layers // 2)`` (at least ``[0]``).
    cutoff : plausibility cut-off β on the final layer (None disables). Default 0.1.
    strength : None = original DoLa (``log p_final − log q_M``); a number λ gives
        ``log p_final + λ·(log p_final − log q_M)`` (λ = 0 ⇒ exactly greedy). Default 1.

    After each step, ``last_premature`` holds the chosen hidden-state index per row.

    Example
    -------
    >>> out = greedy_decode(vlm.model, enc, 32, strategy=DoLaStrategy(vlm, strength=1.0))   # doctest: +SKIP
    """

    name = "dola"

    def __init__(self, vlm: LoadedVLM, candidate_layers: Sequence[int] | None = None, cutoff: float | None = 0.1,
                 strength: float | None = 1.0):
        self.vlm, self.model, self.spec = vlm, vlm.model, vlm.spec
        n = self.spec.n_layers
        layers = list(range(0, max(1, n // 2))) if candidate_layers is None else [int(j) for j in candidate_layers]
        if not layers:
            raise ValueError("DoLa needs at least one candidate layer.")
        bad = [j for j in layers if not 0 <= j < n]
        if bad:
            raise ValueError(f"candidate layers {bad} out of range: hidden-state indices 0..{n - 1} "
                             f"(0 = embeddings, {n} = the final layer, which is not a candidate).")
        self.candidate_layers = sorted(set(layers))
        self.cutoff = check_cutoff(cutoff, "cutoff")
        self.strength = None if strength is None else float(strength)
        self._hidden: dict[int, torch.Tensor] = {}
        self.last_premature: torch.Tensor | None = None

    @contextmanager
    def context(self) -> Iterator[None]:
        layers = self.spec.layers(self.model)
        self._hidden = {}
        handles = []

        def make(j):
            def pre_hook(module, args, kwargs):
                h = kwargs.get("hidden_states", args[0] if args else None)
                self._hidden[j] = h[:, -1].detach()
                return None
            return pre_hook

        try:
            for j in self.candidate_layers:
                handles.append(layers[j].register_forward_pre_hook(make(j), with_kwargs=True))
            yield
        finally:
            for h in handles:
                h.remove()
        missing = [j for j in self.candidate_layers if j not in self._hidden]
        if missing:
            raise InterventionNotAppliedError(f"DoLa captured no hidden state for candidate layer(s) {missing}.")

    def early_exit_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``lm_head(norm(hidden))`` in float32 for last-position hidden states ``[B, D]``."""
        norm = self.spec.language_model(self.model).norm
        head = self.model.get_output_embeddings()
        with torch.no_grad():
            return head(norm(hidden)).float()

    def combine(self, logits: torch.Tensor, branch_logits: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if set(self._hidden) != set(self.candidate_layers):
            raise InterventionNotAppliedError("DoLa.combine ran without the hidden states of the main forward.")
        logp_final = torch.log_softmax(logits.float(), dim=-1)
        logq = torch.stack([torch.log_softmax(self.early_exit_logits(self._hidden[j]), dim=-1)
                            for j in self.candidate_layers])                       # [J, B, V]
        jsd = jensen_shannon(logp_final[None], logq)                               # [J, B]
        pick = jsd.argmax(0)                                                       # [B]
        self.last_premature = torch.tensor(self.candidate_layers, device=pick.device)[pick]
        logq_m = logq[pick, torch.arange(logq.shape[1], device=pick.device)]       # [B, V]
        if self.strength is None:
            scores = logp_final - logq_m
        elif self.strength == 0.0:
            scores = logits.float()  # exactly greedy (same argmax as log p_final, without rounding ties)
        else:
            scores = contrast(logp_final, logq_m, self.strength)
        return apply_plausibility(scores, logp_final, self.cutoff)


class DoLa(Intervention):
    """DoLa: contrast the final layer with the premature layer (among ``candidate_layers``) that differs most.

    Per row and step the premature layer is ``M = argmax_j JSD(p_final ‖ q_j)``; the scores are
    ``(1 + λ)·log p_final − λ·log q_M`` (``strength`` λ; None gives the original
    ``log p_final − log q_M``), tokens with ``p_final < β·max p_final`` get −inf.

    Parameters
    ----------
    candidate_layers : hidden-state indices (0 = embeddings) below the number of layers; None = the
        lower half. Checked against the model at :meth:`bind`.
    cutoff : plausibility cut-off β in [0, 1]; None disables. Default 0.1.
    strength : interpolation λ ≥ 0 (0 ⇒ exactly greedy), or None for the original DoLa scores. Default 1.

    Example
    -------
    >>> from lens_halluc.interventions import DoLa
    >>> DoLa(strength=None).get_params()
    {'candidate_layers': None, 'cutoff': 0.1, 'strength': None}
    >>> caps = lh.caption(vlm, ds, strategy=DoLa(candidate_layers=[0, 2]))      # doctest: +SKIP
    """

    name = "dola"
    description = "DoLa: contrast the final layer with an early layer"
    options = {
        "candidate_layers": Param("ints", "premature layers (comma-separated; default: the lower half)"),
        "cutoff": Param("float", "plausibility cut-off (DoLa's beta)", aliases=("--beta",)),
        "strength": Param("float", "contrast strength (DoLa's lambda)"),
    }

    def __init__(self, candidate_layers: Sequence[int] | None = None, cutoff: float | None = 0.1,
                 strength: float | None = 1.0):
        self.candidate_layers = check_ints(candidate_layers, "candidate_layers", "DoLa")
        self.cutoff = check_number(cutoff, "cutoff", "DoLa", 0.0, 1.0, optional=True)
        self.strength = check_number(strength, "strength", "DoLa", low=0.0, optional=True)

    def bind(self, vlm) -> DoLaStrategy:
        return self._bound(DoLaStrategy(vlm, self.candidate_layers, self.cutoff, self.strength))
