"""Equal tuning of E2E and Deep Incubation for `paper_claims.py --tune` (issue 24 item 1).

Both methods get the same search: learning rate x warm-up, 3 x 2 (`GRID`), run at one seed (or at several,
`--tune-seeds`, each point scored by the mean or worst of their top-1: benchmarks/tune_search.py) on data held out from
the training set (never on the validation set the tables report); each method then runs its seeds at the grid point
that scored best for it. Where either method's best learning rate is the lowest or highest one searched, the grid grows
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
continues it on any machine. The DI-only ablations run at their default cell's tuned point (benchmarks/ablations.py),
the decoupled experiment's methods are searched alike by `tune_cell` too (benchmarks/decoupled_tuning.py), and so are
m2mKD's students (benchmarks/m2mkd_tuning.py, through `complete` and `grow`).

The ladder of learning rates follows the optimizer the cell's phases train with (`LADDERS`, `ladder_for`): AdamW's
(the demo's 8e-3 per 512 in the middle of the first grid) or SGD's (`resnet110_cifar_sgd`: InfoPro's 0.4 per 512 in
the middle); a cell whose phases use different optimizers, or one without a ladder (LAMB), is refused.

    python benchmarks/paper_claims.py --tune --experiments depth --depths 16 --seeds 0,1,2,3,4
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
from benchmarks.tune_search import (LADDER, LADDERS, RULES, WARMUPS, complete, file_tag, grow, labels,  # noqa: F401
                                    point_lr, same_search, saved_seeds, scored, searched, seeds_text, select, start,
                                    tune_seeds)

METHODS = ("di", "e2e")                 # the two methods tuned alike


LRS = start()                           # half the demo's, the demo's, twice


def lr_sections(methods: tuple[str, ...] = METHODS) -> tuple[str, ...]:
    """The config sections of every phase the tuned methods train, in the registry's order (DI's, then E2E's, then
    the decoupled baselines' where `methods` has them): each gets the grid point's learning rate and the clipping of
    `equal`."""
    return common.sections(p for m in methods for p in registry.trained_phases(m))


def warmup_sections(methods: tuple[str, ...] = METHODS) -> tuple[str, ...]:
    """The sections of the phases that start cold (`common.cold_phases`: not DI's fine-tune, which keeps its own
    warm-up): each gets the grid point's warm-up."""
    return common.sections(p for m in methods for p in common.cold_phases(m))


def ladder_for(recipe: str, sets: list[str], methods: tuple[str, ...] = METHODS) -> tuple[str, ...]:
    """The ladder of the one optimizer that every phase of `methods` trains with in the cell (recipe + `sets`)."""
    from dsincubate import recipes
    from dsincubate.config import apply_overrides

    cfg = apply_overrides(recipes.get(recipe), sets)
    optimizers = sorted({getattr(cfg, s).optimizer for s in lr_sections(methods)})
    if len(optimizers) != 1 or optimizers[0] not in LADDERS:
        raise UserError(f"tuning needs one optimizer with a learning-rate ladder ({', '.join(LADDERS)}) in every "
                        f"tuned phase; the cell's phases use {', '.join(optimizers)}")
    return LADDERS[optimizers[0]]


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
    """The overrides of one grid point anywhere on any ladder (with the clipping every tuned method gets)."""
    rates = tuple(dict.fromkeys(lr for ladder in LADDERS.values() for lr in ladder))
    for lb, sets in grid(rates, methods):
        if lb == label:
            return equal(methods) + sets
    raise UserError(f"unknown grid point {label!r}")


def unfinished_line(label: str, t: dict) -> str:
    """The table's line on a search that --tune-stop-after stopped (no seeds ran)."""
    return f"{label}: search unfinished ({scored(t['scores'])} of {len(t['grid'])} grid points scored, lr " \
           f"{t['lrs'][0]} to {t['lrs'][-1]}, held-out split, {seeds_text(t)}); continue with --tune --tune-from " \
           "<this file>"


def describe(label: str, t: dict) -> str:
    """The table's line on a tuned cell's choice."""
    if t.get("partial"):
        return unfinished_line(label, t)
    edge = f"; at the end of the searched learning rates ({t['lrs'][0]} to {t['lrs'][-1]}): " \
           f"{', '.join({'di': 'DI', 'e2e': 'E2E'}[m] for m in t['edge'])}" if t.get("edge") else ""
    return f"{label}: DI at {t['di']}, E2E at {t['e2e']} (each its best of the same grid on the held-out split, " \
           f"{seeds_text(t)}; clipping 1.0 in every phase of both{edge})"


