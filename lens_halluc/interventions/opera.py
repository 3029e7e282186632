"""OPERA — over-trust penalty and retrospection-allocation beam search (Huang et al., CVPR 2024).

Reference: shikiw/OPERA · ``transformers-4.29.2/src/transformers/generation/utils.py`` ·
``GenerationMixin.opera_beam_search`` (README defaults: 5 beams, ``scale_factor`` 50,
``threshold`` 15, ``num_attn_candidates`` 5, ``penalty_weights`` 1; ``window_size`` 512 is the
function's own default). Line numbers below are those of that file at commit 61426ef.

One decoding step of one batch item with ``K`` beams, ``s`` tokens generated so far, ``C`` =
``num_attn_candidates`` (everything per beam unless said otherwise):

1. **Attention.** The last decoder layer's post-softmax attention, **max over heads**
   (L3349-3356: ``outputs.attentions[-1]`` then ``.max(1)``). The rows of the generated tokens
   (queries at positions ``response_start + i``, ``i < s``; ``response_start`` = prompt length) are
   kept and re-ordered with the beams each step (L3354).
2. **Candidates.** The top ``C`` tokens of the beam's *raw logits* (L3371-3373). Each candidate is
   fed once more (one extra forward per candidate, L3382-3410) to get *its own* attention row.
3. **Window.** Rows and columns from ``response_start`` on (L3420): the ``(s+1) × (s+1)``
   lower-triangular matrix of the generated tokens plus the candidate. Every row is divided by its
   own sum over all key positions first (L3415; rows of a max over heads do not sum to 1). The
   *whole* response is the window: ``window_size`` only bounds the rollback history (L3313-3315).
4. **Over-trust score.** ``w = scale_factor · window``; column ``j``'s score is
   ``1e-7 · Π_{i ≥ j} w[i, j]`` (lower triangle, diagonal included; L3423-3428), stored in a
   **float16** buffer (L3424-3425: products above 65504 become ``inf``, tiny ones 0). The
   candidate's penalty is the max over columns, its location the arg-max (first on ties; L3436).
5. **Early steps.** While the window has ``≤ 10`` columns (``s + 1 ≤ 10``) the penalty is instead
   minus the candidate row's attention mass on the image tokens (L3432, L3440): a bonus.
6. **Scores.** ``candidate logit − penalty_weights · penalty`` (L3449); every non-candidate token
   gets ``−999``; ``log_softmax`` over the vocabulary (L3555-3557, the ``except`` branch; L3563), then the
   beam score is added and the usual beam selection (top ``2K``, ``BeamSearchScorer``) follows.
7. **Retrospection (rollback).** The per-beam location is the mode over its candidates; the step's
   location ``loc`` is the mode of those over the beams (ties: smallest; L3437-3438). Each beam
   *slot* keeps the history of its per-beam locations (not re-ordered with the beams, L3443-3447).
   If in **every** slot ``loc`` occurs more than ``threshold`` times (L3459) and ``loc ≥ 10``
   (L3460), the search rolls back to ``pos = loc + 1`` — the token right after the summary token —
   unless that position was already rolled back to ``num_attn_candidates`` times; then ``pos − 1``;
   if that is exhausted too, no rollback (L3463-3472). It restores the whole state at the start of
   step ``pos`` (sequences, beam scores, finished hypotheses, attention rows; L3484-3495), re-runs the
   model there, and re-chooses with the *plain* logits shifted so their minimum is ``−999``, the
   ``(parent beam, token)`` pairs chosen at ``pos`` before (and at every earlier rollback to ``pos``)
   set to ``−999`` — no penalty and no candidate restriction on that step (L3543-3552). The history
   of locations is cut back to steps ``0..pos`` (L3478-3481, L3538-3540).

Pure functions below restate each step on tensors; :class:`OperaController` keeps the per-item
bookkeeping; :class:`OperaBeamHook` maps it onto the decoding loop's ``BeamHook`` and
:class:`OPERAStrategy` (what :meth:`OPERA.bind` returns) decodes with ``Beams(num_beams)``.

Example
-------
>>> from lens_halluc.interventions.opera import OPERA
>>> OPERA()
OPERA()
>>> OPERA(flavour="corrected").get_params()["score_dtype"]
'float32'
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from ..data.flavour import FLAVOURS, check_flavour
from ..generation.decoding import BeamHook, BeamState, DecodingStrategy
from ..generation.sampling import Beams
from ..hooks.attention import (ATTN_IMPLEMENTATION, set_text_attn_implementation,
                               text_attn_implementation)
from ..models.spec import TokenRole
from .base import Intervention, Param, check_bool, check_choice, check_int, check_number

__all__ = ["EARLY_WINDOW", "MIN_ROLLBACK_LOC", "OPERA", "OPERAStrategy", "OperaController", "REJECT_SCORE",
           "SCORE_SCALE", "column_scores", "image_attention", "normalize_rows", "over_trust_penalty",
           "penalized_scores", "reduce_heads", "rollback_position", "rollback_scores", "select_candidates",
           "smallest_mode", "step_location", "window_matrix"]

SCORE_SCALE = 1e-7
"""The constant factor of every column score (L3427: ``1e-7 * attn_local[..., j:, j].prod(-1)``)."""
EARLY_WINDOW = 10
"""Windows with at most this many columns use the image-attention bonus instead (L3440)."""
MIN_ROLLBACK_LOC = 10
"""Summary locations below this never trigger a rollback (L3460: ``if rollback_loc < 10: assert False``)."""
REJECT_SCORE = -999.0
"""The score of non-candidates (L3556) and of rejected tokens after a rollback (L3543, L3551)."""
SCORE_DTYPES = ("float16", "float32")
HISTORY_KINDS = ("slot", "lineage")


# ---------------------------------------------------------------------- pure functions
def reduce_heads(attn: torch.Tensor) -> torch.Tensor:
    """Max over the head dimension of ``[..., heads, q, kv]`` → ``[..., q, kv]`` (L3354, L3356, L3406)."""
    return attn.max(dim=-3).values


def normalize_rows(rows: torch.Tensor) -> torch.Tensor:
    """Each row divided by its sum over all key positions (L3415: ``attn_last / attn_last.sum(-1, keepdim=True)``)."""
    return rows / rows.sum(-1, keepdim=True)


def window_matrix(past: torch.Tensor, candidate_rows: torch.Tensor) -> torch.Tensor:
    """The local window ``[K, C, s+1, s+1]`` from the past rows and each candidate's row.

    ``past``: ``[K, s, s]``, the (normalised) attention among the generated tokens, row ``i`` =
    generated token ``i`` as query (columns after ``i`` are 0). ``candidate_rows``: ``[K, C, s+1]``,
    each candidate's (normalised) row over the generated tokens and itself. The reference pads the
    past with a zero column and appends the candidate row (L3408-3410), then slices from
    ``response_start`` (L3420).
    """
    k, c, n = candidate_rows.shape
    if past.shape != (k, n - 1, n - 1):
        raise ValueError(f"past rows {tuple(past.shape)} do not fit candidate rows {tuple(candidate_rows.shape)}.")
    padded = torch.cat([past, past.new_zeros(k, n - 1, 1)], dim=-1)
    padded = padded[:, None].expand(k, c, n - 1, n).to(candidate_rows.dtype)
    return torch.cat([padded, candidate_rows[:, :, None, :]], dim=-2)


def column_scores(window: torch.Tensor, scale_factor: float, score_dtype: str = "float16") -> torch.Tensor:
    """Over-trust score of every column of ``window`` ``[..., n, n]`` → ``[..., n]`` (float32 values).

    ``score[j] = 1e-7 · Π_{i ≥ j} (scale_factor · window[i, j])`` (L3423-3428). ``"float16"`` (the
    reference): the product is taken in the window's own dtype and the result goes through the
    reference's float16 buffer (``inf`` above 65504, 0 below ~3e-8). ``"float32"``: the window is
    cast to float32 first and nothing is rounded to float16.
    """
    check_choice(score_dtype, "score_dtype", "OPERA", SCORE_DTYPES)
    w = window if score_dtype == "float16" else window.to(torch.float32)
    n = w.shape[-1]
    scaled = scale_factor * w
    below = torch.ones(n, n, dtype=torch.bool, device=w.device).tril()  # rows i >= column j
    scaled = torch.where(below, scaled, torch.ones_like(scaled))
    scores = SCORE_SCALE * scaled.prod(dim=-2)
    scores = scores.to(torch.float32)
    if score_dtype == "float16":
        scores = scores.to(torch.float16).to(torch.float32)
    return scores


def image_attention(candidate_rows_full: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
    """Attention mass of each (normalised) candidate row on the image tokens (L3432: ``[..., -1, image_start:image_end+1].sum(-1)``).

    ``candidate_rows_full``: ``[K, C, L+1]`` rows over all key positions; ``image_mask``: ``[L+1]`` or broadcastable bool.
    """
    return (candidate_rows_full * image_mask.to(candidate_rows_full.dtype)).sum(-1)


def over_trust_penalty(window: torch.Tensor, image_attn: torch.Tensor, scale_factor: float,
                       score_dtype: str = "float16") -> tuple[torch.Tensor, torch.Tensor]:
    """``(penalty [K, C], location [K, C])`` of every candidate from its window ``[K, C, n, n]``.

    The location is the arg-max column (first on ties, L3436). The penalty is the max column score,
    or ``−image_attn`` while ``n ≤ 10`` (L3440).
    """
    scores = column_scores(window, scale_factor, score_dtype)
    best, loc = scores.max(dim=-1)
    n = window.shape[-1]
    penalty = -image_attn.to(torch.float32) if n <= EARLY_WINDOW else best
    return penalty, loc


def select_candidates(logits: torch.Tensor, num_candidates: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top ``num_candidates`` raw logits and their tokens per beam, sorted (L3371-3373)."""
    if num_candidates < 1:
        raise ValueError(f"num_attn_candidates must be >= 1, got {num_candidates}.")
    return torch.topk(logits, num_candidates, dim=-1, largest=True, sorted=True)


