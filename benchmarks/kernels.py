"""Benchmark the dsincubate CUDA kernels against PyTorch on the local GPU.

Measures, each as forward + backward:
  * fused residual-add + LayerNorm: GB/s (minimum DRAM traffic / time) for ours and for PyTorch's
    `x + r; F.layer_norm`, next to the device's measured copy bandwidth;
  * attention: TFLOP/s for ours and for every SDPA backend that accepts the shape (flash, cudnn, efficient,
    math) at ViT shapes (N = 197 / 257 / 577, head dim 64 / 80);
  * a timm vit_huge_patch14_224 bf16 training step (fwd + bwd + SGD) with kernels off / 'cuda' / 'auto'.
Before timing, each op's kernels are self-checked against the float64 PyTorch reference at its probe shape in bf16
and fp16 (dsincubate.ops.dispatch.self_check; attention also at ViT-H's head dim 80, the kernel's padded path); a
pass is recorded as GPU evidence for `dsincubate ops` (dsincubate/ops/verification.py), a failure is printed and ends
the run with status 1 after the timings.
Prints a table and writes benchmarks/results/kernels_<device>_<date>.json (+ .txt with the table) with the device,
command, git commit and date (`benchmarks.common`). Without a GPU it prints one line and exits with status 1.

How to run (the ops are JIT-built on first use; CUDA_HOME must point at an nvcc matching torch's CUDA):
    CUDA_HOME=/usr/local/cuda python benchmarks/kernels.py            # everything (a few minutes)
    CUDA_HOME=/usr/local/cuda python benchmarks/kernels.py --quick    # fewer shapes and iterations
    options: --skip-vit, --vit-batch 32, --out PATH
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from dsincubate.ops import flash_attention as attn_mod  # noqa: E402
from dsincubate.ops import layernorm as ln_mod  # noqa: E402
from dsincubate.ops import dispatch, reference, verification  # noqa: E402

LN_SHAPES = [(64 * 197, 192), (64 * 197, 384), (32 * 197, 540), (32 * 197, 768), (32 * 257, 1024),
             (32 * 257, 1280), (37, 1000)]
ATTN_SHAPES = [(32, 12, 197, 64), (32, 16, 197, 80), (32, 12, 257, 64), (32, 16, 257, 80), (8, 16, 577, 64),
               (8, 16, 577, 80)]


def timed(fn, iters: int, warmup: int = 3) -> float:
    """Median seconds per call of fn() (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(iters: int) -> float:
    a = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    t = timed(lambda: b.copy_(a), iters)
    return 2 * a.numel() / t / 1e9


def check_kernels() -> dict:
    """Self-check every kernel op on this GPU (bf16 and fp16 at its probe shape); record the ops that pass."""
    out = {}
    for op, mod in (("layernorm", ln_mod), ("attention", attn_mod)):
        errors = {}
        for dtype in ("bfloat16", "float16"):
            probe = mod._probe({"device": f"cuda:{torch.cuda.current_device()}", "dtype": dtype})
            errors[dtype] = dispatch.self_check(op, mod.CUDA_IMPL, tuple(sorted(probe.items())))
            if op == "attention":  # ViT-H's head dim 80 runs the kernel's padded path: its own check
                probe80 = {**probe, "heads": 16, "head_dim": 80}
                errors[f"{dtype} head_dim 80"] = dispatch.self_check(op, mod.CUDA_IMPL, tuple(sorted(probe80.items())))
        out[op] = errors
        if all(e is None for e in errors.values()):
            verification.record(op, "gpu", verification.gpu_details("benchmarks/kernels.py self-check"))
        else:
            print(f"benchmarks/kernels.py: {op} self-check FAILED: {errors}")
    return out


def bench_layernorm(iters: int, shapes) -> list[dict]:
    rows_out = []
    for rows, cols in shapes:
        dtype = torch.bfloat16
        x = torch.randn(rows, cols, device="cuda", dtype=dtype, requires_grad=True)
        r = torch.randn(rows, cols, device="cuda", dtype=dtype, requires_grad=True)
        w = torch.ones(cols, device="cuda", requires_grad=True)
        b = torch.zeros(cols, device="cuda", requires_grad=True)
        gy, gs = torch.randn_like(x), torch.randn_like(x)

        def ours():
            y, s = ln_mod._LayerNormFn.apply(x, r, w, b, 1e-6)
            torch.autograd.backward([y, s], [gy, gs])

        def torch_ref():
            s = x + r
            y = F.layer_norm(s, (cols,), w.to(dtype), b.to(dtype), 1e-6)
            torch.autograd.backward([y, s], [gy, gs])

        nbytes = reference.layer_norm_bytes(rows, cols, x.element_size(), residual=True)
        row = {"rows": rows, "cols": cols, "dtype": "bfloat16", "bytes": nbytes}
        for name, fn in (("dsi", ours), ("torch", torch_ref)):
            t = timed(fn, iters)
            row[f"{name}_ms"] = t * 1e3
            row[f"{name}_GBps"] = nbytes / t / 1e9
        rows_out.append(row)
    return rows_out


def _sdpa_backends():
    from torch.nn.attention import SDPBackend

    names = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
             "math": "MATH"}
    return {k: getattr(SDPBackend, v) for k, v in names.items() if hasattr(SDPBackend, v)}


