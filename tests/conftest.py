"""Test tiers: unit tests (fast, CPU), `integration` (real launchers in subprocesses on the debug recipe), `gpu`
(kernel tests, skipped with a reason without CUDA). `make test` runs them all; `make test-fast` skips integration."""


def pytest_configure(config):
    config.addinivalue_line("markers", "integration: runs the real dsincubate/deepspeed commands in subprocesses")
