"""Load vision-language checkpoints: a local directory, the local Hugging Face cache, or the hub.

One code path serves the shipped model organism, ``llava-hf/llava-1.5-7b-hf`` and every family with
a lens_halluc adapter (:mod:`lens_halluc.models.adapters`): safetensors only, no remote code unless
asked, the text tower on eager attention (so attention weights exist and attention edits apply;
for a flat config such as Chameleon's the whole model), the vision tower on its default. Hugging
Face conventions: a repo id is read from the cache, else downloaded (weights, configs and
processor files only) unless ``HF_HUB_OFFLINE`` is set; ``device_map="auto"`` spreads a model too
large for one GPU (accelerate), and ``vlm.device`` is then the device of the input embeddings.
Processors that list a video processor load without torchvision (image-only: no video processor).

Example
-------
>>> vlm = load_vlm("llava-hf/llava-1.5-7b-hf", device="cuda", dtype="bfloat16")   # doctest: +SKIP
>>> vlm = load_vlm("Qwen/Qwen2-VL-7B-Instruct", device_map="auto", dtype="bf16")  # doctest: +SKIP
>>> enc = vlm.encode([image], ["Please describe this image in detail."])           # doctest: +SKIP
>>> vlm.spec.token_roles(enc["input_ids"], enc["attention_mask"])                  # doctest: +SKIP
>>> out = vlm.model(**vlm.model_inputs(enc))                                        # doctest: +SKIP
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .addons import attach_addons
from .compat import config_path
from .errors import ModelLoadError
from .prompts import PromptTemplate, render_prompt, render_text_only, resolve_template
from .spec import ModelSpec, SpecError

#: Files fetched from the hub for a repo id: weights (safetensors only), configs, tokenizer and processor files.
HUB_ALLOW_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.json", "*.jinja", "*.model", "*.txt",
                      "*.tiktoken", "tokenizer*")

_TRUE = ("1", "true", "yes", "on")


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) asks for no network access."""
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _not_available(name: str, why: str, cause: Exception | None = None) -> ModelLoadError:
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
    detail = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
    return ModelLoadError(
        f"{name!r} is not in the local Hugging Face cache ({cache}) and {why}{detail}. Download it where there is "
        f"network (`hf download {name}`) and copy the cache here, or pass the checkpoint's local directory.")


def resolve_model_path(name_or_path: str | os.PathLike | None, download: bool | None = None) -> Path:
    """A local directory for ``name_or_path``: itself if it is a directory, else the HF cache, else the hub.

    ``None`` means the shipped model organism (the embedded default). A repo id missing from the
    cache is downloaded (``huggingface_hub.snapshot_download``, only :data:`HUB_ALLOW_PATTERNS`:
    safetensors, configs, tokenizer and processor files) when ``download`` is true, or, by default
    (``None``), when ``HF_HUB_OFFLINE`` is unset; offline or without network it raises
    :class:`ModelLoadError` saying how to get the files.

    Example
    -------
    >>> resolve_model_path("/no/such/dir")                        # doctest: +SKIP
    ModelLoadError: model directory not found: /no/such/dir ...
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
    except ImportError as e:  # pragma: no cover - transformers depends on it
        raise _not_available(name, "huggingface_hub is not installed", e) from e
    try:
        return Path(snapshot_download(name, local_files_only=True, allow_patterns=list(HUB_ALLOW_PATTERNS)))
    except Exception as e:  # the hub client raises several types for "not cached"
        cached_error = e
    if download is None:
        download = not hub_offline()
    if not download:
        raise _not_available(name, "HF_HUB_OFFLINE is set (nothing is downloaded)"
                             if hub_offline() else "downloading was not asked for") from cached_error
    try:
        return Path(snapshot_download(name, allow_patterns=list(HUB_ALLOW_PATTERNS)))
    except Exception as e:  # no network, unknown repo, gated repo without a token ...
        raise _not_available(name, "could not be downloaded from the hub (no network, an unknown or gated repo)",
                             e) from e


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


def input_device(model: nn.Module) -> torch.device:
    """The device inputs go to: the input embeddings' (with ``device_map`` the model spans several devices)."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    weight = getattr(emb, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.device
    return next(model.parameters()).device