def bench_attention(iters: int, shapes) -> list[dict]:
    from torch.nn.attention import sdpa_kernel

    out = []
    for B, H, N, D in shapes:
        qkv = torch.randn(B, N, 3, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16)
        flops = reference.attention_flops(B, H, N, D, backward=True)
        row = {"batch": B, "heads": H, "seq": N, "head_dim": D, "dtype": "bfloat16", "flops": flops}

        def run(core):
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            o = core(q, k, v)
            torch.autograd.backward([o], [grad])

        candidates = {"dsi": lambda q, k, v: attn_mod._AttentionFn.apply(q, k, v, D ** -0.5)}
        for name, backend in _sdpa_backends().items():
            def core(q, k, v, backend=backend):
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(q, k, v)
            candidates[f"sdpa_{name}"] = core
        for name, core in candidates.items():
            try:
                t = timed(lambda: run(core), iters)
            except RuntimeError as exc:  # backend does not support this shape / dtype / GPU
                row[f"{name}_TFLOPs"] = None
                row[f"{name}_error"] = str(exc).splitlines()[0][:160]
                continue
            row[f"{name}_ms"] = t * 1e3
            row[f"{name}_TFLOPs"] = flops / t / 1e12
        out.append(row)
        qkv.grad = None
    return out


def bench_vit(iters: int, batch: int) -> dict:
    import timm

    import dsincubate.ops as ops

    result = {"model": "vit_huge_patch14_224", "batch": batch, "dtype": "bfloat16 autocast"}
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    y = torch.randint(0, 1000, (batch,), device="cuda")
    for mode in ("off", "cuda", "auto"):
        torch.manual_seed(0)
        model = timm.create_model("vit_huge_patch14_224").cuda().train()
        if mode != "off":
            result[f"{mode}_info"] = ops.apply_kernel_backend(model, mode)
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        t = timed(step, iters, warmup=3)
        result[f"{mode}_ms"] = t * 1e3
        result[f"{mode}_img_per_s"] = batch / t
        del model, opt
        torch.cuda.empty_cache()
    result["decisions"] = ops.decisions()
    return result


def format_tables(res: dict) -> str:
    lines = [f"device: {res['device']['name']}  ({res['date']})   copy bandwidth: {res['copy_GBps']:.0f} GB/s",
             "\nresidual-add + LayerNorm, fwd+bwd, bf16",
             f"{'rows x cols':>16} {'dsi GB/s':>9} {'torch GB/s':>10} {'dsi/copy':>8} {'speedup':>8}"]
    for r in res["layernorm"]:
        lines.append(f"{r['rows']:>9} x {r['cols']:<5} {r['dsi_GBps']:>9.0f} {r['torch_GBps']:>10.0f} "
                     f"{r['dsi_GBps'] / res['copy_GBps']:>8.2f} {r['torch_ms'] / r['dsi_ms']:>8.2f}")
    lines.append("\nattention, fwd+bwd, bf16, TFLOP/s")
    names = [k[:-7] for k in res["attention"][0] if k.endswith("_TFLOPs")]
    lines.append(f"{'B x H x N x D':>18} " + " ".join(f"{n:>14}" for n in names))
    for r in res["attention"]:
        cells = [f"{r[n + '_TFLOPs']:>14.1f}" if r[n + "_TFLOPs"] is not None else f"{'n/a':>14}" for n in names]
        lines.append(f"{r['batch']:>4} x {r['heads']:>2} x {r['seq']:>3} x {r['head_dim']:>3} " + " ".join(cells))
    if "vit" in res:
        v = res["vit"]
        lines.append(f"\n{v['model']} training step, batch {v['batch']}, {v['dtype']}")
        for mode in ("off", "cuda", "auto"):
            lines.append(f"  kernels {mode:<5} {v[mode + '_ms']:8.1f} ms/step  {v[mode + '_img_per_s']:7.1f} img/s")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes and iterations")
    parser.add_argument("--skip-vit", action="store_true", help="skip the ViT-H/14 training step")
    parser.add_argument("--vit-batch", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default benchmarks/results/kernels_<device>_<date>.json)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py: no CUDA GPU available (torch.cuda.is_available() is False); nothing measured")
        return 1
    iters = 5 if args.quick else 20
    for builder_check in (ln_mod._supports({"device": "cuda", "dtype": "bfloat16", "weight_dtype": "float32"}),
                          attn_mod._supports({"device": "cuda", "dtype": "bfloat16", "head_dim": 64})):
        if not builder_check[0]:
            print(f"benchmarks/kernels.py: kernels unavailable: {builder_check[1]}")
            return 1
    res = common.header("kernels")
    res.update(torch=torch.__version__, cuda=torch.version.cuda)
    res["self_check"] = check_kernels()
    res["copy_GBps"] = copy_bandwidth(iters)
    res["layernorm"] = bench_layernorm(iters, LN_SHAPES[1::2] if args.quick else LN_SHAPES)
    res["attention"] = bench_attention(iters, ATTN_SHAPES[::2] if args.quick else ATTN_SHAPES)
    if not args.skip_vit:
        res["vit"] = bench_vit(3 if args.quick else 10, args.vit_batch)
    text = format_tables(res)
    print(text)
    path = common.write_result("kernels", res, text, args.out)
    print(f"\nwrote {path}")
    return 0 if all(e is None for errs in res["self_check"].values() for e in errs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
