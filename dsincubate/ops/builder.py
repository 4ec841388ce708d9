"""JIT builders for the dsincubate CUDA ops, in the style of DeepSpeed's op builders.

Each builder names its sources under ``csrc/``, its compiler flags and whether it can be built on this machine
(``is_compatible() -> (bool, reason)``); ``load()`` compiles the extension with ninja through
``torch.utils.cpp_extension.load`` into a cache directory and imports it. The cache directory name hashes the
sources, flags, CUDA arch list and torch/CUDA versions, so an edit or a different GPU never reuses a stale
binary and ``is_built()`` is exact. Building needs nvcc and ninja but no GPU.

Environment:
    DSI_OPS_CACHE          cache root (default ~/.cache/dsincubate/ops)
    TORCH_CUDA_ARCH_LIST   e.g. "8.0;9.0" or "9.0+PTX" (default: the visible GPUs, else 8.0;9.0)
    CUDA_HOME, MAX_JOBS    as for torch.utils.cpp_extension
    DSI_OPS_VERBOSE=1      show the compiler commands
    DSI_OPS_BUILD_WAIT_S   how long to wait for another live process building the same op (default 3600)

A build killed half-way (SIGKILL, OOM killer, a SLURM time limit) used to hang every later start: torch's JIT
build marks its build directory with a ``lock`` file, and torch versions whose lock is a plain file
(``torch.utils.file_baton.FileBaton``: existence = held) wait forever for a file nobody will remove. ``load()``
therefore serialises builds of one directory with its own kernel-held lock (``fcntl.flock`` on ``dsi_build.lock``,
which the kernel drops when its holder dies, with the holder's host and pid written inside). Holding it, any torch
``lock`` file still there was left by a process that is gone (every builder of the directory takes our lock
first), so it is removed with a warning. A live builder is respected: we wait for its lock, up to
DSI_OPS_BUILD_WAIT_S, then stop with an error naming it. (torch >= 2.14 itself holds an OS lock, so a leftover file
no longer blocks there; the removal is for the torch versions that still use FileBaton.)

Prebuild everything (what setup.py does when DSI_BUILD_OPS=1):
    python -c "from dsincubate.ops.builder import prebuild_all; print(prebuild_all())"
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import re
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

logger = logging.getLogger("dsincubate.ops")
TORCH_LOCK = "lock"  # the file torch.utils.cpp_extension locks (or, in older torch, creates) in the build directory
OUR_LOCK = "dsi_build.lock"

def _find_csrc() -> Path:
    """The kernel sources: dsincubate/csrc in an installed package (setup.py ships csrc/ there as package data),
    else csrc/ at the root of the checkout (editable install, or running from the source tree)."""
    installed = Path(__file__).resolve().parents[1] / "csrc"
    return installed if installed.is_dir() else Path(__file__).resolve().parents[2] / "csrc"


CSRC = _find_csrc()
DEFAULT_ARCHS = ("8.0", "9.0")
_ARCH_RE = re.compile(r"^(\d+)\.(\d+)([a-z]?)(\+PTX)?$")


def cache_root() -> Path:
    env = os.environ.get("DSI_OPS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dsincubate" / "ops"


def cuda_arch_list() -> list[str]:
    """Arch list from TORCH_CUDA_ARCH_LIST, else the visible GPUs, else the ViT training targets (A100, H100)."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if env:
        archs = [a for a in re.split(r"[;\s,]+", env) if a]
        bad = [a for a in archs if not _ARCH_RE.match(a)]
        if bad:
            raise ValueError(f"TORCH_CUDA_ARCH_LIST: unsupported entries {bad} (use numbers like 8.0;9.0+PTX)")
        return archs
    if torch.cuda.is_available():
        caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        return [f"{major}.{minor}" for major, minor in sorted(caps)]
    return list(DEFAULT_ARCHS)


def gencode_flags(archs: list[str]) -> list[str]:
    flags = []
    for arch in archs:
        major, minor, suffix, ptx = _ARCH_RE.match(arch).groups()
        num = f"{major}{minor}{suffix}"
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def cuda_home() -> str | None:
    from torch.utils import cpp_extension

    # A toolkit needs the headers too: a bare nvcc wrapper on PATH makes torch guess CUDA_HOME=/usr/local.
    for home in (os.environ.get("CUDA_HOME"), cpp_extension.CUDA_HOME, "/usr/local/cuda"):
        if home and Path(home, "bin", "nvcc").exists() and Path(home, "include", "cuda_runtime.h").exists():
            return home
    return None


