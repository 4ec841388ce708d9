"""apply_kernel_backend on timm ViTs (CPU): untouched without CUDA, identical outputs / gradients / state_dict
when the ops resolve to torch, correct routing through injected kernels, and broken kernels falling back.

    python -m pytest tests/ops/test_patch.py
"""

import copy
import json
import pickle
import warnings

import pytest
import timm
import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block

import dsincubate.ops as ops
from dsincubate.ops import dispatch, patch, reference
from dsincubate.ops import flash_attention as attn_mod
from dsincubate.ops import layernorm as ln_mod

CPU = lambda key: (key["device"] == "cpu", "cpu test kernel")  # noqa: E731


def _vit(**kw):
    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=5)
    args.update(kw)
    return timm.create_model("vit_tiny_patch16_224", **args)


def _fwd_bwd(model, x, seed=1):
    torch.manual_seed(seed)  # drop path draws random numbers in train mode
    out = model(x)
    out.square().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("backend", ["torch", "auto", "cuda"])
def test_no_cuda_leaves_modules_untouched(backend, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = _vit()
    info = ops.apply_kernel_backend(model, backend)
    json.dumps(info)
    assert info["requested"] == backend and info["blocks_patched"] == 0
    assert {op: s["backend"] for op, s in info["ops"].items()} == {"layernorm": "torch", "attention": "torch"}
    assert all(type(m) is Block for m in model.blocks) and all(type(m.attn) is Attention for m in model.blocks)


@pytest.mark.parametrize("kw", [dict(), dict(drop_path_rate=0.3, init_values=0.1), dict(qkv_bias=False)],
                         ids=["plain", "droppath+layerscale", "no-qkv-bias"])
@pytest.mark.parametrize("train", [True, False])
def test_patched_blocks_are_bit_identical_when_ops_resolve_to_torch(kw, train):
    plain = _vit(**kw)
    patched = copy.deepcopy(plain)
    info = patch.patch_module(patched, "auto")
    assert info["blocks_patched"] == 3 and info["attention_patched"] == 3
    assert all(type(m) is patch.DsiBlock for m in patched.blocks)
    plain.train(train)
    patched.train(train)
    x = torch.randn(2, 3, 32, 32)
    out_a, grads_a = _fwd_bwd(plain, x)
    out_b, grads_b = _fwd_bwd(patched, x)
    assert torch.equal(out_a, out_b)
    assert grads_a.keys() == grads_b.keys() and all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)


def test_state_dict_round_trips_into_plain_timm():
    model = _vit(init_values=0.1)
    before = list(model.state_dict().keys())
    patch.patch_module(model, "cuda")
    assert list(model.state_dict().keys()) == before
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in _vit(init_values=0.1).named_parameters()]
    fresh = _vit(init_values=0.1)
    for p in fresh.parameters():
        torch.nn.init.zeros_(p)
    fresh.load_state_dict(model.state_dict(), strict=True)
    restored = pickle.loads(pickle.dumps(model))
    assert type(restored.blocks[0]) is patch.DsiBlock
    clone = copy.deepcopy(model)
    assert ops.remove_kernel_backend(clone) == 6
    assert type(clone.blocks[0]) is Block and not hasattr(clone.blocks[0], "_dsi_backend")
    x = torch.randn(1, 3, 32, 32)
    model.eval(), fresh.eval(), clone.eval()
    assert torch.equal(model(x), fresh(x)) and torch.equal(clone(x), fresh(x))


def test_ineligible_modules_fall_back_per_block():
    model = _vit(qk_norm=True)
    info = patch.patch_module(model, "cuda")
    assert info["attention_patched"] == 0
    assert all("q_norm" in why for name, why in info["skipped"].items() if name.endswith(".attn"))
    assert all(type(m.attn) is Attention for m in model.blocks)

    model = _vit()
    model.blocks[1].norm2 = torch.nn.RMSNorm(48)
    info = patch.patch_module(model, "cuda")
    assert "blocks.1.norm1/norm2" in info["skipped"] and model.blocks[1]._dsi_fuse_ln is False
    assert model.blocks[0]._dsi_fuse_ln is True


