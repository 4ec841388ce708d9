"""`dsincubate tune`: find a fast engine configuration for a recipe's phase by trying them, a few steps each.

For one phase (any of `dsincubate.registry`'s: meta, incubate --module I, finetune, e2e, e2e_tune, m2mkd --module I
with a teacher model file, m2mkd_finetune) of a recipe it tries every combination of micro-batch size,
shipped ds_config (ZeRO stage 0/2/3, bf16/fp32, CPU offload of optimizer and parameters: `ds_configs/*.json`) and
activation checkpointing (`model.grad_checkpointing`). Each trial runs in its own subprocess (optionally under the
`deepspeed` launcher with several ranks): the phase's engine as the training loop builds it
(`dsincubate.engine.build_engine`: the phase's own model with weights not loaded, its kernels, its optimizer over the
trainable parameters at the scaled lr, `deepspeed.initialize` with the resolved ds_config), then `--warmup` +
`--steps` training steps on a random batch. An out-of-memory error, a crash, a kill or a timeout becomes a row of
the table, not the end of the sweep; once a configuration runs out of memory its larger micro-batches are skipped.
`--memory-cap 2G` limits each trial's address space (RLIMIT_AS, set in the child after its imports, so the cap counts
what the trial itself maps beyond the interpreter and libraries) to emulate a device on which a configuration does
not fit.

It prints a table of throughput (images/s over all ranks) and peak memory per rank (torch.cuda.max_memory_allocated
on GPUs; the resident-set high-water mark on the CPU), and writes the fastest configuration that fitted as a ready
ds_config JSON (engine keys only; it passes `dsincubate.dsconfig.validate`) plus the micro-batch and checkpointing
setting to use with it, e.g. `--ds-config tuned.json --set e2e.micro_batch=64 --set model.grad_checkpointing=true`.
The full table goes next to it as `<out>.trials.json`.

DeepSpeed has its own autotuner (`deepspeed --autotuning tune` with an `"autotuning"` section), but it is
CUDA-oriented (it profiles GPU memory and launches experiments for GPUs; it does not run on DeepSpeed's CPU
accelerator) and knows nothing of our phases or frozen parameters, which is why we sweep ourselves.

    dsincubate tune --recipe vit_h14 --phase e2e --micro-batches 8,16,32,64 --ranks 8 --out vith_e2e.json
    dsincubate tune --recipe debug --phase incubate --module 0 --micro-batches 8,64 --memory-cap 1G
    python -m dsincubate.tune ...   (the same without the CLI wiring)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

from dsincubate import procutil, registry
from dsincubate.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", default="debug", help="recipe (default debug)")
    parser.add_argument("--config", default=None, help="a saved config.json instead of a recipe")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override applied to every trial (e.g. model.kernel_backend=torch)")
    parser.add_argument("--phase", choices=registry.list_phases(), default="e2e", help="phase to tune (default e2e)")
    parser.add_argument("--module", type=int, default=0, help="incubate, m2mkd: the module I (default 0)")
    parser.add_argument("--micro-batches", default="8,16,32,64", help="comma list of micro-batch sizes per rank")
    parser.add_argument("--ds-configs", default="all",
                        help="comma list of ds_configs (names or paths); 'all' = every shipped one")
    parser.add_argument("--grad-checkpointing", default="off,on", help="off, on or off,on (default both)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per trial (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per trial")
    parser.add_argument("--ranks", type=int, default=1,
                        help="ranks per trial; >1 runs each trial under the deepspeed launcher")
    parser.add_argument("--launcher-args", default="", help="extra options for the deepspeed launcher (one string)")
    parser.add_argument("--memory-cap", default="", help="address-space cap per trial beyond its imports, e.g. 2G")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per trial (default 600)")
    parser.add_argument("--out", default="ds_config_tuned.json", help="where to write the best ds_config")
    parser.add_argument("--trial", default=None, help=argparse.SUPPRESS)  # the child side
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)


def parse_size(text: str) -> int:
    if not text:
        return 0
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", str(text))
    if not m:
        raise UserError(f"--memory-cap {text!r}: expected a size like 512M or 2G")
    return int(float(m.group(1)) * 1024 ** " KMGT".index((m.group(2) or " ").upper()))


# ---------------------------------------------------------------- child: one trial

def _num_classes(cfg) -> int:
    """The class count of the run: the config's, else the preset's, else the dataset's."""
    if cfg.model.num_classes:
        return cfg.model.num_classes
    try:
        from dsincubate.models import family

        n_cls = int(family.target_spec(cfg.model).kwargs["num_classes"])
        if n_cls:
            return n_cls
    except Exception:  # noqa: BLE001
        pass
    from dsincubate.data import resolve_data

    return resolve_data(cfg.data, cfg.model.num_classes).num_classes


