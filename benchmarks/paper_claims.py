"""The paper's small-scale findings, E2E against Deep Incubation at matched training FLOPs, several seeds per cell.

Every cell runs `dsincubate pipeline --methods di`, then `--methods e2e` (the same command line, loop and recipe a
user runs) with the cell's settings. E2E is given at least Deep Incubation's total budget, meta pre-training
included, on both measures: its epochs are the larger of ceil(DI training FLOPs / E2E FLOPs per epoch) (FLOPs per
image counted by `accounting.count_flops` on each phase's model) and ceil(DI device-seconds / the fine-tune phase's
seconds per epoch) (the same model as E2E, measured in the same run). Each run's training FLOPs and device-hours from
run.json are reported; wall time on a shared 2-core machine swings several-fold, so where they disagree the FLOPs
are the fairer measure. Each table also shows the meta model alone: where the small meta model is at least as good
as both E2E and Deep Incubation, the setting does not reward a large model at all, and the verdict says so instead
of counting a win or a loss.

Experiments (paper references in brackets):
  depth   target depth 8 / 16 / 32 at width 64, K = 4                      [Fig. 6, Tab. 2]
  data    25 / 50 / 100 % of the training data at the full set's iterations [Tab. 5]
  meta    meta model fixed / pre-trained + tunable / random + tunable       [Sec. 4.4 table]
  kd      meta depth per stage 1 / 2 x Module Incubation / Imitation       [Fig. 8]
  k       K = 2 / 4 / 8                                                     [Fig. 10 area]
  reuse   meta model from scratch / built from a trained model (`model.meta_init`, the same seed's E2E model of
          the default cell) with 2 meta epochs, and with the saved FLOPs spent on incubation   [suppl. Sec. 3]
  width   meta model of the target's width 64 / of width 32 stitched into the width-64 target, and with
          the FLOPs it saves spent on incubation                                            [suppl. Sec. 3]
  ft      fine-tune epochs 1 / 2 / 4 / 8 / 16 of the assembled model                       [Fig. 10, epochs]
  ft_lr   fine-tune learning rate 4e-3 / 8e-3 (default) / 1.6e-2                          [Fig. 10, lr]
  decoupled, split   E2E / DGL / InfoPro / DI at DI's FLOPs [Tab. 2]; DI's FLOPs split between its phases:
          their cells and tables are benchmarks/paper_claims_decoupled.py's
meta, kd, k, reuse, width, ft and ft_lr change only Deep Incubation: their cells train DI and share the default
cell's E2E run per seed; where a cell's meta pre-training or incubation of a module has the default cell's config
key (ft, ft_lr: only the fine-tune differs), it takes that finished phase instead of training it again. In `reuse`,
the source model's own training is not counted in DI's budget (a reused model is sunk cost). Their tables pair each
cell's DI with the default cell's; under `--tune` every cell runs at the default cell's tuned point
(benchmarks/ablations.py).

    python benchmarks/paper_claims.py                                 # CPU: depth + data, 3 seeds, built-in data
    python benchmarks/paper_claims.py --experiments meta,kd --seeds 0,1,2
    python benchmarks/paper_claims.py --scale paper --experiments depth -- --train /data/c100/train --val /data/c100/val
    python benchmarks/paper_claims.py --collect-only                  # rebuild tables/plots from --workdir
    python benchmarks/paper_claims.py --experiments ft --set model.depth=32 --only 1,2,4,8   # Fig. 10 at depth 32
    python benchmarks/paper_claims.py --depths 32 \
        --merge benchmarks/results/archive/paper_claims_depth_cpu2_2026-11-23.json
                                      # run depth 32 only; the table keeps the earlier file's other depths

`--scale paper` runs the paper's DeiT-T-32/128 recipes (`deit_t_<N>`: 200 modular + 100 fine-tune epochs against
400 for E2E) on CIFAR-100-size shards you provide after `--`, on a GPU. Writes
benchmarks/results/paper_claims_<exp>_<device>_<date>.{json,txt,png}; re-running resumes (finished cells are kept).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import ablations, common, stats, tuning  # noqa: E402
from benchmarks.ablations import ABLATIONS  # noqa: E402
# the cells' runs and records live in paper_claims_cells.py; their names stay importable from here
from benchmarks.paper_claims_cells import (_pipeline, cell_key, code_commit, collect_cell, commit_problem,  # noqa: E402,F401
                                           e2e_epochs_for, e2e_epochs_for_hours, reuse_phases, run_cell)

# CPU scale: a narrow ViT (width 64, 2 heads) on the built-in 32x32 data with 8x8 patches, every phase at the demo
# learning rate (fine-tuning too, with clipping and half an epoch of warmup); DI = meta 16 epochs + 6 epochs per
# module + 4 fine-tune epochs: the meta model gets about as many epochs as E2E, as in the paper (with half as many
# epochs of half the data, it stayed near chance and the whole comparison with it). Only the last epoch is evaluated.
CPU_BASE = ["model.embed_dim=64", "model.num_heads=2", "model.patch_size=8", "model.depth=8",
            "model.kernel_backend=torch", "meta.epochs=16", "incubate.epochs=6", "finetune.epochs=4",
            "meta.eval_every=100", "incubate.eval_every=100", "finetune.eval_every=100", "e2e.eval_every=100",
            "finetune.lr=8e-3", "finetune.clip_grad=1.0", "finetune.warmup_epochs=0.5"]
EXPERIMENTS = {
    "depth": ("target depth", [(f"{d}", [f"model.depth={d}"]) for d in (8, 16, 32)]),
    # at depth 8 (the cheapest target): the 100% cell is the depth experiment's depth-8 cell, run once
    "data": ("training data", [(f"{int(f * 100)}%", [f"data.train_fraction={f}"] if f < 1 else [])
                               for f in (0.25, 0.5, 1.0)]),
    # default-valued cells carry no override, so they share the depth-8 cell's runs
    **ABLATIONS,  # the DI-only ablations (meta, kd, k, reuse, width, ft, ft_lr): benchmarks/ablations.py
}
# Ablations of Deep Incubation's own settings: none of them changes the E2E run (same model, data, seed), so their
# cells train Deep Incubation only and compare with the default cell's E2E run of the same seed. Its budget matched
# the default cell's DI; the table's TFLOP columns show where an ablation's DI used more.
DI_ONLY = set(ABLATIONS)
PAPER_DEPTHS = (32, 128)
# a row's statistics, recomputed by summarise
DERIVED = ("stats", "paired", "means", "verdict", "flags", "n_seeds", "vs_default")


def cells(experiment: str, scale: str, depths: list[int] | None = None) -> list[tuple[str, str, list[str]]]:
    """(recipe, label, overrides) of every cell of an experiment (`depths` replaces the depth experiment's)."""
    if experiment == "depth" and depths:
        if scale == "paper":
            return [(f"deit_t_{d}", f"{d}", []) for d in depths]
        return [("demo", f"{d}", CPU_BASE + [f"model.depth={d}"]) for d in depths]
    if scale == "paper":
        if experiment == "depth":
            return [(f"deit_t_{d}", f"{d}", []) for d in PAPER_DEPTHS]
        return [("deit_t_32", label, sets) for label, sets in EXPERIMENTS[experiment][1]]
    return [("demo", label, CPU_BASE + sets) for label, sets in EXPERIMENTS[experiment][1]]


def _ms(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def verdict(meta, di, e2e, diff: dict) -> str:
    """What a cell shows: the paired difference's 95% interval decides (`stats.paired`: DI and E2E of one seed
    share the meta model's seed and the data order); where the meta model alone is at least as good as both
    (means), the row says so, since the setting then does not reward a large model at all."""
    (m, _), (d, _), (e, _) = meta, di, e2e
    if None in (m, d, e) or diff.get("mean") is None:
        return "incomplete"
    v = diff["verdict"]
    if m >= max(d, e):
        v += "; meta alone best: no reward for the large model"
    return v


def summarise(experiment: str, rows: list[dict]) -> tuple[str, list[dict]]:
    """The table of an experiment's rows (each with its seeds' records) and the rows with their statistics: mean ±
    std per method, the paired DI - E2E difference with its 95% interval and p (`stats.paired`), the verdict that
    follows the interval, and per-seed flags (`stats.seed_flags`)."""
    if experiment in ("decoupled", "split"):  # tables of their own (--from recomputes them too)
        from benchmarks import paper_claims_decoupled

        return paper_claims_decoupled.summarise(experiment, rows)
    title = EXPERIMENTS[experiment][0] if experiment in EXPERIMENTS else experiment
    # --tune rows: the default recipe's E2E of the same seeds beside the tuned one
    default = any(r.get("e2e_default") is not None for row in rows for r in row["seeds"])
    # a DI-only ablation marks its default cell: each row's DI paired with the default's (the ablation's number)
    ref = any(row.get("default") for row in rows)
    vs = ablations.vs_default(rows)
    out, table_rows = [], []
    for row, vd in zip(rows, vs):
        ok = [r for r in row["seeds"] if r.get("ok")]
        ms = {k: _ms([r.get(k) for r in ok]) for k in ("meta", "assembled", "di", "e2e", "e2e_default")}
        both = [r for r in ok if r["di"] is not None and r["e2e"] is not None]
        ms["di_minus_e2e"] = _ms([r["di"] - r["e2e"] for r in both])
        diff = stats.paired([r["di"] for r in both], [r["e2e"] for r in both])
        flops = {k: _ms([r[k] for r in ok])[0] for k in ("di_flops", "e2e_flops", "di_hours", "e2e_hours")}
        v = verdict(ms["meta"], ms["di"], ms["e2e"], diff)
        flags = stats.flag_summary(ok)
        out.append(dict(row, stats=ms, paired=diff, means=flops, verdict=v, flags=flags, n_seeds=len(ok)) |
                   ({"vs_default": vd} if ref else {}))
        pm = lambda k: "-" if ms[k][0] is None else f"{ms[k][0]:.1f} ± {ms[k][1]:.1f}"  # noqa: E731
        label = row["label"] + ("*" if row.get("merged_from") else "")  # a row of an earlier result (--merge)
        vs_cell = ["default" if row.get("default") else stats.fmt_interval(vd or {})] if ref else []
        table_rows.append([label, len(ok), pm("meta"), pm("assembled"), pm("di"), pm("e2e")] +
                          ([pm("e2e_default")] if default else []) + [pm("di_minus_e2e"),
                           stats.fmt_interval(diff)] + vs_cell + [
                           None if flops["di_flops"] is None else flops["di_flops"] / 1e12,
                           None if flops["e2e_flops"] is None else flops["e2e_flops"] / 1e12,
                           flops["di_hours"], flops["e2e_hours"], v, flags or "-"])
    table = common.table([title, "seeds", "meta top-1", "assembled", "DI top-1", "E2E top-1"] +
                         (["E2E default"] if default else []) + ["DI-E2E paired", "DI-E2E [95% CI] p"] +
                         (["DI - default DI [95% CI] p"] if ref else []) +
                         ["DI TFLOP", "E2E TFLOP", "DI h", "E2E h", "verdict", "per-seed flags"], table_rows,
                         [""] * (8 + default + ref) + [".1f", ".1f", ".4f", ".4f", "", ""])
    sources = sorted({Path(r["merged_from"]).name for r in rows if r.get("merged_from")})
    if sources:
        table += f"\n* measured earlier: {', '.join(sources)}"
    for r in rows:
        if r.get("tuning"):
            table += "\n" + tuning.describe(r["label"], r["tuning"])
    if any(r.get("tuned_at") for r in rows):
        table += "\nevery other cell: Deep Incubation at the default cell's DI point, with the default cell's E2E"
    return table, out


def plot(experiment: str, rows: list[dict], path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label, style in (("e2e", "E2E", "o-"), ("di", "Deep Incubation", "s-"),
                              ("meta", "meta model alone", "^--")):
        m = [r["stats"][key][0] for r in rows]
        s = [r["stats"][key][1] for r in rows]
        if all(v is None for v in m):
            continue
        ax.errorbar(x, [float("nan") if v is None else v for v in m], yerr=[0 if v is None else v for v in s],
                    fmt=style, capsize=3, label=label)
    ax.set_xticks(x, [r["label"] for r in rows])
    ax.set_xlabel(EXPERIMENTS[experiment][0])
    ax.set_ylabel("top-1 % (mean ± std over seeds)")
    budget = "the default cell's E2E (>= its DI's FLOPs)" if experiment in DI_ONLY else "E2E at >= DI's training FLOPs"
    ax.set_title(f"{experiment}: {budget} ({device})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def merged(experiment: str, rows: list[dict], path: str, old_rows: list[dict]) -> list[dict]:
    """This run's rows and the rows of an earlier result whose labels it did not run (each keeps its seeds'
    records and names its file), ordered as the experiment lists them (depths numerically)."""
    have = {r["label"] for r in rows}
    rows = rows + [{k: v for k, v in dict(r, merged_from=r.get("merged_from") or path).items() if k not in DERIVED}
                   for r in old_rows if r["label"] not in have]
    order = [label for label, _ in EXPERIMENTS[experiment][1]]
    if all(r["label"].isdigit() for r in rows):
        return sorted(rows, key=lambda r: int(r["label"]))
    return sorted(rows, key=lambda r: order.index(r["label"]) if r["label"] in order else len(order))


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experiments", default="depth,data",
                   help=f"comma list of {', '.join(EXPERIMENTS)}, decoupled, split (paper_claims_decoupled.py)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--scale", choices=("cpu", "paper"), default="cpu")
    p.add_argument("--depths", default="", help="depths of the depth experiment (default 8,16,32; paper: 32,128)")
    p.add_argument("--workdir", default="runs/paper_claims")
    p.add_argument("--timeout", type=int, default=7200, help="seconds per pipeline run")
    p.add_argument("--collect-only", action="store_true")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting for every cell, the default cell too (part of the cells' keys): "
                        "`--experiments ft --set model.depth=32` runs the fine-tune ablation on the depth-32 cell")
    p.add_argument("--only", default="", help="comma list of cell labels to run (default: all of each experiment)")
    p.add_argument("--merge", default="", help="comma list of earlier result .json files: an experiment's table also "
                   "shows the rows of its earlier file whose cells this invocation does not run (marked with the file)")
    p.add_argument("--e2e-budget", choices=("max", "flops"), default="max",
                   help="E2E's epochs: 'max' = at least DI's FLOPs and its device-seconds (the committed results); "
                        "'flops' = DI's FLOPs alone (reproducible on a loaded machine; device-hours reported beside)")
    p.add_argument("--name", default="",
                   help="a tag in the result file names: paper_claims_<exp>_<name>_<device>_<date>")
    p.add_argument("--allow-dirty", action="store_true", help="run although the code is not committed (the result "
                   "file then says so in its table); by default a '+dirty' or unknown commit is refused")
    tuning.add_args(p)
    p.add_argument("--from", dest="from_files", default="", help="comma list of result .json files: recompute their "
                   "tables from the per-seed records they hold (no runs), written as <file>_stats.{json,txt}")
    return p.parse_args(argv)


def recompute(path: Path, commit: str) -> Path:
    """The table of a committed result recomputed from its per-seed records with this code's statistics; written
    beside it as <stem>_stats.{json,txt} (the record names its source and the source's commit)."""
    rec = json.loads(path.read_text())
    rows = [{k: v for k, v in r.items() if k not in DERIVED} for r in rec["rows"]]
    table, rows = summarise(rec["experiment"], rows)
    if not rec.get("git_commit") or rec["git_commit"].endswith("+dirty"):
        table += f"\nWARNING: the source result records git_commit {rec.get('git_commit')!r}: not a clean commit"
    if commit_problem(commit):
        table += f"\nWARNING: recomputed by code at git_commit {commit!r}: not a clean commit"
    out = dict(common.header(f"paper_claims_{rec['experiment']}_stats", rec.get("device")), git_commit=commit,
               recomputed_from=str(path), source_git_commit=rec.get("git_commit"), source_date=rec.get("date"),
               experiment=rec["experiment"], scale=rec.get("scale", "cpu"), seeds=rec.get("seeds"), rows=rows)
    return common.write_result("", out, table, out=path.with_name(path.stem + "_stats.json"))


def earlier_results(args) -> dict[str, tuple[str, list[dict]]] | str:
    """--merge's files as {experiment: (file, rows)}, or why one cannot be merged."""
    earlier: dict[str, tuple[str, list[dict]]] = {}
    for f in [f.strip() for f in args.merge.split(",") if f.strip()]:
        try:
            rec = json.loads(Path(f).read_text())
            earlier[rec["experiment"]] = (f, rec["rows"])
        except (OSError, ValueError, KeyError) as e:
            return f"--merge {f}: not a paper_claims result ({e})"
        if rec.get("scale", "cpu") != args.scale:
            return f"--merge {f}: made at scale {rec.get('scale')}, not {args.scale}"
    return earlier


def refusal(args, exps: list[str], decoupled: dict) -> str:
    """What is wrong with the command line's experiments and tuning options, before anything runs ('' if nothing)."""
    bad = [e for e in exps if e not in EXPERIMENTS and e not in decoupled]
    if bad:
        return f"unknown experiment(s) {bad}; use {', '.join([*EXPERIMENTS, *decoupled])}"
    if args.tune and "split" in exps:
        return "--tune does not apply to the split experiment (Deep Incubation alone: nothing to tune alike)"
    unreadable = tuning.unreadable(args.tune_from)
    return f"--tune-from {unreadable}" if unreadable else ""


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    args = parse_args(argv)
    start_commit = code_commit()
    if args.from_files:
        for f in [Path(f.strip()) for f in args.from_files.split(",") if f.strip()]:
            try:
                path = recompute(f, start_commit)
            except (OSError, ValueError, KeyError) as e:
                print(f"error: --from {f}: not a paper_claims result ({e})", file=sys.stderr)
                return 2
            print(f"{f} ->\n{path.with_suffix('.txt').read_text()}-> {path} (+ .txt)\n", flush=True)
        return 0
    exps = [e.strip() for e in args.experiments.split(",") if e.strip()]
    from benchmarks import paper_claims_decoupled as decoupled

    if refused := refusal(args, exps, decoupled.EXPERIMENTS):
        print(f"error: {refused}", file=sys.stderr)
        return 2
    problem = commit_problem(start_commit)
    if problem and not args.allow_dirty and not args.collect_only:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    earlier = earlier_results(args)
    if isinstance(earlier, str):
        print(f"error: {earlier}", file=sys.stderr)
        return 2
    common.set_threads()
    for exp in exps:
        if exp in decoupled.EXPERIMENTS:  # Tab. 2's baselines, the budget split: their own cells and tables
            decoupled.run(exp, args, extra, start_commit, problem)
            continue
        rows = run_experiment(exp, args, extra)
        rows = merged(exp, rows, *earlier.get(exp, ("", [])))
        table, rows = summarise(exp, rows)
        end_commit = code_commit()
        if problem or end_commit != start_commit:
            table += f"\nWARNING: the code changed or was not committed: git_commit {start_commit!r} at the start, " \
                     f"{end_commit!r} at the end"
        dev = common.device()
        name = f"paper_claims_{exp}" + ("_tuned" if args.tune else "") + (f"_{args.name}" if args.name else "")
        record = dict(common.header(name, dev), git_commit=end_commit, git_commit_at_start=start_commit,
                      scale=args.scale, experiment=exp, seeds=[int(s) for s in args.seeds.split(",")], rows=rows,
                      extra_args=extra, cell_settings=args.set, e2e_budget=args.e2e_budget,
                      note="E2E epochs = " + ("ceil(DI training FLOPs / E2E FLOPs per epoch)" if args.e2e_budget ==
                                              "flops" else "max(ceil(DI training FLOPs / E2E FLOPs per epoch), "
                                              "ceil(DI device-seconds / fine-tune seconds per epoch))") +
                      "; mean ± std over seeds; paired DI - E2E with its 95% t interval and p")
        path = common.write_result(name, record, table)
        plot(exp, rows, path.with_suffix(".png"), common.device_kind(dev))
        print(f"\n{exp}:\n{table}\n-> {path} (+ .txt, .png)\n", flush=True)
    return 0


def run_experiment(exp: str, args: argparse.Namespace, extra: list[str]) -> list[dict]:
    """Run (or with --collect-only, collect) every cell of one experiment over the seeds; its rows."""
    rows, work = [], Path(args.workdir) / args.scale
    depths = [int(d) for d in args.depths.split(",") if d.strip()]
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    base = None
    if exp in DI_ONLY:  # the default cell: the experiment's base settings, whose E2E run every cell shares
        base = ("deit_t_32", []) if args.scale == "paper" else ("demo", list(CPU_BASE))
        base = (base[0], base[1] + args.set)
        if args.tune:
            own = [(base[0], label, sets) for label, sets in ABLATIONS[exp][1]]
            return ablations.tuned_rows(exp, work, own, base, extra, args, only)
    for recipe, label, sets in cells(exp, args.scale, depths):
        if only and label not in only:
            continue
        print(f"[paper_claims] {exp} {label}", flush=True)
        sets = sets + args.set
        if args.tune:
            rows.append(tuned_row(work, recipe, label, sets, extra, args))
            continue
        seed_rows = [r for seed in [int(s) for s in args.seeds.split(",")]
                     for r in [seed_record(work, recipe, sets, seed, extra, args, base)] if r is not None]
        rows.append({"label": label, "recipe": recipe, "overrides": sets, "seeds": seed_rows} |
                    ({"default": ablations.is_default(recipe, sets, base[1])} if base else {}))
    return rows


def seed_record(work: Path, recipe: str, sets: list[str], seed: int, extra: list[str], args,
                base: tuple[str, list[str]] | None) -> dict | None:
    """Run (or collect) one seed of a cell; `base` is a DI-only ablation's default cell, whose E2E run it shares.
    None where --collect-only finds the seed unfinished."""
    out = work / cell_key(recipe, sets) / f"seed{seed}"  # identical cells of two experiments run once
    e2e_from = work / cell_key(*base) / f"seed{seed}" if base else None
    seed_sets = [s.replace("{e2e}", str((e2e_from or out) / "e2e" / "model.safetensors")) for s in sets]
    if args.collect_only:
        if ((e2e_from or out) / "e2e" / "MANIFEST.json").is_file() and (out / "summary.json").is_file():
            flop_epochs, plan = e2e_epochs_for(recipe, seed_sets, extra)
            return collect_cell(out, seed, plan, flop_epochs, e2e_from)
        return None
    if e2e_from is not None and e2e_from != out and not (e2e_from / "e2e" / "MANIFEST.json").is_file():
        run_cell(e2e_from, base[0], base[1], seed, extra, args.timeout, budget=args.e2e_budget)  # shared E2E first
    return run_cell(out, recipe, seed_sets, seed, extra, args.timeout, e2e_from, args.e2e_budget)


def tuned_row(work: Path, recipe: str, label: str, sets: list[str], extra: list[str], args) -> dict:
    """A cell under --tune: the grid on the held-out split, then every seed at each method's choice."""
    choice = tuning.tune_cell(work, recipe, sets, extra, args)
    seeds = [] if choice is None or choice.get("partial") else [
        r for seed in [int(s) for s in args.seeds.split(",")]
        for r in [tuning.run_tuned_seed(work, recipe, sets, choice, seed, extra, args)] if r is not None]
    return {"label": f"{label} tuned", "recipe": recipe, "overrides": sets, "tuning": choice, "seeds": seeds}


if __name__ == "__main__":
    common.exit_with(main)
