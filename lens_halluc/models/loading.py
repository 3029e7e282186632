"""Load LLaVA-family checkpoints offline, from a local directory or the local Hugging Face cache.

One code path serves the shipped model organism and ``llava-hf/llava-1.5-7b-hf``: safetensors
only, no remote code unless asked, the text tower on eager attention (so attention weights exist
and attention edits apply), the vision tower on its default implementation.

Example
-------
>>> vlm = load_vlm("llava-hf/llava-1.5-7b-hf", device="cuda", dtype="bfloat16")   # doctest: +SKIP
>>> enc = vlm.encode([image], ["Please describe this image in detail."])           # doctest: +SKIP
>>> vlm.spec.token_roles(enc["input_ids"], enc["attention_mask"])                  # doctest: +SKIP
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .addons import attach_addons
from .errors import ModelLoadError
from .prompts import PromptTemplate, resolve_template
from .spec import ModelSpec




def resolve_model_path(name_or_path: str | os.PathLike | None) -> Path:
    """A local directory for ``name_or_path``: itself if it is a directory, else the local HF cache.

    ``None`` means the shipped model organism (the embedded default). Nothing is downloaded.
    """
    if name_or_path is None:
        from .default import organism_path  # the one place core code knows the organism

        return organism_path("final")
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"{p} has no config.json; point --model at a directory saved with save_pretrained().")
        return p
    if p.exists():
        raise ModelLoadError(f"{p} is a file; --model needs a checkpoint directory or a Hugging Face repo id.")
    name = str(name_or_path)
    if name.count("/") != 1 or name.startswith((".", "/")):
        raise ModelLoadError(f"model directory not found: {p}. Pass an existing directory or a repo id like 'llava-hf/llava-1.5-7b-hf'.")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception as e:  # the hub client raises several types for "not cached"
        cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
        raise ModelLoadError(
            f"{name!r} is not in the local Hugging Face cache ({cache}) and nothing is downloaded at run time. "
            f"Download it where there is network (`hf download {name}`) and copy the cache here, "
            "or pass the checkpoint's local directory."
        ) from e


def _check_safetensors(path: Path) -> None:
    if not any(path.glob("*.safetensors")):
        raise ModelLoadError(f"{path} holds no .safetensors weights; lens_halluc loads safetensors only "
                             "(re-save the model with save_pretrained(safe_serialization=True)).")


#: The precisions lens_halluc loads a model in (``--dtype``); other spellings accepted by :func:`_as_dtype`.
DTYPES = ("float32", "bfloat16", "float16")
DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def _as_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    # float32 unless asked: exactness checks and CPU runs want it; pass bfloat16 for 7B on a GPU.
    if dtype is None:
        return torch.float32
    allowed = {getattr(torch, n) for n in DTYPES}
    if isinstance(dtype, torch.dtype):
        if dtype in allowed:
            return dtype
        raise ValueError(f"dtype {dtype} is not one lens_halluc loads models in; use float32, bfloat16 or float16 "
                         "(--dtype); quantised (int8/int4) loading is not supported.")
    name = DTYPE_ALIASES.get(str(dtype).strip().lower(), str(dtype).strip().lower())
    if name.startswith("torch."):
        name = name[len("torch."):]
    if name not in DTYPES:
        extra = " (quantised loading is not supported)" if name.startswith(("int", "uint", "qint")) else ""
        raise ValueError(f"unknown dtype {dtype!r}{extra}; use float32, bfloat16 or float16 (--dtype).")
    return getattr(torch, name)


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a :class:`torch.device` that exists here, or ``ValueError`` saying which ones do.

    Example
    -------
    >>> check_device("cpu")
    device(type='cpu')
    """
    if isinstance(device, torch.device):
        dev = device
    else:
        try:
            dev = torch.device(str(device).strip())
        except (RuntimeError, ValueError):
            raise ValueError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps (--device).") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but CUDA is not available on this machine "
                             "(no GPU, or PyTorch built without CUDA); use --device cpu.")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"device {device!r}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}.")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError(f"device {device!r} asked for, but MPS is not available here; use --device cpu.")
    elif dev.type not in ("cpu", "meta"):
        raise ValueError(f"device {device!r} is not supported; use cpu, cuda, cuda:N or mps (--device).")
    return dev


