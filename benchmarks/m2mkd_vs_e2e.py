"""m2mKD against E2E for the same Vision-MoE student, at matched training FLOPs and device-hours, several seeds.

The teacher is the E2E model of `paper_claims.py`'s default cell (the dense depth-8, width-64 ViT on the built-in
data; trained here first when that run is missing), the meta model that cell's (m2mKD uses the Deep Incubation meta
model at the teacher's width; reused, its device-hours still counted). The student is a V-MoE of the same depth and
width on DeepSpeed MoE (MoE MLP in every other block, 4 experts, top-2). Per seed:

  m2mKD    `dsincubate pipeline --methods m2mkd`: 4 student modules distilled through the frozen meta model
           (6 epochs each), assembled, trained end to end (4 epochs);
  E2E      `dsincubate pipeline --methods e2e`, the same student from scratch, for at least m2mKD's training FLOPs
           (meta included, the teacher's own training not: a reused model) and its device-hours, both measured
           from the m2mKD run's run.json files.

    python benchmarks/m2mkd_vs_e2e.py --seeds 0,1,2 --workdir runs/paper_claims     # shares paper_claims' runs
    python benchmarks/m2mkd_vs_e2e.py --collect-only --workdir runs/paper_claims

With --tune (benchmarks/m2mkd_tuning.py) both students first get the same learning-rate x warm-up search on a split
held out of the training data, the teacher and meta model come from the default cell at its tuned points, and the
student E2E's epochs follow m2mKD's FLOPs alone (reproducible; device-hours beside).

Writes benchmarks/results/m2mkd_vs_e2e_<device>_<date>.{json,txt,png}; re-running resumes (finished runs are kept).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common, m2mkd_tuning as mt, paper_claims as pc, stats, tuning  # noqa: E402
from dsincubate import registry  # noqa: E402

VMOE = ["model.moe_every=2", "model.moe_experts=4", "model.moe_top_k=2"]
# m2mKD's phases get what Deep Incubation's get in the default cell (incubate 6, finetune 4 epochs, same lr/clip)
KD = ["m2mkd.epochs=6", "m2mkd.eval_every=100", "m2mkd_finetune.epochs=4", "m2mkd_finetune.eval_every=100",
      "m2mkd_finetune.lr=8e-3", "m2mkd_finetune.clip_grad=1.0", "m2mkd_finetune.warmup_epochs=0.5"]


def _runs(out: Path, names: list[str]) -> list[dict]:
    return [json.loads((out / n / "run.json").read_text()) for n in names]


def e2e_epochs(out: Path, K: int, budget: str = "max") -> tuple[int, dict]:
    """Student E2E epochs with at least m2mKD's measured training FLOPs and (`budget` "max") device-seconds, or
    (`budget` "flops") its FLOPs alone (meta included)."""
    runs = _runs(out, common.train_dirs("m2mkd", K))  # meta, the K students, the assembled students
    flops = sum(r["flops"]["train_step_per_image"] * r["images_processed"] for r in runs)
    ft = runs[-1]  # the assembled student: the same model as the student E2E
    per_epoch_flops = ft["flops"]["train_step_per_image"] * ft["images_processed"] / ft["epochs"]
    per_epoch_s = statistics.mean(h["epoch_seconds"] for h in ft["history"]) * ft["world_size"]
    seconds = sum(r["device_seconds"] for r in runs)
    plan = {"kd_flops": flops, "kd_device_seconds": seconds, "e2e_flops_per_epoch": per_epoch_flops,
            "e2e_seconds_per_epoch": per_epoch_s}
    by_time = math.ceil(seconds / per_epoch_s) if budget == "max" else 1
    return max(1, math.ceil(flops / per_epoch_flops - 1e-9), by_time), plan


def _finished(run: Path, method: str) -> bool:
    """Whether a run directory holds the finished model of a method (its last trained phase's output)."""
    return (run / common.train_dirs(method, 1)[-1] / "MANIFEST.json").is_file()


def run_seed(work: Path, seed: int, extra: list[str], timeout: int, collect_only: bool) -> dict:
    base_recipe, _, base_sets = pc.cells("meta", "cpu")[0]  # the default cell: teacher and meta model
    teacher_run = work / pc.cell_key(base_recipe, base_sets) / f"seed{seed}"
    sets = pc.CPU_BASE + VMOE + KD
    out = work / pc.cell_key("demo", sets + ["m2mkd.teacher=<default cell E2E>"]) / f"seed{seed}"
    if not collect_only:
        if not _finished(teacher_run, "e2e"):
            pc.run_cell(teacher_run, base_recipe, base_sets, seed, extra, timeout)
        teacher = teacher_run / common.train_dirs("e2e", 1)[-1] / registry.phase("e2e").output_file
        err = run_students(out, sets + [f"m2mkd.teacher={teacher}"], teacher_run, seed, extra, timeout, "max")
        if err:
            return {"ok": False, "seed": seed, "error": err}
    if not _finished(out, "e2e"):
        return {"ok": False, "seed": seed, "error": "not run"}
    teacher_summary = json.loads((teacher_run / "summary.json").read_text())
    return collect(out, seed, teacher_summary["e2e"]["top1"], "max")


def run_students(out: Path, sets: list[str], meta_src: Path, seed: int, extra: list[str], timeout: int,
                 budget: str = "flops") -> str:
    """m2mKD in `out` (the meta model copied from `meta_src`), then the student E2E there at m2mKD's training FLOPs
    (and, `budget` "max", device-seconds: `e2e_epochs`); finished parts are kept. '' or what failed."""
    run = sets + [f"seed={seed}"]
    if not _finished(out, "m2mkd"):
        pc.reuse_phases(meta_src, out, "demo", run, extra, modules=False)
        if not pc._pipeline(out, "m2mkd", "demo", run, extra, timeout):
            return f"m2mKD failed, see {out / 'log_m2mkd.txt'}"
    if not _finished(out, "e2e"):
        e2e_set = f"{registry.phase('e2e').config_section}.epochs={e2e_epochs(out, 4, budget)[0]}"
        if not pc._pipeline(out, "e2e", "demo", run + [e2e_set], extra, timeout):
            return f"student E2E failed, see {out / 'log_e2e.txt'}"
    return ""


def tuned_rows(work: Path, extra: list[str], args) -> tuple[list[dict], dict | None]:
    """--tune: the default cell's tuned points (its search restored or run), the students' search, then every seed
    with each student at its own choice."""
    recipe, _, base = pc.cells("meta", "cpu")[0]
    dchoice = tuning.tune_cell(work, recipe, base, extra, args)
    if not dchoice or dchoice.get("partial"):
        return [], None
    student = pc.CPU_BASE + VMOE + KD + mt.meta_sets(dchoice["di"])
    t_extra = tuning.tune_extra(args.tune_data, extra, work, args.tune_per_class)
    per_epoch = [f"data.samples_per_epoch={pc.e2e_epochs_for(recipe, base, extra)[1]['samples_per_epoch']}"]
    meta_t, teacher_t = mt.tuning_sources(work, recipe, base, dchoice, t_extra, per_epoch, args)

    def run_point(label: str, seed: int) -> dict:
        g = student + mt.point_sets(label, mt.STUDENT) + mt.point_sets(label, "e2e") + per_epoch
        g += [f"m2mkd.teacher={teacher_t / 'e2e' / registry.phase('e2e').output_file}"]
        out = work / "tune" / pc.cell_key("demo", g) / f"seed{seed}"
        print(f"[m2mkd_vs_e2e]   {out}", flush=True)
        err = "" if args.collect_only else run_students(out, g, meta_t, seed, t_extra, args.timeout)
        s = json.loads((out / "summary.json").read_text()) if not err else {}
        return {m: s.get(m, {}).get("top1") for m in mt.METHODS}

    choice = mt.search(work, student, run_point, args, tuning.ladder_for("demo", student, mt.METHODS))
    if not choice or choice.get("partial"):
        return [], choice
    meta_dir, teacher_dir = (work / pc.cell_key(recipe, base + tuning.grid_sets(dchoice[m])) for m in tuning.METHODS)
    sets = student + mt.point_sets(choice[mt.STUDENT], mt.STUDENT) + mt.point_sets(choice["e2e"], "e2e")
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        print(f"[m2mkd_vs_e2e] seed {seed}: m2mKD at {choice['m2mkd']}, E2E at {choice['e2e']}", flush=True)
        d = tuning.run_tuned_seed(work, recipe, base, dchoice, seed, extra, args)  # teacher and meta of this seed
        teacher = teacher_dir / f"seed{seed}" / "e2e" / registry.phase("e2e").output_file
        out = work / pc.cell_key("demo", sets + ["m2mkd.teacher=<default cell E2E, tuned>"]) / f"seed{seed}"
        err = "default cell unfinished" if not d or not d.get("ok") else "" if args.collect_only else \
            run_students(out, sets + [f"m2mkd.teacher={teacher}"], meta_dir / f"seed{seed}", seed, extra, args.timeout)
        rows.append(collect(out, seed, d["e2e"]) if not err and _finished(out, "e2e") else
                    {"ok": False, "seed": seed, "error": err or "not run"})
        rows[-1].update(kd_setting=choice["m2mkd"], e2e_setting=choice["e2e"])
    return rows, choice


def collect(out: Path, seed: int, teacher_top1: float, budget: str = "flops") -> dict:
    """One seed's record from its finished run directory."""
    s = json.loads((out / "summary.json").read_text())
    _, plan = e2e_epochs(out, 4, budget)
    e2e_run = _runs(out, common.train_dirs("e2e", 1))[-1]
    return {"ok": True, "seed": seed, "teacher": teacher_top1,
            "meta": s["deep_incubation"]["meta_top1"], "assembled": s["m2mkd"]["assembled_top1"],
            "kd": s["m2mkd"]["top1"], "e2e": s["e2e"]["top1"], "kd_hours": s["m2mkd"]["device_hours"],
            "e2e_hours": s["e2e"]["device_hours"], "e2e_epochs": s["e2e"]["epochs"], "kd_flops": plan["kd_flops"],
            "e2e_flops": e2e_run["flops"]["train_step_per_image"] * e2e_run["images_processed"], "plan": plan,
            "run": str(out)}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--workdir", default="runs/paper_claims", help="shared with paper_claims.py (teacher and meta)")
    p.add_argument("--timeout", type=int, default=7200, help="seconds per pipeline run")
    p.add_argument("--collect-only", action="store_true")
    tuning.add_args(p)  # --tune and its options (--tune-from takes the default cell's and the students' searches)
    args = p.parse_args(argv)
    common.set_threads()
    work, dev = Path(args.workdir) / "cpu", common.device()
    if args.tune:
        rows, choice = tuned_rows(work, extra, args)
        table, summary = summarise(rows, "V-MoE d8 w64 4x top-2, tuned")
        table += "\n" + mt.describe(choice)
        note = "both students searched alike (benchmarks/m2mkd_tuning.py); teacher = the default cell's tuned E2E, " \
               "meta = its tuned DI meta model (their cost not counted, the meta model's FLOPs counted); E2E " \
               "epochs = ceil(m2mKD FLOPs / E2E FLOPs per epoch); paired 95% t interval over seeds"
        extra_rec = {"tuning": choice}
    else:
        rows = [run_seed(work, int(s), extra, args.timeout, args.collect_only) for s in args.seeds.split(",")]
        table, summary = summarise(rows)
        note = "teacher = paper_claims default cell's E2E model (its cost not counted); E2E epochs = max(ceil(" \
               "m2mKD FLOPs / E2E FLOPs per epoch), ceil(m2mKD device-s / seconds per epoch)); paired 95% t interval"
        extra_rec = {}
    record = dict(common.header("m2mkd_vs_e2e", dev), seeds=args.seeds, rows=rows, **summary, extra_args=extra,
                  note=note, **extra_rec)
    path = common.write_result("m2mkd_vs_e2e_tuned" if args.tune else "m2mkd_vs_e2e", record, table)
    ok = [r for r in rows if r["ok"]]
    plot(ok, path.with_suffix(".png"), common.device_kind(dev))
    print(f"\n{table}\n-> {path} (+ .txt, .png)")
    return 0 if ok else 1


def summarise(rows: list[dict], student: str = "V-MoE d8 w64 4x top-2") -> tuple[str, dict]:
    """The table of the seeds' records and its statistics: mean ± std per model, the paired m2mKD - E2E difference
    with its 95% interval and p (`stats.paired`, the two students of a seed share its meta model and teacher), the
    verdict that follows the interval, mean FLOPs and device-hours."""
    ok = [r for r in rows if r["ok"]]
    ms = {k: pc._ms([r[k] for r in ok]) for k in ("teacher", "meta", "assembled", "kd", "e2e")}
    both = [r for r in ok if r["kd"] is not None and r["e2e"] is not None]
    paired = stats.paired([r["kd"] for r in both], [r["e2e"] for r in both])
    means = {k: pc._ms([r[k] for r in ok])[0] for k in ("kd_flops", "e2e_flops", "kd_hours", "e2e_hours")}
    verdict = pc.verdict(ms["meta"], ms["kd"], ms["e2e"], paired).replace("DI", "m2mKD")
    pm = lambda k: "-" if ms[k][0] is None else f"{ms[k][0]:.1f} ± {ms[k][1]:.1f}"  # noqa: E731
    tflop = lambda v: None if v is None else v / 1e12  # noqa: E731
    table = common.table(
        ["student", "seeds", "teacher (dense E2E)", "meta top-1", "assembled", "m2mKD top-1", "E2E top-1",
         "m2mKD-E2E [95% CI] p", "m2mKD TFLOP", "E2E TFLOP", "m2mKD h", "E2E h", "verdict"],
        [[student, len(ok), pm("teacher"), pm("meta"), pm("assembled"), pm("kd"), pm("e2e"),
          stats.fmt_interval(paired), tflop(means["kd_flops"]), tflop(means["e2e_flops"]), means["kd_hours"],
          means["e2e_hours"], verdict]], ["", "", "", "", "", "", "", "", ".1f", ".1f", ".4f", ".4f", ""])
    return table, {"stats": ms, "paired": paired, "means": means, "verdict": verdict}


def plot(rows: list[dict], path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label, style in (("teacher", "teacher (dense E2E)", "k--"), ("e2e", "student E2E", "o-"),
                              ("kd", "student m2mKD", "s-"), ("meta", "meta model alone", "^:")):
        ax.plot([r["seed"] for r in rows], [r[key] for r in rows], style, label=label)
    ax.set_xlabel("seed")
    ax.set_ylabel("top-1 %")
    ax.set_title(f"V-MoE student: m2mKD vs E2E at >= m2mKD's FLOPs and hours ({device})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    common.exit_with(main)
