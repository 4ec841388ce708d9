"""ViT-H/14 memory per rank: ZeRO-3 on 2 ranks against 1 rank without ZeRO, for a meta, an incubation and a fine-tune
step, through the real `deepspeed` launcher (on a CPU machine: `--num_accelerators`, gloo).

For each phase (meta pre-training, incubation of module `--module`, fine-tuning of the assembled ViT-H) and each
setting (`--zero-config`, default `zero3_bf16`, on `--ranks` ranks; the same JSON with ZeRO stage 0 on 1 rank, so that
only the sharding differs), one `deepspeed` job builds the phase's engine as training does
(`dsincubate.engine.build_engine`: the phase's own model with weights not loaded, activation checkpointing on, its
AdamW over the trainable parameters, `deepspeed.initialize` with the resolved ds_config), and runs one training step
(forward, backward, optimizer step) at micro-batch `--batch`, 224px. Every rank reports:

  state        bytes of parameters + fp32 master copies + optimizer state this rank holds after the step
               (ZeRO-3 partitions `ds_tensor`, the optimizer's flat partitions and their Adam moments; deduplicated)
  rss_step     resident set after the step minus before the model was built
  peak_step    resident-set high-water mark during the step (VmHWM reset after deepspeed.initialize) minus the same
               baseline: weights, gradients, optimizer state, activations and communication buffers
  peak_build   resident-set high-water mark while the engine is built (model construction, weights, optimizer,
               `deepspeed.initialize`) minus the same baseline. Under ZeRO-3 the model is built inside
               `deepspeed.zero.Init` (dsincubate.phases.Phase.build_model_zero3), so no rank ever holds the whole
               model; target: ZeRO-3 build peak per rank <= 0.55 of the unsharded build on 2 ranks
  peak_all     lifetime VmHWM (build and step)

and the table gives ZeRO-3 per rank / no-ZeRO, target: state near 1/2 with 2 ranks. ViT-H has 632M parameters: fp32
weights 2.5 GB, Adam moments 5 GB per unsharded rank, so the 1-rank fine-tune step needs 10-13 GB of RAM. With fp32
ZeRO-3 keeps an fp32 master copy of each partition next to the fp32 partition itself, so the per-rank state falls to
2/3, not 1/2 (the fp32 record in results/ shows it); with bf16 the unsharded rank holds bf16 weights + fp32 master +
moments and ZeRO-3 shards all of them.

    python benchmarks/vith_memory.py                        # CPU: 2 ranks, batch 1, zero3_bf16 vs bf16 stage 0
    python benchmarks/vith_memory.py --zero-config zero3_fp32 --base-config cpu --out results/vith_memory_fp32_cpu2.json
    python benchmarks/vith_memory.py --ranks 8 --batch 8    # GPUs
    python benchmarks/vith_memory.py --build-only           # only the build peaks (no training step)
    options: --preset vit_h14, --module 1, --phases meta,incubate,finetune, --out PATH

Writes benchmarks/results/vith_memory_<device>_<date>.json (+ .txt) with device, command, commit and date.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from dsincubate import procutil, registry  # noqa: E402


def state_bytes(engine) -> dict:
    """Parameters, fp32 master partitions and optimizer state held by this rank (each storage counted once)."""
    import torch

    seen = set()

    def add(t) -> int:
        if not torch.is_tensor(t) or t.numel() == 0:
            return 0
        try:
            key = (t.untyped_storage().data_ptr(), t.device.type)
            size = t.untyped_storage().nbytes()
        except Exception:  # noqa: BLE001
            key, size = (t.data_ptr(), t.device.type), t.numel() * t.element_size()
        if key in seen:
            return 0
        seen.add(key)
        return size

    params = sum(add(p.ds_tensor if hasattr(p, "ds_tensor") else p.data) for p in engine.module.parameters())
    opt = engine.optimizer
    master = 0
    for name in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):
        for t in getattr(opt, name, None) or []:
            master += add(t)
    inner = getattr(opt, "optimizer", opt)
    for g in getattr(inner, "param_groups", []):
        for p in g["params"]:
            master += add(p)
    moments = sum(add(t) for st in getattr(inner, "state", {}).values() for t in st.values())
    return {"params": params, "master": master, "optimizer_state": moments, "total": params + master + moments}


def vith_phase(spec: dict):
    """The phase a child measures: the vit_h14 recipe at spec's preset, ds_config and micro-batch, with activation
    checkpointing, torch kernels and AdamW; no weights loaded."""
    from dsincubate import phases, recipes
    from dsincubate.config import apply_overrides

    entry = registry.phase(spec["phase"])
    cfg = apply_overrides(recipes.get("vit_h14"), [
        f"model.preset={spec['preset']}", "model.grad_checkpointing=true", "model.kernel_backend=torch",
        f"ds_config={spec['ds_config']}", f"{entry.config_section}.micro_batch={spec['batch']}",
        f"{entry.config_section}.optimizer=adamw"])
    return phases.make(spec["phase"], cfg, Path("/nonexistent-vith-root"), 1000,
                       spec["module"] if entry.per_stage else None, resolve=False)


def train_step(engine, phase, ctx, x, y, mark):
    """One training step (forward, loss, backward, optimizer step), each part marked as done: (loss, seconds)."""
    import torch

    engine.train()
    t1 = time.time()
    loss = phase.loss(engine(x), y, torch.nn.CrossEntropyLoss())["loss"]
    mark("forward done")
    engine.backward(loss)
    mark("backward done")
    engine.step()
    mark("optimizer step done")
    if ctx.has_cuda:
        torch.cuda.synchronize()
    return loss, time.time() - t1


def child(spec: dict) -> dict:
    import torch

    from dsincubate import dist, dsconfig
    from dsincubate.engine import build_engine, resolve_ds_config

    ctx = dist.init()
    rss0 = procutil.current_rss_bytes()
    progress = Path(spec["result_dir"], f"progress{ctx.rank}.json")

    def mark(stage: str) -> None:  # where a rank that gets killed had got to, and its memory then
        progress.write_text(json.dumps({"rank": ctx.rank, "stage": stage,
                                        "rss": procutil.current_rss_bytes() - rss0,
                                        "hwm": procutil.status_bytes("VmHWM") - rss0}))
    name = spec["phase"]
    phase = vith_phase(spec)
    tc = phase.train_cfg
    _, ds_cfg = resolve_ds_config(phase, ctx.has_cuda, ctx.world_size)
    t0 = time.time()
    mark("building the engine")
    build_reset = procutil.reset_peak_rss()
    engine = build_engine(phase, ctx, ds_cfg, load=False).engine  # model, optimizer, deepspeed.initialize
    peak_build = (procutil.status_bytes("VmHWM") - rss0) if build_reset else None
    mark("deepspeed.initialize done")
    gc.collect()
    t_init = time.time() - t0
    numel = lambda p: p.ds_numel if hasattr(p, "ds_numel") else p.numel()  # noqa: E731  (ZeRO-3 partitions)
    n_total = sum(numel(p) for p in engine.module.parameters())
    n_train = sum(numel(p) for p in engine.module.parameters() if p.requires_grad)
    rss_init = procutil.current_rss_bytes()
    hwm_all_before = procutil.status_bytes("VmHWM")
    if spec.get("build_only"):
        return {"rank": ctx.rank, "world_size": ctx.world_size, "device_name": ctx.device_name, "phase": name,
                "ds_config": spec["ds_config"], "zero_stage": dsconfig.zero_stage(ds_cfg),
                "params_total": n_total, "params_trainable": n_train, "init_seconds": t_init,
                "state": state_bytes(engine), "rss_before_model": rss0, "rss_after_initialize": rss_init - rss0,
                "peak_build": peak_build, "build_only": True}
    if ctx.has_cuda:
        torch.cuda.reset_peak_memory_stats()
    reset = procutil.reset_peak_rss()
    dtype = dsconfig.precision(ds_cfg)
    img = phase.img_size
    g = torch.Generator().manual_seed(ctx.rank)
    x = torch.randn(tc.micro_batch, 3, img, img, generator=g).to(ctx.device, dtype)
    y = torch.randint(0, 1000, (tc.micro_batch,), generator=g).to(ctx.device)
    loss, t_step = train_step(engine, phase, ctx, x, y, mark)
    gc.collect()
    res = {"rank": ctx.rank, "world_size": ctx.world_size, "device_name": ctx.device_name, "phase": name,
           "ds_config": spec["ds_config"], "zero_stage": dsconfig.zero_stage(ds_cfg),
           "precision": str(dtype).replace("torch.", ""), "params_total": n_total, "params_trainable": n_train,
           "threads": torch.get_num_threads(), "init_seconds": t_init, "step_seconds": t_step, "loss": float(loss),
           "state": state_bytes(engine), "rss_before_model": rss0,
           "rss_after_initialize": rss_init - rss0, "rss_step": procutil.current_rss_bytes() - rss0,
           "peak_step": (procutil.status_bytes("VmHWM") - rss0) if reset else None, "peak_build": peak_build,
           "peak_all": max(hwm_all_before, procutil.status_bytes("VmHWM")) - rss0}
    if ctx.has_cuda:
        res["cuda_peak_step"] = torch.cuda.max_memory_allocated()
    return res


def launch(spec: dict, ranks: int, args) -> list[dict]:
    import tempfile

    import torch

    spec = dict(spec, result_dir=tempfile.mkdtemp(prefix="vith_memory_"))
    ds = str(Path(sys.executable).with_name("deepspeed"))
    n = ["--num_gpus", str(ranks)] if torch.cuda.is_available() else ["--num_accelerators", str(ranks)]
    cmd = [ds, *n, "--master_port", str(procutil.free_port()), str(Path(__file__).resolve()), "--child",
           json.dumps(spec)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if not torch.cuda.is_available():
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // ranks))
    print(f"[vith_memory] {spec['phase']} {spec['ds_config']} x{ranks}: {' '.join(cmd[:6])} ...", flush=True)
    t0 = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env, cwd=common.ROOT)
        out, rc = p.stdout + "\n" + p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        out, rc = str(e.stdout or "") + str(e.stderr or ""), "timeout"
    rows = [json.loads(f.read_text()) for f in sorted(Path(spec["result_dir"]).glob("rank*.json"))]
    if len(rows) != ranks:
        prog = [json.loads(f.read_text()) for f in sorted(Path(spec["result_dir"]).glob("progress*.json"))]
        err = procutil.classify_failure(rc if isinstance(rc, int) else -1, out)
        if prog:
            err += "; last: " + ", ".join(f"rank {p['rank']} after '{p['stage']}' at {p['rss'] / 2**30:.1f} GiB"
                                          for p in prog)
        return [{"ok": False, "error": err, "progress": prog, "log_tail": out[-3000:], "phase": spec["phase"],
                 "ds_config": spec["ds_config"]}]
    print(f"[vith_memory]   done in {time.time() - t0:.0f}s", flush=True)
    return sorted(rows, key=lambda r: r["rank"])


def _params(r: dict) -> str:
    """A rank's trainable / total parameters, in millions."""
    return f"{r['params_trainable'] / 1e6:.0f}M/{r['params_total'] / 1e6:.0f}M"


