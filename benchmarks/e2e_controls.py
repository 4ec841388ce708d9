"""Is E2E's loss in a `paper_claims.py` cell the recipe's fault? The same E2E run again with one recipe change.

For each seed of a finished `paper_claims.py` depth cell, E2E is trained again with the epochs that cell's E2E got
(so the same training FLOPs), once per variant: gradient clipping 1.0 (what the fine-tune phase uses), half the
learning rate, twice the warm-up, LayerScale (DeiT-III's 1e-4: the fix a ViT user reaches for when a deep ViT does
not train), or twice the epochs (twice DI's FLOPs: is E2E only short of budget?). Deep Incubation and the original
E2E are read from the cell, not re-run. With `--tuned` the cell is `paper_claims.py --tune`'s: DI and E2E each at its
own tuned grid point, the variants on top of E2E's. A variant that closes the gap to Deep Incubation means the
cell's verdict was about the E2E recipe, not the method. Paired differences with 95% t intervals (`stats.py`).

    python benchmarks/paper_claims.py --experiments depth --depths 32 --workdir runs/paper_claims   # first
    python benchmarks/e2e_controls.py --depth 32 --seeds 0,1,2 --workdir runs/paper_claims
    python benchmarks/e2e_controls.py --depth 32 --variants clip,lr_half --collect-only
    python benchmarks/e2e_controls.py --tuned --depth 32 --seeds 0,1,2,3,4 --variants layer_scale,budget_x2 \
        --workdir runs/pc_builtin     # after paper_claims.py --tune --experiments depth --depths 32

Writes benchmarks/results/e2e_controls_<device>_<date>.{json,txt}; finished runs are kept on a re-run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common, paper_claims as pc, stats, tuning  # noqa: E402
from dsincubate import registry  # noqa: E402

E2E = "e2e"  # the re-trained phase: its config section and output directory are the registry's
_SEC = registry.phase(E2E).config_section
VARIANTS = {"clip": [f"{_SEC}.clip_grad=1.0"], "lr_half": [f"{_SEC}.lr=4e-3"],
            "warmup_x2": [f"{_SEC}.warmup_epochs=2.0"], "layer_scale": ["model.layer_scale_init=1e-4"],
            "budget_x2": []}
EPOCH_FACTOR = {"budget_x2": 2}  # a variant's epochs: the cell's E2E epochs times this
MODEL_VARIANTS = ("layer_scale",)  # a change to the model, not to E2E's recipe: --di-too gives it to DI as well


def finished(run: Path) -> bool:
    """Whether a run directory holds a finished E2E model."""
    return (run / registry.phase(E2E).output_dir() / "MANIFEST.json").is_file()


def run_variant(cell: Path, name: str, recipe: str, sets: list[str], seed: int, epochs: int, timeout: int,
                collect_only: bool):
    """The cell's E2E of this seed again with the variant's settings and its `epochs`; its summary or None."""
    out = cell / "e2e_controls" / name
    if not finished(out):
        if collect_only:
            return None
        full = sets + [f"seed={seed}", f"{_SEC}.epochs={epochs * EPOCH_FACTOR.get(name, 1)}"] + VARIANTS[name]
        if not pc._pipeline(out, "e2e", recipe, full, [], timeout):
            raise SystemExit(f"e2e_controls: E2E {name} failed, see {out / 'log_e2e.txt'}")
    s = json.loads((out / "summary.json").read_text())["e2e"]
    return {"top1": s["top1"], "epochs": s["epochs"], "device_hours": s["device_hours"]}


def run_di_variant(di_cell: Path, name: str, recipe: str, di_sets: list[str], seed: int, timeout: int,
                   collect_only: bool):
    """The cell's Deep Incubation of this seed again with a model variant (every phase, meta model included); its
    top-1 or None."""
    out = di_cell / "e2e_controls" / f"{name}_di"
    if not (out / "finetune" / "MANIFEST.json").is_file():
        if collect_only:
            return None
        if not pc._pipeline(out, "di", recipe, di_sets + [f"seed={seed}"] + VARIANTS[name], [], timeout):
            raise SystemExit(f"e2e_controls: DI {name} failed, see {out / 'log_di.txt'}")
    s = json.loads((out / "summary.json").read_text())["deep_incubation"]
    return {"top1": s["top1"], "meta_top1": s["meta_top1"], "device_hours": s["device_hours"]}


def _ms(values) -> str:
    values = [x for x in values if x is not None]
    if not values:
        return "-"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.1f}"


def _pair(a, b) -> str:
    return stats.fmt_interval(stats.paired(a, b))


def cell_dirs(args, p) -> tuple[str, list[str], list[str], Path, Path]:
    """(recipe, DI's and E2E's settings, DI's and E2E's cell directories) of the depth cell: the default one, or
    with --tuned each method's own tuned grid point (p.error where the tuning has not run)."""
    recipe, _, sets = pc.cells("depth", "cpu", [args.depth])[0]
    root = Path(args.workdir) / "cpu"
    di_sets = e2e_sets = sets
    if args.tuned:
        choice_file = root / "tune" / f"choice_{pc.cell_key(recipe, sets)}.json"
        if not choice_file.is_file():
            p.error(f"no tuned depth-{args.depth} cell under {root} ({choice_file.name}); run paper_claims.py --tune "
                    f"--experiments depth --depths {args.depth} --workdir {args.workdir} first")
        choice = json.loads(choice_file.read_text())
        di_sets, e2e_sets = sets + tuning.grid_sets(choice["di"]), sets + tuning.grid_sets(choice["e2e"])
    return recipe, di_sets, e2e_sets, root / pc.cell_key(recipe, di_sets), root / pc.cell_key(recipe, e2e_sets)


