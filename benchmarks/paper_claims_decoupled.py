"""Deep Incubation against the paper's decoupled baselines (Tab. 2), and the budget-split sweep: the `decoupled` and
`split` experiments of benchmarks/paper_claims.py (its command line, work directory and result files).

decoupled  E2E, DGL and InfoPro (`dsincubate.decoupled`) against Deep Incubation, each baseline given Deep
           Incubation's planned training FLOPs (meta included): its epochs are ceil(DI FLOPs / its own FLOPs per
           epoch, auxiliary networks included), so all four methods train on the same budget, stated in the table
           (planned and measured TFLOP per method). Cells (CPU scale):
             DeiT-T-32   the depth experiment's depth-32 cell (`paper_claims.CPU_BASE`: width 64, 2 heads, 8x8
                         patches on the 32 px demo images, K = 4; DI = meta 16 + 6 per module + fine-tune 4 epochs)
             DeiT-T-32-s1000  the same with every epoch of every method 1,000 images drawn from the 3,000 (a third
                         of the budget, for a loaded machine: on 2026-12-06 the 4-block meta model's epoch took 41 s
                         against 2 s on a quiet one)
             ResNet-20   `resnet110_cifar` (K = 3, one block per stage in the meta model) with 9 blocks (ResNet-20)
                         instead of 54 (3 per stage: ResNet-110's 18 cost 6x more, beyond this machine), DI = meta 8 +
                         4 per module + fine-tune 4 epochs, 1 warm-up epoch in every phase (the recipe's 5 exceed
                         these runs)
             ResNet-20 SGD  the same with InfoPro's optimiser (`resnet110_cifar_sgd`: SGD, Nesterov momentum 0.9,
                         weight decay 1e-4) in every phase of every method; --tune searches SGD's ladder
           Every seed's record is written to the result file as soon as it finishes. The table gives each method's
           mean ± std and, per baseline, the paired DI - baseline difference with its 95% t interval and p.
           With --tune, DI and every baseline first get the same learning-rate x warm-up grid on a split held out of
           the training data (`decoupled_tuning.tune_decoupled`: one directory per grid point, each method scored
           there), then each method runs the seeds at its own best point (`decoupled_tuning.run_tuned_decoupled_seed`;
           result paper_claims_decoupled_tuned_*).
split      Deep Incubation alone at the default cell's total planned FLOPs (depth 8; `--set model.depth=16` for
           another), the total divided differently between meta pre-training, incubation and fine-tuning (`SPLITS`:
           shares of the FLOPs, rounded to whole epochs; the table gives each cell's planned FLOPs). Accuracy
           against the split, paired against the default split, and a plot (its code: benchmarks/budget_split.py).

    python benchmarks/paper_claims.py --experiments decoupled --seeds 0,1,2 --only DeiT-T-32
    python benchmarks/paper_claims.py --tune --experiments decoupled --seeds 0,1,2,3,4 --only DeiT-T-32
    python benchmarks/paper_claims.py --experiments split --seeds 0,1
    python benchmarks/paper_claims.py --experiments decoupled,split --collect-only
    python benchmarks/paper_claims.py --tune --experiments decoupled --only ResNet-20 --baselines infopro \
        --name infopro_own --set infopro_loss.info_y=contrast --set infopro_loss.info_x=bce   # DI vs one baseline

Results: benchmarks/results/paper_claims_decoupled/paper_claims_<exp>_<device>_<date>.{json,txt} (split: + .png).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from benchmarks import common, decoupled_tuning, paper_claims as pc, stats, tuning
from benchmarks.budget_split import (SPLITS, plot_split, run_split_seed, split_phases, split_plan,  # noqa: F401
                                     split_sets, summarise_split)
from dsincubate import registry


def baselines() -> tuple[str, ...]:
    """Tab. 2's baselines: every registered method that trains the whole target in one phase of its own (E2E, DGL,
    InfoPro), in the registry's order; not DI, m2mKD or E2E trained further (e2e_tune)."""
    return tuple(m for m in registry.list_methods()
                 if len(registry.trained_phases(m)) == 1 and registry.phase(registry.trained_phases(m)[0]).exports)


