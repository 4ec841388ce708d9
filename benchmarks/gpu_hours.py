"""Accuracy vs device-hours of E2E and Deep Incubation at several training budgets (the paper's Fig. 4).

Each budget scales the epochs of every phase of a recipe by a factor (rounded up, at least 1): meta pre-training,
each of the K incubations, fine-tuning, and the E2E baseline. Each budget is one pipeline run through our own
command line or launchers, so the same sweep runs on one CPU, one GPU node or a hostfile cluster:

  --via cli        python -m dsincubate pipeline ...                      (one process; the default)
  --via deepspeed  deepspeed <launcher options> --module dsincubate pipeline ...
  --via script     launchers/incubate.sh <launcher options> --recipe ... --output ... -- <dsincubate options>

`--launcher-args "--hostfile hosts --master_port 29600"` is passed through to `deepspeed` / `incubate.sh`; anything
after `--` goes to every dsincubate call (e.g. `--train /data/in1k/train --val /data/in1k/val`, `--set ...`).

Device-hours come from each phase's run.json (`device_seconds` = wall seconds x devices; every phase counted,
including meta pre-training), top-1 from the final evaluation (fine-tuned model for Deep Incubation). Writes
benchmarks/results/gpu_hours_<device>_<date>.csv/.json/.png (accuracy vs device-hours, one line per method, the
device in the axis label) and the device-hours saving factor of Deep Incubation at equal accuracy, linearly
interpolated along each curve (see `hours_to_reach` / `saving_factor`). Re-running resumes: finished phases are
skipped. The recipe (with the --set overrides) is resolved once and saved as <workdir>/sweep_config.json; every
budget runs from it (`--config`), so all budgets share one setting.

    python benchmarks/gpu_hours.py                         # CPU: demo model on the built-in data, 3 budgets, < 30 min
    python benchmarks/gpu_hours.py --recipe vit_b16 --budgets 0.1,0.2,0.4 --via script \\
        --launcher-args "--num_gpus 8" --workdir /shared/gh -- --train /data/in1k/train --val /data/in1k/val
    python benchmarks/gpu_hours.py --collect-only          # rebuild CSV/PNG/JSON from the runs in --workdir
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from dsincubate import registry  # noqa: E402

# The methods compared (the pipeline's default --methods), each by its name in the results; the phases a budget
# trains and scales, where their outputs are and which phase's top-1 a method reports are the registry's.
METHODS = {"e2e": "e2e", "di": "deep_incubation"}
# The CPU default: the demo recipe (depth 16, width 64, 8x8 patches, K=4; meta 20, incubate 8, finetune 6, E2E 24
# epochs) on the built-in demo data (3000 images/epoch), at budgets 0.2, 0.4, 0.8 of its epochs. The committed
# archive/gpu_hours_cpu2.* results predate this demo (they used depth 8, width 96, 4x4 patches).
CPU_DEFAULT_SETS: list[str] = []


# ---------------------------------------------------------------- the math (unit-tested)

def sweep_phases() -> tuple[str, ...]:
    """The phases one budget trains (meta, incubate, finetune, e2e): the trained phases of `METHODS` in the order the
    pipeline runs them, each once."""
    methods = registry.parse_methods(",".join(METHODS))
    return tuple(dict.fromkeys(p for m in methods for p in registry.trained_phases(m)))


def scaled_epochs(base: dict, factor: float) -> dict:
    """Epochs of each phase at a budget factor: ceil(base x factor), at least 1."""
    return {k: max(1, math.ceil(v * factor - 1e-9)) for k, v in base.items()}


def device_hours(run: dict) -> float:
    """Device-hours of one phase from its run.json: device_seconds (= wall x devices), falling back to wall x world."""
    sec = run.get("device_seconds")
    if sec is None:
        sec = run["wall_seconds"] * run.get("world_size", 1)
    return sec / 3600.0


def _curve(points) -> list[tuple[float, float]]:
    pts = sorted((float(h), float(a)) for h, a in points if h is not None and a is not None)
    return pts


def hours_to_reach(points, acc: float) -> tuple[float | None, bool]:
    """Device-hours at which a curve of (hours, top1) points first reaches accuracy `acc`.

    Linear interpolation between consecutive budgets (sorted by hours). Returns (hours, exact): exact is False when
    the smallest budget already reaches `acc` (its hours are then only an upper bound); (None, False) when no budget
    reaches it (no extrapolation).
    """
    pts = _curve(points)
    if not pts or max(a for _, a in pts) < acc:
        return None, False
    if pts[0][1] >= acc:
        return pts[0][0], False
    for (h0, a0), (h1, a1) in zip(pts, pts[1:]):
        if a0 < acc <= a1:
            return h0 + (h1 - h0) * (acc - a0) / (a1 - a0), True
    return None, False  # unreachable: max >= acc and first < acc imply a crossing


def saving_factor(e2e_points, di_points, acc: float) -> dict:
    """E2E device-hours / Deep Incubation device-hours to reach `acc`.

    kind: "exact" (both interpolated), "lower_bound" (DI's smallest budget already reaches acc, so DI might need even
    less), "upper_bound" (E2E's smallest budget already reaches it), "unknown" (both), or None factor when a curve
    never reaches acc.
    """
    he, ee = hours_to_reach(e2e_points, acc)
    hd, ed = hours_to_reach(di_points, acc)
    if he is None or hd is None or hd <= 0:
        return {"accuracy": acc, "factor": None, "kind": "not_reached", "e2e_hours": he, "di_hours": hd}
    kind = {(True, True): "exact", (True, False): "lower_bound", (False, True): "upper_bound",
            (False, False): "unknown"}[(ee, ed)]
    return {"accuracy": acc, "factor": he / hd, "kind": kind, "e2e_hours": he, "di_hours": hd}


def compare(e2e_points, di_points, levels: int = 5) -> dict:
    """Saving factors at equal accuracy: the headline at the best accuracy both methods reach, and a few levels
    across the accuracy range where both curves are interpolable."""
    e, d = _curve(e2e_points), _curve(di_points)
    if not e or not d:
        return {"headline": None, "levels": [], "note": "a method has no finished budget"}
    top = min(max(a for _, a in e), max(a for _, a in d))
    low = max(e[0][1], d[0][1])
    out = {"headline": saving_factor(e, d, top), "levels": []}
    if top > low:
        for k in range(levels):
            acc = low + (top - low) * (k + 1) / levels
            out["levels"].append(saving_factor(e, d, acc))
    out["note"] = ("factor = E2E device-hours / Deep Incubation device-hours at equal top-1, linear interpolation "
                   "between budgets, no extrapolation")
    return out


# ---------------------------------------------------------------- running the sweep

def budget_dir(workdir: Path, factor: float) -> Path:
    return workdir / f"budget_{factor:g}"


def command_for(args, out: Path, epochs: dict, extra: list[str]) -> list[str]:
    sets = []
    for ph in sweep_phases():
        sets += ["--set", f"{registry.phase(ph).config_section}.epochs={epochs[ph]}"]
    base = ["--output", str(out)] + (["--config", args.pinned_config] if getattr(args, "pinned_config", None) else
                                     ["--recipe", args.recipe] if args.recipe else [])
    if args.ds_config:
        base += ["--ds-config", args.ds_config]
    launcher = shlex.split(args.launcher_args or "")
    if args.via == "cli":
        return [sys.executable, "-m", "dsincubate", "pipeline", *base, *sets, *extra]
    if args.via == "deepspeed":
        ds = str(Path(sys.executable).with_name("deepspeed"))
        if not any(a.startswith(("--num_accelerators", "--num_gpus", "--hostfile", "--include")) for a in launcher):
            import torch

            if not torch.cuda.is_available():
                launcher += ["--num_accelerators", "1"]
        return [ds, *launcher, "--module", "dsincubate", "pipeline", *base, *sets, *extra]
    script = common.ROOT / "launchers" / "incubate.sh"  # takes --output/--recipe/--ds-config itself
    return ["bash", str(script), *launcher, *base, "--", *sets, *extra]


def collect(out: Path, num_stages: int) -> dict | None:
    """Top-1 and device-hours of each method of one budget's run, from its phases' run.json files (a method is
    absent until every phase it trains has finished)."""
    row = {"dir": str(out)}
    for method in METHODS:
        got = method_result(out, method, num_stages)
        if got:
            row[method] = got
    return row


def method_result(out: Path, method: str, num_stages: int) -> dict | None:
    """One method's top-1 (its last phase's), device-hours (every phase's, meta pre-training included) and epochs;
    for a method of several phases also the first phase's top-1 and each phase's hours (a per-stage phase's K)."""
    from dsincubate.checkpoint import complete

    trained = registry.trained_phases(method)
    runs = {p: [] for p in trained}
    for s in registry.method_steps(method, num_stages):
        if s.kind == "train":
            d = out / registry.phase(s.name).output_dir(s.stage_index)
            if not complete(d):
                return None
            runs[s.name].append(json.loads((d / "run.json").read_text()))
    last = runs[trained[-1]][-1]
    hours = {p: [device_hours(r) for r in rs] if registry.phase(p).per_stage else device_hours(rs[0])
             for p, rs in runs.items()}
    res = {"top1": last["final"].get("top1")}
    if len(trained) == 1:
        res.update(device_hours=hours[trained[0]], epochs=last["epochs"])
    else:
        first = runs[trained[0]][0]
        res.update({f"{trained[0]}_top1": first["final"].get("top1"),
                    "device_hours": sum(sum(h) if isinstance(h, list) else h for h in hours.values()),
                    "phases_hours": hours, "epochs": {p: rs[0]["epochs"] for p, rs in runs.items()}})
    res.update(device_name=last.get("device_name"), world_size=last.get("world_size"),
               device_type=last.get("device_type"))
    return res


def write_outputs(rows: list[dict], args, dev: dict, cmp: dict, stem: Path) -> None:
    phased = [m for m in METHODS if len(registry.trained_phases(m)) > 1]  # the methods with a column per phase
    columns = list(dict.fromkeys(p for m in phased for p in registry.trained_phases(m)))
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "budget_factor", "epochs", "top1", "device_hours", *(f"{p}_hours" for p in columns),
                    "device_name", "world_size", "run_dir"])
        for r in rows:
            for method, name in METHODS.items():
                if method not in r:
                    continue
                d = r[method]
                ep, hours = d["epochs"], d.get("phases_hours", {})
                epochs = (";".join(f"{p}={ep[p]}" for p in ep) if isinstance(ep, dict)
                          else f"{registry.trained_phases(method)[0]}={ep}")
                w.writerow([name, r["budget"], epochs, d["top1"], f"{d['device_hours']:.6f}",
                            *(_hours_cell(hours.get(p)) for p in columns), d["device_name"], d["world_size"],
                            r["dir"]])
    plot(rows, dev, cmp, stem.with_suffix(".png"), args)


