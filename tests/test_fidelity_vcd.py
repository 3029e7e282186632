"""VCD against its reference (DAMO-NLP-SG/VCD): the noisy image, the schedule, the contrast, the cut-off
and the token choice of each flavour, each compared with a plain re-statement of the reference's
computation written here from its code (``vcd_utils/vcd_add_noise.py``, ``vcd_utils/vcd_sample.py``,
``experiments/eval/object_hallucination_vqa_llava.py``)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lens_halluc.generation.sampling import Sampling
from lens_halluc.interventions import VCD
from lens_halluc.interventions.vcd import diffusion_alpha_bar, diffusion_coefficients


# ---------------------------------------------------------------- the reference, restated
def reference_schedule():
    """vcd_add_noise.py: 1000 steps, β = sigmoid(linspace(−6, 6)) · (0.5e-2 − 1e-5) + 1e-5, float32 (torch's default)."""
    b = torch.sigmoid(torch.linspace(-6, 6, 1000)) * (0.5e-2 - 1e-5) + 1e-5
    prod = torch.cumprod(1 - b, dim=0)
    return prod, torch.sqrt(prod), torch.sqrt(1 - prod)


def reference_noisy(image_tensor, noise_step, noise):
    """q_x(x_0, t) = √ᾱ_t · x_0 + √(1 − ᾱ_t) · noise, ``t`` indexing the 0-based schedule directly."""
    _, a, s = reference_schedule()
    return a[noise_step] * image_tensor + s[noise_step] * noise


def reference_vcd_scores(logits, logits_cd, cd_alpha, cd_beta):
    """vcd_sample.py ("version 2" cut-off on the clean branch's raw logits, then the logit contrast)."""
    cutoff = torch.log(torch.tensor(cd_beta)) + logits.max(dim=-1, keepdim=True).values
    diffs = (1 + cd_alpha) * logits - cd_alpha * logits_cd
    return diffs.masked_fill(logits < cutoff, -float("inf"))


def _noise(like, seed):
    # our ε: a CPU generator seeded with ``seed``
    return torch.randn(like.shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- the noisy image
def test_schedule_is_the_references_in_float32():
    prod, a, s = reference_schedule()
    for t in (0, 1, 250, 500, 999):
        assert diffusion_alpha_bar(t) == float(prod[t])
        assert diffusion_coefficients(t) == (float(a[t]), float(s[t]))
    # 0-based: step 0 already carries β_0 of noise (the reference indexes alphas_bar_sqrt[t] directly)
    assert diffusion_alpha_bar(0) == float(1 - (torch.sigmoid(torch.tensor(-6.0)) * (0.5e-2 - 1e-5) + 1e-5))
    with pytest.raises(ValueError, match="noise_step"):
        diffusion_alpha_bar(1000)


@pytest.mark.parametrize("step", [0, 1, 500, 999])
@pytest.mark.parametrize("seed", [0, 3])
def test_noisy_pixels_equal_the_reference(step, seed):
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(11)) * 1.5  # normalised pixels
    got = VCD(noise_step=step, seed=seed).bind(None).noisy_pixels(x)
    assert torch.equal(got, reference_noisy(x, step, _noise(x, seed)))


def test_noise_is_the_references_draw_for_a_first_image():
    # The reference draws torch.randn_like(x_0) from the global CPU generator that set_seed(seed) seeds:
    # our seeded generator is that same stream (the reference also spends it on other draws first).
    x = torch.zeros(1, 3, 6, 6)
    torch.manual_seed(42)
    ref = torch.randn_like(x)
    assert torch.equal(_noise(x, 42), ref)


def test_noise_is_added_to_the_processors_normalised_pixel_values(tiny_vlm):
    rng = np.random.default_rng(0)
    enc = tiny_vlm.encode([Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))], ["describe"])
    px = enc["pixel_values"]
    assert px.min() < 0  # CLIP-normalised, as image_processor.preprocess(...)['pixel_values'] in the reference
    s = VCD(noise_step=500, seed=7).bind(tiny_vlm)
    s.begin(dict(enc))
    (branch,) = s.branches()
    noisy = branch.inputs(dict(enc))
    assert torch.equal(noisy["pixel_values"], reference_noisy(px.float(), 500, _noise(px, 7)).to(px.dtype))
    assert torch.equal(noisy["input_ids"], enc["input_ids"])  # only the image changes


# ---------------------------------------------------------------- contrast and cut-off
@pytest.mark.parametrize("alpha", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("beta", [0.1, 0.2, 0.5])
def test_scores_equal_the_references(alpha, beta):
    g = torch.Generator().manual_seed(int(alpha * 10 + beta * 100))
    logits = torch.randn(4, 64, generator=g) * 3 + 5       # raw logits, not normalised
    logits_cd = torch.randn(4, 64, generator=g) * 3
    s = VCD(strength=alpha, cutoff=beta).bind(None)
    got = s.combine(logits, {"noisy": logits_cd})
    want = reference_vcd_scores(logits, logits_cd, alpha, beta)
    assert torch.equal(got, want)
    assert torch.isinf(got).any() and torch.isfinite(got).any()  # the cut-off really cut and kept


def test_cutoff_reads_the_clean_branch_only():
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0]])
    noisy = torch.tensor([[0.0, 9.0, -20.0, 30.0]])
    got = VCD(strength=1.0, cutoff=0.1).bind(None).combine(logits, {"noisy": noisy})
    # log 0.1 + 4 ≈ 1.70: tokens 2 and 3 are cut however the noisy branch scores them
    assert torch.isinf(got[0, 2:]).all() and torch.equal(got[0, :2], 2 * logits[0, :2] - noisy[0, :2])


# ---------------------------------------------------------------- defaults and the token choice per flavour
def test_defaults_are_the_reference_scripts():
    for flavour in ("reference", "corrected"):
        v = VCD(flavour=flavour)
        assert (v.strength, v.cutoff, v.noise_step, v.seed) == (1.0, 0.1, 500, 0)


def test_reference_flavour_samples_with_the_seed():
    s = VCD().bind(None)
    assert VCD().sample is True and isinstance(s.sampling, Sampling)
    assert s.sampling == Sampling(temperature=1.0, top_k=None, top_p=None, seed=0)  # do_sample, T=1, top_p=1, top_k=None
    assert VCD(seed=9).bind(None).sampling == Sampling(seed=9)
    assert VCD(sample=False).bind(None).sampling is None


def test_corrected_flavour_takes_the_argmax():
    v = VCD(flavour="corrected")
    assert v.sample is False and v.bind(None).sampling is None
    assert VCD(flavour="corrected", sample=True).bind(None).sampling == Sampling(seed=0)
    # the only difference between the flavours is the token choice
    ref, cor = VCD().get_params(), v.get_params()
    assert {k for k in ref if ref[k] != cor[k]} == {"flavour", "sample"}
    assert repr(v) == "VCD(flavour='corrected')" and VCD(**v.get_params()) == v
