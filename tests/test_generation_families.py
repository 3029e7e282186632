"""Decoding equals ``model.generate`` token for token on every VLM family (tiny random models of the zoo).

For each family whose zoo module exists (``lens_halluc/models/zoo/<family>.py``), the processor output
of a left-padded batch (``processor(images=..., text=..., padding=True)``, two prompts of different
lengths, the family's chat template and image nesting from its adapter) goes whole to
:func:`lens_halluc.generation.decode` and to ``model.generate``: greedy, batch of two and each prompt
alone, 8 new tokens, float32, must give the same tokens (M-RoPE positions for Qwen-VL, ``token_type_ids``
for Gemma 3 / PaliGemma, ``mm_token_type_ids`` for Qwen, Mllama's ``cross_attention_mask``, image inputs
at prefill only: all left to the model, as ``generate`` does). One seeded sampling case per family
checks ``Sampling(seed)`` against ``torch.manual_seed(seed); model.generate(do_sample=True)`` on a batch
of one, as :mod:`lens_halluc.generation.sampling` claims. A beam-search case checks ``Beams(2)`` against
``generate(num_beams=2)`` (expansion of the family's image inputs after their encoding).
"""
from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image

from lens_halluc.generation import Beams, DecodingStrategy, Sampling, decode
from lens_halluc.models.adapters import adapter_for
from lens_halluc.models.zoo import FAMILIES, make_tiny

PROMPTS = ("please describe this image in detail .", "is there a dog ?")
N_NEW = 8


_MODELS: dict = {}


def _tiny(family: str):
    if family not in _MODELS:
        model, processor = make_tiny(family, seed=0)
        adapter = adapter_for(model)
        _MODELS[family] = (model, processor, adapter)
    return _MODELS[family]


def _images(n: int, seed: int = 0) -> list:
    # 48 x 64 px: where the processor keeps the size (Qwen-VL), a non-square grid of several merged image
    # tokens, so M-RoPE's (t, h, w) positions differ from 1-D ones (a 1-token image would not tell them apart)
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)) for _ in range(n)]


def _encode(processor, adapter, images, prompts):
    """What ``vlm.encode`` does: the family's prompt format and image nesting, left padding, the whole output."""
    texts = [adapter.format_prompt(processor, p) for p in prompts]
    tok = processor.tokenizer
    side, tok.padding_side = tok.padding_side, "left"
    try:
        return dict(processor(images=adapter.processor_images(images), text=texts, padding=True, return_tensors="pt"))
    finally:
        tok.padding_side = side


def _special(model):
    cfg = model.generation_config
    eos = cfg.eos_token_id
    eos = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (eos[0] if eos else 0)
    return eos, int(pad)


def _reference(model, enc, logits: bool = False, **kw):
    """``model.generate`` on the whole processor output: the new tokens (and, with ``logits``, each step's raw
    logits ``[B, V]``)."""
    eos, pad = _special(model)
    out = model.generate(**enc, max_new_tokens=N_NEW, eos_token_id=eos or None, pad_token_id=pad,
                         return_dict_in_generate=True, output_logits=logits, **kw)
    new = out.sequences[:, enc["input_ids"].shape[1]:]
    return (new, torch.stack(out.logits, dim=1)) if logits else new


class _Recorder(DecodingStrategy):
    """Plain greedy that keeps the main branch's next-token logits of every step (``[B, V]`` each)."""

    def __init__(self):
        self.seen = []

    def combine(self, logits, branch_logits):
        self.seen.append(logits.clone())
        return logits


