"""Training throughput: images/s, achieved TFLOP/s and MFU per preset, ds_config, activation checkpointing and kernel
backend; and the overhead of dsincubate's training loop against a minimal hand-written DeepSpeed loop.

1. Peak: MFU = model FLOPs per second per device / the device's dense bf16 peak from the datasheet table
   (`common.PEAK_BF16_TFLOPS`: A100 312, H100 SXM 989, H100 PCIe 756, H200 989 TFLOP/s; `--peak-tflops` for another
   device; none known, e.g. a CPU: the MFU column stays empty), with model FLOPs = `dsincubate.accounting.count_flops`
   train step per image (forward + backward as trained; recomputation under activation checkpointing is not
   counted, as MFU defines). The measured rate of a loop of large square bf16 matmuls (fp32 too on a CPU) is its own
   column ("% of matmul"): what the device reaches on the easiest possible work, not the peak.
2. Grid: for each preset x ds_config x `model.grad_checkpointing` off/on x `model.kernel_backend` torch/auto, one
   trial of `dsincubate tune` (own subprocess; optionally several ranks under the deepspeed launcher): the phase's
   model, its optimizer, `deepspeed.initialize`, `--steps` timed steps on a random batch (no data loading). Failures
   (out of memory, a config the device cannot run) are rows, not crashes. Each preset starts from its own recipe
   where there is one (vit_b16, vit_l16, vit_h14, deit_t_<N>; else `debug`), so a preset is the real model: with
   another `--recipe`, its depth/width/heads/size overrides are cleared. Every row names the target's parameter
   count; a ViT-B/L/H preset whose count is not the real one (86.6 M, 304 M, 632 M with 1000 classes) is refused
   before anything runs. `--ds-configs recipe` / `--ckpt recipe` take what the recipe sets (ds_config=auto: chosen
   per phase as training does).
3. Loop overhead: the same model, ds_config and data (dsincubate's WebDataset loader on the built-in demo data) for
   `--loop-epochs` epochs (a) through `dsincubate e2e` (the real loop: `dsincubate.trainer.run_phase`) and (b) through
   a minimal hand-written loop over the same engine (`dsincubate.engine.build_engine`: model, kernels, optimizer;
   then forward, cross-entropy, backward, step); images/s of the training epochs after the first, runs alternated
   A/B/B/A. Target: ours within 5% of the minimal loop.

GPU target: ViT-H/14 bf16 >= 45% MFU, e.g.
    python benchmarks/throughput.py --presets vit_h14 --batch 32 --ds-configs zero2_bf16,zero3_bf16 \\
        --ckpt off,on --backends torch,auto --ranks 8 --loop-recipe vit_h14 --loop-batch 32
    python benchmarks/throughput.py --presets vit_b16,vit_l16,vit_h14 --batch 128,64,32 --phase finetune \\
        --ds-configs recipe --ckpt recipe --backends torch --skip-loop     # one step each, as the recipes train
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
from dsincubate import procutil, registry  # noqa: E402
from dsincubate.errors import UserError  # noqa: E402

# the phase the loop-overhead runs train (its subcommand, section and output directory: the registry's)
LOOP_PHASE = "e2e"


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

ARCH_FIELDS = ("depth", "embed_dim", "num_heads", "img_size", "patch_size")  # a recipe's reshaping of its preset


def preset_setup(recipe: str | None, preset: str) -> tuple[str, list[str]]:
    """The recipe a preset's rows start from (`recipe`, else the preset's own recipe where one exists, else debug)
    and the overrides that make its model the preset's real one: another preset's depth/width/... overrides cleared,
    and an ImageNet-1k head for the presets whose parameter count is checked."""
    from dsincubate import recipes
    from dsincubate.config import parse_deit_t

    if not recipe:
        recipe = preset if preset in recipes.RECIPES or parse_deit_t(preset) is not None else "debug"
    base = recipes.get(recipe)
    sets = [f"model.preset={preset}"]
    if base.model.preset != preset:
        sets += [f"model.{k}=none" for k in ARCH_FIELDS if getattr(base.model, k) is not None]
    if preset in common.EXPECTED_PARAMS and not base.model.num_classes:
        sets.append("model.num_classes=1000")
    return recipe, sets


def preset_model(recipe: str, sets: list[str], preset: str) -> dict:
    """Parameter count, depth and width of the preset's target model (meta device), and the check against the real
    model's count: `error` is set when the rows would not be the preset."""
    from dsincubate import recipes
    from dsincubate.config import apply_overrides

    cfg = apply_overrides(recipes.get(recipe), sets)
    info = common.model_params(cfg)
    info["error"] = common.check_params(preset, info["params"], info["num_classes"], info["embed_dim"])
    info.update(recipe=recipe, overrides=sets, ds_config=cfg.ds_config, grad_checkpointing=cfg.model.grad_checkpointing)
    return info


