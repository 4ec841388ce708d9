"""Backend selection and fallback on CPU, with kernels injected through dispatch.register_impl.

Covers: 'torch' (the default) / 'cuda' / 'auto' (once per op, device and dtype) / 'autotune' selection, a kernel failing its self-check (wrong forward or wrong gradient)
being disabled with exactly one warning while training continues on the reference, a kernel raising at run
time, one log line per decision, and the CUDA kernels declining CPU tensors.

    python -m pytest tests/ops/test_dispatch.py
"""

import logging
import time
import warnings

import pytest
import torch

from dsincubate.errors import UserError
from dsincubate.ops import add_layer_norm, attention, dispatch, layer_norm, reference
from dsincubate.ops import flash_attention as attn_mod
from dsincubate.ops import layernorm as ln_mod

CPU = lambda key: (key["device"] == "cpu", "cpu test kernel")  # noqa: E731


class Counting:
    """Wraps an implementation and counts calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args):
        self.calls += 1
        return self.fn(*args)


def _math_ln(x, residual, weight, bias, eps):
    s = x if residual is None else x + residual
    y = reference.layer_norm_math(s, weight, bias, eps)
    return (y,) if residual is None else (y, s)


def _wrong_forward_ln(x, residual, weight, bias, eps):
    out = _math_ln(x, residual, weight, bias, eps)
    return (out[0] * 1.05,) + out[1:]


class _BadGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y):
        return y.clone()

    @staticmethod
    def backward(ctx, g):
        return g * 2.0  # wrong by a factor of two


def _wrong_grad_ln(x, residual, weight, bias, eps):
    out = _math_ln(x, residual, weight, bias, eps)
    return (_BadGrad.apply(out[0]),) + out[1:]


def _inputs(rows=6, cols=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen)
    r = torch.randn(rows, cols, generator=gen)
    w = torch.rand(cols, generator=gen) + 0.5
    b = torch.randn(cols, generator=gen)
    return x, r, w, b


def test_unknown_backend_is_a_user_error():
    x, _, w, b = _inputs()
    with pytest.raises(UserError, match="torch, cuda, auto, autotune"):
        layer_norm(x, w, b, backend="fast")


@pytest.mark.parametrize("backend", dispatch.BACKENDS)
def test_cpu_without_injected_kernels_is_exactly_the_reference(backend):
    x, r, w, b = _inputs()
    assert torch.equal(layer_norm(x, w, b, 1e-6, backend=backend), reference.layer_norm(x, w, b, 1e-6))
    y, s = add_layer_norm(x, r, w, b, 1e-6, backend=backend)
    ry, rs = reference.add_layer_norm(x, r, w, b, 1e-6)
    assert torch.equal(y, ry) and torch.equal(s, rs)
    q, k, v = torch.randn(3, 2, 2, 9, 16).unbind(0)
    assert torch.equal(attention(q, k, v, backend=backend), reference.attention(q, k, v))


def test_cuda_kernels_decline_cpu_tensors():
    x, _, w, b = _inputs()
    layer_norm(x, w, b, backend="cuda")
    (decision,) = dispatch.decisions()
    assert decision["backend"] == "torch" and "not a CUDA tensor" in decision["reason"]
    ok, why = attn_mod.CUDA_IMPL.supports({"device": "cpu", "dtype": "bfloat16", "head_dim": 64})
    assert not ok and "CUDA" in why
    ok, why = ln_mod.CUDA_IMPL.supports({"device": "cuda:0", "dtype": "float64", "weight_dtype": "float32"})
    assert not ok and "float64" in why


def test_cuda_backend_uses_a_kernel_that_passes_and_logs_once(caplog):
    fake = Counting(_math_ln)
    dispatch.register_impl(ln_mod.OP, "fake", fake, CPU)
    x, r, w, b = _inputs()
    with caplog.at_level(logging.INFO, logger="dsincubate.ops"):
        for _ in range(3):
            y, s = add_layer_norm(x, r, w, b, 1e-6, backend="cuda")
    ry, rs = reference.add_layer_norm(x, r, w, b, 1e-6)
    assert torch.allclose(y, ry, atol=1e-5) and torch.equal(s, rs)
    assert fake.calls >= 3 + 1  # the self-check plus every call
    lines = [rec for rec in caplog.records if rec.name == "dsincubate.ops" and "-> fake" in rec.getMessage()]
    assert len(lines) == 1
    assert [d["backend"] for d in dispatch.decisions()] == ["fake"]


@pytest.mark.parametrize("broken", [_wrong_forward_ln, _wrong_grad_ln], ids=["forward", "gradient"])
def test_kernel_failing_self_check_is_disabled_with_one_warning(broken):
    bad = dispatch.register_impl(ln_mod.OP, "bad", Counting(broken), CPU)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 1))
    norm = model[1]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    data, target = torch.randn(64, 16), torch.randn(64, 1)
    losses = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(20):
            h = model[0](data)
            for rows in (64, 32):  # a second shape must not warn again
                y = layer_norm(h[:rows], norm.weight, norm.bias, norm.eps, backend="cuda")
            loss = torch.nn.functional.mse_loss(model[2](y), target[:rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    ours = [w for w in caught if "dsincubate.ops" in str(w.message)]
    assert len(ours) == 1 and issubclass(ours[0].category, RuntimeWarning)
    assert "'bad'" in str(ours[0].message) and "self-check" in str(ours[0].message)
    assert bad.disabled and bad.fn.calls == 1  # only the self-check ever ran it
    assert all(d["backend"] == "torch" for d in dispatch.decisions())
    assert all(map(torch.isfinite, map(torch.tensor, losses))) and losses[-1] < losses[0]


def test_kernel_raising_at_run_time_falls_back_with_one_warning():
    state = {"armed": False}

    def flaky(*args):
        if state["armed"]:
            raise RuntimeError("launch failed")
        return _math_ln(*args)

    impl = dispatch.register_impl(ln_mod.OP, "flaky", flaky, CPU)
    x, _, w, b = _inputs()
    layer_norm(x, w, b, backend="cuda")  # passes the self-check
    state["armed"] = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = [layer_norm(x, w, b, 1e-6, backend="cuda") for _ in range(3)]
    assert len([w for w in caught if "flaky" in str(w.message)]) == 1
    assert "raised RuntimeError" in impl.disabled
    assert all(torch.equal(o, reference.layer_norm(x, w, b, 1e-6)) for o in out)


def test_torch_backend_never_consults_kernels():
    fake = Counting(_math_ln)
    dispatch.register_impl(ln_mod.OP, "fake", fake, CPU)
    x, r, w, b = _inputs()
    add_layer_norm(x, r, w, b, backend="torch")
    assert fake.calls == 0 and dispatch.decisions() == []


def _toy_spec(ref_sleep):
    def ref(x):
        time.sleep(ref_sleep)
        return (x * 2.0,)

    return dispatch.OpSpec(
        "toy", ref,
        make_case=lambda key, gen: [torch.randn(key["n"], generator=gen).requires_grad_(True)],
        call=lambda fn, leaves: fn(*leaves))


@pytest.mark.parametrize("ref_sleep,kernel_sleep,expected", [(0.004, 0.0, "fast"), (0.0, 0.004, "torch")])
def test_autotune_picks_the_fastest_backend_that_passed(ref_sleep, kernel_sleep, expected):
    dispatch.register_op(_toy_spec(ref_sleep))
    try:
        def kernel(x):
            time.sleep(kernel_sleep)
            return (x + x,)

        dispatch.register_impl("toy", "fast", kernel, CPU)
        dispatch.register_impl("toy", "wrong", lambda x: (x * 3.0,), CPU)
        key = (("device", "cpu"), ("dtype", "float32"), ("n", 8))
        with pytest.warns(RuntimeWarning, match="'wrong'"):
            name, _ = dispatch.select("toy", key, "autotune")
        assert name == expected
        (decision,) = dispatch.decisions()
        assert "fastest" in decision["reason"] and "wrong" not in decision["reason"]
        assert dispatch.select("toy", key, "cuda")[0] == "fast"  # 'cuda' takes the kernel regardless of speed
    finally:
        dispatch._SPECS.pop("toy")
        dispatch._IMPLS.pop("toy")


def test_attention_injected_kernel_sees_strided_qkv_views():
    seen = []

    def fake(q, k, v, scale):
        seen.append((q.shape, q.stride(-1), q.is_contiguous()))
        return reference.attention_math(q, k, v, scale)

    dispatch.register_impl(attn_mod.OP, "fake", fake, CPU)
    qkv = torch.randn(2, 11, 3, 4, 8)
    out = attn_mod.attention_qkv(qkv, backend="cuda")
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    assert out.shape == (2, 11, 4, 8)
    assert torch.allclose(out, reference.attention(q, k, v).transpose(1, 2), atol=1e-5)
    assert seen[0] == ((2, 4, 11, 8), 1, False)  # the self-check also feeds packed views


def test_self_check_does_not_touch_the_global_rng():
    dispatch.register_impl(ln_mod.OP, "fake", _math_ln, CPU)
    x, _, w, b = _inputs()
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    layer_norm(x, w, b, backend="auto")  # self-check + timing happen here
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
def test_first_use_under_no_grad_still_checks_gradients(context):
    good = dispatch.register_impl(ln_mod.OP, "good", _math_ln, CPU)
    x, r, w, b = _inputs()
    with context():
        y, s = add_layer_norm(x, r, w, b, 1e-6, backend="cuda")
    assert good.disabled is None and dispatch.decisions()[0]["backend"] == "good"
    assert torch.allclose(y, reference.add_layer_norm(x, r, w, b, 1e-6)[0], atol=1e-5)
    dispatch.reset()
    dispatch.register_impl(ln_mod.OP, "bad", _wrong_grad_ln, CPU)
    with context(), pytest.warns(RuntimeWarning, match="'bad'"):
        add_layer_norm(x, r, w, b, 1e-6, backend="cuda")


def test_self_check_is_invisible_to_activation_checkpointing():
    from torch.utils.checkpoint import checkpoint

    dispatch.register_impl(ln_mod.OP, "good", _math_ln, CPU)
    x, _, w, b = _inputs()
    x.requires_grad_(True)
    out = checkpoint(lambda t: layer_norm(t * 2, w, b, 1e-6, backend="cuda"), x, use_reentrant=False)
    out.sum().backward()
    assert dispatch.decisions()[0]["backend"] == "good" and x.grad is not None and torch.isfinite(x.grad).all()


def test_torch_is_the_default_backend_everywhere():
    import inspect

    from dsincubate.config import ModelConfig

    assert ModelConfig().kernel_backend == "torch"
    for fn in (layer_norm, add_layer_norm, attention, attn_mod.attention_qkv):
        assert inspect.signature(fn).parameters["backend"].default == "torch"
    fake = Counting(_math_ln)
    dispatch.register_impl(ln_mod.OP, "fake", fake, CPU)
    x, _, w, b = _inputs()
    layer_norm(x, w, b)
    assert fake.calls == 0 and dispatch.decisions() == []


def test_auto_decides_once_per_device_and_dtype_at_the_probe_shape(caplog):
    """'auto' self-checks at the op's fixed probe key, logs one decision for (device, dtype), then uses the kernel
    for every shape without timing or further checks, so every rank makes the same choice."""
    seen = []

    def fake(x, residual, weight, bias, eps):
        seen.append(tuple(x.shape))
        return _math_ln(x, residual, weight, bias, eps)

    dispatch.register_impl(ln_mod.OP, "fake", fake, CPU)
    with caplog.at_level(logging.INFO, logger="dsincubate.ops"):
        for rows, cols in ((6, 32), (3, 40), (6, 32)):
            x, r, w, b = _inputs(rows, cols)
            y, s = add_layer_norm(x, r, w, b, 1e-6, backend="auto")
            assert torch.allclose(y, reference.add_layer_norm(x, r, w, b, 1e-6)[0], atol=1e-5)
    probe = ln_mod._probe({"device": "cpu", "dtype": "float32"})
    assert seen[0] == (probe["rows"], probe["cols"])  # the self-check ran at the probe shape, first
    assert seen[1:] == [(6, 32), (3, 40), (6, 32)]  # then each call, with no per-shape check or timing
    (decision,) = dispatch.decisions()
    assert decision["key"] == {"device": "cpu", "dtype": "float32"} and decision["backend"] == "fake"
    assert len([r for r in caplog.records if "backend=auto" in r.getMessage()]) == 1
    add_layer_norm(*[t.bfloat16() for t in _inputs()], 1e-6, backend="auto")  # another dtype: its own decision
    assert [(d["key"]["dtype"], d["backend"]) for d in dispatch.decisions()] == [("float32", "fake"),
                                                                               ("bfloat16", "fake")]


def test_auto_falls_back_to_torch_for_the_whole_dtype_when_the_probe_fails():
    bad = dispatch.register_impl(ln_mod.OP, "bad", Counting(_wrong_forward_ln), CPU)
    with pytest.warns(RuntimeWarning, match="'bad'"):
        for rows in (6, 3):
            x, r, w, b = _inputs(rows)
            y, _ = add_layer_norm(x, r, w, b, 1e-6, backend="auto")
            assert torch.equal(y, reference.add_layer_norm(x, r, w, b, 1e-6)[0])
    assert bad.fn.calls == 1 and [d["backend"] for d in dispatch.decisions()] == ["torch"]


def _qkv_views(head_dim, heads=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(2, 9, 3, heads, head_dim, generator=gen).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def test_auto_keeps_attention_on_sdpa_even_when_a_kernel_passes_its_self_check(caplog):
    """'auto' covers LayerNorm only: the attention kernel (scalar fp32 FMAs, no tensor cores) is never picked over
    SDPA untimed; the decision is logged once and says why."""
    fake = Counting(lambda q, k, v, scale: reference.attention_math(q, k, v, scale))
    dispatch.register_impl(attn_mod.OP, "fake", fake, CPU)
    with caplog.at_level(logging.INFO, logger="dsincubate.ops"):
        for head_dim in (64, 64, 80):
            q, k, v = _qkv_views(head_dim)
            out = attention(q, k, v, backend="auto")
            assert torch.equal(out, reference.attention(q, k, v))
    assert fake.calls == 0  # neither used nor even self-checked
    assert {d["backend"] for d in dispatch.decisions()} == {"torch"}
    assert all("LayerNorm only" in d["reason"] for d in dispatch.decisions())
    lines = [r.getMessage() for r in caplog.records if "backend=auto" in r.getMessage()]
    assert len(lines) == 2 and all("tensor cores" in m for m in lines)  # once per head dim, not per call


def test_auto_self_checks_each_attention_head_dim_bucket(monkeypatch):
    """Were attention under 'auto' (it is not by default), a kernel right at head dim 64 but wrong at ViT-H's 80
    (the padded path) must be checked at 80 too, not used there on the strength of the check at 64."""
    monkeypatch.setattr(dispatch, "AUTO_EXCLUDED", {}, raising=False)
    checked = []

    def right_only_at_64(q, k, v, scale):
        checked.append(q.shape[-1])
        out = reference.attention_math(q, k, v, scale)
        return out if q.shape[-1] == 64 else out * 1.05

    dispatch.register_impl(attn_mod.OP, "padded", right_only_at_64, CPU)
    q, k, v = _qkv_views(64)
    assert torch.allclose(attention(q, k, v, backend="auto"), reference.attention(q, k, v), atol=1e-5)
    assert checked == [64, 64]  # the self-check at the probe, then the call
    q, k, v = _qkv_views(80)
    with pytest.warns(RuntimeWarning, match="'padded'"):
        out = attention(q, k, v, backend="auto")
    assert torch.equal(out, reference.attention(q, k, v))
    assert 80 in checked
    assert [(d["key"].get("head_dim"), d["backend"]) for d in dispatch.decisions()] == [(64, "padded"), (80, "torch")]


@pytest.mark.gpu
def test_auto_on_a_gpu_uses_the_fused_layernorm_and_keeps_sdpa_at_vit_h_head_dim():
    """On a GPU, a ViT with ViT-H's head dim 80: 'auto' self-checks and uses the LayerNorm kernel, leaves attention
    on SDPA, and the model's output matches plain timm under bf16 autocast."""
    import copy

    import timm

    from dsincubate import ops

    torch.manual_seed(0)
    plain = timm.create_model("vit_huge_patch14_224", depth=2, img_size=56, num_classes=10).cuda()
    assert plain.blocks[0].attn.head_dim == 80
    patched = copy.deepcopy(plain)
    info = ops.apply_kernel_backend(patched, "auto")
    assert info["ops"]["layernorm"]["backend"] == "auto", info
    assert info["ops"]["attention"] == {"backend": "torch", "reason": dispatch.AUTO_EXCLUDED["attention"]}, info
    x = torch.randn(2, 3, 56, 56, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        a, b = plain(x).float(), patched(x).float()
    assert (a - b).abs().max() <= 5e-2 * a.abs().max()
    assert {d["op"]: d["backend"] for d in dispatch.decisions()} == {"layernorm": "cuda", "attention": "torch"}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cuda_attention_kernel_passes_its_self_check_at_head_dim_80(dtype):
    """The padded path ViT-H takes ('cuda' and 'autotune' check every shape; this is that check at ViT-H's shape)."""
    key = (("batch", 2), ("device", f"cuda:{torch.cuda.current_device()}"), ("dtype", dtype), ("head_dim", 80),
           ("heads", 16), ("seq", 257))
    assert dispatch.self_check(attn_mod.OP, attn_mod.CUDA_IMPL, key) is None