def _hours_cell(hours) -> str:
    """A phase's device-hours in the CSV: empty where a method has no such phase, `;` between a per-stage
    phase's K."""
    if hours is None:
        return ""
    return ";".join(f"{h:.6f}" for h in hours) if isinstance(hours, list) else f"{hours:.6f}"


def plot(rows, dev, cmp, path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for key, name, style in (("e2e", "E2E", "s--"), ("di", "Deep Incubation (incl. meta pre-training)", "o-")):
        pts = sorted((r[key]["device_hours"], r[key]["top1"], r["budget"]) for r in rows if key in r)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=name)
            for h, a, b in pts:
                ax.annotate(f"x{b:g}", (h, a), textcoords="offset points", xytext=(4, -10), fontsize=7)
    names = {r[k]["device_name"] for r in rows for k in METHODS if k in r} or {dev["name"]}
    ws = {r[k]["world_size"] for r in rows for k in METHODS if k in r}
    ax.set_xlabel(f"device-hours ({', '.join(sorted(names))}; {'/'.join(map(str, sorted(ws)))} device(s) per job)")
    ax.set_ylabel("top-1 accuracy (%)")
    h = cmp.get("headline") or {}
    sub = ""
    if h.get("factor"):
        sub = f"\nsaving at {h['accuracy']:.1f}% top-1: {h['factor']:.2f}x ({h['kind']})"
    ax.set_title(f"Accuracy vs training cost: {args.recipe or 'run'} (budgets {args.budgets}){sub}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default="demo", help="recipe whose epochs are scaled (default demo)")
    ap.add_argument("--budgets", default="0.2,0.4,0.8", help="comma list of epoch factors (default 0.2,0.4,0.8)")
    ap.add_argument("--via", choices=("cli", "deepspeed", "script"), default="cli")
    ap.add_argument("--launcher-args", default="", help="options for deepspeed / launchers/incubate.sh, one string")
    ap.add_argument("--ds-config", default=None)
    ap.add_argument("--workdir", default="runs/gpu_hours", help="run directories (one per budget)")
    ap.add_argument("--demo-root", default=None, help="where the built-in demo data is generated (data.demo_root)")
    ap.add_argument("--collect-only", action="store_true", help="do not run; rebuild outputs from --workdir")
    ap.add_argument("--timeout", type=float, default=0, help="seconds per budget (0 = none)")
    ap.add_argument("--out", default=None, help="output stem (default benchmarks/results/gpu_hours_<device>_<date>)")
    return ap


def sweep_config(args, extra: list[str], dev: dict):
    """The recipe with the sweep's overrides (but epochs, which each budget sets) and the dsincubate arguments every
    budget passes: (config, arguments)."""
    from dsincubate import recipes
    from dsincubate.config import apply_overrides

    sets = [] if extra else list(CPU_DEFAULT_SETS) if dev["type"] == "cpu" and args.recipe == "demo" else []
    if args.demo_root:
        sets.append(f"data.demo_root={Path(args.demo_root).resolve()}")
    extra = [a for s in sets for a in ("--set", s)] + extra
    cfg = recipes.get(args.recipe)
    over = common.extra_sets(extra)
    try:
        cfg = apply_overrides(cfg, [o for o in over if not o.split("=")[0].endswith(".epochs")])
    except Exception:  # noqa: BLE001  (an override for another recipe field; only K and epochs matter here)
        pass
    return cfg, extra


def pin_config(args, cfg, workdir: Path) -> None:
    """Pin the recipe: every budget runs from the same saved config (a recipe edited while the sweep runs, or a
    resumed sweep, cannot mix settings across budgets); --set overrides still apply on top (epochs per budget).
    Sets args.pinned_config (None where nothing is pinned: --collect-only of a sweep that never started)."""
    pinned = workdir / "sweep_config.json"
    if not args.collect_only:
        workdir.mkdir(parents=True, exist_ok=True)
        if not pinned.is_file():
            cfg.save(pinned)
        elif json.loads(pinned.read_text()) != json.loads(json.dumps(cfg.to_dict())):
            print(f"[gpu_hours] note: {pinned} (from an earlier start of this sweep) differs from the recipe now; "
                  f"keeping the pinned one so that all budgets match", flush=True)
    args.pinned_config = str(pinned) if pinned.is_file() else None


def run_budget(args, b: float, base: dict, extra: list[str], workdir: Path, num_stages: int) -> dict:
    """Train one budget (unless --collect-only) and collect its row."""
    out = budget_dir(workdir, b)
    epochs = scaled_epochs(base, b)
    cmd = command_for(args, out, epochs, extra)
    t0 = time.time()
    status = "collected"
    if not args.collect_only:
        out.parent.mkdir(parents=True, exist_ok=True)
        log = workdir / f"budget_{b:g}.log"
        print(f"[gpu_hours] budget x{b:g} epochs {epochs}: {' '.join(shlex.quote(c) for c in cmd)}  (log {log})",
              flush=True)
        with open(log, "a") as f:
            try:
                p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=common.ROOT,
                                   env=dict(os.environ, PYTHONUNBUFFERED="1"), timeout=args.timeout or None)
                status = "ok" if p.returncode == 0 else f"exit {p.returncode} (see {log})"
            except subprocess.TimeoutExpired:
                status = f"timeout after {args.timeout:.0f}s (see {log})"
    row = collect(out, num_stages)
    row.update(budget=b, epochs=epochs, status=status, wall_seconds_of_sweep_step=round(time.time() - t0, 1),
               command=" ".join(shlex.quote(c) for c in cmd))
    print(f"[gpu_hours] budget x{b:g}: {status}; " + "; ".join(
        f"{k} top1 {row[k]['top1']:.2f} in {row[k]['device_hours']:.4f} device-h" for k in METHODS
        if k in row), flush=True)
    return row


