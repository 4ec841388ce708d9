"""ds_report-style status of the dsincubate CUDA ops (what `dsincubate ops` prints).

Per op: whether it can be built here (and why not), whether a build is cached (and where), and which backend a
model will use for the requested kernel backend. --build compiles now; --check also runs the kernel
self-check on the GPU (ViT-B/16-sized shapes).

    python -m dsincubate.ops.report [--backend auto|cuda|torch] [--build] [--check]
"""

from __future__ import annotations

import argparse
import sys

import torch

from . import _op_status, dispatch
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
        return f"cuda ({when}self-check; torch if it fails)"
    return f"auto ({when}self-check, then per shape the faster of cuda and torch)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="dsincubate ops", description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=dispatch.BACKENDS, default="auto", help="kernel backend to report on")
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
        print(f"{name}")
        print(f"  compatible   {compat}")
        print(f"  built        {built}")
        print(f"  backend      {use}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
