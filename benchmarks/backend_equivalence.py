"""Training equivalence of the data backends: the same pipeline with data.backend=torch and =dali, several seeds.

For each seed and backend, `dsincubate pipeline` runs the recipe (default: the CI's `debug` recipe on the built-in
demo data; `--recipe demo` for the demo) with `--methods` (default di,e2e); the run's summary.json gives Deep
Incubation's top-1 (after fine-tuning), the meta model's and E2E's. The debug recipe's one-epoch phases end near
chance (10%), which no comparison can use: `--methods e2e --set e2e.epochs=8 --set data.samples_per_epoch=1024`
trains long enough to tell backends apart. The result holds every run's numbers and, per backend, the
mean and sample standard deviation over seeds: the backends agree when their means differ by less than the seed
spread. Only `data.backend` differs between the two runs of one seed (same shards, recipe, seed and plan).

    nice -n 19 python benchmarks/backend_equivalence.py [--recipe debug] [--seeds 0,1,2] [--workdir runs/backend_eq]
    nice -n 19 python benchmarks/backend_equivalence.py --methods e2e --set e2e.epochs=8 \
        --set data.samples_per_epoch=1024
    python benchmarks/backend_equivalence.py --collect-only     # table of the finished runs

Finished runs (a summary.json in their folder) are kept on a re-run. Writes
benchmarks/results/backend_equivalence_<device>_<date>.{json,txt} with the command, git commit and date.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402

BACKENDS = ("torch", "dali")
METRICS = (("di_top1", ("deep_incubation", "top1")), ("meta_top1", ("deep_incubation", "meta_top1")),
           ("e2e_top1", ("e2e", "top1")))


def run_one(out: Path, recipe: str, methods: str, backend: str, seed: int, sets: list[str], timeout: int) -> bool:
    """`dsincubate pipeline` for one (backend, seed) into `out`; True when it finished."""
    cmd = [sys.executable, "-m", "dsincubate", "pipeline", "--recipe", recipe, "--methods", methods,
           "--output", str(out), "--set", f"data.backend={backend}", "--set", f"seed={seed}"]
    for s in sets:
        cmd += ["--set", s]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "log.txt", "a") as log:
        return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=common.ROOT,
                              timeout=timeout).returncode == 0


def read_summary(out: Path) -> dict | None:
    path = out / "summary.json"
    if not path.is_file():
        return None
    s = json.loads(path.read_text())
    row = {}
    for name, (part, key) in METRICS:
        row[name] = s.get(part, {}).get(key)
    return row


def aggregate(runs: list[dict]) -> dict:
    """Per backend and metric: mean, sample std (0 for one seed) and the seeds' values."""
    out = {}
    for backend in BACKENDS:
        mine = [r for r in runs if r["backend"] == backend]
        out[backend] = {}
        for name, _ in METRICS:
            vals = [r[name] for r in mine if r.get(name) is not None]
            if vals:
                out[backend][name] = {"mean": statistics.mean(vals), "std": statistics.stdev(vals) if len(vals) > 1
                                      else 0.0, "n": len(vals), "values": vals}
    return out


def table(agg: dict) -> str:
    lines = [f"{'metric':<10} " + " ".join(f"{b + ' mean±std (n)':>24}" for b in BACKENDS) + f" {'|diff|':>7} "
             f"{'max std':>8}"]
    for name, _ in METRICS:
        cells, means, stds = [], [], []
        for b in BACKENDS:
            m = agg.get(b, {}).get(name)
            cells.append(f"{m['mean']:7.2f} ± {m['std']:5.2f} ({m['n']})" if m else "-")
            if m:
                means.append(m["mean"])
                stds.append(m["std"])
        diff = f"{abs(means[0] - means[1]):7.2f}" if len(means) == 2 else "      -"
        lines.append(f"{name:<10} " + " ".join(f"{c:>24}" for c in cells) + f" {diff} {max(stds, default=0):8.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="debug", help="debug (the CI fixture) or demo")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default="di,e2e", help="dsincubate pipeline --methods (di, e2e)")
    p.add_argument("--set", action="append", default=[], dest="sets", help="extra config override for every run")
    p.add_argument("--workdir", default="runs/backend_eq")
    p.add_argument("--timeout", type=int, default=7200, help="seconds per run")
    p.add_argument("--collect-only", action="store_true")
    args = p.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds must be a comma list of integers, got {args.seeds!r}")
    if args.recipe not in ("debug", "demo"):
        p.error("--recipe must be debug or demo (recipes that train on the built-in demo data)")
    record = common.header("backend_equivalence")
    record["load_average_start"] = os.getloadavg()
    if not set(args.methods.split(",")) <= {"di", "e2e"} or not args.methods:
        p.error(f"--methods must be a comma list of di, e2e; got {args.methods!r}")
    work = Path(args.workdir) / "_".join([args.recipe, args.methods.replace(",", "_"), *args.sets]).replace("=", "-")
    runs = []
    for seed in seeds:
        for backend in BACKENDS:
            out = work / f"{backend}_seed{seed}"
            t0 = time.time()
            if read_summary(out) is None and not args.collect_only:
                ok = run_one(out, args.recipe, args.methods, backend, seed, args.sets, args.timeout)
                print(f"[backend_equivalence] {backend} seed {seed}: {'done' if ok else 'FAILED'} in "
                      f"{time.time() - t0:.0f}s ({out})", flush=True)
            row = read_summary(out)
            if row is not None:
                runs.append({"backend": backend, "seed": seed, **row})
    if not runs:
        print("[backend_equivalence] no finished runs: nothing to write")
        return 1
    agg = aggregate(runs)
    text = table(agg)
    print(text)
    record.update(settings=vars(args), runs=runs, aggregate=agg, load_average_end=os.getloadavg())
    print(f"[backend_equivalence] wrote {common.write_result('backend_equivalence', record, text)}")
    return 0 if len(runs) == len(seeds) * len(BACKENDS) else 1


if __name__ == "__main__":
    raise SystemExit(main())