def penalized_scores(logits: torch.Tensor, tokens: torch.Tensor, candidate_logits: torch.Tensor,
                     penalty: torch.Tensor, penalty_weights: float) -> torch.Tensor:
    """Next-token log-probs ``[K, V]`` of an ordinary OPERA step.

    Candidates keep ``logit − penalty_weights · penalty`` (L3449), every other token ``−999``
    (L3556-3557), then ``log_softmax`` over the vocabulary (L3563).
    """
    full = torch.full_like(logits, REJECT_SCORE, dtype=torch.float32)
    full.scatter_(-1, tokens, candidate_logits.to(torch.float32) - penalty_weights * penalty.to(torch.float32))
    return torch.log_softmax(full, dim=-1)


def rollback_scores(logits: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Next-token log-probs ``[K, V]`` of the step re-chosen after a rollback.

    The plain logits are shifted so their per-beam minimum is ``−999`` (L3543), the rejected
    ``parent · V + token`` positions of the flattened ``[K·V]`` scores are set to ``−999`` (L3544-3552),
    then ``log_softmax`` (L3563). No penalty, no candidate restriction.
    """
    k, v = logits.shape
    shifted = logits.to(torch.float32) - (-REJECT_SCORE + logits.to(torch.float32).min(-1, keepdim=True).values)
    flat = shifted.reshape(k * v)
    if rejected.numel():
        flat = flat.scatter(0, rejected.reshape(-1).long(), REJECT_SCORE)
    return torch.log_softmax(flat.view(k, v), dim=-1)


def smallest_mode(values: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The most frequent value along ``dim``; the smallest of tied ones (``torch.mode`` on CPU, L3437-3438)."""
    values = values.movedim(dim, -1).long()
    top = int(values.max()) + 1 if values.numel() else 1
    counts = torch.nn.functional.one_hot(values, top).sum(dim=-2)
    return counts.argmax(dim=-1)  # argmax returns the first (smallest) of tied counts


def step_location(locations: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(per-beam location [K], step location)`` from the candidates' locations ``[K, C]``.

    Per beam: the mode over candidates (what the history records, L3443-3446); the step's: the mode
    of those over the beams (L3437-3438).
    """
    per_beam = smallest_mode(locations, dim=-1)
    return per_beam, int(smallest_mode(per_beam, dim=-1))


def rollback_position(history: torch.Tensor, location: int, threshold: int, times: Mapping[int, int],
                      num_candidates: int) -> int | None:
    """The position to roll back to, or ``None`` (L3459-3472); does not change ``times``.

    ``history``: ``[K, steps]`` per-slot locations including this step's. A rollback needs
    ``location`` more than ``threshold`` times in every slot and ``location ≥ 10``; the position is
    ``location + 1``, or ``location`` when ``location + 1`` has been used ``num_candidates`` times
    already (``times``: rollbacks so far per position), or none when both are used up.
    """
    if history.numel() == 0 or not bool(((history == location).sum(-1) > int(threshold)).all()):
        return None
    if location < MIN_ROLLBACK_LOC:
        return None
    pos = location + 1
    if times.get(pos, 0) >= num_candidates:
        pos -= 1
        if times.get(pos, 0) >= num_candidates:
            return None
    return pos


# ---------------------------------------------------------------------- per-item bookkeeping
@dataclass
class _Saved:
    window: torch.Tensor          # [K, s, s] normalised rows of the generated tokens at the start of step s
    chosen: torch.Tensor | None = None  # flat parent·V + token of the K beams chosen at step s (set after selection)
    history: list = field(default_factory=list)  # per-slot locations of steps 0..s, in the beam order of step s


@dataclass
class StepOutcome:
    """What :meth:`OperaController.step` asks of the loop: scores, or a rollback.

    ``scores``: ``[K, V]`` log-probs to which the loop adds the beam scores (``None`` on a rollback).
    ``rollback_to``: the step whose start state the loop must restore; it then re-runs the model there
    and takes the scores from :meth:`OperaController.rollback`.
    """

    scores: torch.Tensor | None
    rollback_to: int | None = None
    location: int | None = None
    penalty: torch.Tensor | None = None


@dataclass
class OperaController:
    """OPERA's state for one batch item of ``K`` beams, driven step by step by a beam loop.

    Protocol per step ``s`` (``s`` tokens generated so far)::

        out = ctl.step(s, logits, newest_rows, lookahead)   # newest_rows None at s == 0
        if out.rollback_to is not None:                     # restore loop state at step t = out.rollback_to,
            scores = ctl.rollback(logits_at_t)              # re-run the model there; s becomes t
        else:
            scores = out.scores
        ... beam selection on scores + beam scores → parents [K], tokens [K] ...
        ctl.selected(parents, tokens, vocab)

    ``newest_rows``: ``[K, heads, L]`` attention of the newest token per beam (layer ``layer``, all
    key positions) from the loop's main forward. ``lookahead(tokens [K, C])`` → ``[K, C, heads, L+1]``:
    each candidate fed after its beam (caches unchanged). ``image_mask``: ``[T]`` bool over the
    prompt positions; ``prompt_len`` = ``T`` = ``response_start``.
    """

    num_beams: int
    prompt_len: int
    image_mask: torch.Tensor
    scale_factor: float = 50.0
    threshold: int = 15
    num_attn_candidates: int = 5
    penalty_weights: float = 1.0
    window_size: int = 512
    rollback_enabled: bool = True
    score_dtype: str = "float16"
    history_kind: str = "slot"
    window: torch.Tensor | None = None
    history: list = field(default_factory=list)        # per step: [K] per-slot locations
    times: dict = field(default_factory=dict)          # rollbacks per position (max_rollback_time)
    rejected: dict = field(default_factory=dict)       # position → flat rejected indices (reject_token_pos_gather)
    saved: dict = field(default_factory=dict)          # step → _Saved (at most window_size)
    parents: torch.Tensor | None = None                # last selection, to re-order the rows
    step_no: int = 0
    rollbacks: list = field(default_factory=list)      # (from step, to step, location) log

    def _append_newest(self, newest_rows: torch.Tensor) -> None:
        row = normalize_rows(reduce_heads(newest_rows[:, :, None, :])[:, 0])  # [K, L]
        if self.score_dtype == "float32":
            row = row.to(torch.float32)
        gen = row[:, self.prompt_len:]                                           # [K, s]
        past = self.window
        if past is None:
            past = gen.new_zeros(self.num_beams, 0, 0)
        else:
            past = past[self.parents] if self.parents is not None else past
        s = gen.shape[-1]
        past = torch.cat([past, past.new_zeros(self.num_beams, s - 1, 1)], dim=-1).to(gen.dtype)
        self.window = torch.cat([past, gen[:, None, :]], dim=-2)

    def step(self, s: int, logits: torch.Tensor, newest_rows: torch.Tensor | None,
             lookahead: Callable[[torch.Tensor], torch.Tensor]) -> StepOutcome:
        """One ordinary step (see the class docstring); records this step's state for rollbacks."""
        self.step_no = s
        if s == 0:
            self.window = None
        else:
            if newest_rows is None:
                raise ValueError("OPERA needs the newest token's attention row at every step after the first.")
            self._append_newest(newest_rows)
        window = self.window if self.window is not None else logits.new_zeros(self.num_beams, 0, 0)
        self.saved[s] = _Saved(window=window)
        for old in [k for k in self.saved if k <= s - self.window_size]:
            del self.saved[old]
        cand_logits, tokens = select_candidates(logits, self.num_attn_candidates)
        rows = normalize_rows(reduce_heads(lookahead(tokens)[..., None, :])[..., 0, :])  # [K, C, L+1]
        if self.score_dtype == "float32":
            rows = rows.to(torch.float32)
        img = image_attention(rows, torch.cat([self.image_mask.bool(),
                                               self.image_mask.new_zeros(rows.shape[-1] - self.image_mask.shape[0],
                                                                         dtype=torch.bool)]))
        local = window_matrix(window.to(rows.dtype), rows[..., self.prompt_len:])
        penalty, locs = over_trust_penalty(local, img, self.scale_factor, self.score_dtype)
        per_slot, loc = step_location(locs)
        self.history.append(per_slot)
        self.saved[s].history = list(self.history)
        scores = penalized_scores(logits, tokens, cand_logits, penalty, self.penalty_weights)
        if self.rollback_enabled:
            pos = rollback_position(torch.stack(self.history, -1), loc, self.threshold, self.times,
                                    self.num_attn_candidates)
            if pos is not None:
                target = min(pos, s - 1)  # the reference restores state_{s-1} when pos >= s (threshold <= 1 only)
                if target in self.saved and self.saved[target].chosen is not None:
                    self.times[pos] = self.times.get(pos, 0) + 1
                    self._restore(target)
                    self.rollbacks.append((s, target, loc))
                    return StepOutcome(None, rollback_to=target, location=loc, penalty=penalty)
        return StepOutcome(scores, location=loc, penalty=penalty)

    def _restore(self, target: int) -> None:
        saved = self.saved[target]
        new = saved.chosen.reshape(-1)
        old = self.rejected.get(target)
        self.rejected[target] = new if old is None else torch.cat([old, new])
        for p in [p for p in self.rejected if p > target]:
            del self.rejected[p]  # later positions' prefixes change (the reference clears only target + 1)
        for k in [k for k in self.saved if k > target]:
            del self.saved[k]
        self.history = list(saved.history)  # steps 0..target (slot order: the same as cutting the list back)
        self.window = saved.window
        self.parents = None
        self.step_no = target

    def rollback(self, logits: torch.Tensor) -> torch.Tensor:
        """Scores of the re-chosen step after a rollback (logits of the restored state)."""
        return rollback_scores(logits, self.rejected.get(self.step_no, logits.new_zeros(0, dtype=torch.long)))

    def selected(self, parents: torch.Tensor, tokens: torch.Tensor, vocab: int) -> None:
        """The beam selection of this step: parent beams ``[K]`` and tokens ``[K]``."""
        parents = parents.long()
        self.saved[self.step_no].chosen = parents * vocab + tokens.long()
        self.parents = parents
        if self.history_kind == "lineage":
            self.history = [h[parents] for h in self.history]


# ---------------------------------------------------------------------- strategy and intervention
ATTENTION_IMPLEMENTATIONS = ("eager", ATTN_IMPLEMENTATION)
"""Text-tower attention implementations that return post-softmax weights (what OPERA reads)."""


def _snapshot(ctl: OperaController) -> dict:
    """A copy of everything :class:`OperaController` mutates (tensors are never changed in place)."""
    return {"window": ctl.window, "history": list(ctl.history), "times": dict(ctl.times),
            "rejected": dict(ctl.rejected), "parents": ctl.parents, "step_no": ctl.step_no,
            "rollbacks": list(ctl.rollbacks),
            "saved": {k: _Saved(window=v.window, chosen=v.chosen, history=list(v.history)) for k, v in ctl.saved.items()}}


def _restore_snapshot(ctl: OperaController, snap: dict) -> None:
    for name, value in snap.items():
        if name == "saved":
            value = {k: _Saved(window=v.window, chosen=v.chosen, history=list(v.history)) for k, v in value.items()}
        elif isinstance(value, (list, dict)):
            value = type(value)(value)
        setattr(ctl, name, value)


class OperaBeamHook(BeamHook):
    """Maps :class:`OperaController`'s protocol onto the decoding loop's :class:`BeamHook`.

    Per step ``s``, :meth:`adjust` gives every batch item's controller the raw scores of its ``K``
    beams, the newest token's attention of layer ``layer`` (``state.attentions``) and the candidates'
    look-ahead attention (one ``state.probe`` for all rows), and returns the penalised log-probs.
    A controller that asks for a rollback to ``t`` has restored itself; the loop's own selection at
    ``s`` is then discarded: :meth:`rollback` returns ``t``, the loop restores the beams before token
    ``t`` and rebuilds the caches, and the next :meth:`adjust` (at ``t``) gives that item the
    controller's rollback scores (plain logits, earlier choices at ``t`` rejected).

    The loop rolls back the whole batch. Items that did not ask (or asked for a later step) are
    rewound to their own state at ``t`` (a snapshot kept per step) and replay from there, so each
    item follows its unbatched course up to the float noise of the rebuilt caches. Where the loop
    exposes ``state.active`` (items still able to improve), finished items' requests are ignored;
    without it, an item whose hypotheses are complete keeps being scored while others run.

    The parents of the loop's selection (which the controller needs to re-order its attention rows
    and to record the chosen ``(parent, token)`` pairs) are recovered in :meth:`rollback` from the
    new beams' prefixes and scores (``new score == old score + log-prob[parent, token]``).
    """

    output_attentions = True

    def __init__(self, strategy: "OPERAStrategy"):
        self.strategy = strategy
        self.controllers: list[OperaController] = []
        self.mode: list[str] = []           # per item: "step" or "rollback" (score the restored step)
        self.pending: list[int | None] = []
        self.snaps: list[dict] = []         # per item: step → (controller snapshot, mode)
        self._last = None

    @property
    def rollbacks(self) -> list[tuple]:
        """``(item, from step, to step, location)`` of every rollback on each item's own course (item by item)."""
        return [(b,) + tuple(r) for b, ctl in enumerate(self.controllers) for r in ctl.rollbacks]

    def start(self, state: BeamState) -> None:
        masks = self.strategy.image_masks(state.batch_size, state.prompt_length)
        self.controllers = [self.strategy.controller(state.prompt_length, masks[b], num_beams=state.num_beams)
                            for b in range(state.batch_size)]
        self.mode = ["step"] * state.batch_size
        self.pending = [None] * state.batch_size
        self.snaps = [{} for _ in range(state.batch_size)]

    def _layer(self, attentions) -> torch.Tensor:
        if attentions is None or attentions[self.strategy.layer] is None:
            raise RuntimeError("OPERA got no attention weights from the model: the text tower must run 'eager' or "
                               f"{ATTN_IMPLEMENTATION!r} attention (OPERA's session() switches it when bound to a vlm).")
        return attentions[self.strategy.layer]

    def adjust(self, scores: torch.Tensor, state: BeamState) -> torch.Tensor:
        s, k = state.step, state.num_beams
        logits = scores.float()
        for b, ctl in enumerate(self.controllers):
            snaps = self.snaps[b]
            for old in [t for t in snaps if t >= s]:
                del snaps[old]
            snaps[s] = (_snapshot(ctl), self.mode[b])
        stepping = [b for b in range(len(self.controllers)) if self.mode[b] == "step"]
        probed = tokens = None
        if stepping:
            _, tokens = select_candidates(logits, self.controllers[0].num_attn_candidates)
            outs = state.probe(tokens)
            probed = torch.stack([self._layer(o.attentions)[:, :, -1, :] for o in outs], dim=1)  # [rows, C, H, L+1]
        newest = self._layer(state.attentions)[:, :, -1, :] if s > 0 else None
        out = logits.clone()
        for b, ctl in enumerate(self.controllers):
            sl = slice(b * k, (b + 1) * k)
            if self.mode[b] == "rollback":
                out[sl] = ctl.rollback(logits[sl])
                continue

            def lookahead(want, sl=sl):
                if torch.equal(want.to(tokens.device), tokens[sl]):
                    return probed[sl]
                full = tokens.clone()  # ties ordered differently in the item's own top-k: probe its tokens
                full[sl] = want.to(full.device)
                return torch.stack([self._layer(o.attentions)[sl, :, -1, :] for o in state.probe(full)], dim=1)

            enabled = ctl.rollback_enabled
            ctl.rollback_enabled = enabled and self._active(state, b)  # a finished item never rewinds the batch
            try:
                outcome = ctl.step(s, logits[sl], newest[sl] if newest is not None else None, lookahead)
            finally:
                ctl.rollback_enabled = enabled
            if outcome.rollback_to is not None:
                self.pending[b] = outcome.rollback_to
            else:
                out[sl] = outcome.scores.to(out.dtype)
        acc = torch.log_softmax(out.float(), dim=-1) + state.beam_scores.float()[:, None]
        self._last = (s, state.sequences.clone(), acc)
        return out

    def _active(self, state: BeamState, b: int) -> bool:
        active = getattr(state, "active", None)
        return True if active is None else bool(torch.as_tensor(active).reshape(-1)[b])

    def rollback(self, state: BeamState) -> int | None:
        asks = {b: t for b, t in enumerate(self.pending) if t is not None}
        if not asks:
            for b in range(len(self.controllers)):
                self.mode[b] = "step"
                self._select(b, state)
            return None
        target = min(asks.values())
        for b in range(len(self.controllers)):
            if asks.get(b) == target:
                self.mode[b] = "rollback"
            else:
                snap, mode = self.snaps[b][target]
                _restore_snapshot(self.controllers[b], snap)
                self.mode[b] = mode
            self.pending[b] = None
        return target

    def _select(self, b: int, state: BeamState) -> None:
        """Recover item ``b``'s parents and tokens of the loop's selection and tell its controller."""
        s, old, acc = self._last
        k = state.num_beams
        sl = slice(b * k, (b + 1) * k)
        new, new_scores = state.sequences[sl], state.beam_scores[sl].float()
        old, acc = old[sl], acc[sl]
        vocab = acc.shape[-1]
        tokens = new[:, s].long()
        parents = torch.empty(k, dtype=torch.long)
        for j in range(k):
            same = (old == new[j, :s]).all(-1) if s else torch.ones(k, dtype=torch.bool, device=old.device)
            cand = acc[:, int(tokens[j])]
            gap = torch.minimum((cand - new_scores[j]).abs(), (cand - (new_scores[j] + 1.0e9)).abs())
            gap = torch.where(same.to(gap.device), gap, torch.full_like(gap, float("inf")))
            parents[j] = int(gap.argmin())
        self.controllers[b].selected(parents.to(tokens.device), tokens, vocab)


class OPERAStrategy(DecodingStrategy):
    """The bound OPERA strategy: beam search (``sampling = Beams(num_beams)``) driven by :class:`OperaBeamHook`.

    One :class:`OperaController` per batch item. :meth:`session` switches the text tower to
    ``eager`` attention (unless it already returns weights: ``eager`` or ``"lens_halluc"``) and
    restores it afterwards. Image positions come from ``spec.token_roles(...) == TokenRole.IMAGE``
    (or an ``image_mask(input_ids, attention_mask)`` callable, for models without a spec).
    OPERA is a beam search: decoding it with argmax or sampling raises ``ValueError``.
    """

    name = "opera"

    def __init__(self, params: Mapping, spec=None, vlm=None,
                 image_mask: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None):
        self.params = dict(params)
        self.spec = spec if spec is not None or vlm is None else vlm.spec
        self.vlm = vlm
        self.num_beams = int(params["num_beams"])
        self.layer = int(params["layer"])
        self.sampling = Beams(num_beams=self.num_beams)
        self._image_mask_fn = image_mask
        self._masks = None
        self._hooked = False
        self.last_hook: OperaBeamHook | None = None

    def session(self):
        if self.vlm is None:
            return nullcontext()
        return _weights_attention(self.vlm)

    def begin(self, inputs: dict) -> None:
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        if self._image_mask_fn is not None:
            masks = self._image_mask_fn(ids, mask)
        elif self.spec is not None:
            masks = self.spec.token_roles(ids, mask) == int(TokenRole.IMAGE)
        else:
            raise ValueError("OPERAStrategy needs a model spec (bind to a vlm) or an image_mask callable.")
        self._masks = torch.as_tensor(masks).bool()
        self._hooked = False

    def image_masks(self, batch: int, prompt_length: int) -> torch.Tensor:
        """``[batch, prompt_length]`` bool: the image positions of each item's (padded) prompt."""
        if self._masks is None or tuple(self._masks.shape) != (batch, prompt_length):
            raise RuntimeError(f"OPERA: image masks {None if self._masks is None else tuple(self._masks.shape)} do "
                               f"not fit the batch ({batch}, {prompt_length}); begin() must see the same inputs.")
        return self._masks

    def beam_hook(self) -> OperaBeamHook:
        self._hooked = True
        self.last_hook = OperaBeamHook(self)
        return self.last_hook

    def combine(self, logits: torch.Tensor, branch_logits: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if not self._hooked:
            raise ValueError("OPERA is a beam search: decode it with sampling='strategy' (its Beams) or a Beams, "
                             "not argmax or sampling.")
        return logits

    def controller(self, prompt_len: int, image_mask: torch.Tensor, num_beams: int | None = None) -> OperaController:
        """A fresh controller for one batch item (``image_mask`` ``[T]`` over its prompt)."""
        p = self.params
        return OperaController(
            num_beams=self.num_beams if num_beams is None else int(num_beams), prompt_len=prompt_len,
            image_mask=image_mask,
            scale_factor=p["scale_factor"], threshold=p["threshold"], num_attn_candidates=p["num_attn_candidates"],
            penalty_weights=p["penalty_weights"], window_size=p["window_size"], rollback_enabled=p["rollback"],
            score_dtype=p["score_dtype"], history_kind=p["history"])


@contextmanager
def _weights_attention(vlm):
    previous = text_attn_implementation(vlm)
    if previous in ATTENTION_IMPLEMENTATIONS:
        yield previous
        return
    set_text_attn_implementation(vlm, "eager")
    try:
        yield previous
    finally:
        set_text_attn_implementation(vlm, previous)


class OPERA(Intervention):
    """OPERA beam search: over-trust penalty on the generated tokens' attention + rollback.

    Parameters (README defaults): ``num_beams`` 5, ``scale_factor`` 50, ``threshold`` 15,
    ``num_attn_candidates`` 5 (also the cap on rollbacks to one position), ``penalty_weights`` 1,
    ``window_size`` 512 (states kept for rollback), ``layer`` −1 (the last decoder layer),
    ``rollback`` True (in both flavours; ``False`` or CLI ``--no-rollback``: the penalty alone). Flavour-dependent: ``score_dtype`` ("float16": the reference's float16 score
    buffer; "float32": no rounding) and ``history`` ("slot": locations kept per beam slot as the
    reference; "lineage": re-ordered with the beams).

    Example
    -------
    >>> OPERA(num_beams=3)
    OPERA(num_beams=3)
    >>> OPERA(flavour="corrected")
    OPERA(flavour='corrected')
    """

    name = "opera"
    description = "OPERA: beam search with the over-trust penalty and retrospection rollback (Huang et al. 2024)"
    options = {
        "num_beams": Param("int", "beams"),
        "scale_factor": Param("float", "scale of the attention before the column product"),
        "threshold": Param("int", "rollback when the summary location repeats more than this many times"),
        "num_attn_candidates": Param("int", "candidates per beam (also max rollbacks per position)"),
        "penalty_weights": Param("float", "weight of the over-trust penalty"),
        "window_size": Param("int", "steps of history kept for rollback"),
        "layer": Param("int", "decoder layer whose attention is read (-1: last)"),
        "rollback": Param("bool", "retrospection-allocation rollback (--no-rollback: penalty only)"),
        "flavour": Param("str", "reference (the paper code) or corrected", FLAVOURS),
        "score_dtype": Param("str", "precision of the column scores", (None,) + SCORE_DTYPES),
        "history": Param("str", "location history per beam slot or per lineage", (None,) + HISTORY_KINDS),
    }
    flavours = {"reference": {"score_dtype": "float16", "history": "slot", "rollback": True},
                "corrected": {"score_dtype": "float32", "history": "lineage", "rollback": True}}
    # ``rollback`` is on in both flavours; its ``None`` default only gives the CLI ``--rollback/--no-rollback``.

    def __init__(self, num_beams: int = 5, scale_factor: float = 50.0, threshold: int = 15,
                 num_attn_candidates: int = 5, penalty_weights: float = 1.0, window_size: int = 512,
                 layer: int = -1, rollback: bool | None = None, flavour: str = "reference",
                 score_dtype: str | None = None, history: str | None = None):
        owner = "OPERA"
        self.num_beams = check_int(num_beams, "num_beams", owner, low=1)
        self.scale_factor = check_number(scale_factor, "scale_factor", owner, low=0.0)
        self.threshold = check_int(threshold, "threshold", owner, low=1)
        self.num_attn_candidates = check_int(num_attn_candidates, "num_attn_candidates", owner, low=1)
        self.penalty_weights = check_number(penalty_weights, "penalty_weights", owner)
        self.window_size = check_int(window_size, "window_size", owner, low=2)
        self.layer = check_int(layer, "layer", owner)
        self.flavour = check_flavour(flavour, owner)
        self.rollback = check_bool(self._flavoured("rollback", rollback), "rollback", owner)
        self.score_dtype = check_choice(self._flavoured("score_dtype", score_dtype), "score_dtype", owner, SCORE_DTYPES)
        self.history = check_choice(self._flavoured("history", history), "history", owner, HISTORY_KINDS)

    def strategy(self, spec=None, image_mask=None) -> OPERAStrategy:
        """The strategy without a model (no attention switch): for a bare model, a spec or an ``image_mask`` callable."""
        return self._bound(OPERAStrategy(self.get_params(), spec, image_mask=image_mask))

    def bind(self, vlm) -> DecodingStrategy:
        """Beam search with OPERA's hook on ``vlm`` (checks ``layer`` against its decoder layers)."""
        n = int(vlm.spec.n_layers)
        if not -n <= self.layer < n:
            raise ValueError(f"OPERA: layer {self.layer} is out of range for a {n}-layer decoder.")
        adapter = getattr(vlm.spec, "adapter", None)
        if adapter is not None:
            # OPERA's over-trust penalty reads the generated tokens' attention on the image tokens of one
            # self-attention layer: it needs image keys there (none in Mllama, whose images enter by cross-attention).
            from ..models.adapters import NotDefinedForArchitecture

            layer = self.layer % n
            reason = adapter.attention_key_group_reason(vlm.model, layer, "image")
            if reason is not None:
                raise NotDefinedForArchitecture(f"OPERA is not defined for {adapter.name} at layer {layer}: it reads the "
                                                f"attention on the image tokens, but {reason}.")
            if adapter.is_sliding_layer(vlm.model, layer):
                full = [i for i in range(n) if adapter.attention_kind(vlm.model, i) == "self"
                        and not adapter.is_sliding_layer(vlm.model, i)]
                raise NotDefinedForArchitecture(
                    f"OPERA is not defined at layer {layer} of {adapter.name}: it reads each generated token's attention "
                    "over the whole sequence (image and text), but this is a sliding-window layer, whose keys are only "
                    f"the last window's tokens; pass layer= one of the full-attention layers {full}.")
        return self._bound(OPERAStrategy(self.get_params(), vlm=vlm))
