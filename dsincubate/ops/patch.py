"""Route timm ViT blocks through the dsincubate ops without touching parameters or state_dict keys.

`patch_module(module, backend)` swaps the class of every plain ``timm.models.vision_transformer.Block`` to
`DsiBlock` and of its plain ``timm.layers.Attention`` to `DsiAttention` (subclasses that only override
``forward``), so parameter names, state_dict keys, hooks, pickling and ``isinstance`` all stay as they were;
`unpatch_module` swaps them back. Patching is local to each block (the ViT is split into stages between
blocks): norm1 becomes a plain fused LayerNorm, and the first residual add is fused with norm2 inside the
block. Drop path and LayerScale are applied to the branch before the fused add, exactly as in timm.

Every op call asks dispatch.py for its backend per shape; whenever the answer is 'torch' the original module
code runs (timm's own norm / Attention.forward), so that path is bit-identical to an unpatched model.
"""

from __future__ import annotations

import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block
from torch import nn

from . import flash_attention as attn_op
from . import layernorm as ln_op

_TIMM_LN_FORWARDS = {nn.LayerNorm.forward}
try:  # timm's LayerNorm subclass has the same semantics (its fast-norm path included)
    from timm.layers import LayerNorm as _TimmLayerNorm

    _TIMM_LN_FORWARDS.add(_TimmLayerNorm.forward)
except ImportError:  # pragma: no cover - older timm
    pass


def layer_norm_ok(norm: nn.Module) -> str | None:
    """None if `norm` is a plain affine LayerNorm over the last dim, else why the fused op cannot stand in."""
    if not isinstance(norm, nn.LayerNorm) or type(norm).forward not in _TIMM_LN_FORWARDS:
        return f"{type(norm).__name__} is not a plain LayerNorm"
    if len(norm.normalized_shape) != 1 or norm.weight is None or norm.bias is None:
        return "LayerNorm without affine weight and bias over the last dim"
    return None


def attention_ok(attn: nn.Module) -> str | None:
    """None if the fused attention kernel can replace this module's core, else why not."""
    if type(attn) is not Attention:
        return f"{type(attn).__name__} is not timm Attention"
    if not isinstance(attn.q_norm, nn.Identity) or not isinstance(attn.k_norm, nn.Identity):
        return "q_norm/k_norm are not Identity"
    if getattr(attn, "gate", None) is not None:
        return "gated attention"
    return None


class DsiAttention(Attention):
    """timm Attention whose softmax(qk^T)v core runs through dsincubate.ops.attention."""

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        backend = self._dsi_backend
        use_torch = attn_mask is not None or is_causal or (self.training and self.attn_drop.p > 0)
        if not use_torch:
            B, N, _ = x.shape
            # Under autocast the projection produces the autocast dtype; otherwise the input's.
            dev = x.device.type
            dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
            shape = (B, self.num_heads, N, self.head_dim)
            use_torch = attn_op.select_backend(shape, dtype, x.device, backend) == "torch"
        if use_torch:
            return Attention.forward(self, x, attn_mask=attn_mask, is_causal=is_causal)
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        o = attn_op.attention(q, k, v, self.scale, backend=backend,
                              torch_path=lambda: _sdpa_core(self, q, k, v))
        x = o.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        x = self.proj(x)
        return self.proj_drop(x)


def _sdpa_core(attn: Attention, q, k, v):
    # Only reached if the kernel raises mid-run (the selection said 'cuda'); mirrors timm's eval-time core.
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=attn.scale)


class DsiBlock(Block):
    """timm Block whose norms run through the fused LayerNorm op (norm2 fused with the first residual add)."""

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal or not self._dsi_fuse_ln:
            return Block.forward(self, x, attn_mask=attn_mask, is_causal=is_causal)
        backend = self._dsi_backend
        n1, n2 = self.norm1, self.norm2
        h = ln_op.layer_norm(x, n1.weight, n1.bias, n1.eps, backend=backend, torch_path=lambda: n1(x))
        branch = self.drop_path1(self.ls1(self.attn(h)))

        def torch_add_norm():
            s = x + branch
            return n2(s), s

        y, x = ln_op.add_layer_norm(x, branch, n2.weight, n2.bias, n2.eps, backend=backend,
                                    torch_path=torch_add_norm)
        return x + self.drop_path2(self.ls2(self.mlp(y)))


def patch_module(module: nn.Module, backend: str) -> dict:
    """Patch every plain Block under `module` and its `.attn`; returns counts and per-module skip reasons."""
    blocks = attns = 0
    skipped = {}
    for name, sub in module.named_modules():
        if type(sub) not in (Block, DsiBlock):  # a DsiBlock again: only the backend changes
            continue
        why = layer_norm_ok(sub.norm1) or layer_norm_ok(sub.norm2)
        sub.__class__ = DsiBlock
        sub._dsi_backend = backend
        sub._dsi_fuse_ln = why is None
        blocks += 1
        if why:
            skipped[f"{name}.norm1/norm2"] = why
        why = None if type(sub.attn) is DsiAttention else attention_ok(sub.attn)
        if why:
            skipped[f"{name}.attn"] = why
            continue
        sub.attn.__class__ = DsiAttention
        sub.attn._dsi_backend = backend
        attns += 1
    return {"blocks_patched": blocks, "attention_patched": attns, "skipped": skipped}


def unpatch_module(module: nn.Module) -> int:
    """Undo `patch_module`; returns the number of modules restored."""
    restored = 0
    for sub in module.modules():
        for cls, base in ((DsiBlock, Block), (DsiAttention, Attention)):
            if type(sub) is cls:
                sub.__class__ = base
                for attr in ("_dsi_backend", "_dsi_fuse_ln"):
                    sub.__dict__.pop(attr, None)
                restored += 1
    return restored
