"""The search loop every tuned comparison shares (`paper_claims.py --tune`, the decoupled experiment, m2mKD's
students): a learning-rate x warm-up grid on one optimizer's ladder, scored on the held-out split, grown one ladder
step past an end while a method's choice sits there, stopped by --tune-stop-after and resumed from what was saved.

Each point is scored at the search's seeds (`--tune-seeds`, default the one seed 0): with several, a method's score at
a point is the mean of its top-1 over them, or the worst of them (`--tune-score worst`), so a rate that trains in one
seed and diverges in another is no longer chosen on the first seed's luck. A point's per-seed scores are kept
(`per_seed`); a search over more seeds than a saved one takes the saved seed's scores and runs only the seeds it
lacks (its grid starts at the first one, as a fresh search's does). A one-seed search saves exactly the record it
always did. Used through benchmarks/tuning.py (which re-exports these names):

    python benchmarks/paper_claims.py --tune --tune-seeds 0,1 --experiments depth --depths 32 --seeds 0,1,2,3,4
"""
from __future__ import annotations

import time
from pathlib import Path

from dsincubate.checkpoint import atomic_write_json
from dsincubate.errors import UserError

from benchmarks import common

# learning rates per 512 images, a factor 2 apart, per optimizer; a search starts at a ladder's 3 middle rates
# (`start`) and grows along it (`extension`)
LADDERS = {"adamw": ("1e-3", "2e-3", "4e-3", "8e-3", "1.6e-2", "3.2e-2", "6.4e-2"),   # the demo's 8e-3 in the middle
           "sgd": ("5e-2", "1e-1", "2e-1", "4e-1", "8e-1", "1.6", "3.2")}              # InfoPro's 0.1 per 128 = 0.4
LADDER = LADDERS["adamw"]
WARMUPS = ("1", "3")                    # epochs of warm-up: the demo's, and three
RULES = {"mean": lambda v: sum(v) / len(v), "worst": min}  # a point's score over the search's seeds (--tune-score)


def start(ladder: tuple[str, ...] = LADDER) -> tuple[str, ...]:
    """The first grid's learning rates: the ladder's middle one and its neighbours."""
    return ladder[2:5]


def labels(lrs: tuple[str, ...] | list[str]) -> list[str]:
    """The grid points' labels over `lrs`, learning rate outer ("lr 8e-3 wu 1")."""
    return [f"lr {lr} wu {wu}" for lr in lrs for wu in WARMUPS]


def point_lr(label: str) -> str:
    """The learning rate of a grid point's label ("lr 8e-3 wu 1" -> "8e-3")."""
    return label.split()[1]


def tune_seeds(args) -> list[int]:
    """The seeds every grid point is scored at (--tune-seeds; a caller's single `tune_seed`, else seed 0)."""
    return list(getattr(args, "tune_seeds", None) or [getattr(args, "tune_seed", 0)])


def rule(args) -> str:
    """How a point's scores over several seeds combine (--tune-score): 'mean' or 'worst'."""
    return getattr(args, "tune_score", None) or "mean"


def saved_seeds(t: dict) -> list[int]:
    """The seeds a saved search scored its points at (a record from before --tune-seeds has one, `seed`)."""
    return list(t.get("seeds") or [t.get("seed", 0)])


def seeds_text(t: dict) -> str:
    """How a table names a search's seeds: 'seed 0', or 'seeds 0,1 (mean)'."""
    seeds = saved_seeds(t)
    return f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {','.join(map(str, seeds))} ({t.get('score', 'mean')})"


def file_tag(args) -> str:
    """The suffix of a search's saved file: '' for the search at seed 0 alone (the name it always had), else its
    seeds (and rule where several), so no other search replaces the record that committed tables were collected
    from."""
    seeds = tune_seeds(args)
    return "" if seeds == [0] else f"_seeds{'-'.join(map(str, seeds))}" + (f"_{rule(args)}" if len(seeds) > 1 else "")


def same_search(t: dict, args) -> bool:
    """Whether a saved search scored its points at the seeds, and with the rule, that `args` ask for."""
    return saved_seeds(t) == tune_seeds(args) and (len(saved_seeds(t)) == 1 or t.get("score", "mean") == rule(args))