@pytest.mark.capability("greedy == generate")
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batched", [True, False], ids=["batch2", "batch1"])
def test_greedy_decode_equals_generate(family, batched):
    model, processor, adapter = _tiny(family)
    eos, pad = _special(model)
    images = _images(2, seed=1)
    cases = [(images, list(PROMPTS))] if batched else [([im], [p]) for im, p in zip(images, PROMPTS)]
    for ims, prompts in cases:
        enc = _encode(processor, adapter, ims, prompts)
        if batched:  # the prompts really differ in length: the shorter row is left-padded
            assert bool((enc["attention_mask"][:, 0] == 0).any()), "the batch is not left-padded"
        ref, ref_logits = _reference(model, enc, logits=True, do_sample=False)
        rec = _Recorder()
        ours = decode(model, enc, max_new_tokens=N_NEW, strategy=rec, eos_token_ids=eos, pad_token_id=pad,
                      sampling=None)
        assert ours.sequences.tolist() == ref.tolist(), f"{family}: decode differs from model.generate"
        # the logits too (a tiny model's argmax may not notice a wrong mask or position; the logits do)
        got = torch.stack(rec.seen, dim=1)
        assert got.shape == ref_logits.shape
        torch.testing.assert_close(got, ref_logits.float(), atol=1e-4, rtol=1e-4)


@pytest.mark.capability("sampling, beams == generate")
@pytest.mark.parametrize("family", FAMILIES)
def test_sampled_decode_equals_generate(family):
    """One CPU generator seeded with ``seed`` == ``torch.manual_seed(seed); model.generate(do_sample=True)``."""
    model, processor, adapter = _tiny(family)
    eos, pad = _special(model)
    enc = _encode(processor, adapter, _images(1, seed=2), PROMPTS[:1])
    s = Sampling(temperature=1.5, seed=5)
    torch.manual_seed(s.seed)
    ref = _reference(model, enc, do_sample=True, temperature=s.temperature, top_k=0, top_p=1.0)
    ours = decode(model, enc, max_new_tokens=N_NEW, eos_token_ids=eos, pad_token_id=pad, sampling=s)
    assert ours.sequences.tolist() == ref.tolist()


@pytest.mark.capability("sampling, beams == generate")
@pytest.mark.parametrize("family", FAMILIES)
def test_beam_decode_equals_generate(family):
    """``Beams(2)`` on a left-padded batch of two == ``generate(num_beams=2)``: the image inputs are expanded
    per beam after their encoding, as generate does (Qwen's flattened patches, Mllama's tiles...)."""
    model, processor, adapter = _tiny(family)
    eos, pad = _special(model)
    enc = _encode(processor, adapter, _images(2, seed=3), list(PROMPTS))
    ref = _reference(model, enc, do_sample=False, num_beams=2, early_stopping=False, length_penalty=1.0)
    ours = decode(model, enc, max_new_tokens=N_NEW, eos_token_ids=eos, pad_token_id=pad, sampling=Beams(2))
    for b in range(2):  # generate fills after the best hypothesis' EOS its own way: compare up to the EOS
        want = ref[b].tolist()
        cut = next((i + 1 for i, t in enumerate(want) if t in eos), len(want))
        got = ours.tokens(b) + ([int(ours.sequences[b, ours.lengths[b]])] if ours.finished[b] else [])
        assert got == want[:cut], f"{family} row {b}: beam search differs from model.generate(num_beams=2)"


class _TwinBranch(DecodingStrategy):
    """A branch on the main branch's inputs, combined as ``main + (main - branch)``: equal to greedy exactly
    when the branch's own per-step state (cache, positions, per-token inputs) follows the main one's."""

    def branches(self):
        from lens_halluc.generation import Branch

        return [Branch("twin", inputs=lambda inputs: dict(inputs))]

    def combine(self, logits, branch_logits):
        return logits + (logits - branch_logits["twin"])


@pytest.mark.parametrize("family", FAMILIES)
def test_branch_keeps_its_own_state(family):
    model, processor, adapter = _tiny(family)
    eos, pad = _special(model)
    enc = _encode(processor, adapter, _images(2, seed=4), list(PROMPTS))
    ref = _reference(model, enc, do_sample=False)
    ours = decode(model, enc, max_new_tokens=N_NEW, strategy=_TwinBranch(), eos_token_ids=eos, pad_token_id=pad,
                  sampling=None)
    assert ours.sequences.tolist() == ref.tolist()
