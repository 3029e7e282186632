"""DoLa — decoding by contrasting layers (final layer vs a dynamically chosen premature layer).

At every step, for each candidate layer ``j`` the early-exit logits at the last position are
``lm_head(h_j)`` (``h_j`` = hidden state with index ``j`` in transformers' ``hidden_states``
convention: 0 = the input embeddings — image features merged —, ``j`` = output of decoder layer
``j − 1``; the final layer's logits are the model's own, ``lm_head(norm(h_N))``). The premature
layer is chosen *per row* as ``M = argmax_j D(p_final, q_j)`` and the next-token scores are

    contrast "plain" (DoLa):        s = log p_final − log q_M
    contrast "interpolated" (λ):    s = (1 + λ)·log p_final − λ·log q_M          (λ = 0 ⇒ greedy)
    s(y) = −inf  where  log p_final(y) < max log p_final + log β   (relative top, ``cutoff`` = β = 0.1)
    then the repetition penalty θ on every token already seen (prompt text and generated):
    s ← s·θ where s < 0, s/θ otherwise.

Flavours (``flavour=``; an explicit parameter always wins):

=====================  ===========================================  ==========================
choice                 ``"reference"`` (voidism/DoLa, the default)   ``"corrected"``
=====================  ===========================================  ==========================
early exit             ``lm_head(h_j)``, no final norm               ``lm_head(norm(h_j))``
candidate layers       even layers of the first half (≤ 40 layers;   every layer of the first
                       of [0, 20) beyond): 0,2,…,14 of 32            half: 0,1,…,15 of 32
layer selection D      ½[KL(M‖p) + KL(M‖q)] / V, M = ½(p + q)        Jensen–Shannon divergence
                       (``F.kl_div(log p, M)``: DoLa's code)         ½[KL(p‖M) + KL(q‖M)]
contrast               plain ``log p − log q``                      interpolated, λ = 1:
                                                                    ``2·log p − log q``
repetition penalty     θ = 1.2                                       none (θ = 1)
relative top β         0.1                                           0.1
=====================  ===========================================  ==========================

Where the reference sets each (github.com/voidism/DoLa): ``transformers-4.28.1/src/transformers/
models/llama/modeling_llama.py`` (``LlamaForCausalLM.forward``: ``logits = self.lm_head(
outputs.hidden_states[early_exit_layer])``, and ``LlamaModel.forward`` applies ``self.norm`` only
to the last entry of ``hidden_states``); ``transformers-4.28.1/src/transformers/generation/utils.py``
(``dola_greedy_decode``: the ``F.kl_div`` selection, ``js_divs.mean(-1)``, ``relative_top_filter``,
``final_logits - base_logits``, then ``logits_processor``); ``README.md`` and the scripts'
``--early-exit-layers 0,2,4,6,8,10,12,14,32`` (7B), ``0,2,…,18,40`` (13B), ``0,2,…,18,60`` /
``…,80`` (30B / 65B); ``tfqa_eval.py`` / ``gsm8k_eval.py`` / ``strqa_eval.py`` /
``gpt4_judge_eval.py``: ``repetition_penalty = 1.2`` in DoLa mode (1.0 for the baseline).

Fixed in both flavours (accidents, not the method): the reference picks one premature layer for
the whole batch (``js_divs.mean(-1)`` over the batch; it runs batch size 1), here each row picks
its own; it masks the premature layer's tokens for batch row 0 only (``base_logits[0][mask]``),
which does not change the scores (those tokens are −inf anyway). The repetition penalty counts the
prompt's text tokens and the generated ones; padding, the image tokens and the image-structure
tokens (the adapter's ``image_token_ids`` / ``structure_token_ids``, which the text-only reference never
had) are not counted. Early exits go through the family's adapter (``lm_head`` — after the final norm
with ``final_norm`` — then the model's own post-processing: Gemma 2 soft-capping, Chameleon's
image-token suppression), as the final layer's logits are. Everything is computed in float32.

No extra forward is needed: hooks on the decoder layers capture the last-position hidden states of
the main branch's own forwards (a candidate ``j < n_layers`` is read from the *input* of decoder
layer ``j``).

Example
-------
>>> from lens_halluc.interventions import DoLa
>>> DoLa(candidate_layers=[0, 2], cutoff=0.1)
DoLa(candidate_layers=[0, 2])
>>> DoLa().get_params()["contrast"], DoLa(flavour="corrected").get_params()["strength"]
('plain', 1.0)
>>> caps = lh.caption(vlm, ds, strategy=DoLa())                                  # doctest: +SKIP
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import torch

from ..data.flavour import FLAVOURS, check_flavour
from ..generation.decoding import DecodingStrategy
from ..hooks.ablation import InterventionNotAppliedError
from ..models.compat import cache_from_kwargs
from ..models.loading import LoadedVLM
from .base import Intervention, Param, check_bool, check_choice, check_ints, check_number
from .contrastive import check_cutoff, contrast

__all__ = ["CONTRASTS", "DIVERGENCES", "DoLa", "DoLaStrategy", "default_candidate_layers", "dola_divergence",
           "jensen_shannon", "relative_top_mask", "repetition_penalty"]

CONTRASTS = ("plain", "interpolated")
"""``plain``: ``log p − log q`` (DoLa); ``interpolated``: ``(1 + λ)·log p − λ·log q``."""
DIVERGENCES = ("dola", "jsd")
"""Layer selection: ``dola`` = DoLa's code, ½[KL(M‖p) + KL(M‖q)] / V; ``jsd`` = the Jensen–Shannon divergence."""