def run_trial(spec: dict) -> dict:
    """One trial in this process (rank of a launcher job or a single process); returns the result on rank 0."""
    import resource

    from dsincubate import dist, dsconfig
    from dsincubate.engine import build_engine, resolve_ds_config

    ctx = dist.init()
    cap = int(spec.get("memory_cap") or 0)
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    if cap:  # the soft limit only, so that it can be lifted again to report the result
        base = procutil.status_bytes("VmSize")
        resource.setrlimit(resource.RLIMIT_AS, (base + cap if hard == resource.RLIM_INFINITY else
                                                min(base + cap, hard), hard))
    result = {"ok": False}
    try:
        phase, n_cls = _trial_phase(spec)
        ds_file, ds_cfg = resolve_ds_config(phase, ctx.has_cuda, ctx.world_size)
        built = build_engine(phase, ctx, ds_cfg, load=False)
        step, loss = _time_steps(phase, built.engine, ctx, spec, n_cls, dsconfig.precision(ds_cfg))
        peak, step, kind = _peak_memory(ctx, step)
        mb = phase.train_cfg.micro_batch
        result = {"ok": True, "step_seconds": step, "images_per_second": mb * ctx.world_size / step,
                  "peak_bytes_per_rank": peak, "memory_kind": kind, "world_size": ctx.world_size,
                  "device_name": ctx.device_name, "loss": loss, "ds_config_file": str(ds_file),
                  "ds_config_engine": dsconfig.load(ds_file), "kernels": built.kernels}
    except BaseException as e:  # noqa: BLE001  (any failure is a row of the table)
        oom = isinstance(e, MemoryError) or procutil.is_out_of_memory(f"{type(e).__name__}: {e}")
        result = {"ok": False, "error": "out of memory" if oom else f"{type(e).__name__}: {str(e)[:300]}"}
    finally:
        if cap:
            resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
    return result if ctx.is_main else {}


def _trial_phase(spec: dict):
    """(the trial's phase, the class count): the recipe or config with the trial's settings applied, the real phase's
    architecture, trainable part, kernels, optimizer and lr (`resolve=False`: no earlier phase's weights needed)."""
    from dsincubate import phases, recipes
    from dsincubate.config import RunConfig, apply_overrides

    cfg = RunConfig.from_dict(spec["config"]) if spec.get("config") else recipes.get(spec["recipe"])
    phase_name = spec["phase"]
    section = registry.phase(phase_name).config_section
    sets = list(spec.get("overrides", [])) + [
        f"ds_config={spec['ds_config']}", f"{section}.micro_batch={spec['micro_batch']}",
        f"model.grad_checkpointing={str(spec['grad_checkpointing']).lower()}"]
    cfg = apply_overrides(cfg, sets)
    n_cls = _num_classes(cfg)
    phase = phases.make(phase_name, cfg, Path("/nonexistent-tune-root"), n_cls,
                        spec.get("module") if registry.phase(phase_name).per_stage else None, resolve=False)
    if phase_name == "m2mkd":  # its teacher stage's architecture comes from the teacher file
        from dsincubate.m2mkd import teacher_spec

        if not Path(cfg.m2mkd.teacher).is_file():
            raise UserError(f"tune m2mkd: m2mkd.teacher={cfg.m2mkd.teacher} must be a model file")
        phase.teacher_spec, phase.teacher_depths = teacher_spec(cfg, n_cls, Path(cfg.m2mkd.teacher))
    return phase, n_cls


