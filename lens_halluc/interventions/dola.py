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
    s(y) = −inf  where  p_final(y) < β · max p_final     (plausibility cut-off, β = 0.1)

No extra forward is needed: hooks on the decoder layers capture the last-position hidden states of
the main branch's own forwards (a candidate ``j < n_layers`` is read from the *input* of decoder
layer ``j``). Deviation from transformers' ``dola_layers``: no repetition penalty is added here.

Example
-------
>>> strategy = DoLa(vlm, candidate_layers=[0, 2, 4, 6], beta=0.1)                 # doctest: +SKIP
>>> out = greedy_decode(vlm.model, enc, max_new_tokens=64, strategy=strategy)     # doctest: +SKIP
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import torch

from ..generation.decoding import DecodingStrategy
from ..hooks.ablation import InterventionNotAppliedError
from ..models.loading import LoadedVLM
from .contrastive import apply_plausibility, check_cutoff, contrast

__all__ = ["DoLa", "jensen_shannon"]


def jensen_shannon(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """JSD between distributions given as log-probabilities ``[..., V]``; returns ``[...]`` (nats)."""
    p, q = logp.exp(), logq.exp()
    logm = torch.log((0.5 * (p + q)).clamp_min(torch.finfo(p.dtype).tiny))
    kl_pm = (p * (logp - logm)).sum(-1)
    kl_qm = (q * (logq - logm)).sum(-1)
    return 0.5 * (kl_pm + kl_qm)


class DoLa(DecodingStrategy):
    """Decoding by contrasting layers, with a dynamic premature layer per row and step.

    Parameters
    ----------
    vlm : the LoadedVLM (or LoadedLM: anything with ``.model`` and ``.spec``).
    candidate_layers : hidden-state indices in ``[0, n_layers)`` (0 = embeddings); None = the lower
        half, ``range(0, n_layers // 2)`` (at least ``[0]``).
    beta : plausibility cut-off on the final layer (None disables). Default 0.1.
    strength : None = original DoLa (``log p_final − log q_M``); a number λ gives
        ``log p_final + λ·(log p_final − log q_M)`` (λ = 0 ⇒ exactly greedy).

    After each step, ``last_premature`` holds the chosen hidden-state index per row.

    Example
    -------
    >>> out = greedy_decode(vlm.model, enc, 32, strategy=DoLa(vlm, strength=1.0))   # doctest: +SKIP
    """

    name = "dola"

    def __init__(self, vlm: LoadedVLM, candidate_layers: Sequence[int] | None = None, beta: float | None = 0.1,
                 strength: float | None = None):
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
        self.beta = check_cutoff(beta)
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
        return apply_plausibility(scores, logp_final, self.beta)
