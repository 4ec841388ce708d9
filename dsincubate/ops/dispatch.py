"""Backend selection for the dsincubate ops: 'torch' | 'cuda' | 'auto' | 'autotune', with a correctness self-check.

Every op has a PyTorch reference (reference.py) and zero or more registered kernel implementations.

* 'torch'    -> the reference (the default everywhere: PyTorch's own LayerNorm and SDPA).
* 'cuda'     -> per shape key, the first kernel that supports the key and passes its self-check at that key,
                else the reference.
* 'auto'     -> covers LayerNorm only. Decided ONCE per (op, device, dtype, bucket): the first kernel that passes
                its self-check at the op's probe shape (OpSpec.probe, with the bucket's fields taken from the
                key: AUTO_BUCKET) is used for every shape of that bucket it supports, else the reference. No timing
                and no dependence on call order, so every rank of a job (same GPU model and software) makes the
                same choice; the decision is logged once. Attention under 'auto' is PyTorch's SDPA (AUTO_EXCLUDED):
                our attention kernel computes with scalar fp32 FMAs, no tensor cores, so on A100/H100 it cannot
                beat SDPA's flash/cuDNN kernels, and choosing it would need timing both, which differs per rank.
                'autotune' times both; 'cuda' uses it (self-checked at every shape). Attention's bucket is its
                head dim, so were it enabled, ViT-H's 80 (the kernel's padded 128 path) gets its own check.
* 'autotune' -> per shape key, the fastest (fwd + bwd wall time) of the reference and every kernel that passed
                the self-check. Timing is noisy: ranks and runs can choose differently.

The self-check runs the kernel on random inputs of the key's shape (own RNG, autocast off, outside any
checkpoint hooks) and compares outputs and input gradients with the reference computed in float64. A kernel
that fails it, or raises when called, is disabled for the rest of the process with ONE warning and the op falls
back to the reference, so training continues. Each decision is logged once on logger "dsincubate.ops" and
kept for `decisions()` (run.json).

Tests inject kernels with `register_impl` (also on CPU) and clean up with `unregister_impl` / `reset`.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .reference import relative_error

logger = logging.getLogger("dsincubate.ops")

BACKENDS = ("torch", "cuda", "auto", "autotune")
TORCH = "torch"
AUTO = "auto"

# max |err| / max |ref| allowed per compute dtype, against a float64 reference.
TOLERANCE = {torch.float32: 2e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2, torch.float64: 1e-10}

Key = tuple  # tuple of (name, value) pairs; JSON-friendly via dict(key)

# 'auto' leaves these ops on the reference, whatever kernels pass their self-check (see the module docstring).
AUTO_EXCLUDED = {"attention": "auto covers LayerNorm only: the attention kernel uses scalar fp32 FMAs (no tensor "
                              "cores) and would lose to SDPA; kernel_backend=autotune times both, cuda forces it"}
# Key fields that split an op's 'auto' decision into buckets, each self-checked at its own probe: the attention
# kernel pads head dims up to 64 or 128 (ViT-B/L: 64, ViT-H: 80), so one check at 64 says nothing about 80.
AUTO_BUCKET = {"attention": ("head_dim",)}


@dataclass
class OpSpec:
    """How to exercise an op: `make_case(key, generator)` returns leaf tensors (those requiring grad get
    checked gradients) and `call(fn, leaves)` applies an implementation to them, returning a tuple of outputs."""

    name: str
    reference: Callable
    make_case: Callable[[dict, torch.Generator], list]
    call: Callable[[Callable, list], tuple]
    check_key: Callable[[dict], dict] = lambda key: key  # e.g. a smaller batch for the self-check
    probe: Callable[[dict], dict] = lambda key: key  # 'auto': the fixed key checked for the key's (device, dtype)


@dataclass
class KernelImpl:
    op: str
    name: str
    fn: Callable
    supports: Callable[[dict], tuple]  # key dict -> (bool, reason)
    disabled: str | None = None
    checked: dict = field(default_factory=dict)  # key -> error string or None


_SPECS: dict[str, OpSpec] = {}
_IMPLS: dict[str, dict[str, KernelImpl]] = {}
_CHOICE: dict[tuple, tuple[str, str]] = {}  # (op, backend, key) or (op, 'auto', device, dtype) -> (name, reason)
_SUPPORTED: dict[tuple, bool] = {}  # (op, impl name, key) -> supports(key), for 'auto' (asked once per shape)
_DECISIONS: list[dict] = []


def register_op(spec: OpSpec) -> None:
    _SPECS[spec.name] = spec
    _IMPLS.setdefault(spec.name, {})


def register_impl(op: str, name: str, fn: Callable, supports: Callable[[dict], tuple]) -> KernelImpl:
    """Add (or replace) a kernel implementation of `op`; forgets earlier decisions for that op."""
    if name == TORCH:
        raise ValueError("'torch' is the reference backend's name")
    impl = KernelImpl(op, name, fn, supports)
    _IMPLS[op][name] = impl
    forget(op)
    return impl


def unregister_impl(op: str, name: str) -> None:
    _IMPLS[op].pop(name, None)
    forget(op)


def forget(op: str | None = None) -> None:
    """Drop cached decisions (of one op or all), so the next call decides again."""
    for ck in [ck for ck in _CHOICE if op is None or ck[0] == op]:
        del _CHOICE[ck]
    for ck in [ck for ck in _SUPPORTED if op is None or ck[0] == op]:
        del _SUPPORTED[ck]


def reset() -> None:
    """Forget every decision, self-check result and disabled state (tests)."""
    forget()
    _DECISIONS.clear()
    for impls in _IMPLS.values():
        for impl in impls.values():
            impl.disabled = None
            impl.checked.clear()


def impls(op: str) -> dict[str, KernelImpl]:
    return dict(_IMPLS.get(op, {}))


def decisions() -> list[dict]:
    """Every decision made so far: op, requested backend, shape key, chosen backend, reason."""
    return [dict(d) for d in _DECISIONS]


def validate_backend(backend: str) -> str:
    if backend not in BACKENDS:
        from ..errors import UserError

        raise UserError(f"kernel backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    return backend


def _disable(impl: KernelImpl, why: str) -> None:
    impl.disabled = why
    forget(impl.op)
    msg = f"dsincubate.ops: {impl.op} kernel '{impl.name}' disabled ({why}); falling back to the PyTorch reference"
    logger.warning(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _run(spec: OpSpec, fn: Callable, leaves: list, cotangents: list | None, dtype=None):
    """fwd + bwd of `fn` on fresh copies of `leaves` (cast to dtype); returns (outputs, input grads, cotangents)."""
    fresh = []
    for t in leaves:
        if t is None:  # an optional input (e.g. no residual)
            fresh.append(None)
            continue
        c = t.detach().to(dtype) if (dtype is not None and t.is_floating_point()) else t.detach().clone()
        fresh.append(c.requires_grad_(t.requires_grad))
    outs = spec.call(fn, fresh)
    if cotangents is None:
        gen = torch.Generator(device=outs[0].device).manual_seed(4321)
        cotangents = [torch.randn(o.shape, generator=gen, device=o.device, dtype=torch.float32) for o in outs]
    torch.autograd.backward(list(outs), [c.to(o.dtype) for c, o in zip(cotangents, outs)])
    grads = [t.grad for t in fresh if t is not None and t.requires_grad]
    return [o.detach() for o in outs], grads, cotangents


def _isolated():
    """Context for self-checks and timing: grad on (even inside inference_mode), autocast off, and no outer
    saved-tensor hooks (activation checkpointing must not see the check's private autograd graph)."""
    import contextlib

    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.enable_grad())
    for dev in ("cuda", "cpu") if torch.cuda.is_available() else ("cpu",):
        stack.enter_context(torch.autocast(device_type=dev, enabled=False))
    stack.enter_context(torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t))
    return stack