def _phase(method: str) -> str:
    """A baseline's one training phase."""
    return registry.trained_phases(method)[0]


def _run_json(out: Path, method: str) -> Path:
    return out / registry.phase(_phase(method)).output_dir() / "run.json"


def finished(out: Path, method: str) -> bool:
    """Whether `method` (DI or a baseline) has a finished model in run directory `out`."""
    return ((out / "finetune") if method == "di" else _run_json(out, method).parent).joinpath("MANIFEST.json").is_file()


BASELINES = baselines()


def tune_methods(baselines: tuple[str, ...] = BASELINES) -> tuple[str, ...]:
    """The methods the decoupled experiment's --tune searches for alike: DI and every baseline (`--baselines`)."""
    return ("di",) + tuple(baselines)


def baseline_list(value: str) -> tuple[str, ...]:
    """`--baselines`: a comma list of registered baselines, in the registry's order (argparse refuses another)."""
    names = [m.strip() for m in value.split(",") if m.strip()]
    bad = [m for m in names if m not in BASELINES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown baseline(s) {bad or value!r}; use a comma list of "
                                         f"{', '.join(BASELINES)}")
    return tuple(m for m in BASELINES if m in names)


def add_args(p) -> None:
    p.add_argument("--baselines", type=baseline_list, default=BASELINES, help="decoupled experiment: the baselines "
                   f"DI is compared with (default every one: {','.join(BASELINES)}); the rows record them")


def baseline_sets(method: str, epochs: dict) -> list[str]:
    """A baseline's own overrides: its epochs at DI's planned FLOPs; the decoupled ones evaluate like E2E."""
    return [f"{registry.phase(_phase(method)).config_section}.epochs={epochs[method]}"] + \
        (_DECOUPLED_EVAL if method != "e2e" else [])
NAMES = {"di": "DI", "e2e": "E2E", "dgl": "DGL", "infopro": "InfoPro"}
# the baselines' own evaluation settings: like E2E's in CPU_BASE, only the last epoch is evaluated
_DECOUPLED_EVAL = [f"{s}.eval_every=100" for s in common.sections(_phase(m) for m in BASELINES if m != "e2e")]
# ResNet-20: every phase that starts cold (DI's before its assembly, each baseline's) gets 1 warm-up epoch
_RESNET = ["model.depth=9", "model.kernel_backend=torch", "meta.epochs=8", "incubate.epochs=4", "finetune.epochs=4"] + \
    [f"{p}.{k}" for p in common.sections([*common.cold_phases("di"), *map(_phase, BASELINES)])
     for k in ("warmup_epochs=1.0", "eval_every=100")] + ["finetune.eval_every=100", "data.num_workers=1"]
DECOUPLED_CELLS = [("demo", "DeiT-T-32", pc.CPU_BASE + ["model.depth=32"]),
                   ("demo", "DeiT-T-32-s1000", pc.CPU_BASE + ["model.depth=32", "data.samples_per_epoch=1000"]),
                   ("resnet110_cifar", "ResNet-20", _RESNET), ("resnet110_cifar_sgd", "ResNet-20 SGD", _RESNET)]
RESULTS = common.RESULTS / "paper_claims_decoupled"
EXPERIMENTS = {"decoupled": "method (at DI's planned FLOPs)", "split": "meta / incubate / fine-tune share of FLOPs"}


def _name(method: str) -> str:
    return NAMES.get(method, method)


def per_image_flops(recipe: str, sets: list[str], extra: list[str], phase: str) -> float:
    """Training FLOPs per image of `phase`'s model (a decoupled baseline: its target and auxiliary networks)."""
    from dsincubate import accounting, phases, recipes
    from dsincubate.cli import _preflight
    from dsincubate.config import apply_overrides

    extra_sets = common.extra_sets(extra)
    cfg = apply_overrides(recipes.get(recipe), sets + extra_sets)
    info = _preflight(cfg, False)
    ph = phases.make(phase, cfg, "/nonexistent", cfg.model.num_classes or info.num_classes, None, resolve=False)
    return accounting.count_flops(lambda: ph.build_model(load=False), ph.img_size)["train_step_per_image"]


