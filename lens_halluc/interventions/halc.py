"""HALC — detector-grounded contrast over fields of view (Chen et al., ICML 2024; BillChan226/HALC).

What the reference does (``decoder_zoo/HALC/context_density/halc.py`` and the ``halc_dola_decode`` /
``halc_dola_beam_search`` loops in its patched ``transformers-4.36.2/src/transformers/generation/utils.py``),
and what this module does:

1. **Trigger.** The reference waits until a word is complete (the next token starts with "▁"),
   strips punctuation and one trailing "s" from it, and intervenes on it only when spaCy tags it
   ``NOUN``/``PROPN`` (plus a hand list ``add_word_list``, minus ``exempt_word_list``), and then only
   with probability ``1 − skip_rate`` (``self.skip_rate = 0.3``, ``random.random()``). It then
   re-decodes the *first token of that word* from the prefix before it. Here the decision is taken
   at the word's first token directly: when the argmax next token starts a new word, the word is
   read by a greedy look-ahead of the main model (at most ``max_word_tokens`` tokens; none for a
   word-level tokenizer), and it is an *object word* when its CHAIR singular
   (:func:`lens_halluc.data.chair.singularize`) is a single-word entry of the CHAIR synonym table
   or the first word of a two-word one (no spaCy: an offline, deterministic stand-in). The random
   skip is kept (``skip_rate``, seeded by ``seed``; reference flavour 0.3, corrected 0).
2. **Detection.** ``detector.detect(image, word)``; more than ``max_handle_box`` (3) boxes → leave the
   token alone ("invalid"); none → the box ``[0.2, 0.2, 0.8, 0.8]`` (normalised, "not-detected");
   else the smallest box.
3. **Fields of view** (``context_density_embedding``, :func:`fov_boxes`): in normalised coordinates,
   ``expand(b, f)`` moves each side out by ``f·width/2`` (``f·height/2``), clipped to ``[0, 1]``;
   the ``context_window`` (4) FOVs are ``[expand(b, −min(r, 0.8) if r > 0.8 else −r), b,
   expand(b, r), expand(expand(b, r), r)]`` — exponential growth by ``(1 + r)`` per step — with
   ``r = expand_ratio`` (0.6, the run script's ``--expand-ratio``). Each is cropped from the image
   (pixel edges rounded as ``PIL.Image.crop`` does) and re-encoded through the processor; the model
   is re-run on prompt + generated prefix with the crop's ``pixel_values`` instead of the image's.
4. **Contrast** (``context_layer_contrastive_decoding``): for every pair ``i < j`` of FOV logits the
   reference's "JSD" is ``0.5·(F.kl_div(log P_i, M) + F.kl_div(log P_j, M))`` with
   ``M = (P_i + P_j)/2`` — by ``F.kl_div``'s argument order that is ``0.5·(KL(M‖P_i) + KL(M‖P_j))``,
   not the Jensen–Shannon divergence (``flavour="reference"``: as the reference; ``"corrected"``:
   the true JSD ``0.5·(KL(P_i‖M) + KL(P_j‖M))``). The pair with the largest value (argmax over the
   flattened upper triangle, ``triu(diagonal=1)``, first on ties) gives ``base = FOV i``,
   ``final = FOV j`` (``context_domain="upper"``); ``base`` is set to −1e3 where ``final < −1e3`` and
   the scores are ``final − contrast_weight · base`` on raw logits, ``contrast_weight = 0.05``. The
   token is their argmax (or the caller's token choice).

5. **Visual-matching beam search** (``halc_dola_beam_search``; :meth:`HALCStrategy.beam_decode`): per
   beam the ``k_candidate_num/2`` (2) most divergent pairs in both directions give ``k_candidate_num``
   (4) candidate tokens, the ``beam_size`` (3) beams are chosen by an image–text scorer (BLIP in the
   reference). It runs only through ``beam_decode`` — the shared decoding loop has no place for a
   strategy's own loop, so ``decode``/``caption`` with ``HALC(beam_search=True)`` raise
   :class:`NotImplementedError`. Not reproduced there: the removal of a "not-detected" word that
   survives the contrast (replaced by ``<unk>`` tokens in the reference). The reference's HALC also
runs with ``dola_decoding=True`` (its main logits are DoLa's layer contrast); here the main logits
are the model's own (combine with DoLa separately if wanted). The images HALC crops are the
processor's (de-normalised ``pixel_values``), not the original files: for LLaVA that is the
resized, centre-cropped square the model sees.

Example
-------
>>> from lens_halluc.interventions.halc import HALC, fov_boxes
>>> [tuple(round(v, 3) for v in b) for b in fov_boxes((0.4, 0.4, 0.6, 0.6), 4, 0.6)]
[(0.46, 0.46, 0.54, 0.54), (0.4, 0.4, 0.6, 0.6), (0.34, 0.34, 0.66, 0.66), (0.244, 0.244, 0.756, 0.756)]
>>> HALC(detector=None).get_params()["detector"] is None
True
"""
from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from ..data.chair import load_synonyms, singularize
from ..data.flavour import FLAVOURS, check_flavour
from ..generation.decoding import DecodingStrategy
from ..models.detectors import describe_detector
from .base import Intervention, Param, check_bool, check_int, check_number

