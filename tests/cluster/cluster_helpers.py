"""Helpers of the cluster tier's tests and fixtures (conftest.py): ports, the environment of launcher commands,
running a command with a bounded time, finding the processes a test started (by its unique run directory), and
reusing the DeepSpeed ops the tier has already compiled."""
from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from cluster import Cluster

REPO = Path(__file__).resolve().parents[2]
LAUNCHERS = REPO / "launchers"
DEEPSPEED = Path(sys.executable).parent / "deepspeed"
_ports = itertools.count(29800, 10)  # each launcher job gets its own block of master ports (concurrent jobs: P+1..P+K)


def next_port() -> int:
    return next(_ports)


def demo_args(shared: Path) -> list[str]:
    return ["--set", f"data.demo_root={shared / 'demo'}", "--set", "collective_timeout_s=60", "--set", "log_every=1"]


def job_env(cluster: Cluster | None, shared: Path, **extra) -> dict:
    base = cluster.env() if cluster is not None else dict(os.environ, PYTHONUNBUFFERED="1")
    base.update(OMP_NUM_THREADS="1", DS_ENV_FILE=str(shared / "ds_env"))
    base.update(extra)
    return base


def runner_env_file(shared: Path, dest: Path) -> Path:
    """DS_ENV_FILE for a bare `deepspeed` runner over pdsh, which sends the other hosts only PYTHON* and the file's
    lines (the launchers add what the ranks read, dsincubate/launch_env.py): the session's file plus this host's
    TORCH_EXTENSIONS_DIR (tests/conftest.py), so that its ranks load the DeepSpeed op the session built."""
    text = (shared / "ds_env").read_text()
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        text += f"TORCH_EXTENSIONS_DIR={os.environ['TORCH_EXTENSIONS_DIR']}\n"
    dest.write_text(text)
    return dest


# DeepSpeed's CPU op every rank JIT-compiles at start-up (deepspeed.comm builds it in its TorchBackend)
DEEPSPEED_JIT_OPS = ("deepspeed_shm_comm",)


def reuse_built_ops(dest: Path) -> list[str]:
    """Copy the DeepSpeed ops already built in the torch extension cache that the tier's other launches use (they run
    with this process's environment) into `dest`, so that a launch with TORCH_EXTENSIONS_DIR=dest loads them instead
    of compiling them again (about 30 s of the CI machine's 2 cores, every rank of every host waiting on it).

    Copied under the build's own lock (never a half-written library) with the files' times and ninja's logs: ninja
    then finds the copy up to date. A build for another environment (other compiler flags) is rebuilt, as before.
    Returns the ops copied; none when the cache has no build yet (the launch then compiles them, as before)."""
    from filelock import FileLock
    from torch.utils.cpp_extension import _get_build_directory

    copied = []
    for name in DEEPSPEED_JIT_OPS:
        src = Path(_get_build_directory(name, False))  # where the other launches (this environment) build it
        if not list(src.glob("*.so")):
            continue
        with FileLock(str(src / "lock")):
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("lock"), dirs_exist_ok=True)
        copied.append(name)
    return copied


class Started:
    """A command started in its own process group with its output in `log`, waited for later (`wait`)."""

    def __init__(self, cmd: list[str], log: Path, env: dict, cwd: Path):
        self.cmd, self.log, self.t0 = cmd, log, time.time()
        with open(log, "wb") as f:
            self.p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                      start_new_session=True)

    def wait(self, timeout: float) -> tuple[int, float]:
        """(exit status, seconds since the start). On timeout: its whole process group ended."""
        try:
            rc = self.p.wait(timeout=max(1.0, self.t0 + timeout - time.time()))
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"{' '.join(map(str, self.cmd))} did not finish in {timeout}s; log {self.log}:\n"
                                 + tail(self.log))
        return rc, time.time() - self.t0

    def stop(self) -> None:
        """End its process group (SIGTERM, then SIGKILL after 5 s) if it still runs."""
        if self.p.poll() is not None:
            return
        try:
            os.killpg(self.p.pid, signal.SIGTERM)
            time.sleep(5)
            os.killpg(self.p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.p.wait()


def run_logged(cmd: list[str], log: Path, env: dict, cwd: Path, timeout: float) -> tuple[int, float]:
    """Run a command with its output in `log`; (exit status, seconds). On timeout: its whole process group ended."""
    return Started(cmd, log, env, cwd).wait(timeout)


def tail(log: Path, n: int = 4000) -> str:
    try:
        return log.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


def procs_with(marker: str) -> dict[int, str]:
    """Live processes (any host: the hosts' PID namespaces are inside this machine's) whose command line contains
    `marker` (a test's unique run directory): what a test started and must not leave behind."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmd and state != "Z":
            found[int(d.name)] = cmd
    return found


def proc_env(pid: int) -> dict:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(kv.split("=", 1) for kv in raw.decode(errors="replace").split("\0") if "=" in kv)


def wait_for(pred, timeout: float, what: str, poll: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
