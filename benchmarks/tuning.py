"""Equal tuning of E2E and Deep Incubation for `paper_claims.py --tune` (issue 24 item 1).

Both methods get the same search: learning rate x warm-up, 3 x 2 (`GRID`), run at one seed on data held out from the
training set (never on the validation set the tables report); each method then runs its seeds at the grid point that
scored best for it. Where either method's best learning rate is the lowest or highest one searched, the grid grows
one factor-2 step in that direction for both (`extension`, at most `--tune-extend` steps); a choice still at an end
is named in the table. DI's grid point sets the settings its phases share: the learning rate of meta pre-training,
incubation and fine-tuning (all at the same rate in the demo recipe) and the warm-up of meta pre-training and
incubation; E2E gets the same learning rate and warm-up. Fine-tuning keeps its half epoch of warm-up (it starts from
an assembled, trained model, not a cold start). Gradient clipping at 1.0 goes to every phase of both methods
(`EQUAL`): the demo recipe clips fine-tuning only, and every committed CPU-scale result clipped every phase at
DeepSpeed's default 1.0 anyway. E2E's epochs follow DI's training FLOPs, which no grid point changes.

The held-out split (`benchmarks/tune_data.py`): `--tune-data TRAIN,TUNE`, else a hold-out of the built-in training
shards; tuning runs train at the full set's samples per epoch (the iterations the seeds will see).

A search longer than one sitting: with `--tune-stop-after MINUTES` no grid point starts after that many minutes; the
search so far (each point's scores and commit) is saved marked `partial`, and `--tune --tune-from <that result>`
continues it on any machine. The DI-only ablations run at their default cell's tuned point (benchmarks/ablations.py).

The decoupled experiment (Tab. 2) tunes DI and every baseline (E2E, DGL, InfoPro; `--baselines` for fewer) alike
(`tune_decoupled`): each grid point sets the rate, warm-up and clipping of every method's phases, each method is
scored there and runs its seeds at its own best point (`run_tuned_decoupled_seed`). Run directories are keyed by the
settings that reach them (`own_sets`): DI and E2E together, as the depth experiment tunes them (the DeiT-T-32 cell
finds that depth-32 cell's runs), each baseline alone. `--jobs N` runs up to N of a grid point's (or seed's)
independent runs at once: the DI/E2E pair and each baseline (give each OMP_NUM_THREADS=cores/N).

    python benchmarks/paper_claims.py --tune --experiments depth --depths 16 --seeds 0,1,2,3,4  # decoupled likewise
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from dsincubate import registry
from dsincubate.checkpoint import atomic_write_json
from dsincubate.errors import UserError

from benchmarks import common
from benchmarks.paper_claims_cells import cell_key
from benchmarks.tune_data import holdout, tune_extra  # noqa: F401  (the held-out split; tests reach it here)

METHODS = ("di", "e2e")                 # the two methods tuned alike
# learning rates per 512 images, a factor 2 apart: the grid starts at the demo's and its neighbours (`extension`)
LADDER = ("1e-3", "2e-3", "4e-3", "8e-3", "1.6e-2", "3.2e-2", "6.4e-2")
LRS = LADDER[2:5]                       # half the demo's, the demo's, twice
WARMUPS = ("1", "3")                    # epochs of warm-up: the demo's, and three


def lr_sections(methods: tuple[str, ...] = METHODS) -> tuple[str, ...]:
    """The config sections of every phase the tuned methods train, in the registry's order (DI's, then E2E's, then
    the decoupled baselines' where `methods` has them): each gets the grid point's learning rate and the clipping of
    `equal`."""
    return common.sections(p for m in methods for p in registry.trained_phases(m))


def warmup_sections(methods: tuple[str, ...] = METHODS) -> tuple[str, ...]:
    """The sections of the phases that start cold (`common.cold_phases`: not DI's fine-tune, which keeps its own
    warm-up): each gets the grid point's warm-up."""
    return common.sections(p for m in methods for p in common.cold_phases(m))


def grid(lrs: tuple[str, ...] | list[str] = LRS,
         methods: tuple[str, ...] = METHODS) -> list[tuple[str, list[str]]]:
    """(label, overrides) of every grid point over `lrs`, learning rate outer. Its override strings are part of the
    tuning runs' cell keys (paper_claims_cells.cell_key): the same registry gives the same strings, so finished runs
    are found again."""
    return [(f"lr {lr} wu {wu}", [f"{s}.lr={lr}" for s in lr_sections(methods)] +
             [f"{s}.warmup_epochs={wu}" for s in warmup_sections(methods)]) for lr in lrs for wu in WARMUPS]