def jensen_shannon(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """JSD between distributions given as log-probabilities ``[..., V]``; returns ``[...]`` (nats)."""
    p, q = logp.exp(), logq.exp()
    logm = torch.log((0.5 * (p + q)).clamp_min(torch.finfo(p.dtype).tiny))
    kl_pm = (p * (logp - logm)).sum(-1)
    kl_qm = (q * (logq - logm)).sum(-1)
    return 0.5 * (kl_pm + kl_qm)


def dola_divergence(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """DoLa's layer-selection score ``½[KL(M‖p) + KL(M‖q)] / V`` (``M = ½(p + q)``), ``[..., V]`` → ``[...]``.

    What ``F.kl_div(log p, M, reduction="none").mean(-1)`` computes in DoLa's ``dola_greedy_decode``
    (``kl_div(input, target) = target·(log target − input)``, i.e. KL(target ‖ input)): the KL
    directions are those of M to each distribution, not the Jensen–Shannon divergence's, and the
    vocabulary mean divides by V (which does not change the argmax).
    """
    m = 0.5 * (logp.exp() + logq.exp())
    kl1 = (torch.xlogy(m, m) - m * logp).mean(-1)
    kl2 = (torch.xlogy(m, m) - m * logq).mean(-1)
    return 0.5 * (kl1 + kl2)


def relative_top_mask(logp: torch.Tensor, beta: float | None) -> torch.Tensor:
    """True where ``logp < max logp + log β`` (DoLa's ``relative_top_filter`` on the final layer); none for β None/0."""
    if beta is None or beta == 0.0:
        return torch.zeros_like(logp, dtype=torch.bool)
    return logp < logp.max(dim=-1, keepdim=True).values + math.log(beta)


def repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, theta: float) -> torch.Tensor:
    """transformers' ``RepetitionPenaltyLogitsProcessor``: on ``seen`` tokens ``s·θ`` where ``s < 0``, else ``s/θ``."""
    if theta == 1.0:
        return scores
    penalised = torch.where(scores < 0, scores * theta, scores / theta)
    return torch.where(seen, penalised, scores)


def default_candidate_layers(n_layers: int, flavour: str = "reference") -> list[int]:
    """The candidate premature layers (hidden-state indices) of a model with ``n_layers`` decoder layers.

    ``reference``: the even layers of the first half, ``range(0, n // 2, 2)`` for up to 40 layers
    and ``range(0, 20, 2)`` beyond — what DoLa's scripts pass for LLaMA 7B / 13B / 30B / 65B
    (32 → 0…14, 40 → 0…18, 60 → 0…18, 80 → 0…18); ``corrected``: every layer of the first half,
    ``range(0, n // 2)``. At least ``[0]``.

    Example
    -------
    >>> default_candidate_layers(32), default_candidate_layers(60)[-1], default_candidate_layers(6, "corrected")
    ([0, 2, 4, 6, 8, 10, 12, 14], 18, [0, 1, 2])
    """
    n = int(n_layers)
    if check_flavour(flavour, "DoLa") == "reference":
        return list(range(0, n // 2 if n <= 40 else 20, 2)) or [0]
    return list(range(0, max(1, n // 2)))


class DoLaStrategy(DecodingStrategy):
    """Decoding by contrasting layers, with a dynamic premature layer per row and step.

    The bound form of :class:`DoLa` (see the module docstring for the formulas).

    Parameters
    ----------
    vlm : the LoadedVLM (or LoadedLM: anything with ``.model`` and ``.spec``).
    candidate_layers : hidden-state indices in ``[0, n_layers)`` (0 = embeddings); None = the
        flavour's (:func:`default_candidate_layers`).
    cutoff : relative-top cut-off β on the final layer (None or 0 disables). Default 0.1.
    strength : λ of the interpolated contrast; None for the plain contrast. λ = 0 is exactly greedy
        (no contrast, cut-off or penalty).
    final_norm : apply the final norm before ``lm_head`` for the early exits (the reference does not).
    divergence : ``"dola"`` (DoLa's code) or ``"jsd"``.
    repetition_penalty : θ > 0 on seen tokens (1 = none).
    flavour : only picks the candidate layers when ``candidate_layers`` is None.

    After each step, ``last_premature`` holds the chosen hidden-state index per row.

    Example
    -------
    >>> out = greedy_decode(vlm.model, enc, 32, strategy=DoLaStrategy(vlm))    # doctest: +SKIP
    """

    name = "dola"

    def __init__(self, vlm: LoadedVLM, candidate_layers: Sequence[int] | None = None, cutoff: float | None = 0.1,
                 strength: float | None = None, final_norm: bool = False, divergence: str = "dola",
                 repetition_penalty: float = 1.2, flavour: str = "reference"):
        self.vlm, self.model, self.spec = vlm, vlm.model, vlm.spec
        n = self.spec.n_layers
        layers = (default_candidate_layers(n, flavour) if candidate_layers is None
                  else [int(j) for j in candidate_layers])
        if not layers:
            raise ValueError("DoLa needs at least one candidate layer.")
        bad = [j for j in layers if not 0 <= j < n]
        if bad:
            raise ValueError(f"candidate layers {bad} out of range: hidden-state indices 0..{n - 1} "
                             f"(0 = embeddings, {n} = the final layer, which is not a candidate).")
        self.candidate_layers = sorted(set(layers))
        self.cutoff = check_cutoff(cutoff, "cutoff")
        self.strength = None if strength is None else float(strength)
        self.final_norm = bool(final_norm)
        if divergence not in DIVERGENCES:
            raise ValueError(f"DoLa: divergence must be one of {DIVERGENCES}, got {divergence!r}.")
        self.divergence = divergence
        self.repetition_penalty = float(repetition_penalty)
        # image placeholders and image-structure tokens are not text the penalty should count
        not_text = tuple(getattr(self.spec, "image_token_ids", ()) or ()) + tuple(
            getattr(self.spec, "structure_token_ids", ()) or ())
        image_id = getattr(self.spec, "image_token_id", None)
        if not not_text and image_id is not None:
            not_text = (int(image_id),)
        self._not_text_ids = tuple(int(i) for i in not_text)
        self._hidden: dict[int, torch.Tensor] = {}
        self._seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.last_premature: torch.Tensor | None = None

    def begin(self, inputs: dict) -> None:
        self._seen = []

    def _record_tokens(self, module, args, kwargs):
        """Forward pre-hook on the model: remember the token ids of this forward (for the repetition penalty)."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return None
        cache = cache_from_kwargs(kwargs)
        past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        if past == 0:
            self._seen = []  # a new prefill
        keep = torch.ones_like(ids, dtype=torch.bool)
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            keep &= mask[:, -ids.shape[1]:] != 0
        if self._not_text_ids:
            keep &= ~torch.isin(ids, torch.tensor(self._not_text_ids, device=ids.device))
        self._seen.append((ids.detach(), keep))
        return None

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
            if self.repetition_penalty != 1.0:
                handles.append(self.model.register_forward_pre_hook(self._record_tokens, with_kwargs=True))
            yield
        finally:
            for h in handles:
                h.remove()
        # no "never ran" check here: the decoding loop may enter this context around forwards that run no
        # decoder layer (a prefill's image pre-encoding); combine() refuses logits without the hidden states.

    def early_exit_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``lm_head(hidden)`` (``lm_head(norm(hidden))`` with ``final_norm``) in float32 for hidden states ``[B, D]``,
        then the model's own logit post-processing (Gemma 2 soft-capping, Chameleon's image-token suppression),
        through the family's adapter (:meth:`~lens_halluc.models.adapters.Adapter.early_exit_logits`), so early
        exits and the final layer are scored alike."""
        adapter = getattr(self.spec, "adapter", None)
        with torch.no_grad():
            if adapter is not None:
                return adapter.early_exit_logits(self.model, hidden, self.final_norm).float()
            head = self.model.get_output_embeddings()
            if self.final_norm:
                hidden = self.spec.language_model(self.model).norm(hidden)
            return head(hidden).float()

    def seen_tokens(self, batch: int, vocab: int, device) -> torch.Tensor:
        """BoolTensor ``[batch, vocab]``: the token ids seen so far in each row (prompt text and generated)."""
        seen = torch.zeros(batch, vocab + 1, dtype=torch.bool, device=device)
        for ids, keep in self._seen:
            ids = torch.where(keep & (ids >= 0) & (ids < vocab), ids, vocab).to(device)
            seen.scatter_(1, ids, True)
        return seen[:, :vocab]

    def select(self, logp_final: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
        """Index into ``candidate_layers`` of the premature layer per row: argmax over ``[J, B]`` divergences."""
        div = dola_divergence if self.divergence == "dola" else jensen_shannon
        return div(logp_final[None], logq).argmax(0)

    def combine(self, logits: torch.Tensor, branch_logits: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if set(self._hidden) != set(self.candidate_layers):
            missing = sorted(set(self.candidate_layers) - set(self._hidden))
            raise InterventionNotAppliedError(f"DoLa captured no hidden state for candidate layer(s) {missing}: "
                                              "combine ran without the hidden states of the main forward.")
        final = logits.float()
        early = torch.stack([self.early_exit_logits(self._hidden[j]) for j in self.candidate_layers])  # [J, B, V]
        logp_final = torch.log_softmax(final, dim=-1)
        logq = torch.log_softmax(early, dim=-1)
        pick = self.select(logp_final, logq)                                        # [B]
        rows = torch.arange(final.shape[0], device=pick.device)
        self.last_premature = torch.tensor(self.candidate_layers, device=pick.device)[pick]
        if self.strength == 0.0:
            return final  # exactly greedy
        if self.strength is None:
            # DoLa's code: log-softmax of both with the relative top; the raw logit difference without it
            scores = logp_final - logq[pick, rows] if self.cutoff else final - early[pick, rows]
        else:
            scores = contrast(logp_final, logq[pick, rows], self.strength)
        scores = scores.masked_fill(relative_top_mask(logp_final, self.cutoff), float("-inf"))
        if self.repetition_penalty != 1.0:
            seen = self.seen_tokens(scores.shape[0], scores.shape[-1], scores.device)
            scores = repetition_penalty(scores, seen, self.repetition_penalty)
        return scores


class DoLa(Intervention):
    """DoLa: contrast the final layer with the premature layer (among ``candidate_layers``) that differs most.

    See the module docstring for the computation, the two flavours and where the reference sets
    each choice. Default (``flavour="reference"``): early exits ``lm_head(h_j)`` without the final
    norm, candidates the even layers of the first half, DoLa's divergence, the plain contrast
    ``log p − log q``, relative top β = 0.1, repetition penalty 1.2. ``flavour="corrected"``: the
    final norm on the early exits, every layer of the first half, the Jensen–Shannon divergence,
    ``2·log p − log q`` (λ = 1), no repetition penalty.

    Parameters
    ----------
    candidate_layers : hidden-state indices (0 = embeddings) below the number of layers; None = the
        flavour's (:func:`default_candidate_layers`). Checked against the model at :meth:`bind`.
    cutoff : relative-top cut-off β in [0, 1]; None disables. Default 0.1.
    strength : λ ≥ 0 of the interpolated contrast ``(1 + λ)·log p − λ·log q`` (0 ⇒ exactly greedy);
        giving it selects ``contrast="interpolated"``. Default: the flavour's (corrected 1.0).
    contrast : ``"plain"`` (``log p − log q``, DoLa) or ``"interpolated"``. Default: the flavour's.
    final_norm : apply the final norm to the early exits. Default: the flavour's (reference False).
    divergence : ``"dola"`` (DoLa's code) or ``"jsd"``. Default: the flavour's.
    repetition_penalty : θ > 0 (1 = none). Default: the flavour's (reference 1.2, corrected 1.0).
    flavour : ``"reference"`` or ``"corrected"``.

    Example
    -------
    >>> from lens_halluc.interventions import DoLa
    >>> DoLa(strength=0.5).contrast
    'interpolated'
    >>> DoLa(flavour="corrected")
    DoLa(flavour='corrected')
    >>> caps = lh.caption(vlm, ds, strategy=DoLa(candidate_layers=[0, 2]))      # doctest: +SKIP
    """

    name = "dola"
    description = "DoLa: contrast the final layer with an early layer"
    flavours = {
        "reference": {"contrast": "plain", "strength": None, "final_norm": False, "divergence": "dola",
                      "repetition_penalty": 1.2},
        "corrected": {"contrast": "interpolated", "strength": 1.0, "final_norm": True, "divergence": "jsd",
                      "repetition_penalty": 1.0},
    }
    options = {
        "candidate_layers": Param("ints", "premature layers (comma-separated hidden-state indices; default: the "
                                          "flavour's: reference the even layers of the first half, corrected all of it)"),
        "cutoff": Param("float", "relative-top plausibility cut-off (DoLa's beta)", aliases=("--beta",)),
        "strength": Param("float", "lambda of the interpolated contrast (1+lambda)*log p - lambda*log q "
                                   "(implies --contrast interpolated)"),
        "contrast": Param("str", "plain (log p - log q, DoLa) or interpolated", CONTRASTS),
        "final_norm": Param("bool", "apply the final norm to the early-exit layers (the reference does not)"),
        "divergence": Param("str", "layer selection: dola (DoLa's code) or jsd (Jensen-Shannon)", DIVERGENCES),
        "repetition_penalty": Param("float", "repetition penalty on seen tokens (1 = none)"),
        "flavour": Param("str", "reference (voidism/DoLa) or corrected (final norm, JSD, 2 log p - log q, "
                                "no penalty)", FLAVOURS),
    }

    def __init__(self, candidate_layers: Sequence[int] | None = None, cutoff: float | None = 0.1,
                 strength: float | None = None, contrast: str | None = None, final_norm: bool | None = None,
                 divergence: str | None = None, repetition_penalty: float | None = None,
                 flavour: str = "reference"):
        self.flavour = check_flavour(flavour, "DoLa")
        self.candidate_layers = check_ints(candidate_layers, "candidate_layers", "DoLa")
        self.cutoff = check_number(cutoff, "cutoff", "DoLa", 0.0, 1.0, optional=True)
        if contrast is None and strength is not None:
            contrast = "interpolated"  # a strength is the interpolated contrast's
        self.contrast = check_choice(self._flavoured("contrast", contrast), "contrast", "DoLa", CONTRASTS)
        if self.contrast == "plain":
            if strength is not None:
                raise ValueError(f"DoLa: strength={strength!r} applies to contrast='interpolated' only; the plain "
                                 "contrast log p - log q has none.")
            self.strength = None
        else:
            lam = self._flavoured("strength", strength)
            self.strength = check_number(1.0 if lam is None else lam, "strength", "DoLa", low=0.0)
        self.final_norm = check_bool(self._flavoured("final_norm", final_norm), "final_norm", "DoLa")
        self.divergence = check_choice(self._flavoured("divergence", divergence), "divergence", "DoLa", DIVERGENCES)
        theta = check_number(self._flavoured("repetition_penalty", repetition_penalty), "repetition_penalty", "DoLa",
                             low=0.0)
        if theta == 0.0:
            raise ValueError("DoLa: repetition_penalty must be > 0 (1 = none; transformers' convention).")
        self.repetition_penalty = theta

    def bind(self, vlm) -> DoLaStrategy:
        return self._bound(DoLaStrategy(vlm, self.candidate_layers, self.cutoff, self.strength, self.final_norm,
                                        self.divergence, self.repetition_penalty, self.flavour))
