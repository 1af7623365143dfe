"""Executes the notebooks top to bottom at small sizes (MLBFGS_NB_QUICK=1)."""

import sys
from pathlib import Path

import nbclient
import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@pytest.mark.parametrize("name", [
    # 60 s; its code is the README quickstart, which tests/test_wheel.py runs.
    pytest.param("quickstart.ipynb", marks=pytest.mark.slow), "algorithm_2d.ipynb"])
def test_notebook_runs(name, monkeypatch):
    # The kernel inherits this environment. jupyter_client starts a kernelspec whose
    # argv[0] is "python" with sys.executable, i.e. with this interpreter's packages.
    monkeypatch.setenv("MLBFGS_NB_QUICK", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert all(not c.get("outputs") and c.get("execution_count") is None
               for c in nb.cells if c.cell_type == "code"), f"clear the outputs of {name}"
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=120,
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()
    assert nb.cells[-1].outputs[0]["text"].strip() == sys.executable
