"""The cells of benchmarks/paper_claims.py: a cell's directory key, the FLOP plan and E2E's epochs from it, one seed's
Deep Incubation and E2E runs through `dsincubate pipeline`, the record collected from a finished run, the phases an
ablation cell takes from the default cell, and the code commit a result records. Imported by paper_claims.py (which
re-exports these names), tuning.py and paper_claims_decoupled.py; not run on its own.
"""
from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import common
from dsincubate import registry


def cell_key(recipe: str, sets: list[str]) -> str:
    """A directory name for a cell's settings: the same settings in two experiments share one run."""
    import hashlib

    final: dict[str, str] = {}
    for s in sets:  # later overrides win, as on the command line
        k, v = s.split("=", 1)
        final[k] = v
    text = recipe + ";" + ";".join(f"{k}={v}" for k, v in sorted(final.items()))
    return f"{recipe}_{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def e2e_epochs_for(recipe: str, sets: list[str], extra: list[str]) -> tuple[int, dict]:
    """E2E epochs that give E2E at least Deep Incubation's training FLOPs (meta included), and the FLOP plan."""
    from dsincubate import accounting, phases, recipes
    from dsincubate.cli import _preflight
    from dsincubate.config import apply_overrides

    extra_sets = common.extra_sets(extra)
    data = {a: extra[i + 1] for i, a in enumerate(extra[:-1]) if a in ("--train", "--val")}
    sets = sets + extra_sets + [f"data.{k[2:]}={v}" for k, v in data.items()]
    cfg = apply_overrides(recipes.get(recipe), sets)
    info = _preflight(cfg, False)
    n_cls = cfg.model.num_classes or info.num_classes
    per_epoch = cfg.data.samples_per_epoch or info.train_samples

    def flops(name, i=None):
        ph = phases.make(name, cfg, "/nonexistent", n_cls, i, resolve=False)
        return accounting.count_flops(lambda: ph.build_model(load=False), ph.img_size)["train_step_per_image"]

    K = cfg.model.num_stages
    plan = {"meta": cfg.meta.epochs * per_epoch * flops("meta"),
            "incubate": sum(cfg.incubate.epochs * per_epoch * flops("incubate", i) for i in range(K)),
            "finetune": cfg.finetune.epochs * per_epoch * flops("e2e"), "e2e_per_epoch": per_epoch * flops("e2e"),
            "samples_per_epoch": per_epoch}
    plan["di_total"] = plan["meta"] + plan["incubate"] + plan["finetune"]
    return max(1, math.ceil(plan["di_total"] / plan["e2e_per_epoch"] - 1e-9)), plan


def reuse_phases(src: Path, out: Path, recipe: str, sets: list[str], extra: list[str],
                 modules: bool = True) -> list[str]:
    """Copy the default cell's finished meta model, and then each finished incubated module, into an ablation cell
    where that phase's config key (seed, model, data, the phase's recipe; for a module also its index and the meta
    model's sha256) is the same: the phase would train the identical model again (training is deterministic; an
    ablation of a later phase does not touch it). The run records still count their device-hours. `modules=False`
    copies the meta model only. Returns the phase directories copied."""
    import shutil

    from dsincubate import checkpoint as ckpt, phases, recipes
    from dsincubate.config import RunConfig, apply_overrides
    from dsincubate.layout import RunLayout

    extra_sets = common.extra_sets(extra)
    data = [f"data.{a[2:]}={extra[i + 1]}" for i, a in enumerate(extra[:-1]) if a in ("--train", "--val")]
    cfg = apply_overrides(recipes.get(recipe), sets + extra_sets + data)

    def key(c, name, i, saved):
        k = phases.make(name, c, out, 1, i, resolve=False).config_key()
        if "meta_sha256" in saved:  # a module's: the copied meta model is the same file, so the same sha256
            k["meta_sha256"] = saved["meta_sha256"]
        return json.loads(json.dumps(k, default=str))

    lay, copied = RunLayout(out), []
    for name, i in [("meta", None)] + [("incubate", i) for i in range(cfg.model.num_stages if modules else 0)]:
        rel = lay.phase_dir(name, i).relative_to(out)
        if not ckpt.complete(src / rel) or (out / rel).exists():
            saved = None
        else:
            saved = json.loads((src / rel / "config_key.json").read_text())
            # through the config classes, so a field added since (absent from the saved key) counts at its default
            old = RunConfig.from_dict({**cfg.to_dict(), **{k: v for k, v in saved.items() if k in cfg.to_dict()}})
            if key(cfg, name, i, saved) != key(old, name, i, saved):
                saved = None
        if saved is None:
            if name == "meta":
                return copied  # modules incubated in another meta model are not this cell's
            continue
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src / rel, out / rel)
        # the key in this code's spelling (a field added since, at its default, would read as another config)
        ckpt.atomic_write_json(out / rel / "config_key.json", key(cfg, name, i, saved))
        copied.append(str(rel))
    return copied


def _pipeline(out: Path, methods: str, recipe: str, sets: list[str], extra: list[str], timeout: int) -> bool:
    cmd = [sys.executable, "-m", "dsincubate", "pipeline", "--methods", methods, "--recipe", recipe,
           "--output", str(out)]
    for s in sets:
        cmd += ["--set", s]
    cmd += extra
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"log_{methods}.txt", "a") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=common.ROOT, timeout=timeout)
    return proc.returncode == 0


