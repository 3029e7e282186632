"""The walkthrough notebooks in notebooks/ run top to bottom on the shipped organism (CPU, no downloads).

Each notebook is executed with nbclient in a fresh kernel started from this interpreter
(``sys.executable -m ipykernel_launcher``, via a kernelspec written to a temporary directory), so the
test needs no installed kernelspec; the kernel runs with ``OMP_NUM_THREADS=1`` and writes only under
a temporary directory (``LENS_HALLUC_NB_RUNS``). Any cell error fails the test.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
KERNEL_NAME = "lens-halluc-test"


@pytest.fixture(scope="module")
def kernel_spec_manager(tmp_path_factory):
    """A kernelspec for *this* Python (the venv's), independent of what `jupyter kernelspec list` shows."""
    from jupyter_client.kernelspec import KernelSpecManager

    root = tmp_path_factory.mktemp("kernels")
    d = root / KERNEL_NAME
    d.mkdir()
    (d / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "lens_halluc test kernel", "language": "python",
        "env": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_VERBOSITY": "error", "PYDEVD_DISABLE_FILE_VALIDATION": "1"},
    }))
    return KernelSpecManager(kernel_dirs=[str(root)])


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    # shared by the notebooks of one session, so 02 and 03 reuse 01's attribution run (each recreates it if missing)
    return tmp_path_factory.mktemp("notebook-runs")


def test_notebooks_found():
    names = [p.name for p in NOTEBOOKS]
    assert names == ["01_attribution.ipynb", "02_why.ipynb", "03_editing.ipynb"], names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path.name}: strip outputs before committing"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, kernel_spec_manager, runs_dir, tmp_path, monkeypatch):
    from jupyter_client.manager import KernelManager

    monkeypatch.setenv("LENS_HALLUC_NB_RUNS", str(runs_dir))  # the kernel inherits this environment
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(path, as_version=4)
    km = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=kernel_spec_manager)
    client = nbclient.NotebookClient(nb, km=km, timeout=600, kernel_name=KERNEL_NAME, allow_errors=False,
                                     resources={"metadata": {"path": str(tmp_path)}})
    t0 = time.perf_counter()
    client.execute()  # raises CellExecutionError on the first failing cell
    elapsed = time.perf_counter() - t0
    print(f"{path.name}: {elapsed:.1f} s")
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    # nothing was written next to the notebook or in the working directory: only under LENS_HALLUC_NB_RUNS
    assert not any(tmp_path.iterdir()), sorted(p.name for p in tmp_path.iterdir())
