"""Shared test setup: the offline data root and the `gpu` marker.

The data root is $ATOM_LAB_DATA, else ../shared/data relative to the repository (exported so that
code reading the environment sees it too). A `gpu`-marked test is skipped when the CuPy/CUDA
kernel backend is not available.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA_ROOT = REPO.parent / "shared" / "data"

os.environ.setdefault("ATOM_LAB_DATA", str(DEFAULT_DATA_ROOT))
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def pytest_collection_modifyitems(config, items):
    from atom_lab.cuda import _probe, kernel_backend_available

    if kernel_backend_available():
        return
    skip_gpu = pytest.mark.skip(reason=f"kernel backend unavailable: {_probe()}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = Path(os.environ["ATOM_LAB_DATA"])
    if not root.is_dir():
        pytest.skip(f"offline data root {root} not found (set ATOM_LAB_DATA)")
    return root
