"""Equal tuning for the decoupled experiment (paper Tab. 2; `paper_claims.py --tune --experiments decoupled`).

DI and every Tab. 2 baseline (E2E, DGL, InfoPro; `--baselines` for fewer) get the same learning-rate x warm-up grid
(`tuning.tune_cell`'s search, on the held-out split, grown the same way): each grid point sets the rate, warm-up and
clipping of every method's phases, each method is scored there and runs its seeds at its own best point
(`run_tuned_decoupled_seed`). Run directories are keyed by the settings that reach them (`own_sets`): DI and E2E
together, as the depth experiment tunes them (the DeiT-T-32 cell finds that depth-32 cell's runs), each baseline
alone. `--jobs N` runs up to N of a grid point's (or seed's) independent runs at once: the DI/E2E pair and each
baseline (give each OMP_NUM_THREADS=cores/N).

    python benchmarks/paper_claims.py --tune --experiments decoupled --only ResNet-20 --seeds 0,1,2,3,4 --jobs 2
"""
from __future__ import annotations

from pathlib import Path

from benchmarks import tuning


def own_sets(sets: list[str], label: str, method: str) -> list[str]:
    """The overrides `method` runs with at grid point `label`: the cell's and the point's for the methods that share
    its run directory (DI and E2E together, keyed as the depth and data experiments key them, so their runs are
    found again; a decoupled baseline alone, its phase's settings only: DI's do not reach it)."""
    return sets + tuning.grid_sets(label, tuning.METHODS if method in tuning.METHODS else (method,))


def run_groups(jobs: int, groups: list) -> list:
    """Call each of `groups` (functions of no arguments, each one or more runs that go in order), up to `jobs` at
    once: runs of different methods are independent jobs, each in its own directory."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(lambda f: f(), groups))


def _decoupled_runs(dirs: dict, recipe: str, own: dict, seed: int, epochs: dict, extra: list[str], args) -> str:
    """Run every method of `dirs` that has not finished at its own settings, DI before E2E in their shared
    directory, the baselines at DI's planned FLOPs (`epochs`); '' or the first failure's message."""
    from benchmarks import paper_claims as pc, paper_claims_decoupled as dc

    def run(m):
        sets = own[m] + [f"seed={seed}"] + ([] if m == "di" else dc.baseline_sets(m, epochs))
        if dc.finished(dirs[m], m) or pc._pipeline(dirs[m], m, recipe, sets, extra, args.timeout):
            return ""
        return f"{m} failed, see {dirs[m] / f'log_{m}.txt'}"

    pair = [m for m in tuning.METHODS if m in dirs]
    groups = [lambda: next((e for e in map(run, pair) if e), "")] + \
        [lambda m=m: run(m) for m in dirs if m not in pair]
    return next((e for e in run_groups(args.jobs, groups) if e), "")


def tune_decoupled(work: Path, recipe: str, sets: list[str], extra: list[str], args) -> dict | None:
    """The decoupled experiment's grid: DI and every Tab. 2 baseline (`paper_claims_decoupled.BASELINES`) get the
    same lr x warm-up points (each baseline's phase its learning rate, warm-up and clipping, like E2E's), each method
    in the directory of its own settings at that point (`own_sets`), the baselines at DI's planned FLOPs, scored on
    the held-out split; each method then takes its own best point."""
    from benchmarks import paper_claims as pc, paper_claims_decoupled as dc

    baselines = getattr(args, "baselines", dc.BASELINES)
    methods = dc.tune_methods(baselines)

    def point(out, g, t_extra, label, seed):
        per_epoch = g[len(sets) + len(tuning.grid_sets(label, methods)):]  # the tuning runs' samples per epoch
        own = {m: own_sets(sets, label, m) + per_epoch for m in methods}
        dirs = {m: work / "tune" / pc.cell_key(recipe, own[m]) / f"seed{seed}" for m in methods}
        epochs, plan = dc.baseline_epochs(recipe, own["di"], t_extra)
        print(f"[paper_claims]   {', '.join(f'{m} {d}' for m, d in dirs.items())}", flush=True)
        err = _decoupled_runs(dirs, recipe, own, seed, epochs, t_extra, args)
        if err:
            print(f"[paper_claims]   {label}: {err}", flush=True)
        return dc.collect_decoupled(dirs["di"], seed, epochs, plan, partial=True, dirs=dirs) or {}

    subset = "" if tuple(baselines) == dc.BASELINES else "_".join(baselines) + "_"  # a search of its own
    return tuning.tune_cell(work, recipe, sets, extra, args, methods, point, name=f"decoupled_{subset}")


def run_tuned_decoupled_seed(work: Path, recipe: str, sets: list[str], choice: dict, seed: int, extra: list[str],
                             args) -> dict | None:
    """One seed of the decoupled experiment at the tuned settings: every method at its own grid point, in the
    directory of its own settings there (`own_sets`: DI's and E2E's are the depth experiment's tuned seed runs of
    the same cell), each baseline at DI's planned FLOPs. None where --collect-only finds DI unfinished."""
    from benchmarks import paper_claims as pc, paper_claims_decoupled as dc

    methods = dc.tune_methods(getattr(args, "baselines", dc.BASELINES))
    own = {m: own_sets(sets, choice[m], m) for m in methods}
    dirs = {m: work / pc.cell_key(recipe, own[m]) / f"seed{seed}" for m in methods}
    epochs, plan = dc.baseline_epochs(recipe, sets, extra)
    if not args.collect_only:
        err = _decoupled_runs(dirs, recipe, own, seed, epochs, extra, args)
        if err:
            return {"ok": False, "seed": seed, "error": err}
    rec = dc.collect_decoupled(dirs["di"], seed, epochs, plan, partial=args.collect_only, dirs=dirs)
    return rec and dict(rec, settings={m: choice[m] for m in methods})
