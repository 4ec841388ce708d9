"""Deep Incubation's own ablations for benchmarks/paper_claims.py: their cells, the default cell each one pairs
with, and the ablations at the tuned point (`--tune`, issue 24).

meta, kd, k, reuse, width, ft and ft_lr change only Deep Incubation: a cell trains DI and shares the E2E run of
the default cell (the experiment's base settings) of the same seed. Under `--tune` the default cell is tuned as the
depth experiment tunes it (the same search and run directories: `--tune-from` the committed depth result restores
it); every ablation cell then runs DI at the default's DI point (its learning rate, warm-up and clipping) with its
own overrides on top, and pairs with the default's tuned E2E. Each ablation is one factor moved from the tuned
recipe, as the paper's ablations move one factor of theirs. Each table gains the paired difference of every cell's
DI from the default cell's DI of the same seed (`vs_default`), the number the ablation is about.

    python benchmarks/paper_claims.py --tune --experiments meta,kd,k --seeds 0,1,2,3,4 --e2e-budget flops \
        --tune-from benchmarks/results/paper_claims_depth_tuned_builtin_cpu2_2026-12-06.json
"""
from __future__ import annotations

from pathlib import Path

from benchmarks import stats, tuning
from benchmarks.paper_claims_cells import cell_key

# (title, [(label, the cell's own overrides)]); the default cell's overrides leave the base settings as they are
ABLATIONS = {
    "meta": ("meta model", [(m, [f"incubate.meta_model={m}"] if m != "fixed" else [])
                            for m in ("fixed", "tunable", "random")]),
    "kd": ("meta depth x objective", [(f"d{d} {'imit' if im else 'incub'}",
                                       ([f"model.meta_depth_per_stage={d}"] if d != 1 else []) +
                                       (["incubate.imitation=true"] if im else []))
                                      for d in (1, 2) for im in (False, True)]),
    "k": ("K", [(f"K={k}", [f"model.num_stages={k}"] if k != 4 else []) for k in (2, 4, 8)]),
    # {e2e} is the default cell's E2E model of the same seed. 14 meta epochs saved = 0.91 TFLOP = 4 incubation epochs
    # of all 4 modules (0.23 TFLOP each), so the last cell spends about the scratch cell's FLOPs. The built meta model
    # warms up 1 of its 2 epochs (the demo's warm-up; named, since a tuned point's 3 would not fit in 2 epochs).
    "reuse": ("meta model", [("scratch, meta 16 ep", []),
                             ("from E2E, meta 2 ep", ["model.meta_init={e2e}", "meta.epochs=2",
                                                      "meta.warmup_epochs=1"]),
                             ("from E2E, meta 2 + inc 10 ep", ["model.meta_init={e2e}", "meta.epochs=2",
                                                               "meta.warmup_epochs=1", "incubate.epochs=10"])]),
    # the width-32 meta model and its hybrids cost less (1.75 against 2.92 TFLOP planned); 13 incubation epochs
    # (0.16 TFLOP each for all 4 modules) spend the own-width cell's budget
    "width": ("meta width", [("64 (own)", []), ("32 (stitched)", ["model.meta_embed_dim=32", "model.meta_num_heads=2"]),
                             ("32 (stitched), inc 13 ep", ["model.meta_embed_dim=32", "model.meta_num_heads=2",
                                                           "incubate.epochs=13"])]),
    # Fig. 10 (DeiT-T-128 on CIFAR-100): one fine-tune epoch already beats E2E, most of the gain comes early; and the
    # default fine-tune learning rate is good enough. Every cell reuses the default cell's meta model and modules.
    "ft": ("fine-tune epochs", [(f"{e}", [f"finetune.epochs={e}"] if e != 4 else []) for e in (1, 2, 4, 8, 16)]),
    # each rate named outright (the demo's 8e-3 too: the same cell key as the default cell's), so under --tune,
    # where the default fine-tunes at the grid point's rate, every label still says the rate its cell ran at
    "ft_lr": ("fine-tune lr", [(lr, [f"finetune.lr={lr}"]) for lr in ("4e-3", "8e-3", "1.6e-2")]),
}


def is_default(recipe: str, sets: list[str], base: list[str]) -> bool:
    """Whether a cell's settings are the default cell's (the same final values: the same runs)."""
    return cell_key(recipe, sets) == cell_key(recipe, base)


def _with_e2e(sets: list[str], e2e_dir: Path) -> list[str]:
    return [s.replace("{e2e}", str(e2e_dir / "e2e" / "model.safetensors")) for s in sets]


