"""The token-choice flags of ``python -m lens_halluc.caption`` / ``answer``: greedy, ``--sample`` or ``--num-beams``.

Example
-------
>>> p = argparse.ArgumentParser(prog="demo")
>>> add_token_choice_args(p)
>>> token_choice(p, p.parse_args(["--sample", "--temperature", "0.7", "--seed", "3"]))
Sampling(temperature=0.7, top_k=None, top_p=None, seed=3)
>>> token_choice(p, p.parse_args(["--num-beams", "5"]))
Beams(num_beams=5, length_penalty=1.0, early_stopping=False)
>>> token_choice(p, p.parse_args([])) is None
True
"""
from __future__ import annotations

import argparse

from ..data.options import float_range, int_range, non_negative_int, positive_float

_SAMPLING_FLAGS = {"temperature": "--temperature", "sample_top_k": "--top-k", "sample_top_p": "--top-p",
                   "seed": "--seed"}


class _Given(argparse.Action):
    """Store the value and remember that the flag was given (so a sampling flag without --sample is refused)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        given = set(getattr(namespace, "_given_flags", set()))
        given.add(option_string)
        setattr(namespace, "_given_flags", given)


def add_token_choice_args(p: argparse.ArgumentParser) -> None:
    """--sample/--temperature/--top-k/--top-p/--seed and --num-beams (default: greedy argmax)."""
    g = p.add_argument_group("token choice (default: greedy argmax)")
    g.add_argument("--sample", action="store_true",
                   help="sample each token (seeded multinomial) instead of taking the argmax; every item draws from "
                        "its own generator seeded from (--seed, its image/question id), so the batch size never "
                        "changes a result")
    g.add_argument("--temperature", type=positive_float, default=1.0, action=_Given,
                   help="with --sample: softmax temperature > 0")
    g.add_argument("--top-k", dest="sample_top_k", type=int_range(1, none="all"), default=None, action=_Given,
                   metavar="K", help="with --sample: keep the K most likely tokens, K >= 1 or 'all' (None: all)")
    g.add_argument("--top-p", dest="sample_top_p", type=float_range(0.0, 1.0, exclusive_minimum=True), default=None,
                   action=_Given, metavar="P",
                   help="with --sample: keep the smallest set of most likely tokens with probability >= P, "
                        "0 < P <= 1 (None: all)")
    g.add_argument("--seed", type=non_negative_int, default=0, action=_Given, help="with --sample: seed >= 0")
    g.add_argument("--num-beams", type=int_range(1), default=None, metavar="K",
                   help="beam search with K >= 1 beams, as transformers' generate(num_beams=K, do_sample=False); "
                        "not with --sample (None: no beam search)")


def token_choice(p: argparse.ArgumentParser, args: argparse.Namespace):
    """The ``sampling=`` value the flags ask for (``None`` greedy, a ``Sampling`` or a ``Beams``); misuse → ``p.error``."""
    from ..generation.sampling import Beams, Sampling

    given = sorted(getattr(args, "_given_flags", set()))
    if args.sample and args.num_beams is not None:
        p.error("--sample and --num-beams exclude each other: sample, or search with beams.")
    if given and not args.sample:
        p.error(f"{', '.join(given)} only apply with --sample.")
    if args.sample:
        return Sampling(temperature=args.temperature, top_k=args.sample_top_k, top_p=args.sample_top_p, seed=args.seed)
    if args.num_beams is not None:
        return Beams(num_beams=args.num_beams)
    return None
