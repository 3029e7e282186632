"""Checks of numeric and enumerated options, as plain functions and as argparse ``type=`` callables.

Every command line of lens_halluc validates its flags at parse time with these (so ``--batch-size 0``
or ``--top-k -2`` stops with ``error: argument --top-k: ...`` and exit status 2 instead of a
silently wrong run), and library functions call :func:`check_int` / :func:`check_fraction` on
their keywords with the same messages. They live in the lowest layer so that every command line
(``lens_halluc.cli`` and ``python -m lens_halluc.organism``) can use them.

Example
-------
>>> check_int("batch_size", 8, minimum=1)
8
>>> positive_int("3")
3
>>> import argparse
>>> p = argparse.ArgumentParser(prog="demo")
>>> _ = p.add_argument("--limit", type=positive_int)
>>> p.parse_args(["--limit", "5"]).limit
5
"""
from __future__ import annotations

import argparse
import math
import numbers
from typing import Callable, Iterable


def _range_text(minimum: float | None, maximum: float | None) -> str:
    if minimum is not None and maximum is not None:
        return f"between {minimum:g} and {maximum:g}"
    if minimum is not None:
        return f">= {minimum:g}"
    if maximum is not None:
        return f"<= {maximum:g}"
    return "any value"


def check_int(name: str, value, minimum: int | None = None, maximum: int | None = None,
              allow_none: bool = False, hint: str = "") -> int | None:
    """``value`` as an int in ``[minimum, maximum]``, or ``ValueError`` naming ``name`` and the range.

    Example
    -------
    >>> check_int("max_new_tokens", 0, minimum=1)
    Traceback (most recent call last):
    ...
    ValueError: max_new_tokens must be an integer >= 1, got 0.
    """
    if value is None and allow_none:
        return None
    ok = (isinstance(value, numbers.Integral) and not isinstance(value, bool)) or (
        isinstance(value, float) and value.is_integer())
    if not ok or (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be an integer {_range_text(minimum, maximum)}, got {value!r}.{hint and ' ' + hint}")
    return int(value)


def check_float(name: str, value, minimum: float | None = None, maximum: float | None = None,
                hint: str = "") -> float:
    """``value`` as a finite float in ``[minimum, maximum]``, or ``ValueError`` naming ``name`` and the range.

    Example
    -------
    >>> check_float("noise", 0.3, minimum=0, maximum=1)
    0.3
    """
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be a number {_range_text(minimum, maximum)}, got {value!r}.{hint and ' ' + hint}")
    return float(value)


def check_fraction(name: str, value) -> float:
    """``value`` in ``[0, 1]``.

    Example
    -------
    >>> check_fraction("question_fraction", 0.5)
    0.5
    """
    return check_float(name, value, minimum=0.0, maximum=1.0)


# ------------------------------------------------------------------------------ argparse types
def int_range(minimum: int | None = None, maximum: int | None = None, none: str | None = None) -> Callable[[str], int | None]:
    """An argparse ``type=`` for integers in ``[minimum, maximum]``; the error names the range.

    ``none``: a word (e.g. ``"all"``) that means ``None``.

    Example
    -------
    >>> int_range(1, 10)("4")
    4
    >>> int_range(1, none="all")("all") is None
    True
    """
    def parse(text: str) -> int | None:
        if none is not None and text.strip().lower() == none:
            return None
        extra = f" or '{none}'" if none is not None else ""
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected an integer {_range_text(minimum, maximum)}{extra}, got {text!r}") from None
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(
                f"must be an integer {_range_text(minimum, maximum)}{extra}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in some messages
    return parse


def float_range(minimum: float | None = None, maximum: float | None = None,
                exclusive_minimum: bool = False) -> Callable[[str], float]:
    """An argparse ``type=`` for finite floats in ``[minimum, maximum]`` (``(minimum, ...`` if exclusive).

    Example
    -------
    >>> float_range(0, 1)("0.25")
    0.25
    """
    def parse(text: str) -> float:
        rng = _range_text(minimum, maximum)
        if exclusive_minimum and minimum is not None:
            rng = f"> {minimum:g}" + (f" and <= {maximum:g}" if maximum is not None else "")
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number {rng}, got {text!r}") from None
        bad = not math.isfinite(value)
        if minimum is not None:
            bad |= value <= minimum if exclusive_minimum else value < minimum
        if maximum is not None:
            bad |= value > maximum
        if bad:
            raise argparse.ArgumentTypeError(f"must be a number {rng}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


#: argparse types for the common cases.
positive_int = int_range(1)
non_negative_int = int_range(0)
fraction = float_range(0.0, 1.0)
positive_float = float_range(0.0, exclusive_minimum=True)
non_negative_float = float_range(0.0)


def choice(options: Iterable[str], what: str = "value", aliases: dict[str, str] | None = None) -> Callable[[str], str]:
    """An argparse ``type=`` accepting one of ``options`` (case-insensitive); the error lists them.

    ``aliases`` maps other spellings onto an option (``{"bf16": "bfloat16"}``).

    Example
    -------
    >>> choice(["float32", "bfloat16", "float16"], "dtype", {"bf16": "bfloat16"})("BF16")
    'bfloat16'
    """
    options = list(options)
    aliases = {k.lower(): v for k, v in (aliases or {}).items()}

    def parse(text: str) -> str:
        t = text.strip().lower()
        for o in options:
            if t == o.lower():
                return o
        if t in aliases:
            return aliases[t]
        listed = ", ".join(options[:-1]) + (f" or {options[-1]}" if len(options) > 1 else options[0])
        raise argparse.ArgumentTypeError(f"unknown {what} {text!r}; use {listed}")

    parse.__name__ = what
    return parse
