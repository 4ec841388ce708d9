"""Training equivalence of the data backends: the same pipeline with data.backend=torch and =dali, several seeds.

For each seed and backend, `dsincubate pipeline` runs the recipe with `--methods`; the run's summary.json gives Deep
Incubation's top-1 (after fine-tuning), the meta model's and E2E's. Only `data.backend` differs between the two runs
of one seed (same shards, recipe, seed and plan), so each seed gives one paired difference d = DALI - torch top-1;
the result reports per backend the mean and sample sd over seeds, and per metric the mean paired difference with its
95% Student-t interval and p-value (benchmarks/stats.py `paired`). The backends agree when the interval contains 0;
with 3 seeds it is wide (t_{0.975,2} = 4.30), which is the honest width. A metric whose runs all end within
CHANCE_MARGIN points of chance (10% on the demo's 10 classes) is marked uninformative: the debug recipe's one-epoch
phases end there, which is why the default is E2E on the demo recipe, shortened by `--set e2e.epochs=N`.

    nice -n 19 python benchmarks/backend_equivalence.py                       # demo, e2e, 3 seeds, both backends
    nice -n 19 python benchmarks/backend_equivalence.py --set e2e.epochs=6 --workdir runs/backend_eq
    nice -n 19 python benchmarks/backend_equivalence.py --seeds 1 --backends dali ...   # one share of the runs
    python benchmarks/backend_equivalence.py --collect-only --set e2e.epochs=6   # table of the finished runs

Finished runs (a summary.json in their folder) are kept on a re-run. Writes
benchmarks/results/backend_equivalence_<device>_<date>.{json,txt} with the command, git commit and date; run it from
a clean checkout (e.g. a `git worktree` at a commit) so the recorded commit is the code that ran, not "+dirty".
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
from benchmarks.stats import fmt_interval, paired  # noqa: E402

BACKENDS = ("torch", "dali")
METRICS = (("di_top1", ("deep_incubation", "top1")), ("meta_top1", ("deep_incubation", "meta_top1")),
           ("e2e_top1", ("e2e", "top1")))
CHANCE, CHANCE_MARGIN = 10.0, 5.0  # the demo's 10 classes; runs ending within the margin of chance tell nothing


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


def compare(runs: list[dict]) -> dict:
    """Per metric: the paired difference DALI - torch over the seeds both backends finished (stats.paired: mean,
    sd, 95% interval, p), the verdict, and whether every run ended near chance (then no verdict)."""
    out = {}
    for name, _ in METRICS:
        by = {(r["backend"], r["seed"]): r.get(name) for r in runs}
        seeds = sorted({s for (b, s), v in by.items() if v is not None and by.get(("torch", s)) is not None
                        and by.get(("dali", s)) is not None})
        if not seeds:
            continue
        dali, torch_ = [by[("dali", s)] for s in seeds], [by[("torch", s)] for s in seeds]
        p = paired(dali, torch_)  # "DI" of stats.paired is DALI here, "E2E" torch
        near_chance = all(abs(v - CHANCE) < CHANCE_MARGIN for v in dali + torch_)
        if near_chance:
            verdict = f"uninformative: every run within {CHANCE_MARGIN:g} points of chance"
        elif p["lo"] is None:
            verdict = "fewer than 2 seeds: no interval"
        else:
            verdict = ("no difference at 95%" if p["lo"] <= 0 <= p["hi"]
                       else "DALI higher" if p["lo"] > 0 else "torch higher")
        out[name] = {"seeds": seeds, **{k: p[k] for k in ("n", "mean", "sd", "lo", "hi", "t", "p", "level")},
                     "near_chance": near_chance, "verdict": verdict}
    return out


def table(agg: dict, cmp: dict) -> str:
    lines = [f"{'metric':<10} " + " ".join(f"{b + ' mean±std (n)':>24}" for b in BACKENDS)
             + f"  {'DALI - torch, paired [95% CI]':<32} verdict"]
    for name, _ in METRICS:
        cells = []
        for b in BACKENDS:
            m = agg.get(b, {}).get(name)
            cells.append(f"{m['mean']:7.2f} ± {m['std']:5.2f} ({m['n']})" if m else "-")
        c = cmp.get(name)
        diff = fmt_interval(c) if c else "-"
        lines.append(f"{name:<10} " + " ".join(f"{x:>24}" for x in cells) + f"  {diff:<32} "
                     + (c["verdict"] if c else "-"))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="demo", help="demo (default) or debug (the CI fixture: ends near chance)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default="e2e", help="dsincubate pipeline --methods (di, e2e)")
    p.add_argument("--set", action="append", default=[], dest="sets", help="extra config override for every run")
    p.add_argument("--workdir", default="runs/backend_eq")
    p.add_argument("--timeout", type=int, default=7200, help="seconds per run")
    p.add_argument("--backends", default="torch,dali",
                   help="the backends this invocation runs (e.g. one each in two processes sharing --workdir); "
                        "the table and result file hold every finished run of both")
    p.add_argument("--collect-only", action="store_true")
    args = p.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds must be a comma list of integers, got {args.seeds!r}")
    run_backends = [b for b in args.backends.split(",") if b]
    if not run_backends or not set(run_backends) <= set(BACKENDS):
        p.error(f"--backends must be a comma list of {', '.join(BACKENDS)}; got {args.backends!r}")
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
            if read_summary(out) is None and not args.collect_only and backend in run_backends:
                ok = run_one(out, args.recipe, args.methods, backend, seed, args.sets, args.timeout)
                print(f"[backend_equivalence] {backend} seed {seed}: {'done' if ok else 'FAILED'} in "
                      f"{time.time() - t0:.0f}s ({out})", flush=True)
            row = read_summary(out)
            if row is not None:
                runs.append({"backend": backend, "seed": seed, **row})
    if not runs:
        print("[backend_equivalence] no finished runs: nothing to write")
        return 1
    agg, cmp = aggregate(runs), compare(runs)
    text = table(agg, cmp)
    print(text)
    record.update(settings=vars(args), runs=runs, aggregate=agg, paired_dali_minus_torch=cmp,
                  load_average_end=os.getloadavg())
    print(f"[backend_equivalence] wrote {common.write_result('backend_equivalence', record, text)}")
    return 0 if len(runs) == len(seeds) * len(BACKENDS) else 1


if __name__ == "__main__":
    raise SystemExit(main())