def baseline_epochs(recipe: str, sets: list[str], extra: list[str]) -> tuple[dict, dict]:
    """Each baseline's epochs at DI's planned training FLOPs, and the plan (DI's phases; each baseline's FLOPs per
    epoch)."""
    _, plan = pc.e2e_epochs_for(recipe, sets, extra)
    epochs = {}
    for m in BASELINES:
        plan[f"{m}_per_epoch"] = plan["samples_per_epoch"] * per_image_flops(recipe, sets, extra, _phase(m))
        epochs[m] = max(1, math.ceil(plan["di_total"] / plan[f"{m}_per_epoch"] - 1e-9))
    return epochs, plan


def _measured(run: dict) -> float:
    return run["flops"]["train_step_per_image"] * run["images_processed"]


def collect_decoupled(out: Path, seed: int, epochs: dict, plan: dict, partial: bool = False,
                      dirs: dict | None = None, baselines: tuple[str, ...] | None = None) -> dict | None:
    """One seed's record: top-1, measured training FLOPs, device-hours and epochs per method. None while DI or
    (unless `partial`: --collect-only, whose table then shows what finished) a baseline has not finished; a
    partial record's unfinished baselines have None values and are listed under "unfinished". `dirs`: a baseline's
    own run directory where it is not `out` (--tune: each method at its own settings). `baselines`: the methods
    besides DI (default: those in `dirs`, or every one)."""
    baselines = baselines or tuple(m for m in BASELINES if not dirs or m in dirs)
    runs = {m: _run_json((dirs or {}).get(m, out), m) for m in baselines}
    if not (out / "summary.json").is_file() or not (partial or all(p.is_file() for p in runs.values())):
        return None
    s = json.loads((out / "summary.json").read_text())["deep_incubation"]
    if s["top1"] is None:
        return None
    di_runs = [json.loads(p.read_text()) for p in [out / "meta" / "run.json", out / "finetune" / "run.json",
                                                    *sorted(out.glob("incubate/*/run.json"))]]
    rec = {"ok": True, "seed": seed, "meta": s["meta_top1"], "assembled": s.get("assembled_top1"),
           "di": s["top1"], "di_hours": s["device_hours"], "di_flops": sum(_measured(r) for r in di_runs),
           "planned": plan, "epochs_flop_match": epochs, "unfinished": [m for m, p in runs.items() if not p.is_file()]}
    for m, p in runs.items():
        r = json.loads(p.read_text()) if p.is_file() else None
        rec.update({m: r and r["final"].get("top1"), f"{m}_hours": r and r["device_seconds"] / 3600,
                    f"{m}_flops": r and _measured(r), f"{m}_epochs": r and r["epochs"]})
    return rec


def run_decoupled_seed(out: Path, recipe: str, sets: list[str], seed: int, extra: list[str], args) -> dict:
    """DI, then each baseline (E2E, DGL, InfoPro) at DI's planned FLOPs (finished methods are kept on a re-run)."""
    epochs, plan = baseline_epochs(recipe, sets, extra)
    sets, t0 = sets + [f"seed={seed}"], time.time()
    if not finished(out, "di") and not pc._pipeline(out, "di", recipe, sets, extra, args.timeout):
        return {"ok": False, "seed": seed, "error": f"Deep Incubation failed, see {out / 'log_di.txt'}"}
    for m in args.baselines:
        if finished(out, m):
            continue
        if not pc._pipeline(out, m, recipe, sets + baseline_sets(m, epochs), extra, args.timeout):
            return {"ok": False, "seed": seed, "error": f"{m} failed, see {out / f'log_{m}.txt'}"}
    print(f"[paper_claims]   {out}: {time.time() - t0:.0f}s", flush=True)
    return collect_decoupled(out, seed, epochs, plan, baselines=args.baselines) or \
        {"ok": False, "seed": seed, "error": "unfinished"}


