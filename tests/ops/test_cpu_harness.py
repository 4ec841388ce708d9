"""CPU execution harness tier: the csrc/ CUDA kernels themselves, run on the CPU and checked against the PyTorch
references (dsincubate/ops/reference.py, float64) with the GPU tier's tolerances (kernel_tolerances.py).

The unchanged .cu files are compiled by g++ with tests/ops/cpu_harness/dsi_cpu_cuda.h (one fiber per CUDA
thread, real __syncthreads and warp-shuffle semantics, per-block shared memory, launch checks) under
AddressSanitizer + UndefinedBehaviorSanitizer. Every case runs under several thread schedules that must agree
bit for bit (a missing barrier shows up as "RACE"); outputs start as NaN so an unwritten element fails.
test_cpu_harness_mutants.py shows the tier can fail. A session compiles once (cached, ~30 s cold).

    CUDA_HOME=/usr/local/cuda python -m pytest tests/ops/test_cpu_harness.py      # make test-harness
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from cpu_harness import harness
from dsincubate.ops import reference, verification
from kernel_tolerances import ATTN_TOL, LN_TOL

pytestmark = [pytest.mark.harness,
              pytest.mark.skipif(harness.unavailable_reason() is not None,
                                 reason=f"CPU harness unavailable: {harness.unavailable_reason()}")]

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
ONE = "lowest"  # the biggest cases run one schedule; every shape class is also covered by a 3-schedule case

# (rows, cols): one image of DeiT-T/S (192/384), ViT-B/16 (768), ViT-L/16 (1024), ViT-H/14 (1280 x 257 tokens),
# ViT-B at 384 (577 tokens), the GPU tier's odd widths (540, 1000, 13 and 4096 / 13000 = the uncached wide-row
# path), and edges: 1 row, 1 column, exactly one vector, one past a vector or a warp of vectors, an uncached
# width that is not a multiple of the vector.
LN_SHAPES = [(197, 192), (197, 384), (197, 540), (197, 768), (197, 1024), (257, 1280), (577, 768), (37, 1000),
             (37, 13), (5, 4096), (3, 13000), (1, 1), (1, 768), (7, 1), (3, 8), (3, 4), (2, 33), (5, 257), (2, 3077)]
LN_CASES = [(dt, r, c, res, False, ONE if r * c > 60_000 else harness.ALL_SCHEDULES)
            for dt in (F32, BF16, F16) for (r, c) in LN_SHAPES for res in (True, False)]
# Misaligned rows (the vector width divides 768, the data does not start on 16 bytes): the scalar fallback.
LN_CASES += [(dt, 41, 768, True, True, harness.ALL_SCHEDULES) for dt in (BF16, F16)]
# > 1024 chunks of 128 rows: the dgamma/dbeta reduction switches to larger chunks.
LN_CASES += [(F32, 131_073, 16, False, False, ONE)]

# (batch, heads, seq, head_dim, packed): seq 1 / one tile / one past a tile (fwd tiles 64 keys, bwd 32), head dims
# 1, odd, 32, 45, 63, 64, 65 (next padded size), 80, 127, 128 (the supported maximum); packed = strided views of
# a [B, N, 3, H, D] qkv buffer as timm makes them, else separate contiguous tensors. Then the ViT shapes at
# batch 1: ViT-B/16 and ViT-L/16 (197 tokens, head dim 64), ViT-H/14 (257 tokens, 80), DeiT-B/16 at 384 (577,
# 64); heads only repeat the grid (B x H blocks of identical code; B, H > 1 indexing is covered above), so
# 2 of them keep the run short.
ATTN_SMALL = [(2, 3, 65, 64, True), (1, 2, 37, 128, False), (2, 1, 1, 32, True), (1, 3, 100, 7, False),
              (1, 1, 33, 1, True), (1, 1, 64, 65, False), (2, 2, 32, 45, True), (1, 1, 129, 63, True),
              (1, 2, 31, 127, True), (1, 1, 96, 80, False)]
ATTN_VIT = [(1, 2, 197, 64, True), (1, 2, 257, 80, True), (1, 2, 197, 64, False)]
ATTN_CASES = [(dt, *s, harness.ALL_SCHEDULES) for dt in (BF16, F16) for s in ATTN_SMALL]
ATTN_CASES += [(dt, *s, ONE) for dt in (BF16, F16) for s in ATTN_VIT]
ATTN_CASES += [(F16, 1, 1, 577, 64, True, ONE)]


def ln_case(dtype, rows, cols, residual, misalign=False, schedules=harness.ALL_SCHEDULES) -> harness.LNCase:
    case = harness.LNCase(dtype, rows, cols, residual, misalign, schedules=schedules)
    gen = torch.Generator().manual_seed(rows * 7919 + cols * 31 + residual)

    def rnd(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=gen) * scale + shift

    # A non-zero mean and spread exercise the mean subtraction and the variance pass.
    case.inputs = {"x": rnd(rows, cols, scale=2.0, shift=0.5).to(dtype), "gamma": rnd(cols, scale=0.3, shift=1.0),
                   "beta": rnd(cols, scale=0.3), "dy": rnd(rows, cols).to(dtype)}
    if residual:
        case.inputs.update(r=rnd(rows, cols).to(dtype), ds=rnd(rows, cols).to(dtype))
    return case


def attn_case(dtype, batch, heads, seq, head_dim, packed, schedules=harness.ALL_SCHEDULES) -> harness.AttnCase:
    case = harness.AttnCase(dtype, batch, heads, seq, head_dim, packed, schedules=schedules)
    gen = torch.Generator().manual_seed(seq * 31 + head_dim * 7 + heads)
    if packed:
        case.inputs = {"qkv": torch.randn(batch, seq, 3, heads, head_dim, generator=gen).to(dtype)}
    else:
        case.inputs = {n: torch.randn(batch, heads, seq, head_dim, generator=gen).to(dtype) for n in "qkv"}
    case.inputs["dout"] = torch.randn(batch, heads, seq, head_dim, generator=gen).to(dtype)
    return case


def assert_close(got, want, tol, what, floor=0.0):
    """max |got - want| <= tol * max(max |want|, floor). `floor` is for a reference that is exactly zero in
    exact arithmetic (dq, dk at seq 1: softmax over one key), where fp32 rounding noise is the right answer."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values (an element never written, or overflow)"
    diff = (got.double() - want.double()).abs().max().item() if want.numel() else 0.0
    scale = max(want.abs().max().item() if want.numel() else 0.0, floor, 1e-12)
    assert diff <= tol * scale, f"{what}: relative error {diff / scale:.3g} > {tol}"