def self_check(op: str, impl: KernelImpl, key: Key) -> str | None:
    """None if `impl` matches the float64 reference on random inputs of this key, else a description."""
    if key in impl.checked:
        return impl.checked[key]
    spec = _SPECS[op]
    kd = spec.check_key(dict(key))
    gen = torch.Generator(device=kd["device"]).manual_seed(1234)
    with _isolated():
        leaves = spec.make_case(kd, gen)
        try:
            outs, grads, cot = _run(spec, impl.fn, leaves, None)
        except Exception as exc:  # a kernel that raises is as unusable as a wrong one
            impl.checked[key] = f"raised {type(exc).__name__}: {exc}"
            return impl.checked[key]
        ref_outs, ref_grads, _ = _run(spec, spec.reference, leaves, cot, dtype=torch.float64)
    tol = TOLERANCE[getattr(torch, kd["dtype"])]
    result = None
    names = [f"output{i}" for i in range(len(ref_outs))] + [f"grad{i}" for i in range(len(ref_grads))]
    for what, got, want in zip(names, outs + grads, ref_outs + ref_grads):
        if got is None or got.shape != want.shape:
            result = f"{what}: shape {None if got is None else tuple(got.shape)} != {tuple(want.shape)}"
            break
        err = relative_error(got, want)
        if not err <= tol:
            result = f"{what}: relative error {err:.3g} > {tol:g} at {dict(key)}"
            break
    impl.checked[key] = result
    return result


def _time(spec: OpSpec, fn: Callable, leaves: list, iters: int = 10) -> float:
    cuda = leaves[0].is_cuda
    with _isolated():
        _, _, cot = _run(spec, fn, leaves, None)
        for _ in range(2):
            _run(spec, fn, leaves, cot)
        if cuda:
            torch.cuda.synchronize(leaves[0].device)
        start = time.perf_counter()
        for _ in range(iters):
            _run(spec, fn, leaves, cot)
        if cuda:
            torch.cuda.synchronize(leaves[0].device)
    return (time.perf_counter() - start) / iters


