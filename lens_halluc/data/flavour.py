"""The one switch between a method's ``reference`` computation and our ``corrected`` variant.

Every method whose paper code made a choice we would make differently takes ``flavour=``:

* ``"reference"`` (the default everywhere): what the paper's released code computes, including
  choices that look odd (a synonym entry that can never match, the last query row only, sampling).
* ``"corrected"``: our variant where it differs (normalised synonyms, every row edited, ...).

Parameters whose value depends on the flavour default to ``None`` and are resolved from the
method's table with :func:`resolve`; an explicit value always wins. Accidents that are not part
of any method (a shared KV cache, rows keyed by index, hard-coded offsets, crashes) are fixed in
both flavours. ``FIDELITY.md`` lists every difference and the test that pins it.

Example
-------
>>> check_flavour("reference")
'reference'
>>> TABLE = {"reference": {"tau": 0.5}, "corrected": {"tau": 0.5, "rows": "all"}}
>>> resolve(TABLE, "corrected", "rows", None), resolve(TABLE, "corrected", "rows", "last")
('all', 'last')
"""
from __future__ import annotations

from typing import Any, Mapping

__all__ = ["DEFAULT_FLAVOUR", "FLAVOURS", "check_flavour", "resolve"]

FLAVOURS: tuple[str, ...] = ("reference", "corrected")
DEFAULT_FLAVOUR = "reference"


def check_flavour(value: Any, owner: str = "") -> str:
    """``value`` if it names a flavour; a clear ``ValueError`` otherwise."""
    if value not in FLAVOURS:
        who = f"{owner}: " if owner else ""
        raise ValueError(f"{who}flavour must be 'reference' (the paper's computation, the default) or "
                         f"'corrected' (our variant; see FIDELITY.md), got {value!r}.")
    return value


def resolve(table: Mapping[str, Mapping[str, Any]], flavour: str, name: str, value: Any) -> Any:
    """``value`` unless it is ``None``; then the flavour's entry for ``name`` in ``table``.

    ``table`` maps each flavour to ``{parameter: value}``; a parameter missing from a flavour's
    entry is a programming error (``KeyError`` naming it).
    """
    if value is not None:
        return value
    check_flavour(flavour)
    try:
        return table[flavour][name]
    except KeyError:
        raise KeyError(f"no {flavour!r} default for {name!r}; the table has {dict(table.get(flavour, {}))}") from None
