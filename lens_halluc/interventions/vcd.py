"""VCD — visual contrastive decoding against a diffusion-noised image.

Scores for the next token ``y`` (DAMO-NLP-SG/VCD ``vcd_utils/vcd_sample.py``)::

    s(y) = (1 + α) · l(y | v, x) − α · l(y | v', x)
    s(y) = −inf  where  l(y | v, x) < log β + max_y' l(y' | v, x)     (adaptive plausibility cut-off)

on the raw logits of the clean branch (the reference's "version 2"; the same tokens as
``p < β · max p``), with ``v'`` the image under forward diffusion noise at step ``t``
(``vcd_utils/vcd_add_noise.py``)::

    β_t = sigmoid(linspace(−6, 6, T)) · (5e-3 − 1e-5) + 1e-5,  T = 1000   (float32, as the reference)
    ᾱ_t = Π_{s ≤ t} (1 − β_s)                                         (``t`` 0-based: 0…999)
    v'  = √ᾱ_t · v + √(1 − ᾱ_t) · ε,   ε ~ N(0, I) drawn on CPU in float32

**Any pixel layout.** The noise is drawn per element of the processor's ``pixel_values``, whatever
its layout: ``[B, 3, H, W]`` (LLaVA, Gemma, PaliGemma, Chameleon: its VQ-VAE then encodes the noisy
image), crops / tiles ``[B, N, 3, H, W]`` (LLaVA-NeXT, Idefics3, SmolVLM) or ``[B, images, tiles, 3, H, W]``
(Mllama), tiles ``[Σ tiles, 3, H, W]`` (InternVL), flattened patches ``[Σ t·h·w, C·T·P·P]`` (Qwen2-VL,
Qwen2.5-VL, Qwen3-VL: the same pixels rearranged, so the same noise law on the image; a still image's
``temporal_patch_size`` copies each get their own draw). Padding is left as it is (the adapter's
:meth:`~lens_halluc.models.adapters.Adapter.pixel_noise_mask`: Idefics3's zero crops via
``pixel_attention_mask``, Mllama's empty tiles via ``aspect_ratio_mask``), so the noisy branch sees as
many images, crops and tiles as the clean one.

**Noise per image.** The reference captions one image at a time, each ``ε`` a fresh draw. In the
runners (``caption``, ``answer``...) every image draws its ``ε`` from its own generator seeded with
``row_seed(seed, key)`` (key: the image id / question id, :func:`~lens_halluc.generation.sampling.row_seed`),
so its noise, hence its caption, does not depend on the batch size or the order of the images. A
direct ``decode`` without ``keys`` draws the batch's ``ε`` ``[B, 3, H, W]`` from one generator seeded
with ``seed`` (row 0 of a batch of one is then ``torch.manual_seed(seed); torch.randn_like(v)``).

The noise is added to the processor's (normalised) ``pixel_values``, as the reference does
(``image_processor.preprocess(image)['pixel_values']`` → ``add_diffusion_noise``). The noisy branch
runs its own forward passes with its own KV cache (as the reference's ``model_kwargs_cd``).

**Token choice.** ``flavour="reference"`` (the default) samples: the reference calls
``generate(do_sample=True, temperature=1.0, top_p=1, top_k=None)`` on the contrast scores
(multinomial from ``softmax(s)``), so the bound strategy carries
``sampling = Sampling(seed=seed)``; ``flavour="corrected"`` takes the argmax (``sample=False``). An
explicit ``sample=`` overrides the flavour. With ``sample=False``, ``α = 0`` gives exactly greedy decoding.

Here α is ``strength`` and β is ``cutoff`` (the names shared by the contrastive family). Defaults are
the reference eval script's (``experiments/eval/object_hallucination_vqa_llava.py``: ``--cd_alpha 1``,
``--cd_beta 0.1``, ``--noise_step 500``); its POPE script ``cd_scripts/llava1.5_pope.bash`` passes
β = 0.2 instead.

Example
-------
>>> from lens_halluc.interventions import VCD
>>> VCD(strength=1.0, cutoff=0.1, noise_step=500)
VCD()
>>> VCD(flavour="corrected").sample
False
>>> caps = lh.caption(vlm, ds, strategy=VCD(strength=1.0))                  # doctest: +SKIP
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from ..data.flavour import FLAVOURS, check_flavour
from ..generation.decoding import Branch, DecodingStrategy
from ..generation.sampling import Sampling, row_seed
from ..models.loading import LoadedVLM
from .base import Intervention, Param, check_bool, check_int, check_number
from .contrastive import apply_plausibility, check_cutoff, contrast

__all__ = ["DIFFUSION_STEPS", "ImageNoiseContrast", "VCD", "VCDStrategy", "diffusion_alpha_bar",
           "diffusion_coefficients", "gaussian_noise", "image_rows", "row_noise"]

DIFFUSION_STEPS = 1000


def _alphas_prod(step: int, n_steps: int) -> torch.Tensor:
    if isinstance(step, bool) or not 0 <= int(step) < n_steps:
        raise ValueError(f"noise_step must be in [0, {n_steps - 1}], got {step}.")
    # float32 throughout, as vcd_add_noise.py: linspace → sigmoid → scale → cumprod(1 − β)
    betas = torch.sigmoid(torch.linspace(-6, 6, n_steps, dtype=torch.float32)) * (0.5e-2 - 1e-5) + 1e-5
    return torch.cumprod(1 - betas, dim=0)


def diffusion_alpha_bar(step: int, n_steps: int = DIFFUSION_STEPS) -> float:
    """``ᾱ_step`` of VCD's sigmoid schedule, in float32 as the reference (``step`` 0-based, as it indexes it)."""
    return float(_alphas_prod(step, n_steps)[int(step)])


