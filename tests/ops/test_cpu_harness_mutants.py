"""The CPU execution harness can fail: deliberately broken copies of the kernels are caught.

Each mutant is a copy of csrc/ made at test time with one textual change (an off-by-one row bound, a vector
path without its tail check, a removed __syncthreads, a wrong shuffle lane, a shuffle mask that leaves out the
calling lanes). Only the mutated file is recompiled (the object cache is keyed by content). Every mutant must be
reported by the mechanism that is meant to catch it: AddressSanitizer, the schedule comparison (RACE), a
harness error, or a mismatch against the PyTorch reference. If a kernel's text changes so that a mutation no
longer applies, the test fails rather than silently testing nothing.

    CUDA_HOME=/usr/local/cuda python -m pytest tests/ops/test_cpu_harness_mutants.py
"""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import torch

from cpu_harness import harness
from test_cpu_harness import attn_case, check_attn, check_ln, ln_case

pytestmark = [pytest.mark.harness,
              pytest.mark.skipif(harness.unavailable_reason() is not None,
                                 reason=f"CPU harness unavailable: {harness.unavailable_reason()}")]


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to csrc/
    old: str
    new: str
    cases: tuple  # ("ln" | "attn", args of ln_case / attn_case)
    expect: str  # how it must be caught: "sanitizer" (ASan/UBSan) | "harness-error" | "mismatch" | "race-or-mismatch"


MUTANTS = [
    Mutant("ln-row-bound-off-by-one", "layernorm/layernorm_kernels.cu",
           "if (row >= rows) return;  // whole warp leaves together",
           "if (row > rows) return;  // whole warp leaves together",
           (("ln", (torch.float32, 37, 13, True)),), "sanitizer"),
    Mutant("ln-vector-path-without-tail-check", "layernorm/layernorm_kernels.cu",
           "const bool vec = aligned && cols % kVec == 0;", "const bool vec = aligned;",
           (("ln", (torch.bfloat16, 5, 257, False)),), "sanitizer"),
    Mutant("attn-fwd-removed-barrier", "attention/attention_fwd.cu",
           "__syncthreads();  // all lanes are done with the previous K/V tile", "",
           (("attn", (torch.float16, 1, 2, 129, 64, True)),), "race-or-mismatch"),
    Mutant("attn-fwd-wrong-shuffle-lane", "attention/attention_fwd.cu",
           "__shfl_sync(0xffffffffu, s[j], (lane & ~(kTpr - 1)) | t)",
           "__shfl_sync(0xffffffffu, s[j], (lane & ~(kTpr - 1)) | ((t + 1) & (kTpr - 1)))",
           (("attn", (torch.bfloat16, 1, 1, 40, 16, False)),), "mismatch"),
    Mutant("attn-bwd-shuffle-mask-excludes-lanes", "attention/attention_bwd.cu",
           "const float pj = __shfl_sync(0xffffffffu, s[j], src);",
           "const float pj = __shfl_sync(0x0000ffffu, s[j], src);",
           (("attn", (torch.float16, 1, 1, 40, 16, True)),), "harness-error"),
]


def _mutated_csrc(root, mutant: Mutant):
    dst = root / mutant.name / "csrc"
    shutil.copytree(harness.REPO_CSRC, dst)
    path = dst / mutant.file
    text = path.read_text()
    assert text.count(mutant.old) == 1, f"{mutant.name}: the text to mutate is not in {mutant.file} exactly once"
    path.write_text(text.replace(mutant.old, mutant.new))
    return dst


@pytest.fixture(scope="module")
def mutant_runs(tmp_path_factory):
    """Build every mutant (two compiles at a time) and run its cases; {name: (cases, Run)}."""
    root = tmp_path_factory.mktemp("mutants")

    def one(mutant):
        exe = harness.build(_mutated_csrc(root, mutant), jobs=1)
        cases = [(kind, ln_case(*args) if kind == "ln" else attn_case(*args)) for kind, args in mutant.cases]
        return cases, harness.run(exe, [c for _, c in cases], timeout=300)

    harness.build()  # the unmutated objects first, so the mutants only compile their one file
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip([m.name for m in MUTANTS], pool.map(one, MUTANTS)))


def _mismatch(cases, run) -> str | None:
    for (kind, case), res in zip(cases, run.results):
        if res.status != "OK":
            continue
        try:
            (check_ln if kind == "ln" else check_attn)(case, res)
        except AssertionError as exc:
            return str(exc).splitlines()[0]
    return None


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_broken_kernel_copy_is_caught_by_the_harness(mutant_runs, mutant):
    cases, run = mutant_runs[mutant.name]
    statuses = [r.status for r in run.results]
    sanitizer = "ERROR: AddressSanitizer" in run.stderr or "runtime error:" in run.stderr  # ASan / UBSan
    harness_error = "DSI_HARNESS_ERROR" in run.stderr
    race = "RACE" in statuses
    mismatch = _mismatch(cases, run)
    caught = {"sanitizer": sanitizer, "harness-error": harness_error, "race": race, "mismatch": mismatch is not None,
              "race-or-mismatch": race or mismatch is not None}[mutant.expect]
    assert caught, (f"{mutant.name} was not caught by {mutant.expect}: statuses {statuses}, sanitizer={sanitizer}, "
                    f"harness_error={harness_error}, mismatch={mismatch}\n{run.stderr[-3000:]}")