def flops_per_image(recipe: str, sets: list[str], phase: str, module: int) -> float:
    from dsincubate import accounting, phases, recipes
    from dsincubate.config import apply_overrides
    from dsincubate.models import vit

    cfg = apply_overrides(recipes.get(recipe), sets)
    n_cls = int(vit.target_spec(cfg.model).kwargs["num_classes"]) or 1000
    ph = phases.make(phase, cfg, Path("/nonexistent"), n_cls, module if registry.phase(phase).per_stage else None,
                     resolve=False)
    return accounting.count_flops(lambda: ph.build_model(load=False), ph.img_size)["train_step_per_image"]


def grid(args, models: dict, peak_tflops: float | None, matmul_tflops: float) -> list[dict]:
    import torch

    from dsincubate import tune

    has_cuda = torch.cuda.is_available()
    rows = []
    targs = argparse.Namespace(ranks=args.ranks, launcher_args=args.launcher_args, timeout=args.timeout)
    for preset, batch in zip(args.preset_list, args.batch_list):
        m = models[preset]
        fpi = flops_per_image(m["recipe"], m["overrides"], args.phase, 0)
        names = sorted(p.stem for p in (common.ROOT / "ds_configs").glob("*.json")) if args.ds_configs == "all" \
            else [m["ds_config"] if n.strip() == "recipe" else n.strip() for n in args.ds_configs.split(",")]
        for name in names:
            for ck in args.ckpt.split(","):
                ckpt = m["grad_checkpointing"] if ck.strip() == "recipe" else ck.strip() == "on"
                for backend in args.backends.split(","):
                    spec = dict(recipe=m["recipe"], config=None, phase=args.phase, module=0, ds_config=name,
                                micro_batch=batch, grad_checkpointing=ckpt, steps=args.steps,
                                warmup=args.warmup, memory_cap=0,
                                overrides=m["overrides"] + [f"model.kernel_backend={backend.strip()}"])
                    load_before = os.getloadavg()[0]
                    res = tune.launch_trial(spec, targs, has_cuda)
                    row = {"preset": preset, "recipe": m["recipe"], "params": m["params"], "depth": m["depth"],
                           "embed_dim": m["embed_dim"], "micro_batch": batch, "ds_config": name,
                           "grad_checkpointing": "on" if ckpt else "off", "kernel_backend": backend,
                           "flops_per_image": fpi, **res,
                           "load_average_1min": [load_before, os.getloadavg()[0]]}  # a busy machine shows here
                    if res.get("ok"):
                        row["tflops"] = fpi * res["images_per_second"] / 1e12
                        row["tflops_per_device"] = row["tflops"] / res["world_size"]
                        row["mfu"] = common.mfu(fpi, res["images_per_second"], res["world_size"], peak_tflops)
                        row["of_matmul"] = row["tflops_per_device"] / matmul_tflops
                    rows.append(row)
                    mfu = f"MFU {row['mfu'] * 100:.1f}%" if row.get("mfu") is not None else "MFU - (no peak)"
                    print(f"[throughput] {preset} ({m['params'] / 1e6:.1f} M params) mb {batch} {name} ckpt "
                          f"{row['grad_checkpointing']} {backend}: " + (
                              f"{res['images_per_second']:.1f} img/s, {row['tflops_per_device'] * 1e3:.1f} "
                              f"GFLOP/s/device, {mfu}" if res.get("ok") else res.get("error", "failed")), flush=True)
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
    phase = phases.make(LOOP_PHASE, cfg, Path(spec["out"]), cfg.model.num_classes or info.num_classes, resolve=False)
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
    sec = registry.phase(LOOP_PHASE).config_section
    sets = [f"{sec}.epochs={args.loop_epochs}", f"{sec}.eval_every={args.loop_epochs}",
            f"{sec}.ckpt_every={args.loop_epochs}", f"{sec}.micro_batch={args.loop_batch}"] + list(args.loop_set)
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
                    cmd = pre + ["dsincubate", LOOP_PHASE, "--recipe", args.loop_recipe, "--output", tmp]
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
                    metrics = Path(tmp) / registry.phase(LOOP_PHASE).output_dir() / "metrics.jsonl"
                    lines = [json.loads(ln) for ln in metrics.read_text().splitlines()]
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


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default="", help="recipe the grid trials start from (default: each preset's own "
                    "recipe where there is one, else debug); the model is always the preset's real one")
    ap.add_argument("--presets", default="tiny")
    ap.add_argument("--batch", default="64", help="micro-batch per rank, one or one per preset")
    ap.add_argument("--phase", default="e2e")
    ap.add_argument("--ds-configs", default="all", help="all, recipe (as the recipe sets it) or a comma list")
    ap.add_argument("--ckpt", default="off,on", help="comma list of off, on, recipe")
    ap.add_argument("--peak-tflops", type=float, default=0.0,
                    help="dense bf16 peak per device for MFU where the device is not in common.PEAK_BF16_TFLOPS")
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
    return ap