__all__ = ["HALC", "HALCStrategy", "NOT_DETECTED_BOX", "expand_box", "fov_boxes", "fov_pixel_boxes",
           "halc_divergence", "pick_pair", "top_pairs", "halc_contrast", "object_words"]

NOT_DETECTED_BOX = (0.2, 0.2, 0.8, 0.8)
"""The normalised box the reference uses when the detector finds nothing."""


# ------------------------------------------------------------------------------ fields of view
def expand_box(box: Sequence[float], factor: float) -> tuple[float, float, float, float]:
    """``box`` (normalised xyxy) with each side moved out by ``factor·size/2``, clipped to [0, 1] (reference ``expand_bbox``)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    w, h = x1 - x0, y1 - y0
    return (max(0.0, x0 - w * factor / 2), max(0.0, y0 - h * factor / 2),
            min(1.0, x1 + w * factor / 2), min(1.0, y1 + h * factor / 2))


def fov_boxes(box: Sequence[float], context_window: int = 4, expand_ratio: float = 0.6) -> list[tuple]:
    """The reference's sequence of fields of view around ``box`` (normalised xyxy), smallest first."""
    box = tuple(float(v) for v in box)
    if context_window == 1:
        return [box]
    shrink = 0.8 if expand_ratio > 0.8 else expand_ratio
    boxes = [expand_box(box, -shrink), box]
    for _ in range(1, context_window - 1):
        boxes.append(expand_box(boxes[-1], expand_ratio))
    return boxes


def fov_pixel_boxes(boxes: Sequence[Sequence[float]], width: int, height: int) -> list[tuple[int, int, int, int]]:
    """Normalised boxes → the integer pixel boxes ``PIL.Image.crop`` uses (``round`` of each edge), at least 1 px."""
    out = []
    for x0, y0, x1, y1 in boxes:
        l, t, r, b = (int(round(v)) for v in (x0 * width, y0 * height, x1 * width, y1 * height))
        r, b = max(r, l + 1), max(b, t + 1)
        out.append((l, t, r, b))
    return out


# ------------------------------------------------------------------------------ contrast
def halc_divergence(logits_a: torch.Tensor, logits_b: torch.Tensor, flavour: str = "reference") -> float:
    """The divergence HALC ranks FOV pairs by, on ``[vocab]`` or ``[1, vocab]`` logits.

    ``reference``: ``0.5·(KL(M‖P_a) + KL(M‖P_b))`` (what ``F.kl_div(log P, M)`` computes);
    ``corrected``: the Jensen–Shannon divergence ``0.5·(KL(P_a‖M) + KL(P_b‖M))``. ``M = (P_a + P_b)/2``.
    """
    la, lb = F.log_softmax(logits_a.float().reshape(-1), -1), F.log_softmax(logits_b.float().reshape(-1), -1)
    pa, pb = la.exp(), lb.exp()
    m = 0.5 * (pa + pb)
    logm = torch.log(m)
    if flavour == "reference":
        kl1 = torch.where(m > 0, m * (logm - la), torch.zeros_like(m)).sum()
        kl2 = torch.where(m > 0, m * (logm - lb), torch.zeros_like(m)).sum()
    else:
        kl1 = torch.where(pa > 0, pa * (la - logm), torch.zeros_like(m)).sum()
        kl2 = torch.where(pb > 0, pb * (lb - logm), torch.zeros_like(m)).sum()
    return float(0.5 * (kl1 + kl2))


