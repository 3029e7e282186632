"""Shared command-line plumbing: model and image options, validated argparse types, friendly error exits.

The argparse types (:func:`positive_int`, :func:`non_negative_int`, :func:`fraction`,
:func:`int_range`, :func:`float_range`, :func:`choice`) come from :mod:`lens_halluc.data.options`
(the lowest layer, so ``python -m lens_halluc.organism`` uses the same ones); :func:`device_arg`
and :func:`dtype_arg` check ``--device`` and ``--dtype`` at parse time.

Example
-------
>>> p = argparse.ArgumentParser(prog="demo")
>>> add_model_args(p)
>>> _ = p.add_argument("--batch-size", type=positive_int, default=8)
>>> p.parse_args(["--dtype", "bf16", "--batch-size", "4"]).dtype
'bfloat16'
"""
from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from typing import Iterator

from ..data.options import (check_int, choice, float_range, fraction, int_range, non_negative_float,  # noqa: F401
                            non_negative_int, positive_float, positive_int)

#: ``--dtype`` values (and the spellings mapped onto them); the loader's list.
DTYPE_CHOICES = ("float32", "bfloat16", "float16")
dtype_arg = choice(DTYPE_CHOICES, "dtype", {"fp32": "float32", "float": "float32", "bf16": "bfloat16",
                                            "fp16": "float16", "half": "float16"})

#: Flags whose value is a number of attention heads: :func:`load_model_from_args` checks them
#: against the loaded model (argparse cannot: the head count is known only then).
HEAD_COUNT_FLAGS = {"top_k": "--top-k", "k": "--k"}


def device_arg(text: str) -> str:
    """argparse ``type=`` of ``--device``: a torch device that exists on this machine (``cpu``, ``cuda:0``...).

    Example
    -------
    >>> device_arg("cpu")
    'cpu'
    """
    if text.strip().lower() == "cpu":
        return "cpu"
    from ..models.loading import check_device  # imports torch: only for a device other than cpu

    try:
        check_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).replace(" (--device)", "")) from None
    return text.strip()


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model/--device/--dtype/--template/--trust-remote-code, the same on every CLI."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="checkpoint directory or Hugging Face repo id (from the local cache, else downloaded "
                        "unless HF_HUB_OFFLINE is set; default: the shipped model organism)")
    g.add_argument("--device", default="cpu", type=device_arg,
                   help="torch device: cpu, cuda, cuda:N or mps; checked to exist here (default: cpu)")
    g.add_argument("--dtype", default=None, type=dtype_arg, help="float32, bfloat16 or float16 (default: float32)")
    g.add_argument("--device-map", default=None,
                   help="spread a model too large for one GPU: 'auto' (needs accelerate; --device is then ignored)")
    g.add_argument("--template", default=None,
                   help="prompt template: vicuna-v1 (LLaVA's conv-mode vicuna_v1, the papers'), llava-v1, ha-baselines, "
                        "llava-1.5 (llava-hf chat format), plain, chat (the processor's own chat template); each "
                        "uses the processor's image placeholder (default: the checkpoint's own: llava-1.5 for "
                        "the organism, vicuna-v1 for LLaVA-1.5 checkpoints, else chat)")
    g.add_argument("--trust-remote-code", action="store_true", help="allow custom modelling code in the checkpoint")


def add_image_args(p: argparse.ArgumentParser) -> None:
    """--allow-outside-image-dir and --max-image-pixels: how image files named in the data are checked."""
    from ..data.images import MAX_IMAGE_PIXELS

    g = p.add_argument_group("images")
    g.add_argument("--allow-outside-image-dir", action="store_true",
                   help="open image files named with '..' or an absolute path outside --image-dir "
                        "(refused by default)")
    g.add_argument("--max-image-pixels", type=positive_int, default=MAX_IMAGE_PIXELS,
                   help=f"refuse images with more pixels than this (default: {MAX_IMAGE_PIXELS}, PIL's limit)")


def image_kwargs(args: argparse.Namespace) -> dict:
    """The ``allow_outside_image_dir`` / ``max_image_pixels`` keywords of the flags :func:`add_image_args` adds."""
    from ..data.images import MAX_IMAGE_PIXELS

    return {"allow_outside_image_dir": getattr(args, "allow_outside_image_dir", False),
            "max_image_pixels": getattr(args, "max_image_pixels", MAX_IMAGE_PIXELS)}


def check_head_counts(args: argparse.Namespace, spec) -> None:
    """Refuse a head-count flag (``--top-k``, ``--k``) larger than the model's number of heads."""
    total = int(spec.n_layers) * int(spec.n_heads)
    for attr, flag in HEAD_COUNT_FLAGS.items():
        value = getattr(args, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > total:
            raise ValueError(f"{flag} {value} is more than the model's {total} attention heads "
                             f"({spec.n_layers} layers x {spec.n_heads} heads); pass {flag} between 1 and {total}.")


def load_model_from_args(args: argparse.Namespace):
    """``load_vlm`` with the flags of :func:`add_model_args`; head-count flags are checked against the model."""
    from ..models import load_vlm

    vlm = load_vlm(args.model, device=args.device, dtype=args.dtype, template=args.template,
                   trust_remote_code=args.trust_remote_code, device_map=getattr(args, "device_map", None))
    check_head_counts(args, vlm.spec)
    return vlm


def load_heads(path, vlm=None, k: int | None = None, flag: str = "--heads") -> list[tuple[int, int]]:
    """The heads of a heads file (:func:`lens_halluc.models.heads.read_heads`), checked against ``vlm``'s shape.

    Every error names the file (and ``flag``).

    Example
    -------
    >>> load_heads("figures/top_heads.json", vlm)          # doctest: +SKIP
    [(4, 3), (5, 0), ...]
    """
    from ..models.heads import HeadsFileError, read_heads

    heads = read_heads(path, k=k)
    if vlm is not None:
        n_layers, n_heads = int(vlm.spec.n_layers), int(vlm.spec.n_heads)
        bad = [h for h in heads if not (h[0] < n_layers and h[1] < n_heads)]
        if bad:
            raise HeadsFileError(f"{flag} {path}: head {list(bad[0])} is out of range for the model ({n_layers} layers, "
                                 f"{n_heads} heads per layer: layer 0-{n_layers - 1}, head 0-{n_heads - 1}); "
                                 "pass the heads file attributed on this model.")
    return heads


@contextmanager
def friendly_errors(prog: str) -> Iterator[None]:
    """Turn the package's input errors into one clear line on stderr and exit status 2."""
    try:
        yield
    except (FileNotFoundError, ValueError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"{prog}: error: {msg}", file=sys.stderr)
        raise SystemExit(2) from None


def callable_module(module_name: str, target: str) -> None:
    """Make the ``python -m`` shim module ``module_name`` callable as the API function ``target``.

    ``lens_halluc.caption`` is both the ``python -m lens_halluc.caption`` entry point and, in the
    public namespace, the function ``lh.caption(vlm, dataset, ...)``. Importing the shim binds the
    module over the function on the package; making the module forward calls to the function keeps
    ``lh.caption(...)`` working either way. ``target`` is ``"module:function"``.
    """
    import importlib
    import types

    if module_name == "__main__":
        return
    mod = sys.modules[module_name]
    path, _, attr = target.partition(":")

    def _target():
        return getattr(importlib.import_module(path), attr)

    class _CallableModule(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return _target()(*args, **kwargs)

    mod.__class__ = _CallableModule
