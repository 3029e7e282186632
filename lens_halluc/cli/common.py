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