def equal(methods: tuple[str, ...] = METHODS) -> list[str]:
    """What every tuned method gets at every grid point: gradient clipping at 1.0 in every phase."""
    return [f"{s}.clip_grad=1.0" for s in lr_sections(methods)]


GRID = grid()
EQUAL = equal()


def grid_sets(label: str, methods: tuple[str, ...] = METHODS) -> list[str]:
    """The overrides of one grid point anywhere on the ladder (with the clipping every tuned method gets)."""
    for lb, sets in grid(LADDER, methods):
        if lb == label:
            return equal(methods) + sets
    raise UserError(f"unknown grid point {label!r}")


def point_lr(label: str) -> str:
    """The learning rate of a grid point's label ("lr 8e-3 wu 1" -> "8e-3")."""
    return label.split()[1]


def searched(scores: dict[str, dict]) -> list[str]:
    """The learning rates a saved search covered, in ladder order (a choice saved before the grid could extend
    covers LRS)."""
    return sorted({point_lr(lb) for lb in scores} | set(LRS), key=LADDER.index)


def select(scores: dict[str, dict], lrs: tuple[str, ...] | list[str] = LRS,
           methods: tuple[str, ...] = METHODS) -> dict:
    """Each method's best point of the grid over `lrs` by its top-1 on the tune split (ties: the first in grid
    order)."""
    labels = [lb for lb, _ in grid(lrs, methods)]
    choice = {}
    for method in methods:
        done = [(lb, s[method]) for lb in labels for s in [scores.get(lb)] if s and s.get(method) is not None]
        if len(done) < len(labels):
            raise UserError(f"tuning incomplete for {method}: {len(done)} of {len(labels)} grid points finished")
        choice[method] = max(done, key=lambda x: x[1])[0]
    return choice


def at_edge(choice: dict, lrs: tuple[str, ...] | list[str]) -> list[str]:
    """The methods whose chosen learning rate is the lowest or highest one searched: their optimum may lie beyond."""
    return [m for m in choice if point_lr(choice[m]) in (lrs[0], lrs[-1])]


def extension(choice: dict, lrs: tuple[str, ...] | list[str]) -> list[str]:
    """The learning rates one ladder step past each end of `lrs` where a method's choice sits at that end (the
    same new points for both methods, so the search stays equal); empty where no choice is at an end, or the ladder
    ends there."""
    lo, hi = LADDER.index(lrs[0]), LADDER.index(lrs[-1])
    chosen = {point_lr(v) for v in choice.values()}
    return ([LADDER[lo - 1]] if lrs[0] in chosen and lo > 0 else []) + \
        ([LADDER[hi + 1]] if lrs[-1] in chosen and hi + 1 < len(LADDER) else [])


def next_lrs(choice: dict, lrs: list[str], limit: int) -> list[str]:
    """`extension`, within `limit` learning rates past LRS in all (--tune-extend)."""
    return extension(choice, lrs)[:max(0, limit - (len(lrs) - len(LRS)))]


def out_of_time(args) -> bool:
    """True once --tune-stop-after minutes have passed since `args.tune_started` (the process's start under
    paper_claims.py; else the first call); 0 or unset: never."""
    limit = getattr(args, "tune_stop_after", 0) or 0
    if not limit:
        return False
    if getattr(args, "tune_started", None) is None:
        args.tune_started = time.monotonic()
    return time.monotonic() - args.tune_started >= limit * 60


def _stopped(path: Path, progress: dict) -> dict:
    """Save a search that --tune-stop-after stopped (marked partial) and return it."""
    atomic_write_json(str(path), progress)
    print(f"[paper_claims] tune: --tune-stop-after reached, {len(progress['scores'])} of {len(progress['grid'])} "
          f"grid points scored; saved (partial) in {path}", flush=True)
    return progress


def unfinished_line(label: str, t: dict) -> str:
    """The table's line on a search that --tune-stop-after stopped (no seeds ran)."""
    return f"{label}: search unfinished ({len(t['scores'])} of {len(t['grid'])} grid points scored, lr {t['lrs'][0]} " \
           f"to {t['lrs'][-1]}, held-out split, seed {t['seed']}); continue with --tune --tune-from <this file>"


