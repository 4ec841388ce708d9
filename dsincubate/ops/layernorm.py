"""Fused residual-add + LayerNorm op: autograd wrapper of the CUDA kernel and the dispatching entry points.

    y = layer_norm(x, weight, bias, eps, backend="cuda")
    y, s = add_layer_norm(x, residual, weight, bias, eps, backend="cuda")   # s = x + residual, y = LN(s)
(backend defaults to 'torch'; see dispatch.py for 'cuda' / 'auto' / 'autotune')

Any leading shape, normalisation over the last dim; x / residual fp32, fp16 or bf16 (mixed dtypes are promoted
first, like ``x + residual``); weight / bias fp32 or the input dtype. The kernel runs only on CUDA tensors
whose backend selection (dispatch.py) picked it; everything else runs reference.py (CPU tensors go through the
same selection, where only test-injected kernels can claim them).
"""

from __future__ import annotations

import torch

from . import dispatch, reference
from .builder import LayerNormBuilder

OP = "layernorm"
_DTYPES = ("float32", "float16", "bfloat16")
_EPS_CHECK = 1e-6
_build_error: list[str] = []  # the first load failure, so a broken toolchain is reported once, not per shape


def _ext():
    return LayerNormBuilder().load()


class _LayerNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps):
        ctx.set_materialize_grads(False)
        shape, cols = x.shape, x.shape[-1]
        x2 = x.reshape(-1, cols).contiguous()
        r2 = residual.reshape(-1, cols).contiguous() if residual is not None else None
        y, s, mean, rstd = _ext().forward(x2, r2, weight, bias, eps)
        ctx.has_res = residual is not None
        ctx.shape = shape
        ctx.bias_dtype = bias.dtype
        # Backward needs the normalised input: s for the fused add, x itself for a plain LayerNorm.
        ctx.save_for_backward(s if ctx.has_res else x2, weight, mean, rstd)
        if ctx.has_res:
            return y.view(shape), s.view(shape)
        return y.view(shape)

    @staticmethod
    def backward(ctx, *grads):
        s, weight, mean, rstd = ctx.saved_tensors
        dy = grads[0]
        ds = grads[1] if ctx.has_res else None
        if dy is None:  # only s was used downstream
            dy = torch.zeros_like(s)
        cols = s.shape[1]
        dy = dy.reshape(-1, cols).contiguous()
        ds = ds.reshape(-1, cols).contiguous() if ds is not None else None
        dx, dw, db = _ext().backward(dy, ds, s, weight, mean, rstd)
        dx = dx.view(ctx.shape)
        need = ctx.needs_input_grad
        # x and residual share one gradient tensor, as torch's own add backward does.
        return (dx if need[0] else None, dx if ctx.has_res and need[1] else None, dw if need[2] else None,
                db.to(ctx.bias_dtype) if need[3] else None, None)


def _reference_op(x, residual, weight, bias, eps):
    if residual is None:
        return (reference.layer_norm(x, weight, bias, eps),)
    return reference.add_layer_norm(x, residual, weight, bias, eps)


def _cuda_op(x, residual, weight, bias, eps):
    out = _LayerNormFn.apply(x, residual, weight, bias, eps)
    return out if residual is not None else (out,)


def _supports(key: dict) -> tuple[bool, str]:
    if not key["device"].startswith("cuda"):
        return False, "not a CUDA tensor"
    if key["dtype"] not in _DTYPES or key["weight_dtype"] not in _DTYPES:
        return False, f"dtype {key['dtype']} / weight {key['weight_dtype']} not in {_DTYPES}"
    if _build_error:
        return False, _build_error[0]
    try:
        _ext()
    except Exception as exc:
        _build_error.append(f"extension unavailable: {exc}")
        return False, _build_error[0]
    return True, "ok"


def _make_case(key: dict, gen: torch.Generator) -> list:
    dev, dt, wdt = key["device"], getattr(torch, key["dtype"]), getattr(torch, key["weight_dtype"])
    rows, cols = key["rows"], key["cols"]

    def rnd(*shape, dtype, scale=1.0, shift=0.0):
        t = torch.randn(*shape, generator=gen, device=dev, dtype=torch.float32) * scale + shift
        return t.to(dtype).requires_grad_(True)

    # A non-zero mean and spread exercise the mean subtraction and the variance pass.
    leaves = [rnd(rows, cols, dtype=dt, scale=2.0, shift=0.5)]
    leaves.append(rnd(rows, cols, dtype=dt) if key["residual"] else None)
    leaves += [rnd(cols, dtype=wdt, scale=0.2, shift=1.0), rnd(cols, dtype=wdt, scale=0.2)]
    return leaves


def _call(fn, leaves):
    x, r, w, b = leaves
    return fn(x, r, w, b, _EPS_CHECK)


def _probe(key: dict) -> dict:
    # 'auto' decides per (device, dtype) at one ViT-B/16-sized shape (2 images of 197 tokens, width 768).
    return {"device": key["device"], "dtype": key["dtype"], "rows": 2 * 197, "cols": 768, "residual": True,
            "weight_dtype": "float32"}


dispatch.register_op(dispatch.OpSpec(OP, _reference_op, _make_case, _call, probe=_probe))
CUDA_IMPL = dispatch.register_impl(OP, "cuda", _cuda_op, _supports)


def make_key(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor) -> dispatch.Key:
    cols = x.shape[-1]
    return (("device", str(x.device)), ("dtype", str(x.dtype).removeprefix("torch.")),
            ("rows", x.numel() // max(cols, 1)), ("cols", cols), ("residual", residual is not None),
            ("weight_dtype", str(weight.dtype).removeprefix("torch.")))


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5,
               backend: str = "torch", torch_path=None) -> torch.Tensor:
    """LayerNorm over the last dim through the selected backend. `torch_path` overrides the reference call
    (the block patch passes the original module so the 'torch' result is bit-identical to timm)."""
    dispatch.validate_backend(backend)
    ref = torch_path or (lambda: reference.layer_norm(x, weight, bias, eps))
    if backend == dispatch.TORCH:
        return ref()
    return dispatch.call(OP, make_key(x, None, weight), backend, (x, None, weight, bias, eps), lambda: (ref(),))[0]


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float = 1e-5, backend: str = "torch", torch_path=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(LayerNorm(x + residual), x + residual) through the selected backend; see `layer_norm` for torch_path."""
    dispatch.validate_backend(backend)
    ref = torch_path or (lambda: reference.add_layer_norm(x, residual, weight, bias, eps))
    if backend == dispatch.TORCH or residual.shape != x.shape:
        return ref()  # (broadcasting adds are left to torch)
    common = torch.promote_types(x.dtype, residual.dtype)  # what `x + residual` would compute in
    xc, rc = x.to(common), residual.to(common)
    return tuple(dispatch.call(OP, make_key(xc, rc, weight), backend, (xc, rc, weight, bias, eps), ref))