def e2e_epochs_for_hours(out: Path) -> int:
    """E2E epochs that take at least Deep Incubation's device-seconds (all its phases, start-up and evaluation
    included), at the fine-tune phase's measured seconds per epoch: the same model, so the same cost per epoch."""
    runs = [json.loads(p.read_text()) for p in [out / "meta" / "run.json", out / "finetune" / "run.json",
                                                 *sorted(out.glob("incubate/*/run.json"))]]
    di_seconds = sum(r["device_seconds"] for r in runs)
    ft = runs[1]
    per_epoch = statistics.mean(h["epoch_seconds"] for h in ft["history"]) * ft["world_size"]
    return max(1, math.ceil(di_seconds / per_epoch))


def run_cell(out: Path, recipe: str, sets: list[str], seed: int, extra: list[str], timeout: int,
             e2e_from: Path | None = None, budget: str = "max") -> dict:
    """One seed of one cell: Deep Incubation first, then E2E with at least its FLOPs and (`budget` "max") its
    device-hours, or (`budget` "flops") its FLOPs alone, which makes the cell reproducible on a loaded machine
    (finished parts are kept on a re-run); with `e2e_from` (a DI-only ablation cell) E2E is that cell's run.
    Returns the measured record."""
    flop_epochs, plan = e2e_epochs_for(recipe, sets, extra)
    sets = sets + [f"seed={seed}"]
    t0 = time.time()
    if e2e_from is not None and e2e_from != out:
        if not (out / "finetune" / "MANIFEST.json").is_file():
            reuse_phases(e2e_from, out, recipe, sets, extra)
            if not _pipeline(out, "di", recipe, sets, extra, timeout):
                return {"ok": False, "error": f"Deep Incubation failed, see {out / 'log_di.txt'}", "seed": seed}
            print(f"[paper_claims]   {out}: {time.time() - t0:.0f}s", flush=True)
        return collect_cell(out, seed, plan, flop_epochs, e2e_from)
    if not (out / "e2e" / "MANIFEST.json").is_file():
        if not (out / "finetune" / "MANIFEST.json").is_file() and \
                not _pipeline(out, "di", recipe, sets, extra, timeout):
            return {"ok": False, "error": f"Deep Incubation failed, see {out / 'log_di.txt'}", "seed": seed}
        epochs = flop_epochs if budget == "flops" else max(flop_epochs, e2e_epochs_for_hours(out))
        if not _pipeline(out, "e2e", recipe, sets + [f"e2e.epochs={epochs}"], extra, timeout):
            return {"ok": False, "error": f"E2E failed, see {out / 'log_e2e.txt'}", "seed": seed}
        print(f"[paper_claims]   {out}: {time.time() - t0:.0f}s", flush=True)
    return collect_cell(out, seed, plan, flop_epochs)


def collect_cell(out: Path, seed: int, plan: dict, flop_epochs: int, e2e_from: Path | None = None) -> dict:
    s = json.loads((out / "summary.json").read_text())
    runs = [json.loads(p.read_text()) for p in out.glob("*/run.json")] + \
        [json.loads(p.read_text()) for p in out.glob("incubate/*/run.json")]
    if e2e_from is not None and e2e_from != out:  # a DI-only cell: E2E is the default cell's run of this seed
        runs = [r for r in runs if r.get("phase") != "e2e"] + [json.loads((e2e_from / "e2e" / "run.json").read_text())]
        s["e2e"] = json.loads((e2e_from / "summary.json").read_text())["e2e"]
    measured = {"di": 0.0, "e2e": 0.0}
    for r in runs:
        for key in measured:  # each method's training phases, as the registry lists them
            if r.get("phase") in registry.trained_phases(key):
                measured[key] += r["flops"]["train_step_per_image"] * r["images_processed"]
    di = s["deep_incubation"]
    return {"ok": True, "seed": seed, "meta": di["meta_top1"], "di": di["top1"], "e2e": s["e2e"]["top1"],
            "assembled": di.get("assembled_top1"), "hybrids": di["incubate_top1"],
            "di_hours": di["device_hours"], "e2e_hours": s["e2e"]["device_hours"], "e2e_epochs": s["e2e"]["epochs"],
            "e2e_epochs_flop_match": flop_epochs, "e2e_run": str((e2e_from or out) / "e2e"),
            "di_flops": measured["di"], "e2e_flops": measured["e2e"], "planned": plan}


def code_commit() -> str:
    """The commit of the code: `common.git_commit` ('+dirty' where dsincubate/, benchmarks/ but for its results/,
    or ds_configs/ differ from it; 'unknown' where git cannot say)."""
    return common.git_commit()


def commit_problem(sha: str) -> str | None:
    """Why the code's commit `sha` cannot be named (None when it can): results must say which code made them."""
    if not sha or sha == "unknown":
        return "no git commit can be read"
    if sha.endswith("+dirty"):
        return (f"uncommitted changes under dsincubate/, benchmarks/ or ds_configs/ ({sha}): commit first, or run "
                "from a clean worktree (git worktree add), or pass --allow-dirty")
    return None
