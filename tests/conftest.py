"""Test tiers (markers registered in pytest.ini, --strict-markers): unit tests (fast, CPU, in-process),
`integration` (real `dsincubate`/`deepspeed` commands in subprocesses on the debug recipe), `build` (nvcc compiles the
csrc kernels), `gpu` (kernel tests, skipped with a reason without CUDA), `cluster` (multi-host tier). `make test` runs
them all; `make test-fast` runs only the unit tier."""