def table_of(args, variants: list[str], per_seed: list[dict]) -> str:
    """Each row's top-1 mean ± sd, DI minus it and it minus the cell's E2E, paired by seed with 95% intervals."""
    e2e_name = "E2E (tuned, paper_claims --tune)" if args.tuned else "E2E (paper_claims)"
    lines = [["Deep Incubation" + (" (tuned)" if args.tuned else ""), _ms([r["di"] for r in per_seed]), "-", "-"],
             [e2e_name, _ms([r["e2e"] for r in per_seed]), _pair([r["di"] for r in per_seed],
                                                                  [r["e2e"] for r in per_seed]), "-"]]
    for v in variants:
        got = [(r["di"], r[v]["top1"], r["e2e"]) for r in per_seed if r[v]]
        what = " ".join(VARIANTS[v] + ([f"{EPOCH_FACTOR[v]}x epochs"] if v in EPOCH_FACTOR else []))
        lines.append([f"E2E {v} ({what})", _ms([e for _, e, _ in got]), _pair([d for d, _, _ in got],
                     [e for _, e, _ in got]), _pair([e for _, e, _ in got], [o for _, _, o in got])])
    table = common.table([f"depth {args.depth}, E2E epochs of the cell (x factor)", "top-1",
                          "DI - it [95% CI] p", "it - E2E [95% CI] p"], lines)
    for v in [v for v in variants if v in MODEL_VARIANTS]:  # --di-too: the variant on both sides
        got = [(r[f"{v}_di"]["top1"], r[v]["top1"], r["di"]) for r in per_seed if r.get(f"{v}_di") and r[v]]
        if got:
            table += f"\nDI {v} (both sides): {_ms([d for d, _, _ in got])}; DI {v} - E2E {v} " \
                f"{_pair([d for d, _, _ in got], [e for _, e, _ in got])}; DI {v} - DI " \
                f"{_pair([d for d, _, _ in got], [o for _, _, o in got])}"
    return table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=32, help="the paper_claims depth cell (CPU scale)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--workdir", default="runs/paper_claims", help="paper_claims.py's --workdir")
    p.add_argument("--timeout", type=int, default=7200, help="seconds per run")
    p.add_argument("--collect-only", action="store_true")
    p.add_argument("--tuned", action="store_true", help="the paper_claims.py --tune cell: DI and E2E each at its "
                   "tuned grid point, the variants on top of E2E's")
    p.add_argument("--di-too", action="store_true", help=f"give the model variants ({', '.join(MODEL_VARIANTS)}) "
                   "to Deep Incubation as well (at DI's own settings), so the comparison stays equal")
    args = p.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if set(variants) - set(VARIANTS):
        p.error(f"unknown variant(s) {sorted(set(variants) - set(VARIANTS))}; use {', '.join(VARIANTS)}")
    common.set_threads()
    recipe, di_sets, e2e_sets, di_work, work = cell_dirs(args, p)
    seeds = [int(s) for s in args.seeds.split(",")]
    missing = [s for s in seeds if not finished(work / f"seed{s}") or
               not (di_work / f"seed{s}" / "summary.json").is_file()]
    if missing:
        p.error(f"no finished paper_claims depth-{args.depth} cell for seed(s) {missing} under {work}; run "
                f"paper_claims.py {'--tune ' if args.tuned else ''}--experiments depth --depths {args.depth} "
                f"--workdir {args.workdir} first")
    per_seed = []
    for seed in seeds:
        cell = work / f"seed{seed}"
        s = json.loads((cell / "summary.json").read_text())
        di = json.loads((di_work / f"seed{seed}" / "summary.json").read_text())["deep_incubation"]["top1"]
        row = {"seed": seed, "di": di, "e2e": s["e2e"]["top1"], "epochs": s["e2e"]["epochs"]}
        for v in variants:
            print(f"[e2e_controls] depth {args.depth} seed {seed}: {v}", flush=True)
            row[v] = run_variant(cell, v, recipe, e2e_sets, seed, row["epochs"], args.timeout, args.collect_only)
            if args.di_too and v in MODEL_VARIANTS:
                print(f"[e2e_controls] depth {args.depth} seed {seed}: {v} for DI", flush=True)
                row[f"{v}_di"] = run_di_variant(di_work / f"seed{seed}", v, recipe, di_sets, seed, args.timeout,
                                                args.collect_only)
        per_seed.append(row)
    table = table_of(args, variants, per_seed)
    name = "e2e_controls" + ("_tuned" if args.tuned else "")
    record = dict(common.header(name), depth=args.depth, seeds=seeds, tuned=args.tuned,
                  variants={v: VARIANTS[v] for v in variants}, epoch_factor={v: EPOCH_FACTOR.get(v, 1) for v in
                  variants}, per_seed=per_seed, cell=str(work), di_cell=str(di_work))
    path = common.write_result(name, record, table)
    print(f"\n{table}\n-> {path} (+ .txt)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