def diffusion_coefficients(step: int, n_steps: int = DIFFUSION_STEPS) -> tuple[float, float]:
    """``(√ᾱ_t, √(1 − ᾱ_t))`` as the reference computes them (float32 ``sqrt`` of its float32 ``ᾱ``).

    Example
    -------
    >>> a, b = diffusion_coefficients(500)
    >>> round(a * a + b * b, 5)
    1.0
    """
    abar = _alphas_prod(step, n_steps)[int(step)]
    return float(torch.sqrt(abar)), float(torch.sqrt(1 - abar))


def gaussian_noise(like: torch.Tensor, seed: int) -> torch.Tensor:
    """Standard normal noise shaped like ``like``, drawn on CPU in float32 with ``seed`` (device-independent)."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(like.shape, generator=gen, dtype=torch.float32).to(device=like.device)


def image_rows(pixel_values: torch.Tensor, n_images: int, inputs: Mapping | None = None) -> list[int]:
    """How many leading rows of ``pixel_values`` belong to each of ``n_images`` images (in batch order).

    One row per image for LLaVA-style ``[B, 3, H, W]`` (or ``[B, crops, ...]``) inputs; for flattened
    patch inputs (Qwen2-VL's ``[Σ t·h·w, d]``) the counts come from ``inputs["image_grid_thw"]``.
    ``ValueError`` if the rows cannot be attributed to the images.
    """
    n = int(pixel_values.shape[0])
    if n == n_images:
        return [1] * n_images
    grid = (inputs or {}).get("image_grid_thw")
    if grid is not None and len(grid) == n_images:
        counts = [int(torch.as_tensor(g).prod()) for g in grid]
        if sum(counts) == n:
            return counts
    raise ValueError(f"cannot split pixel_values of shape {tuple(pixel_values.shape)} into {n_images} images "
                     "(one image per row is needed to draw each image's noise from its own generator).")


def row_noise(like: torch.Tensor, seeds: Sequence[int], rows: Sequence[int] | None = None) -> torch.Tensor:
    """Standard normal noise shaped like ``like``: image ``i``'s rows drawn on CPU in float32 from a generator
    seeded with ``seeds[i]`` (``rows[i]`` leading rows each; default one row per image).

    Image ``i``'s noise is :func:`gaussian_noise` of its rows alone with ``seeds[i]``, whatever the batch.
    """
    rows = [1] * len(seeds) if rows is None else list(rows)
    if len(rows) != len(seeds) or sum(rows) != like.shape[0]:
        raise ValueError(f"row_noise: {len(seeds)} seeds / rows {rows} for a tensor of {like.shape[0]} rows.")
    parts, start = [], 0
    for seed, n in zip(seeds, rows):
        parts.append(gaussian_noise(like[start: start + n], seed))
        start += n
    return torch.cat(parts, dim=0) if parts else gaussian_noise(like, 0)


class ImageNoiseContrast(DecodingStrategy):
    """Base of VCD and SEED: one branch on ``signal·x + noise_scale·ε`` pixels, contrasted with weight ``weight``.

    Subclasses set ``signal``, ``noise_scale``, ``weight`` and ``cutoff``. The noise is drawn in
    :meth:`begin`: with ``row_keys`` (set by ``decode(..., keys=)``, which the runners pass: image /
    question ids) each image from its own generator seeded with ``row_seed(seed, key)``, so an image's
    noise does not depend on its batch; without (a direct ``decode``) the batch's from one generator
    seeded with ``seed``. The same seed (and key) gives the same noisy image.
    """

    branch_name = "noisy"

    def __init__(self, vlm: LoadedVLM, weight: float, signal: float, noise_scale: float,
                 cutoff: float | None, seed: int = 0):
        self.vlm = vlm
        self.weight = float(weight)
        self.signal, self.noise_scale = float(signal), float(noise_scale)
        self.cutoff = check_cutoff(cutoff)
        self.seed = int(seed)
        self._noisy: torch.Tensor | None = None

    def noisy_pixels(self, pixel_values: torch.Tensor, keys: Sequence[Any] | None = None,
                     inputs: Mapping | None = None) -> torch.Tensor:
        """The noisy image tensor for ``pixel_values`` (deterministic given ``seed``), in its dtype.

        ``keys`` (one per image): image ``i``'s noise from a generator seeded with ``row_seed(seed, keys[i])``
        (``inputs`` tells how rows map to images for flattened patch inputs); None: the whole tensor's from
        one generator seeded with ``seed``.
        """
        if keys is None:
            eps = gaussian_noise(pixel_values, self.seed)
        else:
            keys = list(keys)
            eps = row_noise(pixel_values, [row_seed(self.seed, k) for k in keys],
                            image_rows(pixel_values, len(keys), inputs))
        out = self.signal * pixel_values.float() + self.noise_scale * eps
        mask = self._real_pixels(inputs)
        if mask is not None:
            # padding (Idefics3's all-zero crops, Mllama's empty tiles) stays padding: noised, the model
            # would take it for image content (or count more images than the prompt has).
            out = torch.where(mask.to(out.device), out, pixel_values.float())
        return out.to(pixel_values.dtype)

    def _real_pixels(self, inputs: Mapping | None) -> torch.Tensor | None:
        adapter = getattr(getattr(self.vlm, "spec", None), "adapter", None)
        if adapter is None or not inputs:
            return None
        return adapter.pixel_noise_mask(self.vlm.model, inputs)

    def begin(self, inputs: dict) -> None:
        if "pixel_values" not in inputs:
            raise ValueError(f"{type(self).__name__} needs pixel_values in the inputs (a VLM batch with images).")
        self._noisy = self.noisy_pixels(inputs["pixel_values"], self.row_keys, inputs)

    def _branch_inputs(self, inputs: dict) -> dict:
        if self._noisy is None:
            raise RuntimeError(f"{type(self).__name__}.begin() was not called before the noisy branch ran.")
        out = dict(inputs)
        out["pixel_values"] = self._noisy
        return out

    def branches(self):
        return [Branch(self.branch_name, inputs=self._branch_inputs)]

    def combine(self, logits: torch.Tensor, branch_logits: Mapping[str, torch.Tensor]) -> torch.Tensor:
        scores = contrast(logits, branch_logits[self.branch_name], self.weight)
        return apply_plausibility(scores, logits, self.cutoff)


class VCDStrategy(ImageNoiseContrast):
    """Visual contrastive decoding: ``(1+α)·l(y|v,x) − α·l(y|v',x)`` with ``v'`` diffusion-noised at ``noise_step``.

    The bound form of :class:`VCD` (same parameters, plus the model).

    Example
    -------
    >>> out = greedy_decode(vlm.model, enc, 32, strategy=VCDStrategy(vlm, strength=1.0))   # doctest: +SKIP
    """

    name = "vcd"

    def __init__(self, vlm: LoadedVLM, strength: float = 1.0, cutoff: float | None = 0.1, noise_step: int = 500,
                 seed: int = 0):
        signal, noise_scale = diffusion_coefficients(noise_step)
        super().__init__(vlm, weight=strength, signal=signal, noise_scale=noise_scale, cutoff=cutoff, seed=seed)
        self.strength, self.noise_step = self.weight, int(noise_step)


class VCD(Intervention):
    """Visual contrastive decoding against a diffusion-noised image (Leng et al., 2024).

    ``s = (1 + α)·l(y | v, x) − α·l(y | v', x)``, tokens with ``l(y | v, x) < log β + max l`` get −inf;
    ``v'`` is the image after ``noise_step`` steps of forward diffusion (see the module docstring).

    Parameters
    ----------
    strength : contrast weight α ≥ 0 (0 with ``sample=False`` ⇒ exactly greedy). Default 1.
    cutoff : plausibility cut-off β in [0, 1] on the clean branch; None or 0 disables. Default 0.1.
    noise_step : diffusion step t in [0, 999] (T = 1000, VCD's sigmoid schedule). Default 500.
    seed : seed of the Gaussian noise (same seed ⇒ same noisy image; in the runners each image's noise
        is seeded with ``row_seed(seed, image id)``) and, when sampling, of the token sampler. Default 0.
    flavour : ``"reference"`` (default: the reference's token choice, multinomial sampling at T = 1)
        or ``"corrected"`` (argmax). Everything else is the same in both.
    sample : sample the next token (``Sampling(seed=seed)``: T = 1, no top-k/top-p) instead of the
        argmax. None: the flavour's (reference True, corrected False).

    Example
    -------
    >>> from lens_halluc.interventions import VCD
    >>> vcd = VCD(strength=1.0, cutoff=0.1, noise_step=500)
    >>> vcd.get_params()
    {'strength': 1.0, 'cutoff': 0.1, 'noise_step': 500, 'seed': 0, 'flavour': 'reference', 'sample': True}
    >>> caps = lh.caption(vlm, ds, strategy=vcd)                                 # doctest: +SKIP
    """

    name = "vcd"
    description = "visual contrastive decoding (diffusion-noised image)"
    options = {
        "strength": Param("float", "contrast strength (VCD's alpha)", aliases=("--alpha",)),
        "cutoff": Param("float", "plausibility cut-off (VCD's beta)", aliases=("--beta",)),
        "noise_step": Param("int", f"diffusion step of the noisy image (of {DIFFUSION_STEPS})"),
        "seed": Param("int", "noise seed (and sampling seed)"),
        "flavour": Param("str", "reference (samples, as VCD's code) or corrected (argmax)", FLAVOURS),
        "sample": Param("bool", "sample the next token (multinomial at T=1) instead of the argmax"),
    }
    flavours = {"reference": {"sample": True}, "corrected": {"sample": False}}

    def __init__(self, strength: float = 1.0, cutoff: float | None = 0.1, noise_step: int = 500, seed: int = 0,
                 flavour: str = "reference", sample: bool | None = None):
        self.strength = check_number(strength, "strength", "VCD", low=0.0)
        self.cutoff = check_number(cutoff, "cutoff", "VCD", 0.0, 1.0, optional=True)
        self.noise_step = check_int(noise_step, "noise_step", "VCD", 0, DIFFUSION_STEPS - 1)
        self.seed = check_int(seed, "seed", "VCD", low=0)
        self.flavour = check_flavour(flavour, "VCD")
        self.sample = check_bool(self._flavoured("sample", sample), "sample", "VCD")

    def bind(self, vlm) -> VCDStrategy:
        strategy = VCDStrategy(vlm, self.strength, self.cutoff, self.noise_step, self.seed)
        strategy.sampling = Sampling(seed=self.seed) if self.sample else None
        return self._bound(strategy)
