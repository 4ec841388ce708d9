"""Equal tuning of m2mKD and the student's E2E for `m2mkd_vs_e2e.py --tune` (issue 24 item 1, as tuning.py does for
Deep Incubation and E2E).

Both students (the same V-MoE) get the same search: learning rate x warm-up (tuning.py's grid and ladder, grown one
factor-2 step past an end while either choice sits there, at most --tune-extend rates) at --tune-seeds on the split
held out of the training data (tuning.tune_extra; never the validation set the table reports). m2mKD's grid point
sets the rate and clipping (1.0) of its own phases (module distillation and the assembled student's training) and
the warm-up of distillation (the assembled student keeps its half epoch: it starts from trained modules); E2E gets
the same rate, warm-up and clipping. What m2mKD reuses stays fixed: the teacher is the default cell's E2E at E2E's
tuned point and the meta model the default cell's at DI's tuned point (`tuning.tune_cell`'s choice for that cell);
for the search, both come from the default cell's own tuning runs at those points (trained without the held-out
images, run here where missing: `tuning_sources`), for the seeds from its tuned seeds. The student E2E's epochs
follow m2mKD's measured training FLOPs alone (meta included), so a seed is reproducible; device-hours are reported
beside.

    python benchmarks/m2mkd_vs_e2e.py --tune --seeds 0,1,2,3,4 --workdir runs/pc_builtin \\
        --tune-from benchmarks/results/paper_claims_depth_tuned_builtin_cpu2_2026-12-06.json
"""
from __future__ import annotations

import json
from pathlib import Path

from benchmarks import common, tuning
from dsincubate import registry
from dsincubate.checkpoint import atomic_write_json

STUDENT = "m2mkd"  # the method whose student is compared with the same student trained end to end
METHODS = (STUDENT, tuning.METHODS[1])  # the two students tuned alike; keys of the scores and of summary.json


def point_sets(label: str, method: str) -> list[str]:
    """The overrides of `method`'s student at grid point `label` ("lr 8e-3 wu 3"): its own trained phases' rate
    and clipping, its cold phases' warm-up; never the meta model's (reused, at DI's tuned point)."""
    lr, wu = label.split()[1], label.split()[3]
    own = [p for p in registry.trained_phases(method) if method == "e2e" or p != "meta"]
    cold = [p for p in common.cold_phases(method) if p in own]
    return [f"{s}.{k}={v}" for s in common.sections(own) for k, v in (("lr", lr), ("clip_grad", "1.0"))] + \
        [f"{s}.warmup_epochs={wu}" for s in common.sections(cold)]


def meta_sets(di_label: str) -> list[str]:
    """DI's tuned point's settings of the meta phase: the student cell's meta model is then the default cell's
    (the same config key, so `reuse_phases` copies it rather than training another)."""
    meta = registry.phase("meta").config_section
    return [s for s in tuning.grid_sets(di_label) if s.startswith(meta + ".")]


def tuning_sources(work: Path, recipe: str, base: list[str], choice: dict, t_extra: list[str], per_epoch: list[str],
                   args) -> tuple[Path, Path]:
    """(run with the meta model, run with the teacher) for the search: the default cell's tuning runs at the
    search's first seed at its DI and E2E choices (`t_extra`: the held-out split's arguments, `per_epoch`: the seeds'
    samples per epoch), run here where missing as the search ran them (finished parts are kept)."""
    from benchmarks import paper_claims as pc

    dirs = []
    seed = tuning.tune_seeds(args)[0]  # every seed of the students' search reuses the same meta model and teacher
    for m in tuning.METHODS:  # DI's run gives the meta model, E2E's the teacher
        g = base + tuning.grid_sets(choice[m]) + per_epoch
        out = work / "tune" / pc.cell_key(recipe, g) / f"seed{seed}"
        if not args.collect_only:
            print(f"[m2mkd_vs_e2e] the default cell's tuning run at {choice[m]} (for its {m} model)", flush=True)
            pc.run_cell(out, recipe, g, seed, t_extra, args.timeout, budget="flops")
        dirs.append(out)
    return dirs[0], dirs[1]


def search(work: Path, student: list[str], run_point, args, ladder: tuple[str, ...] = tuning.LADDER) -> dict | None:
    """The grid over both students at --tune-seeds (`tuning.grow`: grown, stopped by --tune-stop-after and resumed as
    every tuned search is) on `ladder`, the students' optimizer's (`tuning.ladder_for`); `run_point(label, seed)` runs
    (or collects) one point at one seed and returns {"m2mkd": top-1, "e2e": top-1} on the tune split. Saved as
    work/tune/choice_m2mkd_<cell>.json (each point as it finishes), or restored from a --tune-from result's `tuning`;
    None where --collect-only finds none."""
    from benchmarks import paper_claims as pc

    path = work / "tune" / f"choice_m2mkd_{pc.cell_key('demo', student)}{tuning.file_tag(args)}.json"
    saved = json.loads(path.read_text()) if path.is_file() else _restore(path, args.tune_from, args)
    if args.collect_only:
        return saved
    return tuning.complete(path, saved, METHODS, args, ladder) or \
        tuning.grow(path, saved, METHODS, run_point, args, ladder, tag="m2mkd_vs_e2e")


def _restore(path: Path, files: str, args) -> dict | None:
    for f in [Path(x.strip()) for x in (files or "").split(",") if x.strip()]:
        t = json.loads(f.read_text()).get("tuning")
        if t and all(m in t for m in METHODS) and tuning.same_search(t, args):
            atomic_write_json(str(path), t)
            print(f"[m2mkd_vs_e2e] tune: the search restored from {f}", flush=True)
            return t
    return None


def describe(t: dict | None) -> str:
    """The table's line on the search."""
    if not t or t.get("partial"):
        return "search unfinished"
    edge = f"; at the end of the searched rates ({t['lrs'][0]} to {t['lrs'][-1]}): {', '.join(t['edge'])}" \
        if t.get("edge") else ""
    return f"m2mKD at {t['m2mkd']}, E2E at {t['e2e']} (each its best of the same grid, lr {t['lrs'][0]} to " \
           f"{t['lrs'][-1]} x warm-up {'/'.join(tuning.WARMUPS)}, on the held-out split, {tuning.seeds_text(t)}; " \
           f"clipping 1.0 in both students' phases{edge})"