def _time_steps(phase, engine, ctx, spec: dict, n_cls: int, dtype) -> tuple[float, float]:
    """(median seconds of the timed steps, the last loss): `warmup` + `steps` training steps on one random batch."""
    import torch

    mb, img = phase.train_cfg.micro_batch, phase.img_size
    x = torch.randn(mb, 3, img, img, device=ctx.device).to(dtype)
    y = torch.randint(0, n_cls, (mb,), device=ctx.device)
    crit = torch.nn.CrossEntropyLoss()
    if ctx.has_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    engine.train()
    for k in range(spec["warmup"] + spec["steps"]):
        t0 = time.perf_counter()
        loss = phase.objective(engine.module, engine(x), y, crit)["loss"]
        engine.backward(loss)
        engine.step()
        if ctx.has_cuda:
            torch.cuda.synchronize()
        if k >= spec["warmup"]:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), float(loss)


def _peak_memory(ctx, step: float) -> tuple[int, float, str]:
    """(peak bytes, step seconds, what was measured), each the largest over the ranks (a collective)."""
    import torch

    if ctx.has_cuda:
        peak, kind = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    else:
        peak, kind = procutil.status_bytes("VmHWM"), "process RSS high-water (VmHWM)"
    t = torch.tensor([float(peak), step], dtype=torch.float64, device=ctx.device)
    if ctx.world_size > 1:
        import torch.distributed as tdist

        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return int(t[0].item()), float(t[1].item()), kind


# ---------------------------------------------------------------- parent: the sweep

def launch_trial(spec: dict, args, has_cuda: bool) -> dict:
    payload = json.dumps(spec)
    if args.ranks > 1 or args.launcher_args:
        ds = str(Path(sys.executable).with_name("deepspeed"))
        launcher = shlex.split(args.launcher_args)
        if not any(a.startswith(("--num_gpus", "--num_accelerators", "--include", "--hostfile")) for a in launcher):
            launcher += ["--num_gpus" if has_cuda else "--num_accelerators", str(args.ranks)]
        if not any(a.startswith("--master_port") for a in launcher):
            launcher += ["--master_port", str(procutil.free_port())]
        cmd = [ds, *launcher, "--module", "dsincubate.tune", "--trial", payload]
    else:
        cmd = [sys.executable, "-m", "dsincubate.tune", "--trial", payload]
    t0 = time.time()
    res = procutil.run_child(cmd, timeout=args.timeout, env={"PYTHONUNBUFFERED": "1"})
    res["wall_seconds"] = round(time.time() - t0, 1)
    return res


def _shipped() -> list[str]:
    from dsincubate import dsconfig

    return sorted(p.stem for p in dsconfig.CONFIG_DIR.glob("*.json"))


def _describe(name: str, has_cuda: bool) -> dict:
    from dsincubate import dsconfig

    cfg = dsconfig.load(dsconfig.find(name, has_cuda))
    z = cfg.get("zero_optimization", {})
    off = [k.split("_")[1] for k in ("offload_optimizer", "offload_param")
           if isinstance(z.get(k), dict) and z[k].get("device", "none") not in ("none", None)]
    prec = "bf16" if cfg.get("bf16", {}).get("enabled") else "fp16" if cfg.get("fp16", {}).get("enabled") else "fp32"
    return {"zero_stage": int(z.get("stage", 0)), "precision": prec, "offload": "+".join(off) or "-"}