def pick_pair(fov_logits: Sequence[torch.Tensor], flavour: str = "reference") -> tuple[int, int]:
    """``(i, j)`` of the largest divergence over ``i < j`` (argmax of the flattened upper triangle, first on ties)."""
    n = len(fov_logits)
    mat = torch.zeros(n, n)
    for i in range(n):
        for j in range(i + 1, n):
            mat[i, j] = halc_divergence(fov_logits[i], fov_logits[j], flavour)
    flat = int(torch.argmax(mat.triu(diagonal=1)))
    return flat // n, flat % n


def top_pairs(fov_logits: Sequence[torch.Tensor], k: int, flavour: str = "reference") -> list[tuple[int, int]]:
    """The ``k`` most divergent pairs ``(i, j)``: ``torch.topk`` of the flattened upper triangle (the reference's way)."""
    n = len(fov_logits)
    mat = torch.zeros(n, n)
    for i in range(n):
        for j in range(i + 1, n):
            mat[i, j] = halc_divergence(fov_logits[i], fov_logits[j], flavour)
    idx = torch.topk(mat.triu(diagonal=1).flatten(), k).indices
    return [(int(v) // n, int(v) % n) for v in idx]


def halc_contrast(base: torch.Tensor, final: torch.Tensor, contrast_weight: float = 0.05) -> torch.Tensor:
    """``final − w·base`` with ``base := −1e3`` where ``final < −1e3`` (the reference's mask), on raw logits."""
    base = base.float().clone()
    final = final.float()
    base[final < -1e3] = -1e3
    return final - base * contrast_weight


def object_words(flavour: str = "reference") -> frozenset[str]:
    """Words that make HALC act: single-word CHAIR synonyms and the first words of two-word ones."""
    words = set()
    for entry in load_synonyms(flavour=flavour):
        parts = entry.strip().split()
        if parts:
            words.add(parts[0].lower())
    return frozenset(words)


def _pixels_to_images(pixel_values: torch.Tensor, image_processor) -> list[Image.Image]:
    if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
        raise NotImplementedError(f"HALC crops [batch, 3, H, W] pixel_values; this model gives {tuple(pixel_values.shape)}.")
    mean = torch.tensor(getattr(image_processor, "image_mean", [0.0, 0.0, 0.0]), dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(getattr(image_processor, "image_std", [1.0, 1.0, 1.0]), dtype=torch.float32).view(1, 3, 1, 1)
    x = pixel_values.detach().float().cpu()
    if getattr(image_processor, "do_normalize", True):
        x = x * std + mean
    scale = float(getattr(image_processor, "rescale_factor", 1 / 255)) if getattr(image_processor, "do_rescale", True) else 1.0
    x = (x / scale).round().clamp(0, 255).to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in x]


# ------------------------------------------------------------------------------ strategy
class HALCStrategy(DecodingStrategy):
    """The bound form of :class:`HALC` (argmax / sampling only; one row at a time on triggers).

    ``log``: one dict per intervention (row, step, word, status, boxes, chosen pair, old/new token).
    """

    name = "halc"

    def __init__(self, vlm, detector, contrast_weight: float = 0.05, context_window: int = 4,
                 expand_ratio: float = 0.6, max_handle_box: int = 3, skip_rate: float = 0.3,
                 max_word_tokens: int = 4, seed: int = 0, flavour: str = "reference", beam_search: bool = False,
                 beam_size: int = 3, k_candidate_num: int = 4, scorer=None):
        self.vlm, self.detector = vlm, detector
        self.beam_search, self.beam_size, self.k_candidate_num, self.scorer = bool(beam_search), int(beam_size), \
            int(k_candidate_num), scorer
        self._in_beam = False
        self.contrast_weight, self.context_window = float(contrast_weight), int(context_window)
        self.expand_ratio, self.max_handle_box = float(expand_ratio), int(max_handle_box)
        self.skip_rate, self.max_word_tokens, self.seed = float(skip_rate), int(max_word_tokens), int(seed)
        self.flavour = flavour
        self.objects = object_words(flavour)
        self.log: list[dict] = []
        self._main = False
        self._history: torch.Tensor | None = None
        self._step = 0

    # --- observe the main branch's input tokens (the loop does not pass them to combine)
    @contextmanager
    def _main_ctx(self):
        self._main = True
        try:
            yield
        finally:
            self._main = False

    def context(self):
        return self._main_ctx()

    def _record(self, module, args, kwargs):
        if not self._main:
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise NotImplementedError("HALC needs input_ids in the main branch's forwards.")
        if self._history is None:
            self._history = ids.detach().clone()
        else:
            if ids.shape[0] != self._history.shape[0]:
                raise NotImplementedError("HALC's visual-matching beam search is not implemented; decode with "
                                          "argmax or sampling.")
            self._history = torch.cat([self._history, ids.detach()], dim=1)
        return None

    @contextmanager
    def _session(self):
        handle = self.vlm.model.register_forward_pre_hook(self._record, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def session(self):
        return self._session()

    def begin(self, inputs: dict) -> None:
        if self.beam_search and not self._in_beam:
            raise NotImplementedError("HALC(beam_search=True): the shared decoding loop cannot run HALC's visual-matching "
                                      "beam search; call strategy.beam_decode(enc, max_new_tokens, eos_token_ids) "
                                      "(or use beam_search=False).")
        if "pixel_values" not in inputs:
            raise ValueError("HALC needs pixel_values in the inputs (a VLM batch with images).")
        adapter = getattr(getattr(self.vlm, "spec", None), "adapter", None)
        if adapter is not None:
            per_token = set(adapter.per_token_inputs)
            sized = [k for k in adapter.image_input_keys
                     if k != "pixel_values" and k in inputs and inputs[k] is not None and k not in per_token]
            if sized:
                from ..models.adapters import NotDefinedForArchitecture

                raise NotDefinedForArchitecture(
                    f"HALC is not defined for {adapter.name}: it re-encodes crops of the image with the image processor "
                    f"alone and re-runs the prompt on them, but this family's image inputs {sized} describe the image's "
                    "size / tiling / patch grid (and so the number of image tokens in the prompt), which a crop changes.")
        self._inputs = {k: v for k, v in inputs.items()}
        self._prompt_len = int(inputs["input_ids"].shape[1])
        self._images = _pixels_to_images(inputs["pixel_values"], self.vlm.processor.image_processor)
        self._history = None
        self._step = 0
        self._rng = random.Random(self.seed)

    # --- helpers on one row
    def _row_forward(self, row: int, prefix: Sequence[int] | None = None, extra: Sequence[int] = (),
                     pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Last-position logits of row ``row``: its prompt (unpadded) + ``prefix`` (default: what it generated)
        + ``extra``, with the row's pixels or ``pixel_values``. Uncached (as the reference's FOV re-runs)."""
        mask = self._inputs["attention_mask"][row].bool()
        prompt = self._inputs["input_ids"][row][mask]
        prefix = self._generated(row) if prefix is None else list(prefix)
        new = torch.tensor(prefix + list(extra), dtype=prompt.dtype, device=prompt.device)
        pv = self._inputs["pixel_values"][row:row + 1] if pixel_values is None else pixel_values
        adapter = getattr(getattr(self.vlm, "spec", None), "adapter", None)
        per_token = set(adapter.per_token_inputs) if adapter is not None else set()
        kw = {k: (v[row:row + 1, mask] if k in per_token else v[row:row + 1]) for k, v in self._inputs.items()
              if k not in ("input_ids", "attention_mask", "pixel_values") and torch.is_tensor(v)}
        row_inputs = {"input_ids": prompt[None], "attention_mask": torch.ones_like(prompt)[None], **kw}
        if adapter is not None:
            # per-token inputs (PaliGemma's token_type_ids, Qwen's mm_token_type_ids) extend over the prefix
            row_inputs = adapter.extend_inputs(row_inputs, new[None])
        else:
            row_inputs["input_ids"] = torch.cat([prompt, new])[None]
            row_inputs["attention_mask"] = torch.ones_like(row_inputs["input_ids"])
        out = self.vlm.model(**row_inputs, pixel_values=pv.to(self._inputs["pixel_values"].dtype), use_cache=False)
        return out.logits[0, -1].float()

    def _generated(self, row: int) -> list[int]:
        return self._history[row, self._prompt_len:].tolist()

    def _word(self, row: int, token: int, prefix: Sequence[int] | None = None) -> str | None:
        """The word ``token`` starts after ``prefix`` (read by greedy look-ahead), or None if it starts none."""
        tok = self.vlm.tokenizer
        prev = self._generated(row) if prefix is None else list(prefix)
        before = tok.decode(prev, skip_special_tokens=True)
        now = tok.decode(prev + [token], skip_special_tokens=True)
        piece = now[len(before):] if now.startswith(before) else tok.decode([token], skip_special_tokens=True)
        if not piece.strip():
            return None
        if before and not piece[:1].isspace() and not before[-1:].isspace():
            return None  # continues the previous word
        word_ids = [token]
        word = piece.strip()
        if not word[:1].isalpha():
            return None
        # the word may continue in the next tokens: greedy look-ahead while its prefix could be an object word
        for _ in range(self.max_word_tokens - 1):
            if not any(o.startswith(word.lower()) and o != word.lower() for o in self.objects):
                break
            nxt = int(self._row_forward(row, prev, word_ids).argmax())
            text = tok.decode(prev + word_ids + [nxt], skip_special_tokens=True)
            cont = text[len(tok.decode(prev + word_ids, skip_special_tokens=True)):]
            if not cont or cont[:1].isspace() or not cont[:1].isalpha():
                break
            word_ids.append(nxt)
            word += cont
        return word

    def _is_object(self, word: str) -> bool:
        w = word.strip(".,'[])").lower()
        return bool(w) and (singularize(w) in self.objects or w in self.objects)

    def _target_box(self, row: int, word: str) -> tuple[tuple | None, str, list]:
        image = self._images[row]
        found = self.detector.detect(image, word)
        if len(found) > self.max_handle_box:
            return None, "invalid", found
        if not found:
            return NOT_DETECTED_BOX, "not-detected", found
        W, H = image.size
        norm = [(b[0] / W, b[1] / H, b[2] / W, b[3] / H) for b, _ in found]
        areas = [(b[2] - b[0]) * (b[3] - b[1]) for b in norm]
        return norm[areas.index(min(areas))], "activated", found

    def crops(self, row: int, box: Sequence[float]) -> tuple[list[tuple], list[Image.Image]]:
        """The FOV pixel boxes and crops of ``box`` (normalised) in row ``row``'s image."""
        image = self._images[row]
        px = fov_pixel_boxes(fov_boxes(box, self.context_window, self.expand_ratio), *image.size)
        return px, [image.crop(b) for b in px]

    def _ground(self, row: int, token: int, prefix: Sequence[int] | None, step: int):
        """Trigger + detection + FOV logits for the word ``token`` starts: ``(entry, fov_logits)`` or ``(entry|None, None)``."""
        word = self._word(row, token, prefix)
        if word is None or not self._is_object(word):
            return None, None
        entry = {"row": row, "step": step, "word": word, "token": token}
        if self._rng.random() < self.skip_rate:
            entry["status"] = "skipped"
            return entry, None
        box, status, found = self._target_box(row, word)
        entry.update(status=status, detections=[[list(b), s] for b, s in found])
        if box is None:
            return entry, None
        px, crops = self.crops(row, box)
        ip = self.vlm.processor.image_processor
        device = self._inputs["pixel_values"].device
        fov = [self._row_forward(row, prefix, pixel_values=ip(images=[c], return_tensors="pt")["pixel_values"].to(device))
               for c in crops]
        entry["fovs"] = [list(b) for b in px]
        return entry, fov

    def combine(self, logits: torch.Tensor, branch_logits: Mapping[str, torch.Tensor]) -> torch.Tensor:
        step = self._step
        self._step += 1
        if self._history is None or self._history.shape[0] != logits.shape[0]:
            raise NotImplementedError("HALC under the shared beam search is not supported; use "
                                      "HALCStrategy.beam_decode for HALC's visual-matching beam search.")
        out = logits
        for row in range(logits.shape[0]):
            token = int(logits[row].argmax())
            entry, fov = self._ground(row, token, None, step)
            if fov is not None:
                i, j = pick_pair(fov, self.flavour)
                scores = halc_contrast(fov[i], fov[j], self.contrast_weight)
                if out is logits:
                    out = logits.clone()
                out[row] = scores.to(out.dtype)
                entry.update(pair=[i, j], new_token=int(scores.argmax()))
            if entry is not None:
                self.log.append(entry)
        return out

    # ------------------------------------------------------------------ visual-matching beam search
    @torch.no_grad()
    def beam_decode(self, inputs: Mapping[str, torch.Tensor], max_new_tokens: int = 64, eos_token_ids: Sequence[int] = (),
                    beam_size: int | None = None, k_candidate_num: int | None = None, scorer=None) -> list[list[int]]:
        """HALC's visual-matching beam search (``halc_dola_beam_search``), row by row; returns the best beam's tokens.

        Every step, each unfinished beam proposes ``k_candidate_num`` next tokens: at a grounded object
        word, the argmax of ``final − w·base`` for the ``k/2`` most divergent FOV pairs in both directions
        (``context_layer_double_multi_contrastive_decoding``); otherwise its argmax token ``k`` times. A
        finished beam proposes itself ``k`` times. Of the ``beam_size·k`` candidates, before any grounding
        happened in this image ``random.seed(8); random.sample(range(N), beam_size)`` picks the beams (as the
        reference); afterwards ``scorer.score(image, texts)`` (texts = decoded generated tokens) ranks them,
        softmax, best first, duplicates of a text dropped, padded with the best. Beam 0 is returned.
        Not reproduced: the reference's removal of a "not-detected" word that survives the contrast, and its
        DoLa main logits. Forwards are uncached (one full forward per beam per step).
        """
        beam_size = self.beam_size if beam_size is None else int(beam_size)
        k_candidate_num = self.k_candidate_num if k_candidate_num is None else int(k_candidate_num)
        scorer = self.scorer if scorer is None else scorer
        if scorer is None or not callable(getattr(scorer, "score", None)):
            raise ValueError("HALC's beam search needs a scorer with score(image, texts) "
                             "(lens_halluc.models.detectors.HFImageTextScorer, e.g. a BLIP or CLIP checkpoint).")
        if k_candidate_num % 2:
            raise ValueError("k_candidate_num must be even (the reference's double-multi contrast).")
        self._in_beam = True
        try:
            self.begin(dict(inputs))
        finally:
            self._in_beam = False
        batch = int(inputs["attention_mask"].shape[0])
        self._history = inputs["input_ids"]
        eos = set(int(e) for e in eos_token_ids)
        tok = self.vlm.tokenizer
        results = []
        for row in range(batch):
            beams: list[list[int]] = [[] for _ in range(beam_size)]
            finished = [False] * beam_size
            grounded = False
            for step in range(max_new_tokens):
                if all(finished):
                    break
                cands: list[list[int]] = []
                for b in range(beam_size):
                    if finished[b]:
                        cands += [list(beams[b])] * k_candidate_num
                        continue
                    logits = self._row_forward(row, beams[b])
                    token = int(logits.argmax())
                    entry, fov = self._ground(row, token, beams[b], step)
                    nominated = [token] * k_candidate_num
                    if entry is not None and entry["status"] in ("activated", "not-detected"):
                        grounded = True
                    if fov is not None:
                        nominated = []
                        for i, j in top_pairs(fov, k_candidate_num // 2, self.flavour):
                            nominated.append(int(halc_contrast(fov[i], fov[j], self.contrast_weight).argmax()))
                            nominated.append(int(halc_contrast(fov[j], fov[i], self.contrast_weight).argmax()))
                        entry.update(beam=b, candidates=nominated)
                    if entry is not None:
                        self.log.append(entry)
                    cands += [beams[b] + [t] for t in nominated]
                if not grounded:
                    chosen = random.Random(8).sample(range(len(cands)), beam_size)
                else:
                    texts = [tok.decode(c, skip_special_tokens=True) for c in cands]
                    probs = torch.softmax(torch.tensor(scorer.score(self._images[row], texts), dtype=torch.float64), 0)
                    order = sorted(range(len(cands)), key=lambda n: -float(probs[n]))
                    chosen, seen = [], set()
                    for n in order:
                        if texts[n] not in seen:
                            seen.add(texts[n])
                            chosen.append(n)
                        if len(chosen) == beam_size:
                            break
                    chosen += [chosen[0]] * (beam_size - len(chosen))
                new_finished = []
                for n in chosen:
                    parent = n // k_candidate_num
                    new_finished.append(finished[parent] or (len(cands[n]) > len(beams[parent]) and cands[n][-1] in eos))
                beams = [list(cands[n]) for n in chosen]
                finished = new_finished
            best = beams[0]
            if best and best[-1] in eos:
                best = best[:-1]
            results.append(best)
        return results


class HALC(Intervention):
    """HALC: contrast the model over fields of view around the detected object (Chen et al., 2024).

    At the first token of an object word, the detector's box for that word is grown into
    ``context_window`` fields of view; the pair of FOVs whose next-token distributions diverge most
    is contrasted, ``final − contrast_weight·base`` (see the module docstring for every step and
    where it is in the reference).

    **Beam search.** The default here is ``beam_search=False``: HALC's local (FOV) contrast with
    argmax or the caller's sampling, usable everywhere a strategy is (``caption``, ``compare``). The
    reference's own default is its visual-matching beam search (beam 3, ``k_candidate_num`` 4, BLIP
    scores); it is implemented as :meth:`HALCStrategy.beam_decode` (needs ``scorer=``), but the shared
    decoding loop cannot run it, so a strategy bound with ``beam_search=True`` raises
    ``NotImplementedError`` inside ``decode``/``caption`` and must be driven with ``beam_decode``.

    Parameters
    ----------
    detector : an object with ``detect(image, phrase) -> [((x0, y0, x1, y1) px, score)]``
        (:mod:`lens_halluc.models.detectors`); required to bind (pass it here or to :meth:`bind`).
        ``get_params()`` stores its description (``detector.describe()``), not the object.
    contrast_weight : 0.05 (reference ``halc_params["contrast_weight"]``).
    context_window : number of FOVs, 4. expand_ratio : FOV growth, 0.6 (``--expand-ratio``).
    max_handle_box : more boxes than this → no intervention, 3 (``self.max_handle_box``).
    skip_rate : probability of skipping an object word (reference 0.3, corrected 0).
    max_word_tokens : longest greedy look-ahead used to read a word. seed : of the skip draws.
    flavour : ``"reference"`` (its KL(M‖P) "JSD", skip 0.3) or ``"corrected"`` (true JSD, no skip).
    beam_search : run the visual-matching beam search (only through ``beam_decode``). Default False.
    beam_size : 3 (run script ``--beam``). k_candidate_num : 4 (``--k-candidate-num``), even.
    scorer : image–text scorer for the beam search (``score(image, texts)``); stored as a description.

    Example
    -------
    >>> from lens_halluc.models.detectors import FixedDetector
    >>> h = HALC(detector=FixedDetector([((8, 8, 24, 24), 0.9)]))
    >>> h.get_params()["detector"]["kind"], h.skip_rate
    ('fixed', 0.3)
    """

    name = "halc"
    description = "HALC: detector-grounded contrast over fields of view"
    options = {
        "detector": Param("object", "a Detector (models.detectors): HFZeroShotDetector, the organism's, FixedDetector"),
        "scorer": Param("object", "an image-text scorer for the beam search (models.detectors.HFImageTextScorer)"),
        "contrast_weight": Param("float", "weight of the base FOV's logits"),
        "context_window": Param("int", "number of fields of view"),
        "expand_ratio": Param("float", "growth of the fields of view"),
        "max_handle_box": Param("int", "more detections than this: no intervention"),
        "skip_rate": Param("float", "probability of skipping an object word (reference 0.3)"),
        "max_word_tokens": Param("int", "longest look-ahead to read a word"),
        "seed": Param("int", "seed of the skip draws"),
        "flavour": Param("str", "reference (its KL(M||P) divergence, skip 0.3) or corrected (true JSD, no skip)",
                         FLAVOURS),
        "beam_search": Param("bool", "visual-matching beam search (HALCStrategy.beam_decode only)"),
        "beam_size": Param("int", "beams of the visual-matching beam search"),
        "k_candidate_num": Param("int", "candidates per beam (even)"),
    }
    flavours = {"reference": {"skip_rate": 0.3}, "corrected": {"skip_rate": 0.0}}

    def __init__(self, detector=None, contrast_weight: float = 0.05, context_window: int = 4,
                 expand_ratio: float = 0.6, max_handle_box: int = 3, skip_rate: float | None = None,
                 max_word_tokens: int = 4, seed: int = 0, flavour: str = "reference", beam_search: bool = False,
                 beam_size: int = 3, k_candidate_num: int = 4, scorer=None):
        if isinstance(detector, Mapping):  # a description (get_params round trip): no live detector
            self._detector, self.detector = None, dict(detector)
        else:
            self._detector, self.detector = detector, describe_detector(detector)
        if isinstance(scorer, Mapping):
            self._scorer, self.scorer = None, dict(scorer)
        else:
            self._scorer, self.scorer = scorer, describe_detector(scorer)
        self.contrast_weight = check_number(contrast_weight, "contrast_weight", "HALC", low=0.0)
        self.context_window = check_int(context_window, "context_window", "HALC", 1)
        self.expand_ratio = check_number(expand_ratio, "expand_ratio", "HALC", low=0.0)
        self.max_handle_box = check_int(max_handle_box, "max_handle_box", "HALC", 1)
        self.flavour = check_flavour(flavour, "HALC")
        self.skip_rate = check_number(self._flavoured("skip_rate", skip_rate), "skip_rate", "HALC", 0.0, 1.0)
        self.max_word_tokens = check_int(max_word_tokens, "max_word_tokens", "HALC", 1)
        self.seed = check_int(seed, "seed", "HALC", low=0)
        self.beam_search = check_bool(beam_search, "beam_search", "HALC")
        self.beam_size = check_int(beam_size, "beam_size", "HALC", 1)
        self.k_candidate_num = check_int(k_candidate_num, "k_candidate_num", "HALC", 2)
        if self.k_candidate_num % 2:
            raise ValueError(f"HALC: k_candidate_num must be even (pairs in both directions), got {k_candidate_num}.")
        n_pairs = self.context_window * (self.context_window - 1) // 2
        if self.beam_search and self.k_candidate_num // 2 > n_pairs:
            raise ValueError(f"HALC: k_candidate_num/2 = {self.k_candidate_num // 2} exceeds the {n_pairs} FOV pairs.")

    def bind(self, vlm, detector=None, scorer=None) -> HALCStrategy:
        det = detector if detector is not None else self._detector
        if det is None:
            raise ValueError("HALC needs a detector: HALC(detector=...) or bind(vlm, detector=...) with an object "
                             "that has detect(image, phrase) (lens_halluc.models.detectors.HFZeroShotDetector, "
                             "or the organism's lens_halluc.organism.detector).")
        if not callable(getattr(det, "detect", None)):
            raise TypeError(f"HALC's detector must have detect(image, phrase), got {type(det).__name__}.")
        strategy = HALCStrategy(vlm, det, self.contrast_weight, self.context_window, self.expand_ratio,
                                self.max_handle_box, self.skip_rate, self.max_word_tokens, self.seed, self.flavour,
                                self.beam_search, self.beam_size, self.k_candidate_num,
                                scorer if scorer is not None else self._scorer)
        return self._bound(strategy)