@dataclass
class LoadedVLM:
    """A loaded vision-language model: ``model``, ``processor``, ``spec`` and a prompt ``template``.

    ``adapter`` (= ``spec.adapter``) is the family's description; ``encode`` returns the whole
    processor output and ``model_inputs`` the part of it the forward takes.

    Example
    -------
    >>> vlm = load_vlm()                      # the shipped organism            # doctest: +SKIP
    >>> enc = vlm.encode(images, ["Please describe this image in detail."] * len(images))  # doctest: +SKIP
    >>> logits = vlm.model(**vlm.model_inputs(enc)).logits                     # doctest: +SKIP
    """

    model: nn.Module
    processor: object
    spec: ModelSpec
    template: PromptTemplate
    path: Path | None = None

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def adapter(self):
        """The family's :class:`~lens_halluc.models.adapters.Adapter`."""
        return self.spec.adapter

    @property
    def device(self) -> torch.device:
        """Where inputs go: the device of the input embeddings (the first device under ``device_map``)."""
        return input_device(self.model)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def format_prompt(self, prompt: str) -> str:
        """The full prompt for ``prompt`` with the processor's image placeholder (or its chat template)."""
        return render_prompt(self.template, prompt, self.processor, self.adapter)

    def format_text_only(self, prompt: str) -> str:
        """The prompt without an image (the base language model's input in the inheritance analysis)."""
        return render_text_only(self.template, prompt, self.processor, self.adapter)

    def image_placeholder(self) -> str:
        """The text the processor expands into an image's tokens (``<image>``, ``<|image_pad|>`` ...)."""
        return self.adapter.image_placeholder(self.processor)

    def model_inputs(self, encoding: Mapping[str, Any]) -> dict[str, Any]:
        """The forward's inputs among ``encoding`` (a processor output): ids, mask, image and per-token inputs."""
        return self.adapter.model_inputs(encoding)

    def caption_inputs(self, image, prompt: str, caption_ids: Sequence[int] | torch.Tensor,
                       apply_template: bool = True) -> dict[str, Any]:
        """The forward inputs of ``prompt`` with ``image`` followed by ``caption_ids`` (teacher forcing), batch 1.

        The prompt is encoded by :meth:`encode`; the caption is appended with
        :meth:`Adapter.extend_inputs`, so every per-token input (``token_type_ids``,
        ``mm_token_type_ids``, ``cross_attention_mask`` ...) covers all ``T`` positions. Returns
        ``{"input_ids": [1, T], "attention_mask": [1, T], "pixel_values": ..., ...}`` on the model's
        device (the keys :meth:`model_inputs` keeps).

        Example
        -------
        >>> inputs = vlm.caption_inputs(image, "Describe.", caption_ids)          # doctest: +SKIP
        >>> vlm.model(**inputs).logits.shape[1]                                   # doctest: +SKIP
        """
        inputs = self.model_inputs(self.encode([image], [prompt], apply_template=apply_template))
        ids = inputs["input_ids"]
        caption = torch.as_tensor(list(caption_ids) if not isinstance(caption_ids, torch.Tensor) else caption_ids,
                                  dtype=torch.long).reshape(1, -1).to(ids.device)
        return self.adapter.extend_inputs(inputs, caption)

    def sequence_inputs(self, image, prompt: str, input_ids: Sequence[int] | torch.Tensor,
                        apply_template: bool = True) -> dict[str, Any]:
        """The forward inputs of one teacher-forced sequence ``input_ids`` (``[T]``: prompt, then caption).

        ``input_ids`` must start with the prompt as :meth:`encode` gives it (image tokens
        expanded); what follows is the caption (:meth:`caption_inputs`).

        Example
        -------
        >>> inputs = vlm.sequence_inputs(image, sample["prompt"], sample["input_ids"])   # doctest: +SKIP
        >>> vlm.model(**inputs).logits.shape[1] == len(sample["input_ids"])             # doctest: +SKIP
        True
        """
        inputs = self.model_inputs(self.encode([image], [prompt], apply_template=apply_template))
        prompt_ids = inputs["input_ids"][0]
        ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1).to(prompt_ids.device)
        n = prompt_ids.numel()
        if ids.numel() < n or not torch.equal(ids[:n], prompt_ids):
            raise ValueError("the sequence's input_ids do not start with the prompt as this model encodes it "
                             f"({n} prompt ids); use the model and --template the sequence was made with.")
        return self.adapter.extend_inputs(inputs, ids[n:][None])

    def caption_batch(self, images: Sequence, prompts: Sequence[str], captions: Sequence[Sequence[int]],
                      apply_template: bool = True) -> dict[str, Any]:
        """Teacher-forced batch: row ``i`` = ``prompts[i]`` with ``images[i]``, then ``captions[i]``, right-padded.

        The prompts and images go through the processor together (:meth:`encode`: image inputs
        padded the processor's way, e.g. LLaVA-NeXT's crops, Pixtral's sizes); the captions are
        appended with :meth:`Adapter.extend_inputs`, so per-token inputs cover them; then every
        per-token tensor (``input_ids``, ``attention_mask``, the adapter's
        :attr:`~Adapter.per_token_inputs`, and any other ``[B, T, ...]`` tensor such as Mllama's
        ``cross_attention_mask``) is shifted so each row starts at position 0 and pads at its end
        (``input_ids`` with the pad id, ``attention_mask`` with 0). Right padding is what teacher-forced
        passes want: with a causal mask, padding after a row's end changes none of its states. Row
        ``i``'s prompt has ``attention_mask[i].sum() - len(captions[i])`` tokens.

        Example
        -------
        >>> batch = vlm.caption_batch(images, ["Describe."] * 2, [cap_a, cap_b])   # doctest: +SKIP
        >>> vlm.model(**batch).logits.shape[:2] == batch["input_ids"].shape      # doctest: +SKIP
        True
        """
        if len(captions) != len(prompts):
            raise ValueError(f"{len(captions)} captions for {len(prompts)} prompts; pass one caption per prompt.")
        inputs = self.model_inputs(self.encode(images, prompts, apply_template=apply_template))
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        B, T = ids.shape
        n_prompt = mask.sum(-1).tolist()
        caps = [[int(t) for t in c] for c in captions]
        L = max((len(c) for c in caps), default=0)
        pad_id = self.spec.pad_token_id if self.spec.pad_token_id is not None else 0
        block = torch.full((B, L), pad_id, dtype=torch.long)
        for i, c in enumerate(caps):
            block[i, :len(c)] = torch.tensor(c, dtype=torch.long)
        out = self.adapter.extend_inputs(inputs, block.to(ids.device))
        per_token = {"input_ids", "attention_mask", *self.adapter.per_token_inputs}
        lengths = [int(n) + len(c) for n, c in zip(n_prompt, caps)]
        width = max(lengths)
        for key, value in list(out.items()):
            if not isinstance(value, torch.Tensor):
                continue
            if not (key in per_token or (not key.startswith("pixel") and value.dim() >= 2 and
                                         tuple(value.shape[:2]) == (B, T + L))):
                continue  # image inputs: one entry per image, already batched by the processor
            rows = []
            for i in range(B):
                start = T - int(n_prompt[i])  # left padding of the prompt
                rows.append(torch.roll(value[i], shifts=-start, dims=0)[:width])
            out[key] = torch.stack(rows)
        valid = torch.arange(width, device=ids.device)[None, :] < torch.tensor(lengths, device=ids.device)[:, None]
        out["attention_mask"] = valid.to(mask.dtype)
        out["input_ids"] = torch.where(valid, out["input_ids"], torch.full_like(out["input_ids"], pad_id))
        return out

    def encode(self, images: Sequence, prompts: Sequence[str], apply_template: bool = True):
        """The whole processor output for a batch, left-padded, on the model's (input) device.

        ``images``: PIL images (one per prompt), handed to the processor as the family wants them
        (:meth:`Adapter.processor_images`: a flat list, or one list per sample). ``prompts``: user
        prompts, wrapped in the template unless ``apply_template`` is False (then each must contain
        the processor's image placeholder itself). Returns a ``BatchFeature`` with
        ``input_ids``/``attention_mask`` ``[B, T]`` and every other key the processor returns
        (``pixel_values`` and, by family, ``image_sizes``, ``image_grid_thw``, ``token_type_ids``,
        ``aspect_ratio_ids``, ``cross_attention_mask`` ...); floating pixel inputs are cast to the
        model's dtype, nothing else is.

        Example
        -------
        >>> enc = vlm.encode([img_a, img_b], ["Describe.", "Is there a cat?"])   # doctest: +SKIP
        >>> sorted(enc)                                                           # doctest: +SKIP
        ['attention_mask', 'image_grid_thw', 'input_ids', 'mm_token_type_ids', 'pixel_values']
        """
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts; pass one image per prompt.")
        texts = [self.format_prompt(p) if apply_template else p for p in prompts]
        placeholder = self.image_placeholder()
        missing = [i for i, t in enumerate(texts) if placeholder not in t]
        if missing:
            raise ValueError(f"prompt(s) {missing} lack the image token (placeholder) {placeholder!r}; "
                             "use apply_template=True or put the placeholder in the prompt.")
        tok = self.tokenizer
        side, tok.padding_side = tok.padding_side, "left"  # left padding keeps the last column the next-token slot
        try:
            enc = self.processor(images=self.adapter.processor_images(images), text=texts, return_tensors="pt",
                                 padding=True)
        finally:
            tok.padding_side = side
        enc = enc.to(self.device)
        pixel_keys = set(self.adapter.image_input_keys)
        for key in list(enc.keys()):
            value = enc[key]
            # only pixel inputs take the model's dtype; ids, sizes, grids and masks keep theirs
            if isinstance(value, torch.Tensor) and value.is_floating_point() and \
                    (key in pixel_keys or key.startswith("pixel_values")):
                enc[key] = value.to(self.dtype)
        return enc