def check_models(args) -> dict:
    """Every preset's model, checked before anything heavy starts (UserError: an unknown --phase or preset, or a
    model that is not the preset's real one)."""
    registry.phase(args.phase)  # an unknown --phase: one error line before anything runs
    models = {preset: preset_model(*preset_setup(args.recipe, preset), preset) for preset in args.preset_list}
    for m in models.values():
        if m["error"]:
            raise UserError(m["error"])
    for preset, m in models.items():
        print(f"[throughput] {preset}: {m['params'] / 1e6:.1f} M parameters (depth {m['depth']}, width "
              f"{m['embed_dim']}, {m['num_classes']} classes), recipe {m['recipe']}", flush=True)
    return models


def matmul_peaks(args) -> dict:
    """The measured matmul rate in bf16 (and fp32 on the CPU), every core used."""
    import torch

    n = args.matmul_n or (8192 if torch.cuda.is_available() else 2048)
    common.set_threads()
    peak = {"bf16": matmul_rate("bfloat16", n, args.matmul_seconds)}
    if not torch.cuda.is_available():
        peak["fp32"] = matmul_rate("float32", n, args.matmul_seconds)
    print("[throughput] matmul: " + ", ".join(f"{k} {v['tflops'] * 1e3:.1f} GFLOP/s" for k, v in peak.items()))
    return peak


def grid_table(rows: list[dict]) -> str:
    return common.table(
        ["preset", "params M", "mb", "ds_config", "ckpt", "kernels", "img/s", "GFLOP/s/dev", "MFU %",
         "% of matmul", "peak MiB/rank", "status"],
        [[r["preset"], r["params"] / 1e6, r["micro_batch"], r["ds_config"], r["grad_checkpointing"],
          r["kernel_backend"], r.get("images_per_second"), r["tflops_per_device"] * 1e3 if r.get("ok") else None,
          r["mfu"] * 100 if r.get("mfu") is not None else None,
          r["of_matmul"] * 100 if r.get("ok") else None,
          r["peak_bytes_per_rank"] / 2**20 if r.get("ok") else None,
          "ok" if r.get("ok") else r.get("error", "failed")[:50]] for r in rows],
        ["", ".1f", "", "", "", "", ".1f", ".1f", ".1f", ".1f", ".0f", ""])


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.minimal_loop:
        res = minimal_loop(json.loads(args.minimal_loop))
        if int(os.environ.get("RANK", "0")) == 0:
            procutil.emit_result(res)
        return 0
    args.preset_list = [p.strip() for p in args.presets.split(",")]
    args.batch_list = [int(b) for b in args.batch.split(",")]
    if len(args.batch_list) == 1:
        args.batch_list *= len(args.preset_list)
    if len(args.batch_list) != len(args.preset_list):
        ap.error("--batch: give one batch size or one per preset")
    models = {}
    if not args.skip_grid:
        try:
            models = check_models(args)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    dev = common.device()
    record = common.header("throughput", dev)
    record["settings"] = {k: v for k, v in vars(args).items() if k not in ("minimal_loop", "local_rank")}
    record["models"] = models
    known = common.peak_bf16_tflops(dev["name"]) if dev["type"] == "cuda" else None
    peak_note = (f"peak {args.peak_tflops:g} TFLOP/s bf16 (--peak-tflops)" if args.peak_tflops else
                 f"peak {known[1]:g} TFLOP/s dense bf16 ({known[0]}, datasheet)" if known else
                 f"no bf16 peak known for {dev['name']}: MFU left empty (give --peak-tflops)")
    peak_tflops = args.peak_tflops or (known[1] if known else None)
    record["peak_bf16_tflops"] = {"tflops": peak_tflops, "source": peak_note}
    peak = matmul_peaks(args)
    record["peak_matmul"] = peak
    lines = [f"device: {dev['name']}  ({common.now()})", f"MFU: model FLOP/s per device / {peak_note}",
             "measured matmul rate: " + ", ".join(f"{k} {v['tflops'] * 1e3:.1f} GFLOP/s (n={v['n']})"
                                                  for k, v in peak.items()) + "; '% of matmul' is against bf16"]
    if not args.skip_grid:
        rows = grid(args, models, peak_tflops, peak["bf16"]["tflops"])
        record["grid"] = rows
        lines.append(grid_table(rows))
    if not args.skip_loop:
        lo = loop_overhead(args)
        record["loop_overhead"] = lo
        lines.append("loop overhead: a run failed; see the JSON" if "ours_over_minimal" not in lo else
                     f"loop overhead ({args.loop_recipe}, micro-batch {args.loop_batch}, epochs 2..{args.loop_epochs}"
                     f" of {args.loop_repeats} ABBA-ordered runs each): dsincubate {lo['ours_median']:.1f} img/s "
                     f"vs minimal DeepSpeed loop {lo['minimal_median']:.1f} img/s (medians); ours/minimal per "
                     f"repeat {', '.join(f'{r:.3f}' for r in lo.get('pair_ratios', []))} -> median "
                     f"{lo['ours_over_minimal']:.3f} (target >= 0.95: {'yes' if lo['within_5pct'] else 'NO'})")
    text = "\n".join(lines)
    print("\n" + text)
    path = common.write_result("throughput", record, text, args.out)
    print(f"wrote {path}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
