"""Fused multi-head self-attention op: autograd wrapper of the flash-style CUDA kernels and the entry points.

    o = attention(q, k, v, scale=None, backend="cuda")        # q, k, v, o: [B, H, N, D]
    o = attention_qkv(qkv, scale=None, backend="cuda")        # qkv: [B, N, 3, H, D] -> o: [B, N, H, D]
(backend defaults to 'torch'; see dispatch.py for 'cuda' / 'auto' / 'autotune')

No mask, no dropout. The kernel takes fp16 / bf16 with head dim <= 128 and any sequence length; q, k, v may be
strided views (e.g. of the packed qkv projection) as long as the last dim is contiguous, and its output is laid
out [B, N, H, D] so `attention_qkv(...).reshape(B, N, H * D)` is free. Everything else runs reference.py.
"""

from __future__ import annotations

import torch

from . import dispatch, reference
from .builder import AttentionBuilder

OP = "attention"
_DTYPES = ("float16", "bfloat16")
MAX_HEAD_DIM = 128
_build_error: list[str] = []


def _ext():
    return AttentionBuilder().load()


class _AttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        o, lse = _ext().forward(q, k, v, scale)
        ctx.scale = scale
        ctx.save_for_backward(q, k, v, o, lse)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        if do.stride(-1) != 1:
            do = do.contiguous()
        # One packed [B, N, 3, H, D] buffer: when q, k, v came from a qkv projection, unbind's backward
        # stacks these views back into exactly this layout.
        B, H, N, D = q.shape
        dqkv = torch.empty((B, N, 3, H, D), dtype=q.dtype, device=q.device)
        dq, dk, dv = dqkv.permute(2, 0, 3, 1, 4).unbind(0)
        _ext().backward(do, q, k, v, o, lse, dq, dk, dv, ctx.scale)
        return dq, dk, dv, None


def _cuda_op(q, k, v, scale):
    return _AttentionFn.apply(q, k, v, scale)


def _reference_op(q, k, v, scale):
    return reference.attention(q, k, v, scale)


def _supports(key: dict) -> tuple[bool, str]:
    if not key["device"].startswith("cuda"):
        return False, "not a CUDA tensor"
    if key["dtype"] not in _DTYPES:
        return False, f"dtype {key['dtype']} not in {_DTYPES}"
    if not 1 <= key["head_dim"] <= MAX_HEAD_DIM:
        return False, f"head dim {key['head_dim']} > {MAX_HEAD_DIM}"
    if _build_error:
        return False, _build_error[0]
    try:
        _ext()
    except Exception as exc:
        _build_error.append(f"extension unavailable: {exc}")
        return False, _build_error[0]
    return True, "ok"


def _make_case(key: dict, gen: torch.Generator) -> list:
    shape = (key["batch"], key["seq"], 3, key["heads"], key["head_dim"])
    qkv = torch.randn(shape, generator=gen, device=key["device"], dtype=torch.float32)
    return [qkv.to(getattr(torch, key["dtype"])).requires_grad_(True)]


def _call(fn, leaves):
    # Strided views of a packed qkv tensor, exactly as timm's Attention produces them.
    q, k, v = leaves[0].permute(2, 0, 3, 1, 4).unbind(0)
    return (fn(q, k, v, q.shape[-1] ** -0.5),)


def _check_key(key: dict) -> dict:
    # The batch only multiplies the grid; two batches cover the indexing at a fraction of the float64 cost.
    return {**key, "batch": min(key["batch"], 2)}


def _probe(key: dict) -> dict:
    # 'auto' decides per (device, dtype) at one ViT-B/16-sized shape (12 heads of 64, 197 tokens).
    return {"device": key["device"], "dtype": key["dtype"], "batch": 2, "heads": 12, "seq": 197, "head_dim": 64}


dispatch.register_op(dispatch.OpSpec(OP, _reference_op, _make_case, _call, _check_key, probe=_probe))
CUDA_IMPL = dispatch.register_impl(OP, "cuda", _cuda_op, _supports)


def make_key(q: torch.Tensor) -> dispatch.Key:
    B, H, N, D = q.shape
    return (("device", str(q.device)), ("dtype", str(q.dtype).removeprefix("torch.")), ("batch", B),
            ("heads", H), ("seq", N), ("head_dim", D))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
              backend: str = "torch", torch_path=None) -> torch.Tensor:
    """softmax(q k^T * scale) v for [B, H, N, D] tensors through the selected backend. `torch_path` overrides
    the reference call (the block patch passes timm's own Attention.forward)."""
    dispatch.validate_backend(backend)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    ref = torch_path or (lambda: reference.attention(q, k, v, scale))
    if backend == dispatch.TORCH or q.dim() != 4 or not (q.shape == k.shape == v.shape):
        return ref()
    if not (q.dtype == k.dtype == v.dtype and q.device == k.device == v.device):
        return ref()
    return dispatch.call(OP, make_key(q), backend, (q, k, v, scale), ref)


def attention_qkv(qkv: torch.Tensor, scale: float | None = None, backend: str = "torch") -> torch.Tensor:
    """Attention of a packed [B, N, 3, H, D] projection; returns [B, N, H, D]."""
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return attention(q, k, v, scale, backend).transpose(1, 2)


def select_backend(q_shape: tuple, dtype: torch.dtype, device: torch.device, backend: str) -> str:
    """Backend ('cuda' or 'torch') that `attention` would use for these inputs, deciding now if needed."""
    if backend == dispatch.TORCH:
        return dispatch.TORCH
    B, H, N, D = q_shape
    key = (("device", str(device)), ("dtype", str(dtype).removeprefix("torch.")), ("batch", B), ("heads", H),
           ("seq", N), ("head_dim", D))
    return dispatch.select(OP, key, backend)[0]
