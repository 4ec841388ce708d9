# Set-up and the two main commands. `make demo` and `make test` work on a fresh machine: they create .venv,
# install torch (from the pinned wheels), DeepSpeed, timm, webdataset and this package, then run.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.14.1 torchvision==0.29.1

$(BIN)/dsincubate: setup.py
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

.PHONY: install demo test test-fast test-build test-gpu test-harness test-cluster lint clean-demo
install: $(BIN)/dsincubate

demo: install
	$(BIN)/dsincubate pipeline --recipe demo --output runs/demo

# Test tiers (markers in pytest.ini): `test` runs every test (CI: .ci/run); `test-fast` the unit tests only (no
# subprocess runs of the launcher/CLI, no nvcc compile, no GPU, no multi-host); `test-build` the nvcc compile tests.
test: install
	$(BIN)/python -m pytest -q tests --durations=30

test-fast: install
	$(BIN)/python -m pytest -q tests -m "not integration and not build and not gpu and not cluster and not harness"

test-build: install
	$(BIN)/python -m pytest -q tests -m build

test-gpu: install
	$(BIN)/python -m pytest -q tests -m gpu

# The csrc CUDA kernels run on the CPU execution harness (tests/ops/cpu_harness: g++ + ASan/UBSan, no GPU). On a
# full pass it refreshes the package's record of what passed (dsincubate/ops/kernel_verification.json, shown by
# `dsincubate ops`); commit that file with kernel changes.
test-harness: install
	DSI_VERIFICATION_FILE=$(CURDIR)/dsincubate/ops/kernel_verification.json $(BIN)/python -m pytest -q tests -m harness

# The cluster tier (tests/cluster/, part of `test`): 4 hosts as network namespaces with sshd, pdsh and a one-machine
# SLURM, built by the tests themselves (root; Debian's openssh-server, pdsh, slurm-wlm, munge via apt-get).
test-cluster: install
	$(BIN)/python -m pytest -q tests/cluster -m cluster --durations=0

# Line length: ruff's E501 at 120 characters over the package and benchmarks/ (ruff comes with the test extra).
# tests/unit/test_code_structure.py checks the same limit, with the 400-line module and 60-line function limits.
lint: install
	$(BIN)/ruff check --select E501 --line-length 120 dsincubate benchmarks

clean-demo:
	rm -rf runs/demo
