"""Where each dsincubate CUDA kernel has been verified, for `dsincubate ops`.

Two kinds of evidence, each tied to a hash of the kernel sources (the .cu files and headers under csrc/, not the
torch bindings), so an edit to a kernel makes earlier evidence stale:

* ``cpu-harness``: every kernel of the op ran on the CPU execution harness (tests/ops/test_cpu_harness.py: the
  unchanged kernel bodies, one fiber per CUDA thread, AddressSanitizer + UBSan) and matched the float64 PyTorch
  references on all its cases;
* ``gpu``: the op's GPU tests (`make test-gpu`, tests/ops/test_gpu_kernels.py) or benchmarks/kernels.py's
  correctness check passed on a real GPU (device name and compute capability recorded).

Records are read from two JSON files: the one shipped in the package (kernel_verification.json next to this
module; refreshed in a checkout by `make test-harness` / `make test-gpu`) and the user's
(<op cache>/kernel_verification.json, written by any run of those tests or the benchmark on this machine).
Writes go to $DSI_VERIFICATION_FILE if set, else to the user's file.

    python -c "from dsincubate.ops import verification as v; print(v.status('attention'))"
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from pathlib import Path

KERNELS = {
    "layernorm": {
        "ln_fwd_kernel": "residual add + LayerNorm forward (one warp per row)",
        "ln_bwd_dx_kernel": "LayerNorm backward dx (+ residual grad)",
        "ln_bwd_partial_kernel": "dgamma/dbeta stage 1: per row-chunk partial sums",
        "ln_bwd_final_kernel": "dgamma/dbeta stage 2: column reduction of the partials",
    },
    "attention": {
        "attn_fwd_kernel": "flash-style forward (online softmax, logsumexp)",
        "attn_bwd_delta_kernel": "backward: delta = rowsum(dO * O)",
        "attn_bwd_dq_kernel": "backward: dQ",
        "attn_bwd_dkdv_kernel": "backward: dK, dV",
    },
}
WHERE = ("cpu-harness", "gpu")
SHIPPED = Path(__file__).resolve().parent / "kernel_verification.json"


def user_file() -> Path:
    from .builder import cache_root

    return cache_root() / "kernel_verification.json"


def write_target() -> Path:
    env = os.environ.get("DSI_VERIFICATION_FILE")
    return Path(env).expanduser() if env else user_file()


def source_hash(op: str) -> str:
    """sha256 (16 hex digits) of the op's kernel sources: its .cu files and every header it hashes."""
    from .builder import ALL_BUILDERS, CSRC

    cls = ALL_BUILDERS[op]
    digest = hashlib.sha256()
    for rel in sorted(s for s in cls.SOURCES + cls.HEADERS if not s.endswith(".cpp")):
        digest.update(rel.encode())
        digest.update((CSRC / rel).read_bytes())
    return digest.hexdigest()[:16]


def _load(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    records = data.get("records", []) if isinstance(data, dict) else []
    return [r for r in records if isinstance(r, dict) and {"op", "where", "source_hash"} <= r.keys()]


def records() -> list[dict]:
    """Every record from the shipped file and the user's file (duplicates removed)."""
    seen, out = set(), []
    for path in (SHIPPED, user_file(), write_target()):
        for rec in _load(path):
            key = json.dumps(rec, sort_keys=True)
            if key not in seen:
                seen.add(key)
                out.append(rec)
    return out


def record(op: str, where: str, details: dict | None = None, path: Path | None = None) -> dict:
    """Record that every kernel of `op` passed in `where` ('cpu-harness' | 'gpu') for the current sources.

    One record per (op, where, sources, device); a newer one replaces it. Returns the record."""
    if op not in KERNELS or where not in WHERE:
        raise ValueError(f"unknown op {op!r} or place {where!r}")
    rec = {"op": op, "where": where, "source_hash": source_hash(op), "kernels": sorted(KERNELS[op]),
           "date": datetime.date.today().isoformat(), **(details or {})}
    path = Path(path) if path is not None else write_target()
    same = lambda r: all(r.get(k) == rec.get(k) for k in ("op", "where", "source_hash", "device"))  # noqa: E731
    kept = [r for r in _load(path) if not same(r)]
    kept.append(rec)
    kept.sort(key=lambda r: (r["op"], r["where"], r.get("device", ""), r.get("date", "")))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"records": kept}, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)
    return rec


def gpu_details(via: str) -> dict:
    """What a 'gpu' record says about the machine: device name and compute capability, torch and CUDA."""
    import torch

    i = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(i)
    return {"device": f"{torch.cuda.get_device_name(i)} (sm_{major}{minor})", "torch": torch.__version__,
            "cuda": torch.version.cuda, "via": via}


def status(op: str) -> dict:
    """{'cpu_harness': record | None, 'gpu': [records], 'stale': [older-source records]} for the current sources."""
    current = source_hash(op)
    mine = [r for r in records() if r["op"] == op]
    now = [r for r in mine if r["source_hash"] == current]
    harness = [r for r in now if r["where"] == "cpu-harness"]
    return {"source_hash": current, "cpu_harness": max(harness, key=lambda r: r.get("date", ""), default=None),
            "gpu": [r for r in now if r["where"] == "gpu"], "stale": [r for r in mine if r["source_hash"] != current]}


def summary(op: str) -> tuple[str, str]:
    """(CPU harness, GPU) one-line verdicts for the report."""
    st = status(op)
    h = st["cpu_harness"]
    if h is not None:
        harness = f"passed ({h.get('cases', '?')} cases, ASan+UBSan, {h.get('date', '?')})"
    elif any(r["where"] == "cpu-harness" for r in st["stale"]):
        harness = "not for these sources (passed for an earlier version; run make test-harness)"
    else:
        harness = "never (run make test-harness)"
    if st["gpu"]:
        gpu = "passed on " + ", ".join(f"{r.get('device', '?')} ({r.get('date', '?')})" for r in st["gpu"])
    elif any(r["where"] == "gpu" for r in st["stale"]):
        gpu = "not for these sources (an earlier version passed; run make test-gpu on a GPU)"
    else:
        gpu = "never run on a GPU (run make test-gpu on one)"
    return harness, gpu