@dataclass
class LoadedVLM:
    """A loaded vision-language model: ``model``, ``processor``, ``spec`` and a prompt ``template``.

    Example
    -------
    >>> vlm = load_vlm()                      # the shipped organism            # doctest: +SKIP
    >>> enc = vlm.encode(images, ["Please describe this image in detail."] * len(images))  # doctest: +SKIP
    """

    model: nn.Module
    processor: object
    spec: ModelSpec
    template: PromptTemplate
    path: Path | None = None

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def format_prompt(self, prompt: str) -> str:
        return self.template.format(prompt)

    def encode(self, images: Sequence, prompts: Sequence[str], apply_template: bool = True):
        """Processor outputs for a batch, left-padded, on the model's device and dtype.

        ``images``: PIL images (one per prompt). ``prompts``: user prompts, wrapped in the template
        unless ``apply_template`` is False (then they must contain the image token themselves).
        Returns a ``BatchEncoding`` with ``input_ids``/``attention_mask`` ``[B, T]`` and
        ``pixel_values`` ``[B, 3, H, W]``.
        """
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts; pass one image per prompt.")
        texts = [self.format_prompt(p) if apply_template else p for p in prompts]
        image_token = getattr(self.processor, "image_token", "<image>")
        missing = [i for i, t in enumerate(texts) if image_token not in t]
        if missing:
            raise ValueError(f"prompt(s) {missing} lack the image token {image_token!r}; "
                             "use apply_template=True or put the token in the prompt.")
        tok = self.processor.tokenizer
        side, tok.padding_side = tok.padding_side, "left"  # left padding keeps the last column the next-token slot
        try:
            enc = self.processor(images=list(images), text=texts, return_tensors="pt", padding=True)
        finally:
            tok.padding_side = side
        enc = enc.to(self.device)
        if "pixel_values" in enc:
            enc["pixel_values"] = enc["pixel_values"].to(self.dtype)
        return enc


def load_vlm(
    name_or_path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    attn_implementation: str = "eager",
    template: str | PromptTemplate | None = None,
    trust_remote_code: bool = False,
) -> LoadedVLM:
    """Load a LLaVA-family model and processor offline and describe it with a :class:`ModelSpec`.

    Parameters
    ----------
    name_or_path : local directory, repo id present in the local HF cache, or None for the
        shipped model organism.
    device, dtype : where and in which precision to load (float32 by default; ``"bfloat16"`` for
        7B on a GPU).
    attn_implementation : text-tower attention (``"eager"`` by default so attention weights are
        returned; ``"lens_halluc"`` for attention edits, after ``import lens_halluc.hooks``, or switch
        later with ``lens_halluc.hooks.use_editable_attention(vlm)``; the vision tower keeps its default).
    template : prompt template name (see :mod:`lens_halluc.models.prompts`); ``None`` (default):
        the checkpoint's own (an organism checkpoint records ``"llava-1.5"``), ``"vicuna-v1"`` (the
        papers' LLaVA conv-mode) for LLaVA-1.5 checkpoints, else ``"llava-1.5"``
        (:func:`~lens_halluc.models.prompts.default_template`).
    trust_remote_code : allow custom modelling code shipped with the checkpoint (and add-on
        loaders outside lens_halluc, see :mod:`lens_halluc.models.addons`).

    Add-ons saved beside the weights (the causal module of ``lens_halluc.train.causal_module``)
    are re-attached by the loader their file names; one that cannot be loaded raises
    :class:`~lens_halluc.models.addons.AddonError`.

    Example
    -------
    >>> vlm = load_vlm()                                   # the shipped organism       # doctest: +SKIP
    >>> vlm = load_vlm("llava-hf/llava-1.5-7b-hf", device="cuda", dtype="bfloat16")     # doctest: +SKIP
    >>> vlm.spec.n_layers, vlm.spec.n_heads                                              # doctest: +SKIP
    (32, 32)
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    device = check_device(device)
    dtype = _as_dtype(dtype)
    path = resolve_model_path(name_or_path)
    _check_safetensors(path)
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=_as_dtype(dtype), attn_implementation={"text_config": attn_implementation},
            local_files_only=True, use_safetensors=True, trust_remote_code=trust_remote_code,
        )
        processor = AutoProcessor.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except ValueError as e:
        raise ModelLoadError(f"{path} could not be loaded as an image-text-to-text model ({e}). "
                             "lens_halluc supports LLaVA-family checkpoints; use load_causal_lm() for a text-only LM.") from e
    model.to(device).eval()
    vlm = LoadedVLM(model=model, processor=processor, spec=ModelSpec.from_model(model),
                    template=resolve_template(template, path, model.config), path=path)
    attach_addons(vlm, trust_remote_code=trust_remote_code)  # modules saved beside the weights (Causal-LLaVA's)
    return vlm


@dataclass
class LoadedLM:
    """A text-only causal LM (the base language model before visual instruction tuning)."""

    model: nn.Module
    tokenizer: object
    spec: ModelSpec
    template: PromptTemplate
    path: Path | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def load_causal_lm(
    name_or_path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    attn_implementation: str = "eager",
    template: str | PromptTemplate | None = None,
    trust_remote_code: bool = False,
) -> LoadedLM:
    """Load a base language model (e.g. Vicuna for LLaVA-1.5, or the organism's base LM) offline.

    ``template``: ``None`` (default) resolves as in :func:`load_vlm` (the checkpoint's own, else
    ``"llava-1.5"``); the inheritance analysis formats the base LM's prompt with the VLM's template.

    Example
    -------
    >>> lm = load_causal_lm("lmsys/vicuna-7b-v1.5", device="cuda", dtype="bfloat16")  # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = check_device(device)
    dtype = _as_dtype(dtype)
    path = resolve_model_path(name_or_path)
    _check_safetensors(path)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=_as_dtype(dtype), attn_implementation=attn_implementation,
        local_files_only=True, use_safetensors=True, trust_remote_code=trust_remote_code,
    )
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    model.to(device).eval()
    return LoadedLM(model=model, tokenizer=tok, spec=ModelSpec.from_model(model),
                    template=resolve_template(template, path, model.config), path=path)
