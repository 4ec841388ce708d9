"""Shared helpers of the benchmarks: which device this is, the git commit, result files and tables.

Every benchmark writes `benchmarks/results/<name>_<device-kind>_<YYYY-MM-DD>.json` (`write_result`; a second run on
the same day gets `_2`, `_3`, ..., so a rerun never overwrites an earlier result) holding the device description, the
exact command, the git commit, the date and the load average at the start (`header`; the numbers are only comparable
between runs on the same kind of device with a quiet machine), plus the printed table as text next to it (`.txt`).
Child processes, their results and the process's memory are `dsincubate.procutil`'s. Import from a benchmark script
as `from benchmarks import common` (the scripts put the repository root on sys.path).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def set_threads(n: int | None = None) -> int:
    """Use every core once (or `n`): an oversubscribed CPU makes torch many times slower."""
    import torch

    n = n or int(os.environ.get("OMP_NUM_THREADS", 0) or os.cpu_count() or 1)
    torch.set_num_threads(n)
    return n


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def device(accelerator: bool = True) -> dict:
    """What the numbers were measured on: the accelerator if there is one (and `accelerator`), else the CPU."""
    import torch

    d = {"cpu_model": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
         "python": platform.python_version(), "torch": torch.__version__,
         "load_average_at_start": list(os.getloadavg())}
    try:
        import deepspeed

        d["deepspeed"] = deepspeed.__version__
    except Exception:  # noqa: BLE001
        pass
    if accelerator and torch.cuda.is_available():
        d.update(type="cuda", name=torch.cuda.get_device_name(0), count=torch.cuda.device_count(),
                 memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    else:
        d.update(type="cpu", name=f"{d['cpu_model']} ({d['cores']} cores)", count=1,
                 memory_gib=round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1))
    return d


def device_kind(d: dict | None = None) -> str:
    """Short name for result files: `cpu2` (2 cores), `h100`, `a100`, ..."""
    d = d or device()
    if d["type"] == "cpu":
        return f"cpu{d['cores']}"
    m = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", d["name"].upper())
    return (m.group(1) if m else re.sub(r"[^a-z0-9]+", "_", d["name"].lower())).lower()


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "dsincubate", "benchmarks", "ds_configs"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def command() -> str:
    return " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(
        str(ROOT)) else sys.executable, *sys.argv])


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def header(benchmark: str, dev: dict | None = None) -> dict:
    return {"benchmark": benchmark, "date": now(), "command": command(), "git_commit": git_commit(),
            "device": dev or device()}


def result_path(name: str, dev: dict | None = None, date: str | None = None, suffixes=(".json", ".txt"),
                kind: str | None = None) -> Path:
    """`benchmarks/results/<name>_<device-kind>_<YYYY-MM-DD>.json`, with `_2`, `_3`, ... where a file of that name
    (with any of `suffixes`) exists already: a rerun never overwrites an earlier result. `kind` overrides the
    device kind; `date` (ISO, as in `header`) defaults to today (UTC)."""
    day = (date or now())[:10]
    stem = f"{name}_{kind or device_kind(dev)}_{day}"
    n = 1
    while True:
        path = RESULTS / (f"{stem}.json" if n == 1 else f"{stem}_{n}.json")
        if not any(path.with_suffix(s).exists() for s in suffixes):
            return path
        n += 1


def write_result(name: str, record: dict, table: str | None = None, out: str | Path | None = None,
                 kind: str | None = None) -> Path:
    """Write the JSON record (and the table as text next to it, and inside it): to `out` where given, else to a new
    `result_path` under benchmarks/results/ named after the record's device and date."""
    path = Path(out) if out else result_path(name, record.get("device"), record.get("date"), kind=kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    if table is not None:
        record = dict(record, table=table.splitlines())
        path.with_suffix(".txt").write_text(table + "\n")
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path


def fmt(v, spec: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float) and spec:
        return format(v, spec)
    return str(v)


def table(headers: list[str], rows: list[list], specs: list[str] | None = None) -> str:
    """A plain aligned text table; `specs` are format specs per column for floats."""
    specs = specs or [""] * len(headers)
    cells = [[fmt(v, s) for v, s in zip(r, specs)] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])