def summarize_build(results: dict, phases_, args) -> tuple[str, dict]:
    """The build peaks only (`--build-only`)."""
    rows, ratios = [], {}
    for ph in phases_:
        base, zero = results.get((ph, "base"), []), results.get((ph, "zero"), [])
        b = base[0] if base and base[0].get("ok", True) else None
        for label, rr in (("no ZeRO x1", base), (f"ZeRO-3 x{args.ranks}", zero)):
            for r in rr:
                if not r.get("ok", True):
                    rows.append([ph, label, "-", r.get("error", "failed")[:40], None, None, None])
                    continue
                rows.append([ph, label, str(r["rank"]), _params(r), r["state"]["total"] / 2**20,
                             r["peak_build"] / 2**20, (r["peak_build"] / b["peak_build"]) if b else None])
        if b and zero and all(r.get("ok", True) for r in zero):
            ratios[ph] = {"peak_build_per_rank_over_unsharded": max(r["peak_build"] for r in zero) / b["peak_build"],
                          "state_per_rank_over_unsharded": max(r["state"]["total"] for r in zero) / b["state"]["total"]}
    head = ["phase", "setting", "rank", "trainable/total", "state MiB", "build peak MiB", "build peak/1-rank"]
    return common.table(head, rows, ["", "", "", "", ".0f", ".0f", ".3f"]), ratios