def describe(label: str, t: dict) -> str:
    """The table's line on a tuned cell's choice."""
    if t.get("partial"):
        return unfinished_line(label, t)
    edge = f"; at the end of the searched learning rates ({t['lrs'][0]} to {t['lrs'][-1]}): " \
           f"{', '.join({'di': 'DI', 'e2e': 'E2E'}[m] for m in t['edge'])}" if t.get("edge") else ""
    return f"{label}: DI at {t['di']}, E2E at {t['e2e']} (each its best of the same grid on the held-out split, " \
           f"seed {t['seed']}; clipping 1.0 in every phase of both{edge})"


def _minutes(v: str) -> float:
    """--tune-stop-after's value: minutes, at least 0."""
    import argparse

    try:
        if float(v) >= 0:
            return float(v)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"minutes at least 0, not {v!r}")


def add_args(p) -> None:
    """paper_claims.py's --tune options."""
    p.add_argument("--tune", action="store_true", help="equal tuning (benchmarks/tuning.py): the same lr x warm-up "
                   "grid for E2E and DI on a held-out split at --tune-seed, then the seeds at each method's choice")
    p.add_argument("--tune-data", default="", help="TRAIN,TUNE shard directories for --tune (the tune split held "
                   "out from the training data); default: a hold-out of the built-in training shards")
    p.add_argument("--tune-per-class", type=int, default=50, help="images per class held out of the built-in "
                   "training data for --tune (default 50 of 300)")
    p.add_argument("--tune-seed", type=int, default=0, help="the seed of the tuning runs (default 0)")
    p.add_argument("--jobs", type=int, default=1, help="decoupled experiment: run up to this many of a grid point's "
                   "or seed's independent runs at once (the DI/E2E pair, each baseline; default 1)")
    p.add_argument("--tune-extend", type=int, default=2, help="at most this many learning rates added past the "
                   "grid's ends (a factor 2 each, the same points for both methods) while a method's choice sits at "
                   "an end (default 2; 0: the 3 x 2 grid only); a saved search is extended by a later --tune run")
    p.add_argument("--tune-from", default="", help="comma list of committed result .json files: a cell whose "
                   "search the work directory lacks takes the tuning record of the row with its settings (a fresh "
                   "machine then runs the seeds and any growth of the grid only, or goes on with a stopped search)")
    p.add_argument("--tune-stop-after", type=_minutes, default=0.0, help="minutes: start no grid point after this "
                   "long; the unfinished search is saved (partial) in the result, without seeds, for a later "
                   "--tune --tune-from to continue (default 0: no limit); counted from the start of the process")
    p.set_defaults(tune_started=time.monotonic())  # the parser is built as the process starts
    from benchmarks import paper_claims_decoupled as dc  # its --baselines: which methods a decoupled search holds
    dc.add_args(p)


def unreadable(files: str) -> str:
    """'' where every --tune-from file reads as a result with rows, else what is wrong with the first that does not."""
    for f in [Path(x.strip()) for x in files.split(",") if x.strip()]:
        try:
            if not isinstance(json.loads(f.read_text()).get("rows"), list):
                return f"{f}: no rows (not a paper_claims result)"
        except (OSError, ValueError, AttributeError) as e:
            return f"{f}: not a paper_claims result ({e})"
    return ""


def restore(path: Path, recipe: str, sets: list[str], methods: tuple[str, ...], files: str) -> dict | None:
    """A cell's saved search from committed result files (--tune-from): the `tuning` record of a row with the same
    recipe, settings (their final values) and methods, written to `path` (the work directory's saved search); None
    where none has it. The record's tune-split paths are the source machine's: dropped, so a growing grid writes its
    own split."""
    key = cell_key(recipe, sets)
    for f in [Path(x.strip()) for x in files.split(",") if x.strip()]:
        for row in json.loads(f.read_text()).get("rows", []):
            t = row.get("tuning")
            if t and row.get("recipe") == recipe and cell_key(recipe, row.get("overrides", [])) == key and \
                    (all(m in t for m in methods) if not t.get("partial") else t.get("methods") == list(methods)):
                saved = {k: v for k, v in t.items() if k != "tune_args"}
                atomic_write_json(str(path), saved)
                print(f"[paper_claims] tune: the search of {path.name} restored from {f}", flush=True)
                return saved
    return None


