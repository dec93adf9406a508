"""The analysis notebooks run top to bottom headless (on the tiny random Llama, for speed)."""
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_headless(path, monkeypatch, data_root):
    monkeypatch.setenv("ATOM_LAB_NB_MODEL", "tiny_random")
    monkeypatch.setenv("ATOM_LAB_NB_WINDOWS", "2")
    monkeypatch.setenv("ATOM_LAB_NB_SEQLEN", "128")
    monkeypatch.setenv("ATOM_LAB_DATA", str(data_root))
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
