"""Shared setup for the dsincubate.ops tests: `gpu` tests skip without CUDA, and a clean dispatcher per test.
The markers (`gpu`, `build`) are registered in pytest.ini.

    python -m pytest tests/ops            # CPU tests (GPU tests skip with a reason)
    python -m pytest tests/ops -m gpu     # only the GPU tests (need CUDA)
"""

from pathlib import Path

import pytest
import torch

from dsincubate.ops import dispatch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device: torch.cuda.is_available() is False")
    here = Path(__file__).parent
    for item in items:  # this hook sees the whole session; only touch tests/ops
        if "gpu" in item.keywords and here in Path(item.path).parents:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def clean_dispatch():
    """Every test starts with no decisions, no disabled kernels and only the built-in implementations."""
    builtin = {op: dict(impls) for op, impls in dispatch._IMPLS.items()}
    dispatch.reset()
    yield
    for op, impls in builtin.items():
        dispatch._IMPLS[op] = impls
    dispatch.reset()
