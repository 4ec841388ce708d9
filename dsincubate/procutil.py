"""Process utilities: free ports, this process's memory from /proc, and child processes that report one JSON result.

The one owner of what `dsincubate tune`, the process-group set-up (`dsincubate.dist`) and the benchmarks need from
the operating system, so that these helpers cannot drift apart between copies:

- `free_port()`: a free local TCP port (MASTER_PORT of a one-rank world, `--master_port` of a launcher job).
- Memory of this process, in bytes: `status_bytes("VmHWM")` (any size field of /proc/self/status: VmHWM, VmSize,
  VmRSS; 0 where there is none), `reset_peak_rss()` (resets VmHWM, so that it measures from now on),
  `peak_rss_bytes()` (VmHWM, or ru_maxrss without /proc), `max_rss_bytes()` (ru_maxrss: the lifetime high-water
  mark) and `current_rss_bytes()`.
- Child processes: the child prints its result with `emit_result(dict)` as one marked JSON line, the parent finds it
  with `parse_result(stdout)`; `run_child(argv, timeout=...)` runs a child and returns that result, or an error row
  (`{"ok": False, "error": ...}`) when it crashed, was killed or timed out; `classify_failure(returncode, output)`
  and `is_out_of_memory(text)` name the reason (out of memory, killed, segmentation fault, or the last error line).
"""
from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
from pathlib import Path

RESULT_MARK = "@@RESULT "


# ---------------------------------------------------------------- ports

def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- memory of this process

def status_bytes(field: str) -> int:
    """A size field of /proc/self/status (VmHWM, VmSize, VmRSS, ...) in bytes; 0 where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reset_peak_rss() -> bool:
    """Reset this process's resident-set high-water mark (VmHWM) to its current RSS; False where Linux refuses."""
    try:
        Path(f"/proc/{os.getpid()}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def max_rss_bytes() -> int:
    """Lifetime high-water resident set size of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss_bytes() -> int:
    """High-water resident set size since the last `reset_peak_rss` (VmHWM); ru_maxrss without /proc."""
    return status_bytes("VmHWM") or max_rss_bytes()


def current_rss_bytes() -> int:
    """Resident set size of this process now."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return max_rss_bytes()


# ---------------------------------------------------------------- child processes

def emit_result(result: dict) -> None:
    """The child side: print `result` as the one marked JSON line the parent looks for (`parse_result`)."""
    print(RESULT_MARK + json.dumps(result, default=float), flush=True)


def parse_result(stdout: str) -> dict | None:
    """The parent side: the last result a child printed with `emit_result` (a launcher may prefix its lines), or
    None when it printed none."""
    for line in reversed(stdout.splitlines()):
        if RESULT_MARK in line:
            return json.loads(line[line.index(RESULT_MARK) + len(RESULT_MARK):])
    return None


def is_out_of_memory(text: str) -> bool:
    """Whether an error message or a log says that an allocation failed (host or device, Python or C++)."""
    low = text.lower()
    return any(s in low for s in ("out of memory", "memoryerror", "can't allocate", "cannot allocate",
                                  "bad_alloc", "failed to allocate"))


def classify_failure(returncode: int, text: str) -> str:
    """A short reason for a failed child from its exit status and output: out of memory, killed, a segmentation
    fault, or `exit N: <the last error line>`."""
    if is_out_of_memory(text):
        return "out of memory"
    if returncode in (-9, 137) or "return code = -9" in text:  # the deepspeed launcher reports its ranks' -9
        return "killed (SIGKILL; likely out of memory)"
    if returncode in (-11, 139):
        return "crashed (segmentation fault)"
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    err = next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln), lines[-1] if lines else "")
    return f"exit {returncode}: {err.strip()[:200]}"


def _text(out) -> str:
    return out.decode(errors="replace") if isinstance(out, bytes) else (out or "")


def run_child(argv: list[str], *, timeout: float, env: dict | None = None, cwd: str | Path | None = None) -> dict:
    """Run a child that reports with `emit_result`; its result (with "ok" true unless it says otherwise), or an
    error row when it printed none: a crash, a kill or a timeout is a row, not an exception."""
    e = dict(os.environ, **(env or {}))
    e.setdefault("PYTHONUNBUFFERED", "1")
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=e, cwd=cwd)
    except subprocess.TimeoutExpired as ex:
        return {"ok": False, "error": f"timeout after {timeout:.0f}s",
                "log_tail": (_text(ex.stdout)[-1500:] + "\n" + _text(ex.stderr)[-2500:]).strip()}
    output = p.stdout + p.stderr
    res = parse_result(p.stdout)
    if res is None:
        return {"ok": False, "error": classify_failure(p.returncode, output), "returncode": p.returncode,
                "log_tail": (p.stdout[-1500:] + "\n" + p.stderr[-2500:]).strip()}
    res.setdefault("ok", True)
    if not res["ok"] and p.returncode not in (0, None) and not res.get("error"):
        res["error"] = classify_failure(p.returncode, output)
    return res