def summarize(results: dict, phases_, args) -> tuple[str, dict]:
    mib = lambda b: None if b is None else b / 2**20  # noqa: E731
    rows, ratios, notes = [], {}, []
    for ph in phases_:
        base = results.get((ph, "base"), [])
        zero = results.get((ph, "zero"), [])
        b = base[0] if base and base[0].get("ok", True) else None
        for label, rr in (("no ZeRO x1", base), (f"ZeRO-3 x{args.ranks}", zero)):
            for r in rr:
                if not r.get("ok", True):
                    rows.append([ph, label, "-", r.get("error", "failed")[:40], None, None, None, None, None, None])
                    notes.append(f"{ph} {label}: {r.get('error')}")
                    continue
                st = r["state"]["total"]
                rows.append([ph, label, str(r["rank"]), _params(r), mib(st), (st / b["state"]["total"]) if b else None,
                             mib(r["rss_step"]), mib(r["peak_step"]),
                             (r["peak_step"] / b["peak_step"]) if b and r["peak_step"] else None, mib(r["peak_all"])])
        if b and zero and all(r.get("ok", True) for r in zero):
            ratios[ph] = {"peak_build_per_rank_over_unsharded": max(r["peak_build"] for r in zero) / b["peak_build"],
                          "state_per_rank_over_unsharded": max(r["state"]["total"] for r in zero) / b["state"]["total"],
                          "peak_step_per_rank_over_unsharded": max(r["peak_step"] for r in zero) / b["peak_step"],
                          "peak_all_per_rank_over_unsharded": max(r["peak_all"] for r in zero) / b["peak_all"]}
    head = ["phase", "setting", "rank", "trainable/total", "state MiB", "state/1-rank", "rss after step MiB",
            "peak step MiB", "peak/1-rank", "peak incl. build MiB"]
    t = common.table(head, rows, ["", "", "", "", ".0f", ".3f", ".0f", ".0f", ".3f", ".0f"])
    return t + "".join("\n" + n for n in notes), ratios


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="vit_h14")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--module", type=int, default=1, help="incubated module I (default 1)")
    ap.add_argument("--phases", default=",".join(registry.trained_phases("di")),
                    help="comma list of phases (default: Deep Incubation's, from the registry)")
    ap.add_argument("--zero-config", default="zero3_bf16")
    ap.add_argument("--base-config", default="same",
                    help="the unsharded 1-rank config; 'same' (default) = the ZeRO config with ZeRO stage 0, so only "
                         "the sharding differs")
    ap.add_argument("--timeout", type=float, default=1500)
    ap.add_argument("--build-only", action="store_true", help="measure building the engines only (no step)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        res = child(spec)  # ranks' stdout lines interleave: each rank writes its own file
        Path(spec["result_dir"], f"rank{res['rank']}.json").write_text(json.dumps(res))
        return 0
    dev = common.device()
    record = common.header("vith_memory", dev)
    record["settings"] = {k: v for k, v in vars(args).items() if k not in ("child", "local_rank")}
    phases_ = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = [p for p in phases_ if p not in registry.list_phases()]
    if unknown or not phases_:
        print(f"vith_memory: error: --phases {args.phases!r}: use phases of {', '.join(registry.list_phases())}",
              file=sys.stderr)
        return 2
    if args.base_config == "same":
        import tempfile

        from dsincubate import dsconfig

        base = dsconfig.load(dsconfig.find(args.zero_config, False))
        base["zero_optimization"] = {"stage": 0}
        path = Path(tempfile.mkdtemp(prefix="vith_base_")) / f"{Path(args.zero_config).stem}_stage0.json"
        path.write_text(json.dumps(base))
        args.base_config = str(path)
        record["settings"]["base_config_json"] = base
    results = {}
    for ph in phases_:  # one job at a time: the unsharded one first, then the ZeRO-3 ranks
        spec = dict(phase=ph, preset=args.preset, batch=args.batch, module=args.module, build_only=args.build_only)
        results[(ph, "base")] = launch(dict(spec, ds_config=args.base_config), 1, args)
        results[(ph, "zero")] = launch(dict(spec, ds_config=args.zero_config), args.ranks, args)
    if args.build_only:
        table, ratios = summarize_build(results, phases_, args)
        text = (f"device: {dev['name']}  ({common.now()})\n{args.preset}: building the engine (model, optimizer, "
                f"deepspeed.initialize; ZeRO-3 inside deepspeed.zero.Init), {args.zero_config} on {args.ranks} ranks "
                f"vs {Path(args.base_config).stem} on 1 rank\n{table}\n"
                + "\n".join(f"{ph}: ZeRO-3 build peak per rank / unsharded = "
                            f"{r['peak_build_per_rank_over_unsharded']:.3f} (target <= 0.55)"
                            for ph, r in ratios.items()))
        print("\n" + text)
        record["results"] = [{"phase": ph, "setting": s, "ranks": v} for (ph, s), v in results.items()]
        record["ratios"] = ratios
        print(f"wrote {common.write_result('vith_memory_build', record, text, args.out)}")
        return 0
    table, ratios = summarize(results, phases_, args)
    text = (f"device: {dev['name']}  ({common.now()})\n{args.preset}, micro-batch {args.batch} per rank, activation "
            f"checkpointing on, {args.zero_config} on {args.ranks} ranks vs "
            f"{Path(args.base_config).stem} on 1 rank\n{table}\n"
            + "\n".join(f"{ph}: ZeRO-3 per-rank state / unsharded = {r['state_per_rank_over_unsharded']:.3f} "
                        f"(target near {1 / args.ranks:.2f}); step peak ratio "
                        f"{r['peak_step_per_rank_over_unsharded']:.3f}; lifetime peak ratio "
                        f"{r['peak_all_per_rank_over_unsharded']:.3f}" for ph, r in ratios.items()))
    print("\n" + text)
    record["results"] = [{"phase": ph, "setting": s, "ranks": v} for (ph, s), v in results.items()]
    record["ratios"] = ratios
    path = common.write_result("vith_memory", record, text, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
