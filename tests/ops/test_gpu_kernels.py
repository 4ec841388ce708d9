"""GPU tests of the CUDA kernels: forward + backward against float64 references over fp32 / bf16 / fp16, ViT
preset shapes (hidden 192/384/540/768/1024/1280, head dims 64/80/45, seq 197/257/577/65) and odd shapes,
with freed GPU memory poisoned with NaN first so an output element the kernel never writes is caught.
Skipped with a reason when torch.cuda.is_available() is False. The kernels are JIT-compiled with nvcc on first use,
so these tests are also in the `build` tier.

    CUDA_HOME=/usr/local/cuda python -m pytest tests/ops -m gpu
"""

import copy

import pytest
import torch

import dsincubate.ops as ops
from dsincubate.ops import dispatch, reference
from dsincubate.ops import flash_attention as attn_mod
from dsincubate.ops import layernorm as ln_mod
from kernel_tolerances import ATTN_TOL, LN_TOL  # max |err| / max |ref| against float64

pytestmark = [pytest.mark.gpu, pytest.mark.build]

HALF = [torch.bfloat16, torch.float16]


def poison():
    """Fill freed blocks of the caching allocator with 0xFF bytes (NaN in fp32, fp16 and bf16)."""
    blocks = [torch.full((1 << k,), 255, dtype=torch.uint8, device="cuda") for k in range(9, 29)]
    blocks += [torch.full((3 << k,), 255, dtype=torch.uint8, device="cuda") for k in range(9, 27)]
    del blocks
    torch.cuda.synchronize()


def fwd_bwd(fn, leaves, cotangents):
    fresh = [t.detach().clone().requires_grad_(True) for t in leaves]
    outs = fn(*fresh)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(list(outs), [c.to(o.dtype) for c, o in zip(cotangents, outs)])
    return [o.detach() for o in outs] + [t.grad for t in fresh]


def assert_close(got, want, tol, what, floor=0.0):
    """max |got - want| <= tol * max(max |want|, floor); `floor` covers references that are exactly zero (dq, dk
    at seq 1), where fp32 rounding noise is the right answer (found by the CPU harness tier)."""
    assert got.shape == want.shape, what
    assert torch.isfinite(got).all(), f"{what}: non-finite values (unwritten or overflow)"
    diff = (got.double() - want.double()).abs().max().item() if want.numel() else 0.0
    scale = max(want.abs().max().item() if want.numel() else 0.0, floor, 1e-12)
    assert diff <= tol * scale, f"{what}: relative error {diff / scale:.3g} > {tol}"


@pytest.fixture(scope="module", autouse=True)
def kernels_build():
    ok, why = ln_mod._supports({"device": "cuda:0", "dtype": "float32", "weight_dtype": "float32"})
    assert ok, why
    ok, why = attn_mod._supports({"device": "cuda:0", "dtype": "bfloat16", "head_dim": 64})
    assert ok, why