def check_ln(case: harness.LNCase, res: harness.Result) -> None:
    """Raises AssertionError unless the harness outputs match the float64 reference (fwd and bwd)."""
    assert res.status == "OK", f"{res.status}: {res.detail}"
    rows, cols, dt, tol = case.rows, case.cols, case.dtype, LN_TOL[case.dtype]
    got = {k: v.view(rows, cols) if k in ("y", "s", "dx") else v for k, v in res.outputs.items()}
    inp = case.inputs
    names = ["x", "r", "gamma", "beta"] if case.residual else ["x", "gamma", "beta"]
    leaves = [inp[n].double().requires_grad_(True) for n in names]
    if case.residual:
        y, s = reference.add_layer_norm(*leaves, case.eps)
        torch.autograd.backward([y, s], [inp["dy"].double(), inp["ds"].double()])
        assert torch.equal(got["s"], inp["x"] + inp["r"]), "s must be x + r rounded exactly like torch's add"
        s_kernel = got["s"].double()
    else:
        y = reference.layer_norm(*leaves, case.eps)
        y.backward(inp["dy"].double())
        s_kernel = inp["x"].double()
    assert_close(got["y"], y.detach(), tol, "y")
    mean = s_kernel.mean(-1)
    rstd = (((s_kernel - mean[:, None]) ** 2).mean(-1) + case.eps).rsqrt()
    assert_close(got["mean"], mean, 1e-5, "mean")
    assert_close(got["rstd"], rstd, 1e-5, "rstd")
    assert_close(got["dx"], leaves[0].grad, tol, "dx")
    assert_close(got["dgamma"], leaves[-2].grad, tol, "dgamma")
    assert_close(got["dbeta"], leaves[-1].grad, tol, "dbeta")


