"""Shared setup for the dsincubate.ops tests: `gpu` tests skip without CUDA, and a clean dispatcher per test.
The markers (`gpu`, `build`) are registered in pytest.ini.

    python -m pytest tests/ops            # CPU tests (GPU tests skip with a reason)
    python -m pytest tests/ops -m gpu     # only the GPU tests (need CUDA)
"""

from pathlib import Path

import pytest
import torch

from dsincubate.ops import dispatch


# GPU evidence for `dsincubate ops`: when every collected GPU test of an op passed on a CUDA device, the session
# records it (dsincubate/ops/verification.py) against the current kernel sources.
_GPU_TESTS = {"layernorm": "test_layernorm_", "attention": "test_attention_"}
_gpu_collected: dict[str, set] = {op: set() for op in _GPU_TESTS}
_gpu_passed: dict[str, set] = {op: set() for op in _GPU_TESTS}


def _gpu_op(item_or_report) -> str | None:
    nodeid = item_or_report.nodeid
    if "test_gpu_kernels.py::" not in nodeid:
        return None
    name = nodeid.split("::")[-1]
    return next((op for op, prefix in _GPU_TESTS.items() if name.startswith(prefix)), None)


def pytest_runtest_logreport(report):
    op = _gpu_op(report)
    if op is not None and report.when == "call" and report.passed:
        _gpu_passed[op].add(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    if not torch.cuda.is_available():
        return
    from dsincubate.ops import verification

    for op, collected in _gpu_collected.items():
        if collected and collected == _gpu_passed[op]:
            verification.record(op, "gpu", {**verification.gpu_details("make test-gpu (tests/ops/test_gpu_kernels.py)"),
                                            "tests": len(collected)})


def pytest_collection_modifyitems(config, items):
    for item in items:
        op = _gpu_op(item)
        if op is not None:
            _gpu_collected[op].add(item.nodeid)
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
