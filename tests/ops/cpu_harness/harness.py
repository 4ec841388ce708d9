"""Build and run the CPU execution harness for the csrc/ CUDA kernels (test-only helper).

The kernels' .cu files are compiled unchanged by the host C++ compiler with -DDSI_CPU_HARNESS (dsi_cpu_cuda.h
emulates threads, barriers, warp shuffles, shared memory and launches; runtime.cpp), linked with driver.cpp and
built with AddressSanitizer + UndefinedBehaviorSanitizer. Objects are cached per source content and flags under
$DSI_HARNESS_CACHE (default ~/.cache/dsincubate/cpu_harness), so a session compiles once and a mutated copy of
one kernel file recompiles only that file.

    exe = build()                                  # or build(csrc_root=<a copy of csrc>)
    results = run(exe, [LNCase(...), AttnCase(...)])

Used by tests/ops/test_cpu_harness.py; `make test-harness` runs that tier.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO_CSRC = HERE.parents[2] / "csrc"
KERNEL_SOURCES = ("layernorm/layernorm_kernels.cu", "attention/attention_fwd.cu", "attention/attention_bwd.cu")
DTYPE_TAG = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]
# Sanitizer reports end the process with a non-zero status; the driver's stdout up to then is kept.
# Each case runs under these thread schedules (runtime.cpp) and must give bit-identical outputs under all.
ALL_SCHEDULES = "lowest,highest,random"
RUN_ENV = {"ASAN_OPTIONS": "abort_on_error=1:halt_on_error=1:detect_leaks=1:strict_string_checks=1",
           "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"}


def compiler() -> str:
    for cxx in (os.environ.get("DSI_HARNESS_CXX"), "g++", "clang++"):
        if cxx and shutil.which(cxx):
            return cxx
    raise RuntimeError("no C++ compiler (g++ or clang++) on PATH")


def cuda_include() -> Path | None:
    """CUDA's headers: cuda_fp16.h / cuda_bf16.h provide the half types and their host conversions."""
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and Path(home, "include", "cuda_bf16.h").exists():
            return Path(home, "include")
    return None


def unavailable_reason() -> str | None:
    """Why the harness cannot be built here (None when it can)."""
    try:
        compiler()
    except RuntimeError as exc:
        return str(exc)
    if cuda_include() is None:
        return "CUDA headers (cuda_bf16.h) not found at $CUDA_HOME or /usr/local/cuda"
    if os.uname().machine != "x86_64":
        return "the harness's fiber switch is x86-64 only"
    return None