def tune_cell(work: Path, recipe: str, sets: list[str], extra: list[str], args, methods: tuple[str, ...] = METHODS,
              run_point=None, name: str = "") -> dict | None:
    """Run (or collect) the grid of one cell at `args.tune_seed` on the held-out split and return each method's
    choice with every grid point's tune top-1; saved as work/tune/choice_<cell>.json. While a method's choice sits
    at an end of the searched learning rates, the grid extends one ladder step there (at most `args.tune_extend`
    rates past LRS in all); a saved choice is extended the same way by a later run. None where --collect-only finds
    no saved choice. `methods` and `run_point` (out, sets, extra, label -> each method's top-1 on the tune split) tune
    another set of methods (the decoupled experiment: `paper_claims_decoupled.tune_methods`), saved under
    choice_<name><cell>.json."""
    from benchmarks import paper_claims as pc

    def run_pair(out, g, t_extra, label):  # DI, then E2E at DI's FLOPs
        print(f"[paper_claims]   {out}", flush=True)
        return pc.run_cell(out, recipe, g, args.tune_seed, t_extra, args.timeout, budget="flops")

    run_point = run_point or run_pair
    path = work / "tune" / f"choice_{name}{pc.cell_key(recipe, sets)}.json"
    saved = json.loads(path.read_text()) if path.is_file() else \
        restore(path, recipe, sets, methods, getattr(args, "tune_from", ""))
    if args.collect_only:
        return saved
    scores = dict(saved["scores"]) if saved else {}
    unfinished = bool(saved and saved.get("partial"))  # a search stopped by --tune-stop-after: go on with its grid
    lrs = list(saved["lrs"]) if unfinished else searched(scores)
    picked = select(scores, lrs, methods) if saved and not unfinished else None
    if picked is not None and not next_lrs(picked, lrs, args.tune_extend):
        if "edge" not in saved:  # saved before the grid could extend: record what it searched
            saved = dict(saved, lrs=lrs, edge=at_edge(picked, lrs))
            atomic_write_json(str(path), saved)
        return saved  # nothing left to search within --tune-extend
    t_extra = (saved or {}).get("tune_args") or tune_extra(args.tune_data, extra, work, args.tune_per_class)
    _, plan = pc.e2e_epochs_for(recipe, sets, extra)
    per_epoch = [f"data.samples_per_epoch={plan['samples_per_epoch']}"]  # the iterations of the seeds' runs
    commit = common.git_commit()  # the code that scores this process's grid points
    while True:
        progress = dict(partial=True, methods=list(methods), scores=scores, seed=args.tune_seed,
                        tune_args=t_extra, grid=grid(lrs, methods), equal=equal(methods), lrs=lrs)
        for label, _ in progress["grid"]:
            if label in scores:
                continue
            if out_of_time(args):
                return _stopped(path, progress)
            g = sets + grid_sets(label, methods) + per_epoch
            out = work / "tune" / pc.cell_key(recipe, g) / f"seed{args.tune_seed}"
            print(f"[paper_claims] tune {label}", flush=True)  # run_point prints the directories it runs in
            r = run_point(out, g, t_extra, label) or {}
            scores[label] = {**{m: r.get(m) for m in methods}, "meta": r.get("meta"), "ok": r.get("ok"),
                             "git_commit": commit}
            atomic_write_json(str(path), progress)  # an interrupted search keeps this point (progress holds scores)
        picked = select(scores, lrs, methods)
        more = next_lrs(picked, lrs, args.tune_extend)
        if not more:
            break
        print(f"[paper_claims] tune: a choice sits at an end of lr {lrs[0]} .. {lrs[-1]}; adding {', '.join(more)}",
              flush=True)
        lrs = sorted(set(lrs) | set(more), key=LADDER.index)
    choice = dict(picked, scores=scores, seed=args.tune_seed, tune_args=t_extra, grid=grid(lrs, methods),
                  equal=equal(methods), lrs=lrs, edge=at_edge(picked, lrs))
    atomic_write_json(str(path), choice)
    return choice


