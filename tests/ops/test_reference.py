"""The PyTorch references (the 'torch' backend and the kernels' ground truth) against float64 math.

    python -m pytest tests/ops/test_reference.py
"""

import math

import pytest
import torch

from dsincubate.ops import reference


def _grads(fn, *inputs):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(7)
    cots = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype) for o in outs]
    torch.autograd.backward(list(outs), cots)
    return [o.detach() for o in outs] + [t.grad for t in leaves]


@pytest.mark.parametrize("rows,cols", [(37, 1000), (16, 192), (5, 1280), (3, 45)])
def test_layer_norm_matches_float64_math(rows, cols):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, cols, generator=gen, dtype=torch.float64) * 3 + 1
    w = torch.randn(cols, generator=gen, dtype=torch.float64)
    b = torch.randn(cols, generator=gen, dtype=torch.float64)
    got = _grads(lambda *a: reference.layer_norm(*a, eps=1e-6), x, w, b)
    want = _grads(lambda *a: reference.layer_norm_math(*a, eps=1e-6), x, w, b)
    for g, e in zip(got, want):
        assert reference.relative_error(g, e) < 1e-12
    # float32 input stays within float32 rounding of the float64 result
    y32 = reference.layer_norm(x.float(), w.float(), b.float(), eps=1e-6)
    assert reference.relative_error(y32, want[0]) < 1e-5


def test_add_layer_norm_returns_sum_and_its_norm():
    gen = torch.Generator().manual_seed(1)
    x, r = (torch.randn(4, 7, 96, generator=gen).bfloat16() for _ in range(2))
    w, b = torch.rand(96, generator=gen) + 0.5, torch.randn(96, generator=gen)
    y, s = reference.add_layer_norm(x, r, w, b, 1e-6)
    assert s.dtype == torch.bfloat16 and torch.equal(s, x + r)
    assert torch.equal(y, torch.nn.functional.layer_norm(x + r, (96,), w, b, 1e-6))
    gy, gs = _grads(lambda a, c: reference.add_layer_norm(a, c, w.double(), b.double(), 1e-6), x.double(), r.double())[2:]
    assert torch.equal(gy, gs)  # d/dx and d/dresidual of x + residual are the same


@pytest.mark.parametrize("batch,heads,seq,head_dim", [(2, 3, 65, 64), (1, 2, 197, 80), (2, 4, 37, 45)])
def test_attention_matches_float64_math(batch, heads, seq, head_dim):
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(batch, heads, seq, head_dim, generator=gen, dtype=torch.float64) for _ in range(3))
    got = _grads(reference.attention, q, k, v)
    want = _grads(reference.attention_math, q, k, v)
    for g, e in zip(got, want):
        assert reference.relative_error(g, e) < 1e-10
    scale = 0.3
    assert reference.relative_error(reference.attention(q, k, v, scale), reference.attention_math(q, k, v, scale)) < 1e-10


def test_attention_math_is_a_softmax_average():
    # rows of the attention matrix sum to one: constant v gives constant output
    q = torch.randn(1, 1, 9, 8, dtype=torch.float64)
    k = torch.randn(1, 1, 9, 8, dtype=torch.float64)
    v = torch.full((1, 1, 9, 8), 2.5, dtype=torch.float64)
    assert torch.allclose(reference.attention_math(q, k, v), v)


def test_relative_error_flags_non_finite_and_scales():
    e = torch.tensor([1.0, -2.0, 4.0])
    assert reference.relative_error(e, e) == 0.0
    assert reference.relative_error(e + 0.04, e) == pytest.approx(0.01)
    assert reference.relative_error(torch.tensor([1.0, math.nan, 4.0]), e) == math.inf


def test_flop_and_byte_counts():
    assert reference.attention_flops(1, 1, 10, 4, backward=False) == 2 * 2 * 100 * 4
    assert reference.attention_flops(1, 1, 10, 4) == 3.5 * reference.attention_flops(1, 1, 10, 4, backward=False)
    assert reference.layer_norm_bytes(10, 8, 2, residual=True, backward=False) == 10 * 8 * 2 * 4