def cache_dir() -> Path:
    env = os.environ.get("DSI_HARNESS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dsincubate" / "cpu_harness"


def _flags(quick: bool = False) -> list[str]:
    # No -I for csrc: the kernel files include their headers by relative path, so a copy uses its own headers
    # and the object cache key (sources + headers + flags) does not depend on where the copy lives.
    # quick: -O0 without the flatten attribute, for mutated copies that only run a few tiny cases.
    opt = ["-O0", "-DDSI_HARNESS_NO_FLATTEN"] if quick else ["-O1"]
    return ["-std=c++17", *opt, "-g", *SANITIZE, "-DDSI_CPU_HARNESS", f"-I{HERE}", f"-I{cuda_include()}",
            "-Wall", "-Wno-unknown-pragmas", "-Werror=return-type"]


def _digest(paths: list[Path], flags: list[str], extra: str = "") -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    h.update(repr(flags).encode())
    h.update(extra.encode())
    return h.hexdigest()[:16]


def _compile(cxx: str, src: Path, flags: list[str], headers: list[Path], out_dir: Path, cu: bool) -> Path:
    obj = out_dir / f"{src.stem}-{_digest([src, *headers], flags, cxx)}.o"
    if not obj.exists():
        tmp = obj.with_suffix(f".{os.getpid()}.tmp")
        cmd = [cxx, *flags, *(["-x", "c++"] if cu else []), "-c", str(src), "-o", str(tmp)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"harness compile failed: {' '.join(cmd)}\n{proc.stderr[-6000:]}")
        tmp.replace(obj)  # atomic: concurrent sessions never see a half-written object
    return obj


def build(csrc_root: Path | None = None, jobs: int = 2) -> Path:
    """Compile (or reuse) the sanitized harness executable for the kernels under `csrc_root` (default: csrc/)."""
    csrc = Path(csrc_root or REPO_CSRC).resolve()
    cxx = compiler()
    flags = _flags()
    headers = sorted(p for p in csrc.rglob("*") if p.suffix in (".h", ".cuh"))
    headers += [HERE / "dsi_cpu_cuda.h"]
    out = cache_dir() / "objects"
    out.mkdir(parents=True, exist_ok=True)
    # A kernel file that differs from csrc/ (a mutated copy) is compiled quickly; the rest come from the cache.
    units = [(csrc / s, True, (csrc / s).read_bytes() != (REPO_CSRC / s).read_bytes()) for s in KERNEL_SOURCES]
    units += [(HERE / "runtime.cpp", False, False), (HERE / "driver.cpp", False, False)]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        objs = list(pool.map(lambda u: _compile(cxx, u[0], _flags(u[2]), headers, out, u[1]), units))
    exe = cache_dir() / f"driver-{_digest(objs, flags, cxx)}"
    if not exe.exists():
        tmp = exe.with_suffix(f".{os.getpid()}.tmp")
        proc = subprocess.run([cxx, *SANITIZE, *map(str, objs), "-o", str(tmp)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"harness link failed:\n{proc.stderr[-6000:]}")
        tmp.replace(exe)
    return exe


def _bits(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def _from_bits(data: bytes, dtype: torch.dtype) -> torch.Tensor:
    raw = torch.frombuffer(bytearray(data), dtype=torch.int16 if dtype in (torch.float16, torch.bfloat16) else dtype)
    return raw.view(dtype) if dtype != raw.dtype else raw


@dataclass
class LNCase:
    """Residual-add + LayerNorm fwd + bwd on [rows, cols]; weights are fp32 (the bindings convert them)."""

    dtype: torch.dtype
    rows: int
    cols: int
    residual: bool
    misalign: bool = False  # x starts one element past a 16-byte boundary (the scalar-path fallback)
    eps: float = 1e-6
    schedules: str = ALL_SCHEDULES
    inputs: dict = field(default_factory=dict)

    def line(self) -> str:
        return (f"ln {DTYPE_TAG[self.dtype]} {self.rows} {self.cols} {int(self.residual)} {int(self.misalign)} "
                f"{self.eps!r}")

    def outputs(self) -> dict:
        n, c = self.rows * self.cols, self.cols
        out = {"y": (self.dtype, n), "mean": (torch.float32, self.rows), "rstd": (torch.float32, self.rows),
               "dx": (self.dtype, n), "dgamma": (torch.float32, c), "dbeta": (torch.float32, c)}
        if self.residual:
            out["s"] = (self.dtype, n)
        return out


@dataclass
class AttnCase:
    """Attention fwd + bwd, [B, H, N, D]; packed: q/k/v and dq/dk/dv are views of [B, N, 3, H, D] buffers."""

    dtype: torch.dtype
    batch: int
    heads: int
    seq: int
    head_dim: int
    packed: bool = True
    schedules: str = ALL_SCHEDULES
    inputs: dict = field(default_factory=dict)

    @property
    def scale(self) -> float:
        return self.head_dim ** -0.5

    def line(self) -> str:
        return (f"attn {DTYPE_TAG[self.dtype]} {self.batch} {self.heads} {self.seq} {self.head_dim} "
                f"{int(self.packed)} {self.scale!r}")

    def outputs(self) -> dict:
        one = self.batch * self.heads * self.seq * self.head_dim
        out = {"o": (self.dtype, one), "lse": (torch.float32, self.batch * self.heads * self.seq)}
        if self.packed:
            out["dqkv"] = (self.dtype, 3 * one)
        else:
            out.update({name: (self.dtype, one) for name in ("dq", "dk", "dv")})
        return out


@dataclass
class Result:
    status: str  # OK | RACE | ERR | CRASH (the process died before reporting this case)
    detail: str
    outputs: dict


@dataclass
class Run:
    results: list
    launched: dict  # "kernel<...> | elem type" -> launches
    returncode: int
    stderr: str
    seconds: float = 0.0  # wall time of the driver
    cpu_seconds: float = float("nan")  # its own CPU time (wall time depends on what else shares the machine)


def run(exe: Path, cases: list, timeout: float = 600) -> Run:
    """Write the cases' inputs, run the driver once over all of them, read back every output."""
    import time

    with tempfile.TemporaryDirectory(prefix="dsi_harness_") as tmp:
        d = Path(tmp)
        lines = []
        for i, case in enumerate(cases):
            lines.append(f"{i} {case.schedules} {case.line()}")
            for name, t in case.inputs.items():
                (d / f"{i}.{name}.in").write_bytes(_bits(t))
        (d / "cases.txt").write_text("\n".join(lines) + "\n")
        env = {**os.environ, **RUN_ENV}
        start = time.perf_counter()
        proc = subprocess.run([str(exe), str(d)], capture_output=True, text=True, env=env, timeout=timeout)
        seconds = time.perf_counter() - start
        verdicts, launched, cpu = {}, {}, float("nan")
        for line in proc.stdout.splitlines():
            if line.startswith("CPU_SECONDS "):
                cpu = float(line.split()[1])
            elif line.startswith("LAUNCHED "):
                name, count = line[len("LAUNCHED "):].rsplit(" ", 1)
                launched[name] = int(count)
            elif line.split(" ", 1)[0] in ("OK", "RACE", "ERR"):
                status, rest = line.split(" ", 1)
                cid, _, detail = rest.partition(" ")
                verdicts[int(cid)] = (status, detail)
        results = []
        for i, case in enumerate(cases):
            if i not in verdicts:
                results.append(Result("CRASH", proc.stderr[-8000:], {}))
                continue
            outs = {name: _from_bits((d / f"{i}.{name}.out").read_bytes(), dt)[:n]
                    for name, (dt, n) in case.outputs().items() if (d / f"{i}.{name}.out").exists()}
            results.append(Result(*verdicts[i], outs))
    return Run(results, launched, proc.returncode, proc.stderr, seconds, cpu)