def check_attn(case: harness.AttnCase, res: harness.Result) -> None:
    """Raises AssertionError unless o, the log2-domain logsumexp and dq/dk/dv match the float64 reference."""
    assert res.status == "OK", f"{res.status}: {res.detail}"
    B, H, N, D, tol = case.batch, case.heads, case.seq, case.head_dim, ATTN_TOL[case.dtype]
    if case.packed:
        qkv = case.inputs["qkv"].double().requires_grad_(True)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        leaves = [qkv]
    else:
        leaves = [case.inputs[n].double().requires_grad_(True) for n in "qkv"]
        q, k, v = leaves
    o = reference.attention(q, k, v, case.scale)
    o.backward(case.inputs["dout"].double())
    got_o = res.outputs["o"].view(B, N, H, D).transpose(1, 2)
    assert_close(got_o, o.detach(), tol, "o")
    lse = torch.logsumexp((q @ k.transpose(-2, -1)).detach() * case.scale, dim=-1) / math.log(2)
    assert_close(res.outputs["lse"].view(B, H, N), lse, 1e-4, "lse (log2 domain)")
    if case.packed:
        grads = res.outputs["dqkv"].view(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        want = leaves[0].grad.permute(2, 0, 3, 1, 4).unbind(0)
    else:
        grads = [res.outputs[f"d{n}"].view(B, H, N, D) for n in "qkv"]
        want = [t.grad for t in leaves]
    floor = 1e-3 * max(w.abs().max().item() for w in want)
    for name, g, w in zip(("dq", "dk", "dv"), grads, want):
        assert_close(g, w, tol, name, floor)


@pytest.fixture(scope="session")
def harness_exe():
    return harness.build()


@pytest.fixture(scope="module")
def runs(harness_exe):
    """One driver process for all LayerNorm cases and one for all attention cases, side by side (2 cores)."""
    ln = [ln_case(*c) for c in LN_CASES]
    attn = [attn_case(*c) for c in ATTN_CASES]
    with ThreadPoolExecutor(max_workers=2) as pool:
        ln_run, attn_run = pool.map(lambda cs: harness.run(harness_exe, cs), (ln, attn))
    yield {"ln": (ln, ln_run), "attn": (attn, attn_run)}


def _id(case) -> str:
    dt = {F32: "fp32", BF16: "bf16", F16: "fp16"}[case[0]]
    return f"{dt}-" + "x".join(str(int(v)) for v in case[1:-1])


_PASSED: dict[str, set] = {"ln": set(), "attn": set()}


@pytest.mark.parametrize("index", range(len(LN_CASES)), ids=[_id(c) for c in LN_CASES])
def test_layernorm_kernels_match_reference_under_sanitizers(runs, index):
    cases, run = runs["ln"]
    check_ln(cases[index], run.results[index])
    _PASSED["ln"].add(index)


@pytest.mark.parametrize("index", range(len(ATTN_CASES)), ids=[_id(c) for c in ATTN_CASES])
def test_attention_kernels_match_reference_under_sanitizers(runs, index):
    cases, run = runs["attn"]
    check_attn(cases[index], run.results[index])
    _PASSED["attn"].add(index)


def test_every_kernel_variant_ran_and_the_driver_exited_cleanly(runs):
    """Each kernel template variant (vector/scalar, cached/uncached row, head-dim tile) ran at least once, and
    neither process reported a sanitizer error at exit (leaks included)."""
    launched = {name.split(" | ")[0] for _, run in runs.values() for name in run.launched}
    wanted = {"ln_fwd_kernel<T, kVec, true>", "ln_fwd_kernel<T, kVec, false>", "ln_fwd_kernel<T, 1, true>",
              "ln_fwd_kernel<T, 1, false>", "ln_bwd_dx_kernel<T, kVec>", "ln_bwd_dx_kernel<T, 1>",
              "ln_bwd_partial_kernel<T>", "ln_bwd_final_kernel", "attn_fwd_kernel<T, 64>", "attn_fwd_kernel<T, 128>",
              "attn_bwd_delta_kernel<T>", "attn_bwd_dq_kernel<T, DPAD>", "attn_bwd_dkdv_kernel<T, DPAD>"}
    assert wanted <= launched, f"never launched: {sorted(wanted - launched)}"
    for op, (_, run) in runs.items():
        assert run.returncode == 0, f"{op} driver exited with {run.returncode}:\n{run.stderr[-4000:]}"


def test_record_harness_verification(runs):
    """Runs last in this module: when every case of an op passed, record it for `dsincubate ops`
    (dsincubate/ops/verification.py) against the current kernel sources."""
    test_every_kernel_variant_ran_and_the_driver_exited_cleanly(runs)
    done = {op: len(_PASSED[op]) == len(cases) for op, (cases, _) in runs.items()}
    for op, name in (("ln", "layernorm"), ("attn", "attention")):
        if done[op]:
            cases, run = runs[op]
            verification.record(name, "cpu-harness", {"cases": len(cases), "sanitizers": "address,undefined"})
    if not all(done.values()):
        pytest.skip(f"not every case ran and passed in this session ({done}): nothing recorded")