def tuned_seed(work: Path, recipe: str, base: list[str], own: list[str], choice: dict, seed: int,
               extra: list[str], args, default: dict | None) -> dict | None:
    """One seed of an ablation cell at the tuned point: DI with the cell's own overrides over the default's DI point,
    taking every finished phase whose config key it shares, paired with the default's E2E. `default` is the default
    cell's tuned seed (`tuning.run_tuned_seed`); its record where the cell is the default cell, None where
    --collect-only finds the seed unfinished."""
    from benchmarks import paper_claims as pc  # its cell functions (runs go through them, tests replace them there)

    di_base = base + tuning.grid_sets(choice["di"])
    sets = di_base + own
    if is_default(recipe, sets, di_base) or default is None or not default.get("ok"):
        return default
    src = work / cell_key(recipe, di_base) / f"seed{seed}"
    e_out = work / cell_key(recipe, base + tuning.grid_sets(choice["e2e"])) / f"seed{seed}"
    out = work / cell_key(recipe, sets) / f"seed{seed}"
    run_sets = _with_e2e(sets, e_out)
    flop_epochs, plan = pc.e2e_epochs_for(recipe, run_sets, extra)
    if not args.collect_only and not (out / "finetune" / "MANIFEST.json").is_file():
        pc.reuse_phases(src, out, recipe, run_sets + [f"seed={seed}"], extra)
        if not pc._pipeline(out, "di", recipe, run_sets + [f"seed={seed}"], extra, args.timeout):
            return {"ok": False, "error": f"Deep Incubation failed, see {out / 'log_di.txt'}", "seed": seed}
    if not (out / "summary.json").is_file():
        return None
    rec = pc.collect_cell(out, seed, plan, flop_epochs, e_out)
    return dict(rec, di_setting=choice["di"], e2e_setting=choice["e2e"], e2e_default=default.get("e2e_default"))


def tuned_rows(exp: str, work: Path, cells: list[tuple[str, str, list[str]]], base: tuple[str, list[str]],
               extra: list[str], args, only: list[str]) -> list[dict]:
    """The rows of a DI-only ablation under --tune: the default cell's search (restored or run), then every cell's
    seeds at the default's DI point. `cells` are (recipe, label, own overrides), `base` the default cell's (recipe,
    settings)."""
    recipe, base_sets = base
    choice = tuning.tune_cell(work, recipe, base_sets, extra, args)
    ready = bool(choice) and not choice.get("partial")
    di_point = base_sets + tuning.grid_sets(choice["di"]) if ready else base_sets
    # the default cell's seeds (DI and E2E, each at its own point) first, once: every cell pairs with them
    defaults = {seed: tuning.run_tuned_seed(work, recipe, base_sets, choice, seed, extra, args)
                for seed in [int(s) for s in args.seeds.split(",")]} if ready else {}
    rows = []
    for cell_recipe, label, own in cells:
        if only and label not in only:
            continue
        print(f"[paper_claims] {exp} {label} (at the default cell's tuned point)", flush=True)
        default = is_default(cell_recipe, di_point + own, di_point)  # where DI runs, not the recipe's own values
        seeds = [r for seed, d in defaults.items()
                 for r in [tuned_seed(work, cell_recipe, base_sets, own, choice, seed, extra, args, d)]
                 if r is not None]
        row = {"label": f"{label} tuned", "recipe": cell_recipe, "overrides": base_sets + own, "default": default,
               "seeds": seeds}
        rows.append(dict(row, tuning=choice) if default else dict(row, tuned_at=choice and {
            m: choice.get(m) for m in tuning.METHODS}))
    return rows


def vs_default(rows: list[dict]) -> list[dict | None]:
    """Per row, its DI paired with the default row's DI of the same seeds (`stats.paired`: row - default); None for
    the default row itself and where no row is marked default (results written before the mark)."""
    ref = [r for r in rows if r.get("default")]
    if not ref:
        return [None] * len(rows)
    by_seed = {s["seed"]: s["di"] for s in ref[0]["seeds"] if s.get("ok") and s.get("di") is not None}
    out = []
    for row in rows:
        if row.get("default"):
            out.append(None)
            continue
        mine = {s["seed"]: s["di"] for s in row["seeds"] if s.get("ok") and s.get("di") is not None}
        common = sorted(set(mine) & set(by_seed))
        out.append(stats.paired([mine[s] for s in common], [by_seed[s] for s in common]))
    return out
