"""Both notebooks run headless, top to bottom, without a cell error."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path, shared_compile_cache):
    notebook = nbformat.read(path, as_version=4)
    # Committed without outputs (see the README); executing must not depend on any.
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")
    # Both notebooks run the demo's kernels, as tests/test_demo.py does: the kernel loads them from
    # the session's compilation cache where an earlier process compiled them (conftest.shared_compile_cache).
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=shared_compile_cache)
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors


def test_at_least_the_two_documented_notebooks():
    assert {p.name for p in NOTEBOOKS} >= {"quickstart.ipynb", "merging_experiment.ipynb"}