@functools.lru_cache(maxsize=None)
def nvcc_version(home: str) -> str | None:
    try:
        out = subprocess.run([str(Path(home, "bin", "nvcc")), "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


class OpBuilder:
    """Base class: subclasses set NAME and SOURCES (paths relative to csrc/)."""

    NAME = ""
    SOURCES: tuple[str, ...] = ()
    HEADERS: tuple[str, ...] = ()  # hashed for cache invalidation, not compiled on their own

    _loaded: dict[str, object] = {}

    def sources(self) -> list[str]:
        return [str(CSRC / s) for s in self.SOURCES]

    def cxx_flags(self) -> list[str]:
        # No -std here: torch adds the standard its headers need (a later -std would override it).
        return ["-O3"]

    def nvcc_flags(self) -> list[str]:
        # No --use_fast_math: exp2f/rsqrtf stay within a few ulp, which the self-check tolerances assume.
        return ["-O3", "-std=c++17", "-lineinfo", *gencode_flags(cuda_arch_list())]

    def is_compatible(self) -> tuple[bool, str]:
        from torch.utils import cpp_extension

        if torch.version.cuda is None:
            return False, "this torch build has no CUDA support"
        home = cuda_home()
        if home is None:
            return False, "nvcc not found (set CUDA_HOME)"
        version = nvcc_version(home)
        if version is None:
            return False, f"could not run {home}/bin/nvcc --version"
        if version.split(".")[0] != torch.version.cuda.split(".")[0]:
            return False, f"nvcc {version} does not match torch's CUDA {torch.version.cuda} (major version)"
        if not cpp_extension.is_ninja_available():
            return False, "ninja is not installed (pip install ninja)"
        missing = [s for s in self.sources() if not Path(s).exists()]
        if missing:
            return False, f"sources missing: {missing}"
        try:
            cuda_arch_list()
        except ValueError as exc:
            return False, str(exc)
        return True, f"nvcc {version} at {home}, archs {';'.join(cuda_arch_list())}"

    def build_tag(self) -> str:
        digest = hashlib.sha256()
        for path in sorted(self.SOURCES + self.HEADERS):
            digest.update(path.encode())
            digest.update((CSRC / path).read_bytes())
        for item in (self.cxx_flags(), self.nvcc_flags(), torch.__version__, torch.version.cuda, sys.version_info[:2]):
            digest.update(repr(item).encode())
        return digest.hexdigest()[:12]

    def module_name(self) -> str:
        return f"dsi_{self.NAME}_{self.build_tag()}"

    def build_dir(self) -> Path:
        return cache_root() / self.module_name()

    def is_built(self) -> bool:
        return (self.build_dir() / f"{self.module_name()}.so").exists()

    def load(self, verbose: bool | None = None):
        """Compile (if not cached) and import the extension; raises RuntimeError when not compatible."""
        name = self.module_name()
        if name in OpBuilder._loaded:
            return OpBuilder._loaded[name]
        ok, reason = self.is_compatible()
        if not ok:
            raise RuntimeError(f"{self.NAME} op is not compatible here: {reason}")
        from torch.utils import cpp_extension

        # cpp_extension resolves CUDA_HOME once at import (possibly to a wrong guess); point it at the toolkit
        # validated above so nvcc, the headers and libcudart all come from the same place.
        cpp_extension.CUDA_HOME = cuda_home()
        build_dir = self.build_dir()
        build_dir.mkdir(parents=True, exist_ok=True)
        if verbose is None:
            verbose = os.environ.get("DSI_OPS_VERBOSE") == "1"
        with build_lock(build_dir):
            cached = self.is_built()
            logger.info("%s %s op %s in %s", "loading cached" if cached else "building", self.NAME, name, build_dir)
            module = cpp_extension.load(
                name=name,
                sources=self.sources(),
                extra_cflags=self.cxx_flags(),
                extra_cuda_cflags=self.nvcc_flags(),
                extra_include_paths=[str(CSRC)],
                build_directory=str(build_dir),
                verbose=verbose,
            )
        OpBuilder._loaded[name] = module
        return module


def torch_lock_is_a_file() -> bool:
    """True for torch versions whose JIT build lock is FileBaton (the file's existence is the lock)."""
    from torch.utils import cpp_extension

    return hasattr(cpp_extension, "FileBaton") and not hasattr(cpp_extension, "FileLock")


def build_wait_seconds() -> float:
    """DSI_OPS_BUILD_WAIT_S: the longest a build of ours can take (a cold nvcc build of both ops takes minutes)."""
    try:
        return max(0.0, float(os.environ.get("DSI_OPS_BUILD_WAIT_S", "3600")))
    except ValueError:
        return 3600.0


@contextlib.contextmanager
def build_lock(build_dir: Path, wait_s: float | None = None, poll_s: float = 0.2):
    """Hold the kernel lock of `build_dir` (waiting for a live holder up to `wait_s`, then RuntimeError naming it);
    while held, remove a torch ``lock`` file that its owner left behind (see the module docstring)."""
    build_dir = Path(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    wait_s = build_wait_seconds() if wait_s is None else wait_s
    fd = os.open(build_dir / OUR_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        start, said = time.monotonic(), False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
                break
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
                if time.monotonic() - start >= wait_s:
                    raise RuntimeError(f"{build_dir} is being built by a live process ({holder}) for more than "
                                       f"{wait_s:.0f} s (DSI_OPS_BUILD_WAIT_S); stop it or raise the limit")
                if not said:
                    logger.info("waiting for %s, built by %s", build_dir, holder)
                    said = True
                time.sleep(poll_s)
            except OSError as exc:  # a file system without locks (ENOLCK): build under torch's own lock only
                logger.warning("cannot lock %s (%s); a build killed here may leave a lock that blocks", build_dir, exc)
                locked = False
                break
        stale = build_dir / TORCH_LOCK
        if locked:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode(), 0)
        if locked and stale.exists():
            # Every builder of this directory holds our lock first, and we hold it: the file's owner is gone.
            age = time.time() - stale.stat().st_mtime
            if torch_lock_is_a_file():  # this torch would wait for the file forever: say what we did
                msg = (f"dsincubate.ops: removing the stale build lock {stale} (left {age:.0f} s ago by a build "
                       "that did not finish; its owner is gone)")
                logger.warning(msg)
                warnings.warn(msg, RuntimeWarning, stacklevel=3)
            else:  # torch's OS lock leaves its file after every build; harmless, removed quietly
                logger.debug("removing %s (%.0f s old; torch holds an OS lock, the file is not the lock)", stale, age)
            stale.unlink(missing_ok=True)
        yield
    finally:
        os.close(fd)  # closing drops the flock


class LayerNormBuilder(OpBuilder):
    NAME = "layernorm"
    SOURCES = ("layernorm/layernorm.cpp", "layernorm/layernorm_kernels.cu")
    HEADERS = ("common/dsi_dtype.h", "common/dsi_types.cuh")


class AttentionBuilder(OpBuilder):
    NAME = "attention"
    SOURCES = ("attention/attention.cpp", "attention/attention_fwd.cu", "attention/attention_bwd.cu")
    HEADERS = ("common/dsi_dtype.h", "common/dsi_types.cuh", "attention/attention_common.cuh",
               "attention/attention_params.h")


ALL_BUILDERS: dict[str, type[OpBuilder]] = {b.NAME: b for b in (LayerNormBuilder, AttentionBuilder)}


def prebuild_all(verbose: bool = False, strict: bool = True) -> dict[str, str]:
    """Build every op into the cache. Returns {op: status}; with strict, raises if an op cannot be built."""
    status = {}
    for name, cls in ALL_BUILDERS.items():
        builder = cls()
        ok, reason = builder.is_compatible()
        if not ok:
            status[name] = f"skipped: {reason}"
            if strict:
                raise RuntimeError(f"cannot build the {name} op: {reason}")
            continue
        try:
            builder.load(verbose=verbose)
        except Exception as exc:  # compiler errors surface as RuntimeError/CalledProcessError
            status[name] = f"failed: {exc}"
            if strict:
                raise
            continue
        status[name] = f"built: {builder.build_dir()}"
    return status
