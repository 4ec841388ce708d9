"""PyTorch reference implementations of every dsincubate op.

These are the 'torch' backend (what runs without CUDA, or when a kernel is unavailable or fails its
self-check) and the ground truth the kernels are checked against. They use only public torch ops and work in
any dtype (float64 included) on any device. Shapes and return conventions match the CUDA wrappers in
layernorm.py / flash_attention.py exactly, so the dispatcher can swap one for the other.

    python -m pytest tests/ops/test_reference.py
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dim, same as ``F.layer_norm(x, (C,), weight, bias, eps)``."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(LayerNorm(x + residual), x + residual)``, the pre-norm residual step of a transformer block."""
    s = x + residual
    return layer_norm(s, weight, bias, eps), s


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v for [B, H, N, D] inputs, no mask, no dropout (scale defaults to D ** -0.5)."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """The same attention written out (scores, softmax, weighted sum); used to test `attention` itself."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    return scores.softmax(dim=-1) @ v


def layer_norm_math(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm written out with a biased variance; used to test `layer_norm` itself."""
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def attention_flops(batch: int, heads: int, seq: int, head_dim: int, backward: bool = True) -> float:
    """Matmul FLOPs of attention: 2 (QK^T, PV) forward; 5 backward when S and dP are recomputed once (FA2 count)."""
    matmuls = 2 + (5 if backward else 0)
    return matmuls * 2.0 * batch * heads * seq * seq * head_dim


def layer_norm_bytes(rows: int, cols: int, elem: int, residual: bool, backward: bool = True) -> float:
    """Minimum DRAM traffic of the fused op: each tensor read or written once (weights ignored)."""
    fwd = (2 if residual else 1) + 1 + (1 if residual else 0)  # read x(,r); write y(,s)
    bwd = (1 + 1 + 1 + (1 if residual else 0)) if backward else 0  # read dy, s(, ds); write dx
    return float(rows) * cols * elem * (fwd + bwd)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| in float64 (inf if actual has a non-finite value)."""
    actual = actual.detach().double()
    expected = expected.detach().double()
    if not torch.isfinite(actual).all():
        return math.inf
    scale = expected.abs().max().item() if expected.numel() else 0.0
    diff = (actual - expected).abs().max().item() if expected.numel() else 0.0
    return diff / max(scale, 1e-12)