def _torchvision_available() -> bool:
    return importlib.util.find_spec("torchvision") is not None


def _modality(attribute: str) -> str:
    from transformers.processing_utils import MODALITY_TO_AUTOPROCESSOR_MAPPING

    return next((m for m in MODALITY_TO_AUTOPROCESSOR_MAPPING if m in attribute), attribute)


def _processor_class(path: Path, trust_remote_code: bool = False):
    """The processor class a checkpoint names (``processor_config.json``, ``tokenizer_config.json``) or its config's."""
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING, processor_class_from_name

    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        try:
            data = json.loads((path / name).read_text())
        except (OSError, ValueError):
            continue
        cls_name = data.get("processor_class") if isinstance(data, dict) else None
        if isinstance(cls_name, str):
            cls = processor_class_from_name(cls_name)
            if cls is not None:
                return cls
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    try:
        return PROCESSOR_MAPPING[type(config)]
    except KeyError:
        return None


@functools.lru_cache(maxsize=None)
def image_only_processor_class(cls):
    """``cls`` without its video processor (``cls`` itself when it has none).

    Processors that list a video processor cannot be built without torchvision (transformers'
    video processors require it), though images never touch it. A family adapter may register
    its own image-only subclass (a subclass of ``cls`` defined in ``lens_halluc``, e.g. one that
    also skips a video-only check); that one is used. Otherwise a subclass whose sub-processors
    exclude ``video_processor`` (``None`` is passed for it) and that keeps the class name (so
    ``save_pretrained`` records the same ``processor_class``): ``processor(images=..., text=...)``
    works, ``videos=`` does not.

    Example
    -------
    >>> from transformers import Qwen2VLProcessor
    >>> image_only_processor_class(Qwen2VLProcessor).get_attributes()
    ['image_processor', 'tokenizer']
    """
    from . import adapters  # noqa: F401  (family modules define and register their image-only processors)

    def video_free(c) -> bool:
        return all(_modality(a) != "video_processor" for a in c.get_attributes())

    if video_free(cls):
        return cls
    for sub in cls.__subclasses__():
        if sub.__module__.startswith("lens_halluc.") and video_free(sub):
            return sub
    attributes = [a for a in cls.get_attributes() if _modality(a) != "video_processor"]
    video = [a for a in cls.get_attributes() if _modality(a) == "video_processor"]
    base_init = cls.__init__

    def __init__(self, *args, **kwargs):
        # the stock __init__ may require its video processor positionally: give it None
        for name in video:
            kwargs.setdefault(name, None)
        base_init(self, *args, **kwargs)

    return type(cls.__name__, (cls,), {
        "__init__": __init__,
        "get_attributes": classmethod(lambda c: list(attributes)),
        "__doc__": f"{cls.__name__} without its video processor (loaded without torchvision by lens_halluc).",
        "__module__": cls.__module__,
    })