def select(op: str, key: Key, backend: str) -> tuple[str, Callable | None]:
    """(name, fn) of the implementation to use; fn is None for the reference ('torch')."""
    if backend == TORCH:
        return TORCH, None
    if backend == AUTO:
        return _select_auto(op, key)
    ck = (op, backend, key)
    if ck not in _CHOICE:
        _CHOICE[ck] = _decide(op, key, backend)
    name = _CHOICE[ck][0]
    return (TORCH, None) if name == TORCH else (name, _IMPLS[op][name].fn)


def _select_auto(op: str, key: Key) -> tuple[str, Callable | None]:
    kd = dict(key)
    group = (op, AUTO, kd["device"], kd["dtype"], *(kd[f] for f in AUTO_BUCKET.get(op, ())))
    if group not in _CHOICE:
        _CHOICE[group] = _decide_auto(op, kd)
    name = _CHOICE[group][0]
    impl = _IMPLS[op].get(name)
    if impl is None or impl.disabled:
        return TORCH, None
    sk = (op, name, key)
    if sk not in _SUPPORTED:  # shape limits (e.g. head dim <= 128) are deterministic, so still rank-identical
        _SUPPORTED[sk] = bool(impl.supports(kd)[0])
    return (name, impl.fn) if _SUPPORTED[sk] else (TORCH, None)


def _decide_auto(op: str, kd: dict) -> tuple[str, str]:
    """'auto': self-check every kernel at the op's probe key for this (device, dtype, bucket); the first that passes
    wins. An op in AUTO_EXCLUDED stays on the reference without building or checking anything."""
    bucket = {f: kd[f] for f in AUTO_BUCKET.get(op, ())}
    probe = {**_SPECS[op].probe(kd), **bucket}
    pkey = tuple(sorted(probe.items()))
    notes, choice = [], None
    if op in AUTO_EXCLUDED:
        choice = (TORCH, AUTO_EXCLUDED[op])
    for impl in list(_IMPLS[op].values()) if choice is None else []:
        if impl.disabled:
            notes.append(f"{impl.name} disabled: {impl.disabled}")
            continue
        ok, why = impl.supports(probe)
        if not ok:
            notes.append(f"{impl.name} unsupported: {why}")
            continue
        err = self_check(op, impl, pkey)
        if err is not None:
            _disable(impl, f"failed self-check: {err}")
            notes.append(f"{impl.name} failed self-check")
            continue
        choice = (impl.name, f"passed self-check at {probe}; used for every shape it supports")
        break
    if choice is None:
        choice = (TORCH, "; ".join(notes) or "no kernel registered")
    group = {"device": kd["device"], "dtype": kd["dtype"], **bucket}
    logger.info("op %s backend=auto %s -> %s (%s)", op, group, choice[0], choice[1])
    _DECISIONS.append({"op": op, "requested": AUTO, "key": group, "backend": choice[0], "reason": choice[1]})
    return choice


def _decide(op: str, key: Key, backend: str) -> tuple[str, str]:
    passed, notes = [], []
    for impl in list(_IMPLS[op].values()):
        if impl.disabled:
            notes.append(f"{impl.name} disabled: {impl.disabled}")
            continue
        ok, why = impl.supports(dict(key))
        if not ok:
            notes.append(f"{impl.name} unsupported: {why}")
            continue
        err = self_check(op, impl, key)
        if err is not None:
            _disable(impl, f"failed self-check: {err}")
            notes.append(f"{impl.name} failed self-check")
            continue
        passed.append(impl)
    if not passed:
        choice = (TORCH, "; ".join(notes) or "no kernel registered")
    elif backend == "cuda":
        choice = (passed[0].name, "passed self-check")
    else:
        spec = _SPECS[op]
        kd = dict(key)
        leaves = spec.make_case(kd, torch.Generator(device=kd["device"]).manual_seed(99))
        times = {TORCH: _time(spec, spec.reference, leaves)}
        for impl in passed:
            times[impl.name] = _time(spec, impl.fn, leaves)
        best = min(times, key=times.get)
        choice = (best, "fastest fwd+bwd: " + ", ".join(f"{n} {t * 1e3:.3f} ms" for n, t in times.items()))
    logger.info("op %s backend=%s %s -> %s (%s)", op, backend, dict(key), choice[0], choice[1])
    _DECISIONS.append({"op": op, "requested": backend, "key": dict(key), "backend": choice[0], "reason": choice[1]})
    return choice


def call(op: str, key: Key, backend: str, args: Sequence, torch_path: Callable[[], object]):
    """Run `op` through the selected implementation; `torch_path()` is the exact PyTorch computation (e.g. the
    original module call) used whenever the reference is selected or a kernel raises."""
    name, fn = select(op, key, backend)
    if fn is None:
        return torch_path()
    try:
        return fn(*args)
    except RuntimeError as exc:
        # Only RuntimeError (TORCH_CHECK, CUDA errors): other exceptions can be control flow passing through,
        # e.g. non-reentrant checkpointing stops its recomputation by raising from a saved-tensor hook.
        _disable(_IMPLS[op][name], f"raised {type(exc).__name__}: {exc}")
        return torch_path()