def _seeds(v: str) -> list[int]:
    """--tune-seeds's value: distinct seeds at least 0, in the order given."""
    import argparse

    try:
        seeds = [int(x) for x in v.split(",") if x.strip()]
        if seeds and min(seeds) >= 0 and len(set(seeds)) == len(seeds):
            return seeds
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"distinct seeds at least 0 separated by commas, not {v!r}")


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
                   "grid for E2E and DI on a held-out split at --tune-seeds, then the seeds at each method's choice")
    p.add_argument("--tune-data", default="", help="TRAIN,TUNE shard directories for --tune (the tune split held "
                   "out from the training data); default: a hold-out of the built-in training shards")
    p.add_argument("--tune-per-class", type=int, default=50, help="images per class held out of the built-in "
                   "training data for --tune (default 50 of 300)")
    p.add_argument("--tune-seeds", type=_seeds, default=[0], help="comma list: the seeds every grid point is "
                   "scored at (default 0); with several, a method's score at a point combines its top-1 over them "
                   "(--tune-score), and the search is saved apart from the one-seed search, whose runs it reuses")
    p.add_argument("--tune-seed", type=lambda v: _seeds(v)[:1], dest="tune_seeds", help="one seed: --tune-seeds N")
    p.add_argument("--tune-score", choices=sorted(RULES), default="mean", help="with several --tune-seeds: a "
                   "point's score is the mean of its seeds' top-1 (default) or the worst of them")
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


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def unreadable(files: str) -> str:
    """'' where every --tune-from file reads as a result with rows, else what is wrong with the first that does not."""
    for f in [Path(x.strip()) for x in files.split(",") if x.strip()]:
        try:
            if not isinstance(json.loads(f.read_text()).get("rows"), list):
                return f"{f}: no rows (not a paper_claims result)"
        except (OSError, ValueError, AttributeError) as e:
            return f"{f}: not a paper_claims result ({e})"
    return ""


def restore(path: Path, recipe: str, sets: list[str], methods: tuple[str, ...], files: str,
            want=lambda t: True) -> dict | None:
    """A cell's saved search from committed result files (--tune-from): the `tuning` record of a row with the same
    recipe, settings (their final values) and methods that `want` accepts (its seeds), written to `path` (the work
    directory's saved search); None where none has it. The record's tune-split paths are the source machine's:
    dropped, so a growing grid writes its own split."""
    key = cell_key(recipe, sets)
    for f in [Path(x.strip()) for x in files.split(",") if x.strip()]:
        for row in json.loads(f.read_text()).get("rows", []):
            t = row.get("tuning")
            if t and row.get("recipe") == recipe and cell_key(recipe, row.get("overrides", [])) == key and \
                    (all(m in t for m in methods) if not t.get("partial") else t.get("methods") == list(methods)) \
                    and want(t):
                saved = {k: v for k, v in t.items() if k != "tune_args"}
                atomic_write_json(str(path), saved)
                print(f"[paper_claims] tune: the search of {path.name} restored from {f}", flush=True)
                return saved
    return None


def tune_cell(work: Path, recipe: str, sets: list[str], extra: list[str], args, methods: tuple[str, ...] = METHODS,
              run_point=None, name: str = "") -> dict | None:
    """Run (or collect) the grid of one cell at the search's seeds (--tune-seeds) on the held-out split and return
    each method's choice with every grid point's tune top-1 (`grow`, on the ladder of the cell's optimizer); saved as
    work/tune/choice_<cell>.json (another search: choice_<cell>_seeds<..>[_<rule>].json, started from the cell's
    seed-0 search where there is one), and extended by a later run while a choice sits at an end. None where
    --collect-only finds no saved choice. `methods` and `run_point` (out, sets, extra, label, seed -> each method's
    top-1 on the tune split) tune another set of methods (the decoupled experiment:
    `decoupled_tuning.tune_decoupled`), saved under choice_<name><cell>.json."""
    from benchmarks import paper_claims as pc

    def run_pair(out, g, t_extra, label, seed):  # DI, then E2E at DI's FLOPs
        print(f"[paper_claims]   {out}", flush=True)
        return pc.run_cell(out, recipe, g, seed, t_extra, args.timeout, budget="flops")

    run_point = run_point or run_pair
    stem, files = f"choice_{name}{pc.cell_key(recipe, sets)}", getattr(args, "tune_from", "")
    path = work / "tune" / f"{stem}{file_tag(args)}.json"
    saved = _read(path) or restore(path, recipe, sets, methods, files, lambda t: same_search(t, args))
    if args.collect_only:
        return saved
    if saved is None and file_tag(args):  # the seed-0 search's scores count for seed 0
        one = work / "tune" / f"{stem}.json"
        saved = _read(one) or restore(one, recipe, sets, methods, files, lambda t: saved_seeds(t) == [0])
    ladder = ladder_for(recipe, sets + common.extra_sets(extra), methods)
    done = complete(path, saved, methods, args, ladder)
    if done:
        return done
    t_extra = (saved or {}).get("tune_args") or tune_extra(args.tune_data, extra, work, args.tune_per_class)
    _, plan = pc.e2e_epochs_for(recipe, sets, extra)
    per_epoch = [f"data.samples_per_epoch={plan['samples_per_epoch']}"]  # the iterations of the seeds' runs

    def run_label(label: str, seed: int) -> dict:
        g = sets + grid_sets(label, methods) + per_epoch
        return run_point(work / "tune" / pc.cell_key(recipe, g) / f"seed{seed}", g, t_extra, label, seed)

    return grow(path, saved, methods, run_label, args, ladder,
                lambda lrs: dict(tune_args=t_extra, grid=grid(lrs, methods), equal=equal(methods)))


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