def load_processor(path: str | os.PathLike, trust_remote_code: bool = False):
    """The checkpoint's processor (``AutoProcessor``); without torchvision, image-only.

    When torchvision is missing and the processor lists a video processor, the image-only
    processor (:func:`image_only_processor_class`) is built instead of failing: images and text
    work exactly as with the full processor; videos are refused. With torchvision installed this
    is ``AutoProcessor.from_pretrained``.

    Example
    -------
    >>> processor = load_processor("/tmp/tiny-qwen2-vl")                    # doctest: +SKIP
    """
    from transformers import AutoProcessor

    path = Path(path)
    cls = None
    if not _torchvision_available():
        cls = _processor_class(path, trust_remote_code)
    if cls is not None and image_only_processor_class(cls) is not cls:
        return image_only_processor_class(cls).from_pretrained(path, local_files_only=True)
    return AutoProcessor.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)


def text_attn_request(config, implementation: str):
    """The ``attn_implementation`` argument of ``from_pretrained`` that puts the *text* tower on ``implementation``.

    Nested configs: ``{"text_config": implementation}`` (by the path of the text config among the
    sub-configs; the vision tower keeps its default). A flat config (Chameleon: the text tower reads
    the top-level config): ``implementation`` for the whole model.

    Example
    -------
    >>> from transformers import LlavaConfig, ChameleonConfig
    >>> text_attn_request(LlavaConfig(), "eager"), text_attn_request(ChameleonConfig(), "eager")
    ({'text_config': 'eager'}, 'eager')
    """
    from .adapters import Adapter, AdapterError, adapter_for

    try:
        text = adapter_for(config).text_config(config)
    except AdapterError:  # no adapter (load_vlm refuses it before this): the default description
        text = Adapter().text_config(config)
    path = config_path(config, text)
    if not path:  # flat config, or a text config not reachable through sub_configs
        return implementation
    request: Any = implementation
    for key in reversed(path):
        request = {key: request}
    return request


