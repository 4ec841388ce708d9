"""ds_report-style status of the dsincubate CUDA ops (what `dsincubate ops` prints).

Per op: whether it can be built here (and why not), whether a build is cached (and where), which backend a
model will use for the requested kernel backend (default 'torch', as the config), and per kernel where it has
been verified for the current sources: the CPU execution harness (make test-harness: the kernel bodies run on
the CPU under ASan/UBSan) and real GPUs (make test-gpu, benchmarks/kernels.py); see verification.py. --build
compiles now; --check also runs the kernel self-check on the GPU (ViT-B/16-sized shapes).

    python -m dsincubate.ops.report [--backend torch|cuda|auto|autotune] [--build] [--check]
"""

from __future__ import annotations

import argparse
import sys

import torch

from . import _op_status, dispatch, verification
from .builder import ALL_BUILDERS, cache_root, cuda_arch_list, cuda_home, nvcc_version

# ViT-B/16 at 224: 197 tokens, width 768, 12 heads of 64.
_CHECK_KEYS = {
    "layernorm": (("rows", 2 * 197), ("cols", 768), ("residual", True), ("weight_dtype", "float32")),
    "attention": (("batch", 2), ("heads", 12), ("seq", 197), ("head_dim", 64)),
}


def _environment() -> list[tuple[str, str]]:
    home = cuda_home()
    try:
        archs = ";".join(cuda_arch_list())
    except ValueError as exc:
        archs = f"invalid ({exc})"
    gpu = "none"
    if torch.cuda.is_available():
        gpu = ", ".join(f"{torch.cuda.get_device_name(i)} (sm_{''.join(map(str, torch.cuda.get_device_capability(i)))})"
                        for i in range(torch.cuda.device_count()))
    return [
        ("torch", f"{torch.__version__} (CUDA {torch.version.cuda or 'none'})"),
        ("GPU", gpu),
        ("nvcc", f"{nvcc_version(home)} at {home}" if home else "not found"),
        ("arch list", archs),
        ("op cache", str(cache_root())),
    ]


def _will_use(name: str, backend: str, compatible: bool, why: str, built: bool) -> str:
    if backend == "torch":
        return "torch (requested)"
    if not torch.cuda.is_available():
        return "torch (no CUDA device)"
    if not compatible:
        return f"torch ({why})"
    when = "" if built else "JIT build on first use, then "
    if backend == "cuda":
        return f"cuda ({when}self-check per shape; torch if it fails)"
    if backend == dispatch.AUTO:
        if name in dispatch.AUTO_EXCLUDED:
            return f"torch ({dispatch.AUTO_EXCLUDED[name]})"
        return f"auto ({when}one self-check per device, dtype and bucket; cuda for every supported shape if it passes)"
    return f"autotune ({when}self-check, then per shape the faster of cuda and torch, timed)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="dsincubate ops", description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=dispatch.BACKENDS, default="torch",
                        help="kernel backend to report on (default: torch, the config default)")
    parser.add_argument("--build", action="store_true", help="compile the compatible ops now")
    parser.add_argument("--check", action="store_true", help="build and self-check the kernels on this GPU")
    args = parser.parse_args(argv)

    print("dsincubate ops report")
    print("-" * 78)
    for label, value in _environment():
        print(f"{label:<12} {value}")
    print("-" * 78)
    failed = False
    rows = []
    for name, cls in ALL_BUILDERS.items():
        builder = cls()
        compatible, why = builder.is_compatible()
        if compatible and (args.build or args.check):
            try:
                builder.load()
            except Exception as exc:
                failed = True
                compatible, why = False, f"build failed: {str(exc).splitlines()[0]}"
        built = compatible and builder.is_built()
        use = _will_use(name, args.backend, compatible, why, built)
        if args.check and compatible and torch.cuda.is_available() and args.backend != "torch":
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
            key = (("device", f"cuda:{torch.cuda.current_device()}"), ("dtype", dtype)) + _CHECK_KEYS[name]
            status = _op_status(name, key, args.backend)
            use = f"{status['backend']} ({status['reason']})"
            failed |= status["backend"] == "torch"
        rows.append((name, "yes" if compatible else f"no: {why}", f"yes ({builder.build_dir()})" if built else "no",
                     use))
    for name, compat, built, use in rows:
        harness, gpu = verification.summary(name)
        print(f"{name}")
        print(f"  compatible   {compat}")
        print(f"  built        {built}")
        print(f"  backend      {use}")
        print(f"  sources      {verification.source_hash(name)} ({builder_sources(name)})")
        print(f"  CPU harness  {harness}")
        print(f"  GPU          {gpu}")
        h_ok = "passed" if harness.startswith("passed") else "no"
        g_ok = "passed" if gpu.startswith("passed") else "no"
        print(f"    {'kernel':<24}{'CPU harness':<13}{'GPU':<8}what")
        for kernel, what in verification.KERNELS[name].items():
            print(f"    {kernel:<24}{h_ok:<13}{g_ok:<8}{what}")
    return 1 if failed else 0


def builder_sources(op: str) -> str:
    from .builder import ALL_BUILDERS, CSRC

    return ", ".join(str(CSRC / s) for s in ALL_BUILDERS[op].SOURCES if s.endswith(".cu"))


if __name__ == "__main__":
    sys.exit(main())