def run_tuned_seed(work: Path, recipe: str, sets: list[str], choice: dict, seed: int, extra: list[str],
                   args) -> dict | None:
    """One seed at the tuned settings: DI at its grid point, E2E at its own (in DI's run directory when both chose
    the same), E2E's epochs from DI's FLOPs; beside it the default cell's E2E top-1 of this seed where that run
    exists. None where --collect-only finds the seed unfinished."""
    from benchmarks import paper_claims as pc

    di_sets, e2e_sets = sets + grid_sets(choice["di"]), sets + grid_sets(choice["e2e"])
    d_out = work / pc.cell_key(recipe, di_sets) / f"seed{seed}"
    e_out = work / pc.cell_key(recipe, e2e_sets) / f"seed{seed}"
    flop_epochs, plan = pc.e2e_epochs_for(recipe, di_sets, extra)
    if not args.collect_only:
        s = [f"seed={seed}"]
        if not (d_out / "finetune" / "MANIFEST.json").is_file() and \
                not pc._pipeline(d_out, "di", recipe, di_sets + s, extra, args.timeout):
            return {"ok": False, "error": f"Deep Incubation failed, see {d_out / 'log_di.txt'}", "seed": seed}
        e2e_run = e2e_sets + s + [f"e2e.epochs={flop_epochs}"]
        if not (e_out / "e2e" / "MANIFEST.json").is_file() and \
                not pc._pipeline(e_out, "e2e", recipe, e2e_run, extra, args.timeout):
            return {"ok": False, "error": f"E2E failed, see {e_out / 'log_e2e.txt'}", "seed": seed}
    if not (d_out / "summary.json").is_file() or not (e_out / "e2e" / "MANIFEST.json").is_file():
        return None
    rec = pc.collect_cell(d_out, seed, plan, flop_epochs, e_out if e_out != d_out else None)
    default = work / pc.cell_key(recipe, sets) / f"seed{seed}" / "summary.json"
    rec["e2e_default"] = json.loads(default.read_text())["e2e"]["top1"] if default.is_file() else None
    return dict(rec, di_setting=choice["di"], e2e_setting=choice["e2e"])


def own_sets(sets: list[str], label: str, method: str) -> list[str]:
    """The overrides `method` runs with at grid point `label`: the cell's and the point's for the methods that share
    its run directory (DI and E2E together, keyed as the depth and data experiments key them, so their runs are
    found again; a decoupled baseline alone, its phase's settings only: DI's do not reach it)."""
    return sets + grid_sets(label, METHODS if method in METHODS else (method,))


def _run_groups(jobs: int, groups: list) -> list:
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

    pair = [m for m in METHODS if m in dirs]
    groups = [lambda: next((e for e in map(run, pair) if e), "")] + \
        [lambda m=m: run(m) for m in dirs if m not in pair]
    return next((e for e in _run_groups(args.jobs, groups) if e), "")


def tune_decoupled(work: Path, recipe: str, sets: list[str], extra: list[str], args) -> dict | None:
    """The decoupled experiment's grid: DI and every Tab. 2 baseline (`paper_claims_decoupled.BASELINES`) get the
    same lr x warm-up points (each baseline's phase its learning rate, warm-up and clipping, like E2E's), each method
    in the directory of its own settings at that point (`own_sets`), the baselines at DI's planned FLOPs, scored on
    the held-out split; each method then takes its own best point."""
    from benchmarks import paper_claims as pc, paper_claims_decoupled as dc

    baselines = getattr(args, "baselines", dc.BASELINES)
    methods = dc.tune_methods(baselines)

    def point(out, g, t_extra, label):
        per_epoch = g[len(sets) + len(grid_sets(label, methods)):]  # the tuning runs' samples per epoch
        own = {m: own_sets(sets, label, m) + per_epoch for m in methods}
        dirs = {m: work / "tune" / pc.cell_key(recipe, own[m]) / f"seed{args.tune_seed}" for m in methods}
        epochs, plan = dc.baseline_epochs(recipe, own["di"], t_extra)
        print(f"[paper_claims]   {', '.join(f'{m} {d}' for m, d in dirs.items())}", flush=True)
        err = _decoupled_runs(dirs, recipe, own, args.tune_seed, epochs, t_extra, args)
        if err:
            print(f"[paper_claims]   {label}: {err}", flush=True)
        return dc.collect_decoupled(dirs["di"], args.tune_seed, epochs, plan, partial=True, dirs=dirs) or {}

    subset = "" if tuple(baselines) == dc.BASELINES else "_".join(baselines) + "_"  # a search of its own
    return tune_cell(work, recipe, sets, extra, args, methods, point, name=f"decoupled_{subset}")


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