def _math_ln(x, residual, weight, bias, eps):
    s = x if residual is None else x + residual
    y = reference.layer_norm_math(s, weight, bias, eps)
    return (y,) if residual is None else (y, s)


def test_patched_block_routes_every_norm_and_attention_through_the_ops():
    calls = {"ln": 0, "ln_res": 0, "attn": 0}

    def fake_ln(x, residual, weight, bias, eps):
        calls["ln_res" if residual is not None else "ln"] += 1
        return _math_ln(x, residual, weight, bias, eps)

    def fake_attn(q, k, v, scale):
        calls["attn"] += 1
        return reference.attention_math(q, k, v, scale)

    dispatch.register_impl(ln_mod.OP, "fake", fake_ln, CPU)
    dispatch.register_impl(attn_mod.OP, "fake", fake_attn, CPU)
    plain = _vit(drop_path_rate=0.2, init_values=0.5)
    patched = copy.deepcopy(plain)
    patch.patch_module(patched, "cuda")
    x = torch.randn(2, 3, 32, 32)
    for model in (plain, patched):
        model.train()
    out_a, grads_a = _fwd_bwd(plain, x)
    counts_after_checks = dict(calls)
    out_b, grads_b = _fwd_bwd(patched, x)
    # self-checks ran once per shape, then every block called each op on the real data
    assert calls["ln"] >= 3 and calls["ln_res"] >= 3 and calls["attn"] >= 3
    assert torch.allclose(out_a, out_b, rtol=1e-4, atol=1e-5)
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], rtol=1e-3, atol=1e-5), name
    assert counts_after_checks == {"ln": 0, "ln_res": 0, "attn": 0}
    assert {d["op"]: d["backend"] for d in dispatch.decisions()} == {"layernorm": "fake", "attention": "fake"}


def test_broken_kernel_in_a_model_warns_once_and_training_continues():
    def broken_attn(q, k, v, scale):
        return reference.attention_math(q, k, v, scale * 1.5)

    impl = dispatch.register_impl(attn_mod.OP, "broken", broken_attn, CPU)
    plain = _vit()
    patched = copy.deepcopy(plain)
    patch.patch_module(patched, "cuda")
    opt = torch.optim.SGD(patched.parameters(), lr=0.01)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses = []
        for _ in range(3):
            loss = torch.nn.functional.cross_entropy(patched(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert len([w for w in caught if "'broken'" in str(w.message)]) == 1
    assert impl.disabled and all(torch.isfinite(torch.tensor(losses)))
    patched.eval(), plain.eval()
    plain.load_state_dict(patched.state_dict())
    assert torch.equal(patched(x), plain(x))  # after the fallback the patched model is plain timm again


def test_attention_dropout_in_training_uses_timm_code():
    seen = []
    dispatch.register_impl(attn_mod.OP, "fake", lambda *a: seen.append(1) or reference.attention(*a), CPU)
    model = _vit(attn_drop_rate=0.1)
    patch.patch_module(model, "cuda")
    model.train()
    model(torch.randn(1, 3, 32, 32))
    assert seen == []
    model.eval()
    model(torch.randn(1, 3, 32, 32))
    assert seen  # eval: dropout is off, so the fused core is allowed


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_patched_blocks_under_activation_checkpointing(use_reentrant):
    from torch.utils.checkpoint import checkpoint

    dispatch.register_impl(ln_mod.OP, "fake", _math_ln, CPU)
    dispatch.register_impl(attn_mod.OP, "fake", lambda q, k, v, s: reference.attention_math(q, k, v, s), CPU)
    plain = _vit(init_values=0.2)
    patched = copy.deepcopy(plain)
    patch.patch_module(patched, "cuda")
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for model in (plain, patched):
        tokens = model.patch_embed(x)
        tokens = model._pos_embed(tokens)
        for blk in model.blocks:  # each block its own checkpointed stage, as in the staged ViT
            tokens = checkpoint(blk, tokens, use_reentrant=use_reentrant)
        tokens.square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], rtol=1e-3, atol=1e-6), name
    assert all(impl.disabled is None for op in (ln_mod.OP, attn_mod.OP) for impl in dispatch.impls(op).values())
