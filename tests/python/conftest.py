import os
import pathlib

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _lib_path():
    return pathlib.Path(os.environ.get("SALAD_LIB", ROOT / "build" / "libsalad.so"))


@pytest.fixture(scope="session")
def salad_ops():
    """torch.ops.salad, loaded from the built shared library."""
    path = _lib_path()
    if not path.exists():
        pytest.fail(f"SALAD_LIB: expected the built library at {path} (build first: scripts/test.sh)")
    torch.ops.load_library(str(path))
    return torch.ops.salad


@pytest.fixture(scope="session")
def salad_cli():
    path = pathlib.Path(os.environ.get("SALAD_CLI", ROOT / "build" / "salad"))
    if not path.exists():
        pytest.fail(f"SALAD_CLI: expected the built CLI at {path}")
    return str(path)
