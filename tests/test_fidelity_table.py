"""FIDELITY.md: every row names at least one test, and every named test exists.

A row's last cell lists ``tests/<file>.py::<test>`` references; ``::<test>`` alone continues the last
file named in the row. A parametrised id (``test_x[abs_prob_diff]``) names the function ``test_x``.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REF = re.compile(r"(tests/[\w/]+\.py)?::(\w+)")


def _rows() -> list[str]:
    text = (ROOT / "FIDELITY.md").read_text()
    return [line for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| Method") and not line.startswith("|---")]


def _tests(cell: str) -> list[tuple[str, str]]:
    refs, current = [], None
    for path, name in REF.findall(cell):
        current = path or current
        if current is None:
            raise AssertionError(f"'::{name}' names no file: {cell!r}")
        refs.append((current, name))
    return refs


def test_the_table_has_a_row_per_method_choice():
    rows = _rows()
    methods = {r.split("|")[1].strip() for r in rows}
    assert len(rows) >= 100
    for m in ("CHAIR", "POPE", "ADHH", "TFHH", "VCD", "CausalMM", "DoLa", "OPERA"):
        assert any(m in x for x in methods), f"no FIDELITY row for {m}"


@pytest.mark.parametrize("row", _rows(), ids=lambda r: " / ".join(c.strip()[:40] for c in r.split("|")[1:3]))
def test_every_row_is_pinned_by_an_existing_test(row):
    cells = [c.strip() for c in re.split(r"(?<!\\)\|", row.strip().strip("|"))]  # "\|" is a pipe inside a cell
    assert len(cells) == 6, f"a row has 6 cells (method, choice, reference, reference flavour, corrected, test): {row!r}"
    refs = _tests(cells[-1])
    assert refs, f"row names no test: {row!r}"
    for path, name in refs:
        f = ROOT / path
        assert f.is_file(), f"{path} (named in FIDELITY.md) does not exist"
        assert re.search(rf"^\s*def {name}\(", f.read_text(), re.M), f"{path} has no test {name} (named in FIDELITY.md)"
