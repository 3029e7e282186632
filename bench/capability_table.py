"""The README's architecture × capability table, measured: every cell is the outcome of a marked test.

Runs the tests marked ``@pytest.mark.capability(...)`` (parametrized by ``family``) with
``LH_CAPABILITIES`` set, and renders one row per family, one column per capability:
``✓`` passed, ``n/a`` the method raised ``NotDefinedForArchitecture`` as the test expects (the reason
is a numbered note under the table), ``✗`` failed, ``skip`` skipped (with its reason).

Usage
-----
    .venv/bin/python bench/capability_table.py            # print the table
    .venv/bin/python bench/capability_table.py --write    # also replace it in README.md
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- capabilities:start -->", "<!-- capabilities:end -->"
SYMBOL = {"passed": "✓", "refused": "n/a", "failed": "✗", "skipped": "skip"}
#: Column order of the table (capabilities not listed here follow, in the order the tests ran).
ORDER = ("load offline", "attribute CLI", "attribution == loop", "greedy == generate", "sampling, beams == generate",
         "editable == eager", "ablate", "adhh", "reweight_text", "reweight_image", "vcd", "seed", "causalmm_llm",
         "causalmm_vision", "dola", "opera", "bias", "inheritance", "drift", "confounders")


def measure(pytest_args: list[str]) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "cells.json"
        env = {**os.environ, "LH_CAPABILITIES": str(out), "HF_HUB_OFFLINE": "1"}
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "capability", "-p", "no:cacheprovider",
                        *pytest_args, "tests"], cwd=ROOT, env=env, check=False)
        return json.loads(out.read_text()) if out.exists() else []


def render(cells: list[dict]) -> str:
    from lens_halluc.models.zoo import FAMILIES

    seen = list(dict.fromkeys(c["capability"] for c in cells))
    capabilities = [c for c in ORDER if c in seen] + [c for c in seen if c not in ORDER]
    grid: dict[tuple[str, str], list[dict]] = {}
    for c in cells:
        grid.setdefault((c["family"], c["capability"]), []).append(c)
    notes: dict[str, int] = {}
    lines = ["| family | " + " | ".join(capabilities) + " |", "|---" * (len(capabilities) + 1) + "|"]
    for fam in FAMILIES:
        row = []
        for cap in capabilities:
            got = grid.get((fam, cap), [])
            if not got:
                row.append("")
                continue
            worst = max(got, key=lambda c: ["passed", "refused", "skipped", "failed"].index(c["status"]))
            text = SYMBOL[worst["status"]]
            if worst["status"] in ("refused", "skipped") and worst.get("reason"):
                k = notes.setdefault(worst["reason"], len(notes) + 1)
                text += f" [{k}]"
            row.append(text)
        lines.append(f"| {fam} | " + " | ".join(row) + " |")
    lines.append("")
    lines += [f"[{k}] {reason}" for reason, k in notes.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help="replace the table between the markers in README.md")
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments (e.g. -k qwen)")
    args = ap.parse_args(argv)
    table = render(measure(args.pytest_args))
    print(table)
    if args.write:
        readme = ROOT / "README.md"
        text = readme.read_text()
        if START not in text or END not in text:
            raise SystemExit(f"README.md has no {START} ... {END} markers.")
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        readme.write_text(head + START + "\n" + table + "\n" + END + tail)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