def _check_text_attention(model: nn.Module, spec: ModelSpec, implementation: str) -> None:
    """Every text attention module reads ``implementation`` (else say so: the analyses rely on it)."""
    got = set()
    for layer in range(spec.n_layers):
        cfg = getattr(spec.attention(model, layer), "config", None)
        got.add(str(getattr(cfg, "_attn_implementation", None)))
    if got != {implementation}:
        raise ModelLoadError(f"asked for attn_implementation={implementation!r} for the text tower, but its attention "
                             f"modules run {sorted(got)}; the {spec.adapter.name!r} adapter's text_config() must name "
                             "the config the text layers read.")


def _device_map_kwargs(device_map, device: torch.device) -> dict:
    if device_map is None:
        return {}
    if importlib.util.find_spec("accelerate") is None:
        raise ModelLoadError(f"device_map={device_map!r} needs the accelerate package (pip install accelerate); "
                             "or load on one device with device=... .")
    return {"device_map": device_map}


def load_vlm(
    name_or_path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    attn_implementation: str = "eager",
    template: str | PromptTemplate | None = None,
    trust_remote_code: bool = False,
    device_map: str | Mapping | None = None,
    download: bool | None = None,
) -> LoadedVLM:
    """Load a vision-language model and processor and describe it with a :class:`ModelSpec`.

    Parameters
    ----------
    name_or_path : local directory, repo id (local HF cache, else the hub unless ``HF_HUB_OFFLINE``
        is set: :func:`resolve_model_path`), or None for the shipped model organism.
    device, dtype : where and in which precision to load (float32 by default; ``"bfloat16"`` for
        7B on a GPU). ``device`` is ignored when ``device_map`` is given.
    attn_implementation : text-tower attention (``"eager"`` by default so attention weights are
        returned; ``"lens_halluc"`` for attention edits, after ``import lens_halluc.hooks``, or switch
        later with ``lens_halluc.hooks.use_editable_attention(vlm)``; the vision tower keeps its
        default; a flat config such as Chameleon's has one implementation for the whole model).
    template : prompt template name (see :mod:`lens_halluc.models.prompts`); ``None`` (default):
        the checkpoint's own (an organism checkpoint records ``"llava-1.5"``), ``"vicuna-v1"`` (the
        papers' LLaVA conv-mode) for LLaVA-1.5 checkpoints, else ``"chat"`` (the processor's chat
        template, :func:`~lens_halluc.models.prompts.default_template`).
    trust_remote_code : allow custom modelling code shipped with the checkpoint (and add-on
        loaders outside lens_halluc, see :mod:`lens_halluc.models.addons`).
    device_map : e.g. ``"auto"``: spread the model over the GPUs (accelerate); ``vlm.device`` is then
        the input embeddings' device.
    download : fetch a missing repo id from the hub (default: unless ``HF_HUB_OFFLINE`` is set).

    Raises :class:`ModelLoadError` for a checkpoint that cannot be found or loaded and
    :class:`SpecError` naming the adapter to write for an architecture lens_halluc has no adapter for.

    Add-ons saved beside the weights (the causal module of ``lens_halluc.train.causal_module``)
    are re-attached by the loader their file names; one that cannot be loaded raises
    :class:`~lens_halluc.models.addons.AddonError`.

    Example
    -------
    >>> vlm = load_vlm()                                   # the shipped organism       # doctest: +SKIP
    >>> vlm = load_vlm("llava-hf/llava-1.5-7b-hf", device="cuda", dtype="bfloat16")     # doctest: +SKIP
    >>> vlm = load_vlm("llava-hf/llava-v1.6-34b-hf", device_map="auto", dtype="bf16")   # doctest: +SKIP
    >>> vlm.spec.n_layers, vlm.spec.n_heads                                              # doctest: +SKIP
    (32, 32)
    """
    from transformers import AutoConfig, AutoModelForImageTextToText

    from .adapters import AdapterError, adapter_for

    device = check_device(device) if device_map is None else None
    dtype = _as_dtype(dtype)
    placement = _device_map_kwargs(device_map, device)
    path = resolve_model_path(name_or_path, download=download)
    _check_safetensors(path)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except ValueError as e:
        raise ModelLoadError(f"{path}: config.json could not be read ({e}).") from e
    try:
        adapter_for(config)  # before the weights: an architecture without an adapter fails here, cheaply
        request = text_attn_request(config, attn_implementation)
    except AdapterError as e:
        raise SpecError(str(e)) from None
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=dtype, attn_implementation=request, local_files_only=True, use_safetensors=True,
            trust_remote_code=trust_remote_code, **placement,
        )
    except ValueError as e:
        raise ModelLoadError(f"{path} could not be loaded as an image-text-to-text model ({e}). "
                             "Use load_causal_lm() for a text-only LM.") from e
    try:
        processor = load_processor(path, trust_remote_code=trust_remote_code)
    except (ValueError, OSError, ImportError, TypeError) as e:
        raise ModelLoadError(f"{path}: the processor could not be loaded ({type(e).__name__}: {e}); save it beside "
                             "the weights with processor.save_pretrained().") from e
    if device_map is None:
        model.to(device)
    model.eval()
    spec = ModelSpec.from_model(model, processor)
    _check_text_attention(model, spec, attn_implementation)
    vlm = LoadedVLM(model=model, processor=processor, spec=spec,
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
        """Where inputs go: the device of the input embeddings."""
        return input_device(self.model)


def load_causal_lm(
    name_or_path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    attn_implementation: str = "eager",
    template: str | PromptTemplate | None = None,
    trust_remote_code: bool = False,
    device_map: str | Mapping | None = None,
    download: bool | None = None,
) -> LoadedLM:
    """Load a base language model (e.g. Vicuna for LLaVA-1.5, or the organism's base LM).

    Same conventions as :func:`load_vlm` (cache, hub download unless ``HF_HUB_OFFLINE``,
    ``device_map``). ``template``: ``None`` (default) resolves as in :func:`load_vlm`; the
    inheritance analysis formats the base LM's prompt with the VLM's template.

    Example
    -------
    >>> lm = load_causal_lm("lmsys/vicuna-7b-v1.5", device="cuda", dtype="bfloat16")  # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = check_device(device) if device_map is None else None
    dtype = _as_dtype(dtype)
    placement = _device_map_kwargs(device_map, device)
    path = resolve_model_path(name_or_path, download=download)
    _check_safetensors(path)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=attn_implementation,
        local_files_only=True, use_safetensors=True, trust_remote_code=trust_remote_code, **placement,
    )
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    if device_map is None:
        model.to(device)
    model.eval()
    return LoadedLM(model=model, tokenizer=tok, spec=ModelSpec.from_model(model),
                    template=resolve_template(template, path, model.config), path=path)