def report(rows: list[dict], dev: dict) -> tuple[dict, str]:
    """The E2E/DI comparison over the budgets' rows and the printed text (table and saving factors)."""
    e2e_pts = [(r["e2e"]["device_hours"], r["e2e"]["top1"]) for r in rows if "e2e" in r]
    di_pts = [(r["di"]["device_hours"], r["di"]["top1"]) for r in rows if "di" in r]
    cmp = compare(e2e_pts, di_pts)
    lines = [common.table(["budget", "method", "epochs", "top-1 %", "device-hours"],
                          [[f"x{r['budget']:g}", name, json.dumps(r[k]["epochs"]).replace('"', ""), r[k]["top1"],
                            r[k]["device_hours"]] for r in rows for k, name in (("e2e", "E2E"), ("di", "DI total"))
                           if k in r], ["", "", "", ".2f", ".4f"])]
    h = cmp.get("headline")
    if h and h.get("factor"):
        lines.append(f"saving factor at equal top-1 {h['accuracy']:.2f}%: {h['factor']:.2f}x ({h['kind']}; E2E "
                     f"{h['e2e_hours']:.4f} vs DI {h['di_hours']:.4f} device-hours)")
    elif h:
        lines.append(f"saving factor at top-1 {h['accuracy']:.2f}%: not computable ({h['kind']})")
    for lv in cmp.get("levels", []):
        if lv.get("factor"):
            lines.append(f"  at {lv['accuracy']:.2f}%: {lv['factor']:.2f}x ({lv['kind']})")
    return cmp, f"device: {dev['name']}  ({common.now()})\n" + "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    args = build_parser().parse_args(argv)
    budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    workdir = Path(args.workdir).resolve()
    dev = common.device()
    cfg, extra = sweep_config(args, extra, dev)
    base = {ph: cfg.train_config(ph).epochs for ph in sweep_phases()}
    pin_config(args, cfg, workdir)
    record = common.header("gpu_hours", dev)
    record.update(settings={"recipe": args.recipe, "budgets": budgets, "base_epochs": base, "via": args.via,
                            "launcher_args": args.launcher_args, "dsincubate_args": extra,
                            "workdir": str(workdir),
                            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}, runs=[])
    rows = [run_budget(args, b, base, extra, workdir, cfg.model.num_stages) for b in budgets]
    cmp, text = report(rows, dev)
    record["runs"] = rows
    record["comparison"] = cmp
    print(text)
    stem = Path(args.out) if args.out else common.result_path(
        "gpu_hours", dev, record["date"], suffixes=(".json", ".txt", ".csv", ".png")).with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    common.write_result("gpu_hours", record, text, stem.with_suffix(".json"))
    write_outputs(rows, args, dev, cmp, stem)
    print(f"wrote {stem}.json/.csv/.png/.txt")
    return 0 if all(r["status"] in ("ok", "collected") for r in rows) else 1

if __name__ == "__main__":
    sys.exit(main())