def cells(exp: str, args, extra: list[str]) -> list[tuple[str, str, list[str], dict]]:
    """(recipe, label, overrides, what the row records beside its seeds) of every cell of `exp`."""
    if exp == "decoupled":
        return [(recipe, label, sets + args.set, {"baselines": list(args.baselines)})
                for recipe, label, sets in DECOUPLED_CELLS]
    base = pc.CPU_BASE + args.set
    out, (default, per_epoch) = [], split_plan("demo", base, extra)
    for label, shares in SPLITS:
        own, plan = split_sets(default, per_epoch, shares)
        epochs = {p: s.split("=")[1] for p, s in zip(split_phases(), own)}
        out.append(("demo", label, base + own, {"shares": shares, "planned": plan, "epochs": epochs}))
    return out


def run_experiment(exp: str, args, extra: list[str], write) -> list[dict]:
    """Run (or collect) every selected cell of `exp` over the seeds, calling `write(rows)` after every seed."""
    work = Path(args.workdir) / args.scale
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = [{"label": label, "recipe": recipe, "overrides": sets, "seeds": [], **info}
            for recipe, label, sets, info in cells(exp, args, extra) if not only or label in only]
    if args.tune and exp == "decoupled":  # first the same grid for DI and every baseline, on the held-out split
        rows = [dict(row, label=f"{row['label']} tuned", tuning=choice) for row in rows
                for choice in [decoupled_tuning.tune_decoupled(work, row["recipe"], row["overrides"], extra, args)]
                if choice]
        if any(row["tuning"].get("partial") for row in rows):  # --tune-stop-after: the search so far, no seeds
            write(rows)
    # seeds outer: an interrupted run leaves whole seeds (every cell paired), not whole cells
    for seed in seeds:
        for row in [r for r in rows if not r.get("tuning", {}).get("partial")]:
            out = work / pc.cell_key(row["recipe"], row["overrides"]) / f"seed{seed}"
            print(f"[paper_claims] {exp} {row['label']} seed {seed}", flush=True)
            if exp == "split":
                rec = run_split_seed(out, row["recipe"], row["overrides"], seed, extra, args)
            elif args.tune:
                rec = decoupled_tuning.run_tuned_decoupled_seed(work, row["recipe"], row["overrides"], row["tuning"],
                                                                seed, extra, args)
            elif args.collect_only:
                epochs, plan = baseline_epochs(row["recipe"], row["overrides"], extra)
                rec = collect_decoupled(out, seed, epochs, plan, partial=True, baselines=args.baselines)
            else:
                rec = run_decoupled_seed(out, row["recipe"], row["overrides"], seed, extra, args)
            if rec is not None:
                row["seeds"].append(rec)
                write(rows)
    return rows


