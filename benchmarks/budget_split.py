"""The budget-split experiment of benchmarks/paper_claims.py (`--experiments split`; cells, runs and table are read
through benchmarks/paper_claims_decoupled.py): Deep Incubation alone at the default cell's total planned FLOPs, the
total divided differently between meta pre-training, incubation and fine-tuning (`SPLITS`: shares of the FLOPs,
rounded to whole epochs), accuracy against the split paired against the default split, and a plot.

    python benchmarks/paper_claims.py --experiments split --seeds 0,1 --set model.depth=16
"""
from __future__ import annotations

import json
from pathlib import Path

from benchmarks import common, paper_claims as pc, stats
from dsincubate import registry
from dsincubate.errors import UserError

# (label, (meta, incubate, fine-tune) shares of the total FLOPs); "default" keeps CPU_BASE's epochs
SPLITS = [("default", None), ("meta 40 / inc 40 / ft 20", (0.4, 0.4, 0.2)),
          ("meta 30 / inc 30 / ft 40", (0.3, 0.3, 0.4)), ("meta 20 / inc 20 / ft 60", (0.2, 0.2, 0.6))]


def split_phases() -> tuple[str, ...]:
    """The phases the split divides DI's FLOPs between, in order: DI's trained phases (meta, incubate, finetune),
    one share each in every SPLITS entry. A phase the registry adds to DI leaves it without a share: refused, never
    dropped (zip would silently leave it at its recipe's epochs)."""
    phases = registry.trained_phases("di")
    bad = [label for label, shares in SPLITS if shares is not None and len(shares) != len(phases)]
    if bad:
        raise UserError(f"split: DI trains {len(phases)} phases ({', '.join(phases)}), but SPLITS {bad} give "
                        "another number of shares: give every phase its share")
    return phases


def split_plan(recipe: str, sets: list[str], extra: list[str]) -> tuple[dict, dict]:
    """The default cell's DI FLOP plan and each phase's planned FLOPs per epoch (incubation: all K modules)."""
    from dsincubate import recipes
    from dsincubate.config import apply_overrides

    _, plan = pc.e2e_epochs_for(recipe, sets, extra)
    cfg = apply_overrides(recipes.get(recipe), sets)
    return plan, {p: plan[p] / getattr(cfg, registry.phase(p).config_section).epochs for p in split_phases()}


def split_sets(plan: dict, per_epoch: dict, shares) -> tuple[list[str], dict]:
    """The overrides that divide the default plan's DI FLOPs by `shares` (meta, incubate, fine-tune), each rounded
    to whole epochs (at least 1), and the plan they give (`shares` None: the default's own)."""
    if shares is None:
        return [], plan
    phases = split_phases()
    epochs = {p: max(1, round(share * plan["di_total"] / per_epoch[p])) for p, share in zip(phases, shares)}
    out = dict(plan, **{p: n * per_epoch[p] for p, n in epochs.items()})
    out["di_total"] = sum(out[p] for p in phases)
    return [f"{registry.phase(p).config_section}.epochs={n}" for p, n in epochs.items()], out


def run_split_seed(out: Path, recipe: str, sets: list[str], seed: int, extra: list[str], args) -> dict | None:
    """One seed of one split: Deep Incubation only. None where --collect-only finds it unfinished."""
    if not args.collect_only and not (out / "finetune" / "MANIFEST.json").is_file():
        if not pc._pipeline(out, "di", recipe, sets + [f"seed={seed}"], extra, args.timeout):
            return {"ok": False, "seed": seed, "error": f"Deep Incubation failed, see {out / 'log_di.txt'}"}
    if not (out / "summary.json").is_file():
        return None
    s = json.loads((out / "summary.json").read_text())["deep_incubation"]
    if s["top1"] is None:
        return None
    return {"ok": True, "seed": seed, "meta": s["meta_top1"], "assembled": s.get("assembled_top1"), "di": s["top1"],
            "di_hours": s["device_hours"]}


def summarise_split(rows: list[dict]) -> tuple[str, list[dict]]:
    """Per split: its epochs, planned TFLOP, DI mean ± std, and DI(split) - DI(default split) paired over seeds."""
    default = {r["seed"]: r["di"] for r in rows[0]["seeds"] if r.get("ok")} if rows else {}
    table_rows, out = [], []
    for row in rows:
        ok = [r for r in row["seeds"] if r.get("ok")]
        both = [r for r in ok if r["seed"] in default]
        paired = stats.paired([r["di"] for r in both], [default[r["seed"]] for r in both])
        out.append(dict(row, paired=paired, n_seeds=len(ok)))
        ep = row.get("epochs") or {}
        table_rows.append([row["label"], "/".join(ep.get(p, "=") for p in split_phases()),
                           row["planned"]["di_total"] / 1e12, len(ok), stats.mean_std([r["meta"] for r in ok]),
                           stats.mean_std([r["assembled"] for r in ok]), stats.mean_std([r["di"] for r in ok]),
                           "-" if row is rows[0] else stats.fmt_interval(paired)])
    table = common.table(["split (FLOP shares)", "epochs m/i/f", "planned TFLOP", "seeds", "meta top-1", "assembled",
                          "DI top-1", "vs default [95% CI] p"], table_rows, ["", "", ".2f", "", "", "", "", ""])
    return table + "\n(= : the default cell's epochs)", out


def plot_split(rows: list[dict], path: Path) -> bool:
    """DI top-1 against the fine-tune share of the FLOPs (False where matplotlib is missing: the table stands)."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = []
    for row in rows:
        plan, vals = row["planned"], [r["di"] for r in row["seeds"] if r.get("ok")]
        if vals:
            pts.append((plan["finetune"] / plan["di_total"], vals, row["label"]))
    fig, ax = plt.subplots(figsize=(6, 4))
    for share, vals, label in sorted(pts):
        ax.scatter([share] * len(vals), vals, alpha=0.5)
        ax.annotate(label, (share, sum(vals) / len(vals)), fontsize=7)
    ax.set_xlabel("fine-tune share of DI's training FLOPs")
    ax.set_ylabel("DI top-1 % (each seed)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
