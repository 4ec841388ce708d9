"""Stress test of phase shutdown (outside CI): run a 2-rank V-MoE phase and a 2-rank ZeRO-3 phase N times each in a
row through the real `deepspeed` launcher on the CPU and count the abnormal exits.

    .venv/bin/python benchmarks/stress_shutdown.py                  # N=20 of each, this checkout's code
    .venv/bin/python benchmarks/stress_shutdown.py -n 5 --code /tmp/old   # another tree's dsincubate (a worktree)

Why: a finished rank could abort at interpreter exit ("terminate called without an active exception", exit -6) when
its process groups were left for finalization to destroy; one CI run in four failed that way (issue 21 item 7). A
run is abnormal when the launcher's exit status is not 0, any rank's exit status is not 0, the output has
"terminate called", or a rank's record lacks `process_group_destroyed` (where the code writes that record). The
phases are the debug recipe's `e2e` (1 epoch): the V-MoE with 4 experts over 2 expert-parallel ranks (ZeRO-2, its
expert and expert-data groups, all-to-all over gloo) and the dense model under ZeRO-3 (bf16). Writes its result like
every benchmark (benchmarks/results/stress_shutdown_<device>_<date>.json and .txt).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402
from dsincubate import registry  # noqa: E402

# the phase each run trains (its subcommand, config section and output directory: the registry's)
STRESSED = "e2e"
PHASES = {
    "vmoe_ep2_zero2": ["--ds-config", "zero2_bf16", "--set", "model.moe_every=2", "--set", "model.moe_experts=4",
                       "--set", "model.moe_ep_size=2"],
    "dense_zero3": ["--ds-config", "zero3_bf16"],
}
_RANK_EXIT = re.compile(r"Process (\d+) exits (successfully|with return code = (-?\d+))")


def run_once(kind: str, code: Path, work: Path, port: int, timeout: float) -> dict:
    """One 2-rank phase from scratch; what its exit looked like."""
    out = work / f"{kind}_{port}"
    ds = Path(sys.executable).parent / "deepspeed"
    spec = registry.phase(STRESSED)
    cmd = [str(ds), "--num_accelerators", "2", "--master_port", str(port), "--module", "dsincubate", spec.name,
           "--recipe", "debug", "--output", str(out), "--set", f"data.demo_root={work / 'demo'}",
           "--set", f"{spec.config_section}.epochs=1", *PHASES[kind]]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONPATH=str(code))
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
        rc, text = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc, text = "timeout", (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
    ranks = [m.group(3) or "0" for m in _RANK_EXIT.finditer(text)]
    records = [json.loads(p.read_text()) for p in sorted((out / spec.output_dir() / "ranks").glob("rank_*.json"))]
    recorded = [r.get("process_group_destroyed") for r in records]
    res = {"kind": kind, "rc": rc, "rank_exits": ranks, "seconds": round(time.time() - t0, 1),
           "terminate_called": "terminate called" in text, "done_logged": ": done in" in text,
           "process_group_destroyed": recorded}
    res["abnormal"] = (rc != 0 or any(r != "0" for r in ranks) or len(ranks) != 2 or res["terminate_called"]
                       or (any(x is not None for x in recorded) and not all(recorded)))
    if res["abnormal"]:
        res["tail"] = text[-1500:]
    shutil.rmtree(out, ignore_errors=True)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=20, help="runs of each phase (default 20)")
    ap.add_argument("--code", default=str(ROOT), help="the tree whose dsincubate runs (default this checkout)")
    ap.add_argument("--phases", default=",".join(PHASES), help=f"comma list of {', '.join(PHASES)}")
    ap.add_argument("--port", type=int, default=29800, help="first master port (one per run)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per run before it counts as hung")
    ap.add_argument("--out", default=None, help="result file (default benchmarks/results/...)")
    args = ap.parse_args(argv)
    kinds = [k.strip() for k in args.phases.split(",") if k.strip()]
    if args.n < 1 or not kinds or set(kinds) - set(PHASES):
        print(f"stress_shutdown: error: -n must be >= 1 and --phases a comma list of {', '.join(PHASES)}",
              file=sys.stderr)
        return 2
    code = Path(args.code).resolve()
    rec = common.header("stress_shutdown", common.device(accelerator=False))
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=code, capture_output=True, text=True).stdout.strip()
    rec.update(code=str(code), code_commit=git, n=args.n, runs=[])
    port = args.port
    with tempfile.TemporaryDirectory(prefix="stress_shutdown_") as tmp:
        work = Path(tmp)
        for i in range(args.n):
            for kind in kinds:
                r = run_once(kind, code, work, port, args.timeout)
                port += 1
                rec["runs"].append(r)
                print(f"[stress_shutdown] {kind} run {i + 1}/{args.n}: rc {r['rc']}, ranks {r['rank_exits']}, "
                      f"{'ABNORMAL' if r['abnormal'] else 'ok'} ({r['seconds']} s)", flush=True)
    lines = [f"stress_shutdown: {args.n} runs per phase, code {code} ({git[:10]})",
             f"{'phase':<16} {'runs':>5} {'abnormal':>9} {'aborts(-6)':>11} {'terminate':>10}"]
    rec["summary"] = {}
    for kind in kinds:
        runs = [r for r in rec["runs"] if r["kind"] == kind]
        s = {"runs": len(runs), "abnormal": sum(r["abnormal"] for r in runs),
             "aborts": sum("-6" in r["rank_exits"] for r in runs),
             "terminate_called": sum(r["terminate_called"] for r in runs)}
        rec["summary"][kind] = s
        lines.append(f"{kind:<16} {s['runs']:>5} {s['abnormal']:>9} {s['aborts']:>11} {s['terminate_called']:>10}")
    table = "\n".join(lines)
    print(table)
    print(f"wrote {common.write_result('stress_shutdown', rec, table, out=args.out)}")
    return 1 if any(s["abnormal"] for s in rec["summary"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
