"""Shared command-line plumbing: model options and friendly error exits."""
from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from typing import Iterator


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model/--device/--dtype/--template/--attn-implementation, the same on every CLI."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="checkpoint directory or Hugging Face repo id in the local cache "
                        "(default: the shipped model organism)")
    g.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    g.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the checkpoint's)")
    g.add_argument("--template", default="llava-1.5", help="prompt template name (default: llava-1.5)")
    g.add_argument("--trust-remote-code", action="store_true", help="allow custom modelling code in the checkpoint")


def load_model_from_args(args: argparse.Namespace):
    from ..models import load_vlm

    return load_vlm(args.model, device=args.device, dtype=args.dtype, template=args.template,
                    trust_remote_code=args.trust_remote_code)


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