def _seed_fields(seeds: list[int], how: str) -> dict:
    """A saved search's record of its seeds: `seed` (the first), and `seeds` and `score` where there are several (a
    one-seed search keeps the record it always had)."""
    return dict(seed=seeds[0], **({"seeds": seeds, "score": how} if len(seeds) > 1 else {}))


def _per_seed(entry: dict, seed: int) -> dict[str, dict]:
    """A saved point's scores by seed; a point of a one-seed search is its seed's."""
    return {k: dict(v) for k, v in entry["per_seed"].items()} if "per_seed" in entry else {str(seed): dict(entry)}


def _combine(per: dict[str, dict], seeds: list[int], methods: tuple[str, ...], how: str) -> dict:
    """A point's record at `seeds`: each method's score by `how` (None where a seed's run gave none), the meta
    model's mean, ok where every seed's run was, the commit that scored its last seed; per-seed scores kept where
    there are several."""
    runs = [per[str(s)] for s in seeds]
    out = {m: None if any(r.get(m) is None for r in runs) else round(RULES[how]([r[m] for r in runs]), 3)
           for m in methods}  # rounded: top-1 is reported to a tenth, a mean of a few seeds needs no float noise
    metas = [r["meta"] for r in runs if r.get("meta") is not None]
    out.update({"meta": round(sum(metas) / len(metas), 3)} if metas else {})
    out.update({"ok": all(r.get("ok", True) for r in runs)} if any("ok" in r for r in runs) else {})
    out["git_commit"] = runs[-1].get("git_commit", "")
    return out | ({"per_seed": {str(s): per[str(s)] for s in seeds}} if len(seeds) > 1 else {})


def scored(scores: dict[str, dict]) -> int:
    """How many of a saved search's points are scored at all its seeds (a point some of whose seeds have not run
    holds `per_seed` alone)."""
    return sum(1 for s in scores.values() if "git_commit" in s)


def searched(scores: dict[str, dict], ladder: tuple[str, ...] = LADDER) -> list[str]:
    """The learning rates a saved search covered, in ladder order (a choice saved before the grid could extend
    covers the first grid's)."""
    return sorted({point_lr(lb) for lb in scores} | set(start(ladder)), key=ladder.index)


def select(scores: dict[str, dict], lrs: tuple[str, ...] | list[str] = start(),
           methods: tuple[str, ...] = ("di", "e2e")) -> dict:
    """Each method's best point of the grid over `lrs` by its score on the tune split (ties: the first in grid
    order)."""
    points = labels(lrs)
    choice = {}
    for method in methods:
        done = [(lb, s[method]) for lb in points for s in [scores.get(lb)] if s and s.get(method) is not None]
        if len(done) < len(points):
            raise UserError(f"tuning incomplete for {method}: {len(done)} of {len(points)} grid points finished")
        choice[method] = max(done, key=lambda x: x[1])[0]
    return choice


def at_edge(choice: dict, lrs: tuple[str, ...] | list[str]) -> list[str]:
    """The methods whose chosen learning rate is the lowest or highest one searched: their optimum may lie beyond."""
    return [m for m in choice if point_lr(choice[m]) in (lrs[0], lrs[-1])]


def extension(choice: dict, lrs: tuple[str, ...] | list[str], ladder: tuple[str, ...] = LADDER) -> list[str]:
    """The learning rates one ladder step past each end of `lrs` where a method's choice sits at that end (the
    same new points for both methods, so the search stays equal); empty where no choice is at an end, or the ladder
    ends there."""
    lo, hi = ladder.index(lrs[0]), ladder.index(lrs[-1])
    chosen = {point_lr(v) for v in choice.values()}
    return ([ladder[lo - 1]] if lrs[0] in chosen and lo > 0 else []) + \
        ([ladder[hi + 1]] if lrs[-1] in chosen and hi + 1 < len(ladder) else [])


def next_lrs(choice: dict, lrs: list[str], limit: int, ladder: tuple[str, ...] = LADDER) -> list[str]:
    """`extension`, within `limit` learning rates past the first grid's in all (--tune-extend)."""
    return extension(choice, lrs, ladder)[:max(0, limit - (len(lrs) - len(start(ladder))))]


def out_of_time(args) -> bool:
    """True once --tune-stop-after minutes have passed since `args.tune_started` (the process's start under
    paper_claims.py; else the first call); 0 or unset: never."""
    limit = getattr(args, "tune_stop_after", 0) or 0
    if not limit:
        return False
    if getattr(args, "tune_started", None) is None:
        args.tune_started = time.monotonic()
    return time.monotonic() - args.tune_started >= limit * 60


