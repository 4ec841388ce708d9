"""dsincubate.ops: fused CUDA kernels for ViT training (residual-add + LayerNorm, flash-style attention) with
PyTorch fallbacks that keep every run working without a GPU, a compiler or a correct kernel.

Public API:
    apply_kernel_backend(module, backend) -> dict      route timm ViT blocks through the ops (BACKENDS: 'torch' |
                                                       'cuda' | 'auto' | 'autotune'; 'torch' is the default)
    remove_kernel_backend(module) -> int               undo it
    layer_norm(x, weight, bias, eps, backend)          fused LayerNorm
    add_layer_norm(x, residual, weight, bias, eps, backend) -> (LN(x + residual), x + residual)
    attention(q, k, v, scale, backend)                 [B, H, N, D] attention, no mask / dropout
    attention_qkv(qkv, scale, backend)                 packed [B, N, 3, H, D] -> [B, N, H, D]
    decisions() -> list[dict]                          backend choices made so far (for run.json)

Building: dsincubate/ops/builder.py (JIT, cached; prebuild_all()). Status: `python -m dsincubate.ops.report`.
Where each kernel has been verified (CPU execution harness, GPU): verification.py.
Tests: `python -m pytest tests/ops` (GPU tests: `-m gpu`; CPU harness: `-m harness`).
"""

from __future__ import annotations

import torch

from . import dispatch
from .flash_attention import attention, attention_qkv
from .builder import ALL_BUILDERS
from .dispatch import BACKENDS, decisions
from .layernorm import add_layer_norm, layer_norm
from .patch import patch_module, unpatch_module

__all__ = ["BACKENDS", "add_layer_norm", "apply_kernel_backend", "attention", "attention_qkv", "decisions",
           "layer_norm", "remove_kernel_backend"]

_CHECK_ROWS_TOKENS = 197  # one ViT-B/16 image worth of tokens
_CHECK_DTYPE = "bfloat16"


def remove_kernel_backend(module: torch.nn.Module) -> int:
    """Restore every patched Block / Attention under `module` to plain timm; returns how many were restored."""
    return unpatch_module(module)


def _first_block(module: torch.nn.Module):
    from timm.models.vision_transformer import Block

    return next((m for m in module.modules() if isinstance(m, Block)), None)


def _probe_keys(block, device: str) -> dict:
    """Small representative shapes of this model for the eager self-check (per-shape checks still follow)."""
    dim = block.norm2.normalized_shape[-1]
    keys = {"layernorm": (("device", device), ("dtype", _CHECK_DTYPE), ("rows", 2 * _CHECK_ROWS_TOKENS),
                          ("cols", dim), ("residual", True), ("weight_dtype", "float32"))}
    attn = block.attn
    if hasattr(attn, "num_heads") and hasattr(attn, "head_dim"):
        keys["attention"] = (("device", device), ("dtype", _CHECK_DTYPE), ("batch", 2), ("heads", attn.num_heads),
                             ("seq", _CHECK_ROWS_TOKENS), ("head_dim", attn.head_dim))
    return keys


def _op_status(op: str, key, backend: str) -> dict:
    """Build + self-check the op's CUDA kernel now (not inside the first training step)."""
    if backend == dispatch.AUTO and op in dispatch.AUTO_EXCLUDED:  # nothing to build or check: one log line
        dispatch.select(op, key, dispatch.AUTO)
        return {"backend": "torch", "reason": dispatch.AUTO_EXCLUDED[op]}
    impl = dispatch.impls(op).get("cuda")
    if impl is None:
        return {"backend": "torch", "reason": "no CUDA kernel registered"}
    ok, why = ALL_BUILDERS[op]().is_compatible()
    if not ok:
        return {"backend": "torch", "reason": f"not compatible: {why}"}
    ok, why = impl.supports(dict(key))  # loads (JIT-builds) the extension
    if not ok:
        return {"backend": "torch", "reason": why}
    # Runs the self-check ('auto': the once-per-(device, dtype) decision); a failure disables with one warning.
    name, _ = dispatch.select(op, key, dispatch.AUTO if backend == dispatch.AUTO else "cuda")
    if name != "cuda":
        return {"backend": "torch", "reason": impl.disabled or "kernel unavailable"}
    if backend == "cuda":
        return {"backend": "cuda", "reason": "self-check passed; every supported shape is self-checked, then used"}
    if backend == dispatch.AUTO:
        return {"backend": "auto", "reason": "self-check passed at the probe shape; used for every supported shape "
                                             "of this device, dtype and bucket (the same choice on every rank)"}
    return {"backend": "autotune", "reason": "self-check passed; per shape the faster of cuda and torch (timed)"}


def apply_kernel_backend(module: torch.nn.Module, backend: str) -> dict:
    """Make every timm ViT Block (and its Attention) under `module` compute through the dsincubate ops.

    'torch' (or no CUDA) leaves the modules untouched, so outputs are identical to plain timm. 'cuda' / 'auto' /
    'autotune' build the extensions, self-check them on this device and patch the blocks without changing
    parameter names or state_dict keys. Returns a JSON-serialisable description for run.json.
    """
    dispatch.validate_backend(backend)
    info = {"requested": backend, "cuda_available": torch.cuda.is_available(), "blocks_patched": 0,
            "attention_patched": 0, "skipped": {}, "ops": {}}

    def all_torch(reason: str) -> dict:
        unpatch_module(module)
        info["ops"] = {op: {"backend": "torch", "reason": reason} for op in ALL_BUILDERS}
        return info

    if backend == dispatch.TORCH:
        return all_torch("backend 'torch' requested")
    if not torch.cuda.is_available():
        return all_torch("CUDA is not available; the PyTorch references run unchanged")
    block = _first_block(module)
    if block is None:
        return all_torch("no timm vision_transformer.Block in the module")
    device = f"cuda:{torch.cuda.current_device()}"
    keys = _probe_keys(block, device)
    info["ops"] = {op: _op_status(op, key, backend) for op, key in keys.items()}
    if all(status["backend"] == "torch" for status in info["ops"].values()):
        return all_torch("; ".join(f"{op}: {s['reason']}" for op, s in info["ops"].items()))
    info.update(patch_module(module, backend))
    return info
