"""Training throughput: images/s, achieved TFLOP/s and MFU per preset, ds_config, activation checkpointing and kernel
backend; and the overhead of dsincubate's training loop against a minimal hand-written DeepSpeed loop.

1. Peak: the device's measured bf16 matmul rate (a loop of large square bf16 matmuls; fp32 too on a CPU). MFU =
   model FLOPs per second / that rate, with model FLOPs = `dsincubate.accounting.count_flops` train step per image
   (forward + backward as trained; recomputation under activation checkpointing is not counted, as MFU defines).
2. Grid: for each preset x ds_config (`ds_configs/*.json`) x `model.grad_checkpointing` off/on x
   `model.kernel_backend` torch/auto, one trial of `dsincubate tune` (own subprocess; optionally several ranks under
   the deepspeed launcher): the phase's model, its optimizer, `deepspeed.initialize`, `--steps` timed steps on a
   random batch (no data loading). Failures (out of memory, a config the device cannot run) are rows, not crashes.
3. Loop overhead: the same model, ds_config and data (dsincubate's WebDataset loader on the built-in demo data) for
   `--loop-epochs` epochs (a) through `dsincubate e2e` (the real loop: `dsincubate.trainer.run_phase`) and (b) through
   a minimal hand-written loop over the same engine (`dsincubate.engine.build_engine`: model, kernels, optimizer;
   then forward, cross-entropy, backward, step); images/s of the training epochs after the first, runs alternated
   A/B/B/A. Target: ours within 5% of the minimal loop.

GPU target: ViT-H/14 bf16 >= 45% MFU, e.g.
    python benchmarks/throughput.py --presets vit_h14 --batch 32 --ds-configs zero2_bf16,zero3_bf16 \\
        --ckpt off,on --backends torch,auto --ranks 8 --loop-recipe vit_h14 --loop-batch 32
CPU (small; what is committed from this machine):
    python benchmarks/throughput.py                 # tiny preset, batch 64, every shipped ds_config
options: --phase e2e, --steps N, --skip-grid, --skip-loop, --out PATH.
Writes benchmarks/results/throughput_<device>_<date>.json (+ .txt) with device, command, commit and date.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from dsincubate import procutil  # noqa: E402


# ---------------------------------------------------------------- 1. peak matmul rate

def matmul_rate(dtype_name: str, n: int, seconds: float) -> dict:
    import torch

    dtype = getattr(torch, dtype_name)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(n, n, device=dev).to(dtype)
    b = torch.randn(n, n, device=dev).to(dtype)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    iters, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(10 if dev == "cuda" else 1):
            a @ b
            iters += 1
        sync()
    dt = time.perf_counter() - t0
    return {"dtype": dtype_name, "n": n, "iterations": iters, "seconds": dt, "tflops": 2 * n**3 * iters / dt / 1e12}


# ---------------------------------------------------------------- 2. grid through dsincubate tune trials

def flops_per_image(recipe: str, preset: str, phase: str, module: int) -> float:
    from dsincubate import accounting, phases, recipes
    from dsincubate.config import apply_overrides
    from dsincubate.models import vit

    cfg = apply_overrides(recipes.get(recipe), [f"model.preset={preset}"] if preset else [])
    n_cls = int(vit.target_spec(cfg.model).kwargs["num_classes"]) or 1000
    ph = phases.make(phase, cfg, Path("/nonexistent"), n_cls, module if phase == "incubate" else None, resolve=False)
    return accounting.count_flops(lambda: ph.build_model(load=False), ph.img_size)["train_step_per_image"]


def grid(args, peak_tflops: float) -> list[dict]:
    import torch

    from dsincubate import tune

    has_cuda = torch.cuda.is_available()
    rows = []
    targs = argparse.Namespace(ranks=args.ranks, launcher_args=args.launcher_args, timeout=args.timeout)
    names = sorted(p.stem for p in (common.ROOT / "ds_configs").glob("*.json")) if args.ds_configs == "all" \
        else [n.strip() for n in args.ds_configs.split(",")]
    for preset, batch in zip(args.preset_list, args.batch_list):
        fpi = flops_per_image(args.recipe, preset, args.phase, 0)
        for name in names:
            for ck in args.ckpt.split(","):
                for backend in args.backends.split(","):
                    spec = dict(recipe=args.recipe, config=None, phase=args.phase, module=0, ds_config=name,
                                micro_batch=batch, grad_checkpointing=ck.strip() == "on", steps=args.steps,
                                warmup=args.warmup, memory_cap=0,
                                overrides=[f"model.preset={preset}", f"model.kernel_backend={backend.strip()}"])
                    load_before = os.getloadavg()[0]
                    res = tune.launch_trial(spec, targs, has_cuda)
                    row = {"preset": preset, "micro_batch": batch, "ds_config": name, "grad_checkpointing": ck,
                           "kernel_backend": backend, "flops_per_image": fpi, **res,
                           "load_average_1min": [load_before, os.getloadavg()[0]]}  # a busy machine shows here
                    if res.get("ok"):
                        row["tflops"] = fpi * res["images_per_second"] / 1e12
                        row["tflops_per_device"] = row["tflops"] / res["world_size"]
                        row["mfu"] = row["tflops_per_device"] / peak_tflops
                    rows.append(row)
                    print(f"[throughput] {preset} mb {batch} {name} ckpt {ck} {backend}: " + (
                        f"{res['images_per_second']:.1f} img/s, {row['tflops_per_device'] * 1e3:.1f} GFLOP/s/device, "
                        f"MFU {row['mfu'] * 100:.1f}%" if res.get("ok") else res.get("error", "failed")), flush=True)
    return rows


# ---------------------------------------------------------------- 3. our loop vs a minimal DeepSpeed loop

def minimal_loop(spec: dict) -> dict:
    """A hand-written DeepSpeed loop over dsincubate's loader: the floor our loop is compared to."""
    import torch
    import torch.nn.functional as F

    from dsincubate import dist, dsconfig, phases, recipes
    from dsincubate.config import apply_overrides
    from dsincubate.data import build_train_loader, resolve_data
    from dsincubate.engine import build_engine, resolve_ds_config

    cfg = apply_overrides(recipes.get(spec["recipe"]), spec["sets"])
    info = resolve_data(cfg.data)
    ctx = dist.init()
    phase = phases.make("e2e", cfg, Path(spec["out"]), cfg.model.num_classes or info.num_classes, resolve=False)
    tc = phase.train_cfg
    _, ds_cfg = resolve_ds_config(phase, ctx.has_cuda, ctx.world_size)
    dtype = dsconfig.precision(ds_cfg)
    # The engine our loop builds (model, kernels, optimizer, scaled lr; no schedule): only the loop differs.
    engine = build_engine(phase, ctx, ds_cfg, load=False).engine
    img = phase.img_size
    rates = []
    for epoch in range(tc.epochs):
        loader = build_train_loader(cfg.data, info, batch_size=tc.micro_batch, rank=ctx.rank,
                                    world_size=ctx.world_size, epoch=epoch, seed=cfg.seed, img_size=img,
                                    device=ctx.device)
        engine.train()
        n, t0 = 0, time.time()
        for x, y in loader:
            out = engine(x.to(ctx.device, dtype))
            loss = phase.loss(out, y.to(ctx.device), F.cross_entropy)["loss"]
            engine.backward(loss)
            engine.step()
            n += x.shape[0] * ctx.world_size
        if ctx.has_cuda:
            torch.cuda.synchronize()
        rates.append(n / (time.time() - t0))
    return {"images_per_second_per_epoch": rates}