LN_SHAPES = [(2 * 197, 192), (3 * 257, 384), (2 * 197, 540), (4 * 65, 768), (2 * 577, 1024), (2 * 197, 1280),
             (37, 1000), (37, 13), (5, 4096), (3, 13000), (1, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rows,cols", LN_SHAPES)
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "plain"])
def test_layernorm_matches_float64(dtype, rows, cols, residual):
    gen = torch.Generator(device="cuda").manual_seed(rows * 7919 + cols)
    rnd = lambda *s, scale=1.0, shift=0.0: torch.randn(*s, generator=gen, device="cuda") * scale + shift  # noqa
    x, r = rnd(rows, cols, scale=2.0, shift=0.5).to(dtype), rnd(rows, cols).to(dtype)
    w, b = rnd(cols, scale=0.3, shift=1.0), rnd(cols, scale=0.3)
    cot = [rnd(rows, cols) for _ in range(2 if residual else 1)]
    leaves = [x, r, w, b] if residual else [x, w, b]

    def kernel(*a):
        return ln_mod._LayerNormFn.apply(a[0], a[1] if residual else None, a[-2], a[-1], 1e-6)

    def ref(*a):
        a = [t.double() for t in a]
        return reference.add_layer_norm(*a, 1e-6) if residual else reference.layer_norm(*a, 1e-6)

    poison()
    got = fwd_bwd(kernel, leaves, cot)
    want = fwd_bwd(ref, [t.double() for t in leaves], [c.double() for c in cot])
    names = (["y", "s"] if residual else ["y"]) + (["dx", "dr", "dw", "db"] if residual else ["dx", "dw", "db"])
    for name, g, e in zip(names, got, want):
        if name == "s":  # x + r rounded to the dtype, exactly like torch
            assert torch.equal(g, x + r)
            continue
        assert_close(g, e, LN_TOL[dtype], name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_layernorm_misaligned_and_weight_in_input_dtype(dtype):
    rows, cols = 41, 768  # vector-friendly width, but the data starts 1 element off a 16-byte boundary
    buf = torch.randn(rows * cols + 1, device="cuda").to(dtype)
    x = buf[1:].view(rows, cols)
    r = torch.randn(rows, cols, device="cuda").to(dtype)
    w = (torch.rand(cols, device="cuda") + 0.5).to(dtype)
    b = torch.randn(cols, device="cuda").to(dtype)
    cot = [torch.randn(rows, cols, device="cuda") for _ in range(2)]
    got = fwd_bwd(lambda *a: ln_mod._LayerNormFn.apply(*a, 1e-5), [x, r, w, b], cot)
    want = fwd_bwd(lambda *a: reference.add_layer_norm(*a, 1e-5), [t.double() for t in (x, r, w, b)],
                   [c.double() for c in cot])
    assert got[4].dtype == dtype and got[5].dtype == dtype
    for name, g, e in zip(["y", "s", "dx", "dr", "dw", "db"], got, want):
        assert_close(g, e, LN_TOL[dtype], name)


def test_layernorm_weight_grad_many_rows_is_deterministic():
    rows, cols = 300_000, 64  # > 1024 chunks of 128 rows: exercises the larger chunk size of stage 1
    x = torch.randn(rows, cols, device="cuda")
    w, b = torch.rand(cols, device="cuda") + 0.5, torch.randn(cols, device="cuda")
    cot = [torch.randn(rows, cols, device="cuda")]
    first = fwd_bwd(lambda *a: ln_mod._LayerNormFn.apply(a[0], None, a[1], a[2], 1e-5), [x, w, b], cot)
    second = fwd_bwd(lambda *a: ln_mod._LayerNormFn.apply(a[0], None, a[1], a[2], 1e-5), [x, w, b], cot)
    assert all(torch.equal(p, q) for p, q in zip(first, second))
    want = fwd_bwd(lambda *a: reference.layer_norm(*a, 1e-5), [t.double() for t in (x, w, b)], [cot[0].double()])
    for name, g, e in zip(["y", "dx", "dw", "db"], first, want):
        assert_close(g, e, 1e-4, name)


ATTN_SHAPES = [(2, 3, 197, 64), (2, 6, 257, 64), (1, 4, 577, 64), (2, 16, 197, 80), (1, 16, 257, 80),
               (2, 12, 197, 45), (3, 2, 65, 64), (1, 2, 37, 128), (2, 1, 1, 32), (1, 3, 100, 7)]


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("batch,heads,seq,head_dim", ATTN_SHAPES)
@pytest.mark.parametrize("packed", [True, False], ids=["qkv-views", "contiguous"])
def test_attention_matches_float64(dtype, batch, heads, seq, head_dim, packed):
    gen = torch.Generator(device="cuda").manual_seed(seq * 31 + head_dim)
    qkv = torch.randn(batch, seq, 3, heads, head_dim, generator=gen, device="cuda").to(dtype)
    cot = [torch.randn(batch, heads, seq, head_dim, generator=gen, device="cuda")]
    scale = head_dim ** -0.5

    def split(t):
        q, k, v = t.permute(2, 0, 3, 1, 4).unbind(0)
        return (q, k, v) if packed else (q.contiguous(), k.contiguous(), v.contiguous())

    poison()
    got = fwd_bwd(lambda t: attn_mod._AttentionFn.apply(*split(t), scale), [qkv], cot)
    want = fwd_bwd(lambda t: reference.attention_math(*split(t), scale), [qkv.double()], [cot[0].double()])
    assert_close(got[0], want[0], ATTN_TOL[dtype], "o")
    floor = 1e-3 * want[1].abs().max().item()
    for i, name in enumerate("qkv"):
        assert_close(got[1][:, :, i], want[1][:, :, i], ATTN_TOL[dtype], f"d{name}", floor)


def test_attention_backward_is_deterministic():
    qkv = torch.randn(2, 257, 3, 16, 80, device="cuda", dtype=torch.bfloat16)
    cot = [torch.randn(2, 16, 257, 80, device="cuda")]
    fn = lambda t: attn_mod._AttentionFn.apply(*t.permute(2, 0, 3, 1, 4).unbind(0), 80 ** -0.5)  # noqa: E731
    a, b = fwd_bwd(fn, [qkv], cot), fwd_bwd(fn, [qkv], cot)
    assert all(torch.equal(p, q) for p, q in zip(a, b))


@pytest.mark.parametrize("backend", ["cuda", "auto"])
def test_patched_vit_matches_timm_under_bf16_autocast(backend):
    import timm

    torch.manual_seed(0)
    plain = timm.create_model("vit_small_patch16_224", img_size=64, num_classes=10, drop_path_rate=0.1,
                              init_values=0.1).cuda()
    patched = copy.deepcopy(plain)
    info = ops.apply_kernel_backend(patched, backend)
    assert info["blocks_patched"] == 12 and info["attention_patched"] == 12, info
    # 'auto' covers LayerNorm only: attention stays on SDPA (dispatch.AUTO_EXCLUDED)
    want = {"layernorm": backend, "attention": "cuda" if backend == "cuda" else "torch"}
    assert {op: s["backend"] for op, s in info["ops"].items()} == want, info
    x = torch.randn(4, 3, 64, 64, device="cuda")
    results = []
    for model in (plain, patched):
        model.train()
        torch.manual_seed(3)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x)
        out.float().square().mean().backward()
        results.append((out.float(), {n: p.grad.float() for n, p in model.named_parameters()}))
    (out_a, grads_a), (out_b, grads_b) = results
    assert_close(out_b, out_a.double(), 5e-2, "logits")
    for name in grads_a:
        assert_close(grads_b[name], grads_a[name].double(), 1e-1, name)
    if backend == "cuda":
        assert {d["op"]: d["backend"] for d in dispatch.decisions()} == {"layernorm": "cuda", "attention": "cuda"}