def summarise_decoupled(rows: list[dict]) -> tuple[str, list[dict]]:
    """Per cell: each method's mean ± std, the paired DI - baseline 95% interval and p per baseline, mean TFLOP
    (measured) and device-hours per method."""
    table_rows, out = [], []
    own = lambda row: [m for m in BASELINES if m in row.get("baselines", BASELINES)]  # noqa: E731 (older: all)
    shown = tuple(m for m in BASELINES if any(m in own(row) for row in rows)) or BASELINES
    for row in rows:
        ok = [r for r in row["seeds"] if r.get("ok")]
        paired = {m: stats.paired([r["di"] for r in ok if r.get(m) is not None],
                                  [r[m] for r in ok if r.get(m) is not None]) for m in own(row)}
        out.append(dict(row, paired=paired, n_seeds=len(ok)))
        done = lambda m: [r for r in ok if r.get(m) is not None]  # noqa: E731
        tf = lambda m: sum(r[f"{m}_flops"] for r in done(m)) / len(done(m)) / 1e12 if done(m) else None  # noqa: E731
        table_rows.append([row["label"], len(ok), stats.mean_std([r["meta"] for r in ok])] +
                          [stats.mean_std([r.get(m) for r in ok]) for m in ("di",) + shown] +
                          [stats.fmt_interval(paired[m]) if m in paired else "-" for m in shown] +
                          ["/".join("-" if tf(m) is None else f"{tf(m):.2f}" for m in ("di",) + shown)])
    methods = ("di",) + shown
    heads = ["cell", "seeds", "meta top-1", *map(_name, methods)] + \
        [f"DI-{_name(m)} [95% CI] p" for m in shown] + ["TFLOP " + "/".join(map(_name, methods))]
    table = common.table(heads, table_rows)
    for row in out:
        if row.get("tuning", {}).get("partial"):
            table += "\n" + tuning.unfinished_line(row["label"], row["tuning"])
        elif row.get("tuning"):  # each method's own best point of the same grid
            t = row["tuning"]
            table += f"\n{row['label']}: " + ", ".join(f"{_name(m)} at {t[m]}" for m in ("di", *own(row))) + \
                f" (lr {t['lrs'][0]} to {t['lrs'][-1]} searched, held-out split, {tuning.seeds_text(t)}" + \
                (f"; at an end: {', '.join(map(_name, t['edge']))})" if t.get("edge") else ")")
        for r in row["seeds"]:
            if r.get("ok"):
                have = [m for m in ("di", *own(row)) if r.get(m) is not None]
                table += f"\n{row['label']} seed {r['seed']}: " + ", ".join(
                    f"{_name(m)} {r[m]:.1f}" for m in have) + f" (meta {r['meta']:.1f}); epochs " + \
                    ", ".join(f"{_name(m)} {r[f'{m}_epochs']}" for m in have[1:]) + "; device-h " + \
                    ", ".join(f"{_name(m)} {r[f'{m}_hours']:.4f}" for m in have) + \
                    ("; unfinished: " + ", ".join(_name(m) for m in r["unfinished"]) if r.get("unfinished") else "")
            else:
                table += f"\n{row['label']} seed {r['seed']}: FAILED ({r.get('error')})"
    return table, out


def result_file(name: str, dev: dict) -> Path:
    """RESULTS/<name>_<device>_<date>.json, `_2`, `_3`, ... where taken: a folder of its own, since every
    benchmarks/results/paper_claims_*.json is an E2E-vs-DI table (`paper_claims.summarise`)."""
    stem = f"{name}_{common.device_kind(dev)}_{common.now()[:10]}"
    n = 1
    while any((RESULTS / f"{stem}{'' if n == 1 else f'_{n}'}{s}").exists() for s in (".json", ".txt")):
        n += 1
    return RESULTS / f"{stem}{'' if n == 1 else f'_{n}'}.json"


def summarise(exp: str, rows: list[dict]) -> tuple[str, list[dict]]:
    """The table of a `decoupled` or `split` result and its rows with their statistics."""
    return (summarise_decoupled if exp == "decoupled" else summarise_split)(rows)


def run(exp: str, args, extra: list[str], start_commit: str, problem: str | None) -> Path:
    """Run or collect `exp`, rewriting its result file (json, txt; the split's png) after every finished seed."""
    dev = common.device()
    name = f"paper_claims_{exp}" + ("_tuned" if args.tune else "") + (f"_{args.name}" if args.name else "")
    path = result_file(name, dev)

    def write(rows):
        table, rows = summarise(exp, rows)
        end_commit = pc.code_commit()
        if problem or end_commit != start_commit:
            table += f"\nWARNING: the code changed or was not committed: git_commit {start_commit!r} at the start, " \
                     f"{end_commit!r} at the end"
        note = ("every baseline's epochs = ceil(DI planned training FLOPs / its FLOPs per epoch)" if exp == "decoupled"
                else "DI only; each split's epochs = round(share x the default split's planned FLOPs / FLOPs per "
                "epoch)")
        record = dict(common.header(name, dev), git_commit=end_commit, git_commit_at_start=start_commit,
                      scale=args.scale, experiment=exp, seeds=[int(s) for s in args.seeds.split(",")], rows=rows,
                      extra_args=extra, cell_settings=args.set, note=note + "; mean ± std over seeds; paired 95% t")
        common.write_result(name, record, table, out=path)
        if exp == "split":
            plot_split(rows, path.with_suffix(".png"))
        return table

    rows = run_experiment(exp, args, extra, write)
    print(f"\n{exp}:\n{write(rows)}\n-> {path} (+ .txt)\n", flush=True)
    return path
