"""Helpers of the cluster tier's tests and fixtures (conftest.py): ports, the environment of launcher commands,
running a command with a bounded time, and finding the processes a test started (by its unique run directory)."""
from __future__ import annotations

import itertools
import os
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


def run_logged(cmd: list[str], log: Path, env: dict, cwd: Path, timeout: float) -> tuple[int, float]:
    """Run a command with its output in `log`; (exit status, seconds). On timeout: its whole process group ended."""
    t0 = time.time()
    with open(log, "wb") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGTERM)
            time.sleep(5)
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
            raise AssertionError(f"{' '.join(map(str, cmd))} did not finish in {timeout}s; log {log}:\n"
                                 + tail(log))
    return rc, time.time() - t0


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