def loop_overhead(args) -> dict:
    sets = [f"e2e.epochs={args.loop_epochs}", f"e2e.eval_every={args.loop_epochs}",
            f"e2e.ckpt_every={args.loop_epochs}", f"e2e.micro_batch={args.loop_batch}"] + list(args.loop_set)
    if args.loop_ds_config:
        sets.append(f"ds_config={args.loop_ds_config}")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.ranks > 1:
        import torch

        ds = str(Path(sys.executable).with_name("deepspeed"))
        n = ["--num_gpus" if torch.cuda.is_available() else "--num_accelerators", str(args.ranks)]
        pre = [ds, *n, *shlex.split(args.launcher_args), "--module"]
    else:
        pre = [sys.executable, "-m"]
    res = {"ours": [], "minimal": [], "sets": sets, "recipe": args.loop_recipe}
    for rep in range(args.loop_repeats):
        # ABBA order: a machine whose speed drifts during the runs favours neither loop
        for kind in (("minimal", "ours") if rep % 2 == 0 else ("ours", "minimal")):
            with tempfile.TemporaryDirectory(prefix="dsinc_loop_") as tmp:
                if kind == "ours":
                    cmd = pre + ["dsincubate", "e2e", "--recipe", args.loop_recipe, "--output", tmp]
                    for s in sets:
                        cmd += ["--set", s]
                else:
                    spec = {"recipe": args.loop_recipe, "sets": sets, "out": tmp}
                    cmd = pre + ["benchmarks.throughput", "--minimal-loop", json.dumps(spec)] if args.ranks > 1 else \
                        [sys.executable, str(Path(__file__).resolve()), "--minimal-loop", json.dumps(spec)]
                print(f"[throughput] loop {kind} (repeat {rep + 1}/{args.loop_repeats}) ...", flush=True)
                p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=common.ROOT,
                                   timeout=args.timeout)
                if p.returncode != 0:
                    res[kind].append({"ok": False, "error": procutil.classify_failure(p.returncode,
                                                                                      p.stdout + p.stderr)})
                    continue
                if kind == "ours":
                    lines = [json.loads(ln) for ln in (Path(tmp) / "e2e" / "metrics.jsonl").read_text().splitlines()]
                    rates = [ln["images_per_second"] for ln in lines]
                else:
                    rates = procutil.parse_result(p.stdout)["images_per_second_per_epoch"]
                res[kind].append({"ok": True, "images_per_second_per_epoch": rates})
                print(f"[throughput]   img/s per epoch: {', '.join(f'{r:.1f}' for r in rates)}", flush=True)
    steady = lambda runs: [r for run in runs if run.get("ok") for r in run["images_per_second_per_epoch"][1:]]  # noqa: E731
    o, m = steady(res["ours"]), steady(res["minimal"])
    if o and m:
        res["ours_median"], res["minimal_median"] = statistics.median(o), statistics.median(m)
        # headline: the median over repeats of ours / minimal within a repeat (runs next to each other in time)
        res["pair_ratios"] = [statistics.mean(steady([a])) / statistics.mean(steady([b]))
                              for a, b in zip(res["ours"], res["minimal"]) if steady([a]) and steady([b])]
        res["ours_over_minimal"] = statistics.median(res["pair_ratios"]) if res["pair_ratios"] else \
            res["ours_median"] / res["minimal_median"]
        res["within_5pct"] = res["ours_over_minimal"] >= 0.95
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default="debug", help="recipe the grid trials start from (model set by --presets)")
    ap.add_argument("--presets", default="tiny")
    ap.add_argument("--batch", default="64", help="micro-batch per rank, one or one per preset")
    ap.add_argument("--phase", default="e2e")
    ap.add_argument("--ds-configs", default="all")
    ap.add_argument("--ckpt", default="off,on")
    ap.add_argument("--backends", default="torch,auto")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--launcher-args", default="")
    ap.add_argument("--matmul-n", type=int, default=0, help="matmul size (default 8192 on GPU, 2048 on CPU)")
    ap.add_argument("--matmul-seconds", type=float, default=5.0)
    ap.add_argument("--loop-recipe", default="demo")
    ap.add_argument("--loop-batch", type=int, default=64)
    ap.add_argument("--loop-epochs", type=int, default=3)
    ap.add_argument("--loop-repeats", type=int, default=2)
    ap.add_argument("--loop-ds-config", default=None)
    ap.add_argument("--loop-set", action="append", default=[], help="extra --set for both loops")
    ap.add_argument("--skip-grid", action="store_true")
    ap.add_argument("--skip-loop", action="store_true")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--out", default=None)
    ap.add_argument("--minimal-loop", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.minimal_loop:
        res = minimal_loop(json.loads(args.minimal_loop))
        if int(os.environ.get("RANK", "0")) == 0:
            procutil.emit_result(res)
        return 0
    import torch

    args.preset_list = [p.strip() for p in args.presets.split(",")]
    args.batch_list = [int(b) for b in args.batch.split(",")]
    if len(args.batch_list) == 1:
        args.batch_list *= len(args.preset_list)
    dev = common.device()
    record = common.header("throughput", dev)
    record["settings"] = {k: v for k, v in vars(args).items() if k not in ("minimal_loop", "local_rank")}
    n = args.matmul_n or (8192 if torch.cuda.is_available() else 2048)
    common.set_threads()
    peak = {"bf16": matmul_rate("bfloat16", n, args.matmul_seconds)}
    if not torch.cuda.is_available():
        peak["fp32"] = matmul_rate("float32", n, args.matmul_seconds)
    print("[throughput] matmul: " + ", ".join(f"{k} {v['tflops'] * 1e3:.1f} GFLOP/s" for k, v in peak.items()))
    record["peak_matmul"] = peak
    lines = [f"device: {dev['name']}  ({common.now()})",
             "measured matmul peak: " + ", ".join(f"{k} {v['tflops'] * 1e3:.1f} GFLOP/s (n={v['n']})"
                                                  for k, v in peak.items()) + "; MFU is against bf16"]
    if not args.skip_grid:
        rows = grid(args, peak["bf16"]["tflops"])
        record["grid"] = rows
        lines.append(common.table(
            ["preset", "mb", "ds_config", "ckpt", "kernels", "img/s", "GFLOP/s/dev", "MFU %", "peak MiB/rank",
             "status"],
            [[r["preset"], r["micro_batch"], r["ds_config"], r["grad_checkpointing"], r["kernel_backend"],
              r.get("images_per_second"), r["tflops_per_device"] * 1e3 if r.get("ok") else None,
              r["mfu"] * 100 if r.get("ok") else None,
              r["peak_bytes_per_rank"] / 2**20 if r.get("ok") else None,
              "ok" if r.get("ok") else r.get("error", "failed")[:50]] for r in rows],
            ["", "", "", "", "", ".1f", ".1f", ".1f", ".0f", ""]))
    if not args.skip_loop:
        lo = loop_overhead(args)
        record["loop_overhead"] = lo
        if "ours_over_minimal" in lo:
            lines.append(f"loop overhead ({args.loop_recipe}, micro-batch {args.loop_batch}, epochs 2..{args.loop_epochs}"
                         f" of {args.loop_repeats} ABBA-ordered runs each): dsincubate {lo['ours_median']:.1f} img/s "
                         f"vs minimal DeepSpeed loop {lo['minimal_median']:.1f} img/s (medians); ours/minimal per "
                         f"repeat {', '.join(f'{r:.3f}' for r in lo.get('pair_ratios', []))} -> median "
                         f"{lo['ours_over_minimal']:.3f} (target >= 0.95: {'yes' if lo['within_5pct'] else 'NO'})")
        else:
            lines.append("loop overhead: a run failed; see the JSON")
    text = "\n".join(lines)
    print("\n" + text)
    path = common.write_result("throughput", record, text, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