def format_table(rows: list[dict]) -> str:
    head = ["ds_config", "ZeRO", "prec", "offload", "ckpt", "micro", "status", "img/s", "ms/step", "peak MiB/rank"]
    cells = []
    for r in rows:
        ok = r.get("ok")
        cells.append([r["ds_config"], str(r["zero_stage"]), r["precision"], r["offload"],
                      "on" if r["grad_checkpointing"] else "off", str(r["micro_batch"]),
                      "ok" + (" *best*" if r.get("best") else "") if ok else r.get("error", "failed")[:60],
                      f"{r['images_per_second']:.1f}" if ok else "-", f"{r['step_seconds'] * 1e3:.0f}" if ok else "-",
                      f"{r['peak_bytes_per_rank'] / 2**20:.0f}" if ok else "-"])
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(head)]
    line = lambda c: "  ".join(x.ljust(w) if i in (0, 6) else x.rjust(w) for i, (x, w) in enumerate(zip(c, widths)))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(c) for c in cells])


def sweep(args) -> int:
    """Every trial of the sweep `args` asks for, the table, the best configuration's ds_config and the trials' record;
    exit status 0 when one fitted, 1 when none did."""
    import torch

    has_cuda = torch.cuda.is_available()
    grid = _grid(args, has_cuda)
    print(f"[tune] {args.recipe if not grid['config'] else args.config} phase {args.phase}"
          f"{f' module {args.module}' if registry.phase(args.phase).per_stage else ''}: {len(grid['names'])} "
          f"ds_config(s) x {len(grid['gcs'])} checkpointing x {len(grid['mbs'])} micro-batch(es), {args.ranks} "
          f"rank(s) per trial{f', memory cap {args.memory_cap}' if grid['cap'] else ''}", flush=True)
    rows = _run_trials(args, grid, has_cuda)
    ok = [r for r in rows if r.get("ok")]
    best = max(ok, key=lambda r: r["images_per_second"]) if ok else None
    if best:
        best["best"] = True
    print("\n" + format_table(rows), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    use = _write_best(args, best, out, has_cuda) if best else None
    if not best:
        print("\nno configuration fitted; nothing written (try smaller micro-batches, ZeRO-3 or offload)")
    trials = out.with_name(out.stem + ".trials.json")
    trials.write_text(json.dumps({
        "recipe": args.recipe, "config": args.config, "phase": args.phase, "module": args.module,
        "overrides": args.overrides, "ranks": args.ranks, "memory_cap_bytes": grid["cap"], "steps": args.steps,
        "warmup": args.warmup, "device": "cuda" if has_cuda else f"cpu ({os.cpu_count()} cores)",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": _command(),
        "best": best and {k: best[k] for k in ("ds_config", "micro_batch", "grad_checkpointing",
                                               "images_per_second", "peak_bytes_per_rank")},
        "best_ds_config_file": str(out) if best else None, "use": use,
        "table": format_table(rows).splitlines(), "trials": rows}, indent=2) + "\n")
    print(f"wrote {trials}")
    return 0 if best else 1


def _grid(args, has_cuda: bool) -> dict:
    """The sweep's axes from the command line, every ds_config validated and described before any trial: names,
    gcs (checkpointing off/on), mbs (micro-batches), descr, cap (bytes), config (a saved config.json's dict)."""
    mbs = sorted({int(m) for m in str(args.micro_batches).split(",") if m.strip()})
    if not mbs or min(mbs) < 1:
        raise UserError("--micro-batches: give positive integers, e.g. 8,16,32")
    names = _shipped() if args.ds_configs == "all" else [n.strip() for n in args.ds_configs.split(",") if n.strip()]
    gcs = []
    for g in str(args.grad_checkpointing).split(","):
        g = g.strip().lower()
        if g not in ("off", "on", "false", "true", "0", "1"):
            raise UserError(f"--grad-checkpointing {args.grad_checkpointing!r}: use off, on or off,on")
        gcs.append(g in ("on", "true", "1"))
    config = None
    if args.config:
        if not Path(args.config).is_file():
            raise UserError(f"--config {args.config}: no such file")
        config = json.loads(Path(args.config).read_text())
    return {"mbs": mbs, "names": names, "gcs": gcs, "descr": {n: _describe(n, has_cuda) for n in names},
            "cap": parse_size(args.memory_cap), "config": config}


def _run_trials(args, grid: dict, has_cuda: bool) -> list[dict]:
    """One row per (ds_config, checkpointing, micro-batch); once one runs out of memory (or is killed), the larger
    micro-batches of the same ds_config and checkpointing are skipped."""
    rows = []
    for name in grid["names"]:
        for gc in grid["gcs"]:
            failed_oom = None
            for mb in grid["mbs"]:
                row = dict(ds_config=name, grad_checkpointing=gc, micro_batch=mb, **grid["descr"][name])
                if failed_oom is not None:
                    row.update(ok=False, error=f"skipped: micro-batch {failed_oom} ran out of memory")
                else:
                    spec = dict(recipe=args.recipe, config=grid["config"], overrides=args.overrides, phase=args.phase,
                                module=args.module, ds_config=name, micro_batch=mb, grad_checkpointing=gc,
                                steps=args.steps, warmup=args.warmup, memory_cap=grid["cap"])
                    row.update(launch_trial(spec, args, has_cuda))
                    if not row.get("ok") and ("memory" in row.get("error", "") or "killed" in row.get("error", "")):
                        failed_oom = mb
                rows.append(row)
                status = (f"{row['images_per_second']:.1f} img/s, peak {row['peak_bytes_per_rank'] / 2**20:.0f} "
                          f"MiB/rank" if row.get("ok") else row.get("error"))
                print(f"[tune]   {name:<16} ckpt {'on ' if gc else 'off'} micro-batch {mb:<5} {status}", flush=True)
    return rows


def _write_best(args, best: dict, out: Path, has_cuda: bool) -> str:
    """Write the best trial's ds_config (engine keys only, as shipped) to `out`; the options that use it."""
    from dsincubate import dsconfig

    engine_cfg = dsconfig.load(dsconfig.find(best["ds_config"], has_cuda))
    dsconfig.validate(engine_cfg, str(out))
    out.write_text(json.dumps(engine_cfg, indent=2) + "\n")
    section = registry.phase(args.phase).config_section
    use = (f"--ds-config {out} --set {section}.micro_batch={best['micro_batch']} --set "
           f"model.grad_checkpointing={'true' if best['grad_checkpointing'] else 'false'}")
    print(f"\nbest: {best['ds_config']} (ZeRO {best['zero_stage']}, {best['precision']}, offload "
          f"{best['offload']}), micro-batch {best['micro_batch']}, activation checkpointing "
          f"{'on' if best['grad_checkpointing'] else 'off'}: {best['images_per_second']:.1f} img/s, "
          f"peak {best['peak_bytes_per_rank'] / 2**20:.0f} MiB/rank")
    print(f"wrote {out}; use: {use}")
    return use


def _command() -> str:
    argv = list(sys.argv)
    if argv and argv[0].endswith(("tune.py", "__main__.py")):
        argv[0] = "python -m dsincubate.tune" if argv[0].endswith("tune.py") else "dsincubate"
    return " ".join([argv[0]] + [shlex.quote(a) for a in argv[1:]])


def run(args) -> int:
    if args.trial:
        res = run_trial(json.loads(args.trial))
        if res:
            procutil.emit_result(res)
        return 0
    if args.steps < 1 or args.warmup < 0 or args.ranks < 1:
        raise UserError("--steps >= 1, --warmup >= 0 and --ranks >= 1")
    return sweep(args)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="dsincubate tune", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args, unknown = parser.parse_known_args(argv)
    if unknown and not args.trial:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return run(args)
    except UserError as e:
        print(f"dsincubate tune: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