def _stopped(path: Path, progress: dict, tag: str = "paper_claims") -> dict:
    """Save a search that --tune-stop-after stopped (marked partial) and return it."""
    atomic_write_json(str(path), progress)
    print(f"[{tag}] tune: --tune-stop-after reached, {scored(progress['scores'])} of {len(labels(progress['lrs']))} "
          f"grid points scored; saved (partial) in {path}", flush=True)
    return progress


def complete(path: Path, saved: dict | None, methods: tuple[str, ...], args,
             ladder: tuple[str, ...] = LADDER) -> dict | None:
    """A saved search that is finished, at the seeds and rule `args` ask for, and has nothing left to add within
    --tune-extend (recording what it searched where it was saved before the grid could extend), else None: `grow`
    goes on with it."""
    if not saved or saved.get("partial") or not same_search(saved, args):  # none yet, stopped, or other seeds
        return None
    lrs = searched(saved["scores"], ladder)
    picked = select(saved["scores"], lrs, methods)
    if next_lrs(picked, lrs, args.tune_extend, ladder):
        return None
    if "edge" not in saved:
        saved = dict(saved, lrs=lrs, edge=at_edge(picked, lrs))
        atomic_write_json(str(path), saved)
    return saved


def grow(path: Path, saved: dict | None, methods: tuple[str, ...], run_label, args, ladder: tuple[str, ...] = LADDER,
         record=lambda lrs: {}, tag: str = "paper_claims") -> dict:
    """Score each grid point at every seed of the search that it lacks (`run_label(label, seed)` -> each method's
    top-1 on the tune split), saving the search after every run (marked partial), stop where --tune-stop-after has
    passed, and while a method's choice sits at an end of the searched learning rates extend the grid one `ladder`
    step there (at most `args.tune_extend` rates past the first grid's in all). Returns each method's choice with
    every point's scores, `record(lrs)`'s fields added (the caller's own: its split, its grid's overrides), saved in
    `path`."""
    seeds, how = tune_seeds(args), rule(args)
    was = saved_seeds(saved) if saved else seeds
    per = {lb: _per_seed(s, was[0]) for lb, s in (saved["scores"] if saved else {}).items()}
    if saved and same_search(saved, args):
        lrs = list(saved["lrs"]) if saved.get("partial") else searched(saved["scores"], ladder)
    else:  # a new search (or one over other seeds, whose runs count where it visits them) starts at the first grid
        lrs = list(start(ladder))
    commit = common.git_commit()  # the code that scores this process's runs

    def scores() -> dict:  # a point some of whose seeds have not run yet keeps just those that have
        return {lb: _combine(p, seeds, methods, how) if all(str(s) in p for s in seeds) else {"per_seed": p}
                for lb, p in per.items() if p and lb in labels(lrs)}

    while True:
        for label in labels(lrs):
            for seed in seeds:
                if str(seed) in per.setdefault(label, {}):
                    continue
                progress = dict(partial=True, methods=list(methods), scores=scores(), **_seed_fields(seeds, how),
                                **record(lrs), lrs=lrs)
                if out_of_time(args):
                    return _stopped(path, progress, tag)
                print(f"[{tag}] tune {label}" + (f" seed {seed}" if len(seeds) > 1 else ""), flush=True)
                r = run_label(label, seed) or {}  # run_label prints the directories it runs in
                per[label][str(seed)] = {**{m: r.get(m) for m in methods},
                                         **{k: r[k] for k in ("meta", "ok") if k in r}, "git_commit": commit}
                atomic_write_json(str(path), dict(progress, scores=scores()))  # an interruption keeps this run
        picked = select(scores(), lrs, methods)
        more = next_lrs(picked, lrs, args.tune_extend, ladder)
        if not more:
            break
        print(f"[{tag}] tune: a choice sits at an end of lr {lrs[0]} .. {lrs[-1]}; adding {', '.join(more)}",
              flush=True)
        lrs = sorted(set(lrs) | set(more), key=ladder.index)
    choice = dict(picked, scores=scores(), **_seed_fields(seeds, how), **record(lrs), lrs=lrs,
                  edge=at_edge(picked, lrs))
    atomic_write_json(str(path), choice)
    return choice
