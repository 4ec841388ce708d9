"""Test tiers: unit tests (fast, CPU), `integration` (real launchers in subprocesses on the debug recipe), `gpu`
(kernel tests, skipped with a reason without CUDA). `make test` runs them all; `make test-fast` skips integration."""
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu") if not os.environ.get("CUDA_VISIBLE_DEVICES", "x") else None


def pytest_configure(config):
    config.addinivalue_line("markers", "integration: runs the real dsincubate/deepspeed commands in subprocesses")
