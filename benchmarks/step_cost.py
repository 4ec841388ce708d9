"""Cost of one training step of every Deep Incubation phase against the E2E step: time, FLOPs, peak memory.

For a model preset and micro-batch it measures, each configuration in a fresh subprocess (so memory peaks never mix):

  e2e           the whole target model, every parameter trained
  meta          the meta model (K stages of `meta_depth_per_stage` blocks, target width)
  incubate[I]   the Hybrid of module incubation for each I: meta stages before I under no_grad, target stage I
                trained, later meta stages frozen (input gradients only)
  finetune      the assembled target, every parameter trained (the same computation as e2e, from other weights)

Each step is the training's own: the phase (`dsincubate.phases.make(..., resolve=False)`, no stochastic depth, weights
not loaded) inside the DeepSpeed engine training builds (`dsincubate.engine.resolve_ds_config` + `build_engine`: the
phase's ds_config, by default `auto` as the recipes set it, so bf16 weights and ZeRO on a GPU; its optimizer over the
trainable parameters at the scaled lr), one rank: forward on the batch in the engine's precision, the phase's loss
(cross-entropy), `engine.backward`, `engine.step`, on one fixed random batch (no data loading); not autocast over fp32
weights, which costs more than the engine's bf16 step. ViT-B/L/H presets get a 1000-class head and are refused when
their parameter count is not the real model's (`common.check_params`). Time is the median of `--steps` timed steps after
`--warmup` steps; by default the reported times come from one extra process that builds every configuration and times
them round-robin (a step of each per round), so a background load varying over time affects them alike (the per-process
times are kept in the JSON as `isolated_step_seconds_median`). FLOPs per image are counted with torch.utils.flop_counter
on the meta device (`dsincubate.accounting.count_flops`: forward + backward as they run, so frozen stages before I count
forward only). Peak memory: `torch.cuda.max_memory_allocated` on a GPU; on the CPU the process's resident-set high water
mark (VmHWM, reset after the model is built, so it is the peak of the training steps: weights, gradients, optimizer
state, activations and the interpreter's baseline); "delta" subtracts the RSS before the model was built.

Targets, reported as measured ratios (never asserted): each incubation step's time / E2E step time within 15% of the
ideal ratio from FLOP counts; each incubation step's peak memory below the E2E step's.

    python benchmarks/step_cost.py                                   # preset tiny, batch 64, on this machine
    python benchmarks/step_cost.py --preset tiny,vit_b16 --batch 64,8  # several presets (one batch each) in one file
    python benchmarks/step_cost.py --preset vit_h14 --batch 32 --grad-checkpointing   # on a GPU (the bf16 engine)
    options: --stages K, --steps N, --warmup N, --threads N, --ds-config NAME (default auto), --out PATH

Writes benchmarks/results/step_cost_<device>_<date>.json (+ .txt with the table) with device, command, commit and
date.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from dsincubate import procutil  # noqa: E402
from dsincubate.errors import UserError  # noqa: E402

TOLERANCE = 0.15
METHODS = ("e2e", "di")  # whose training steps are measured (the registry's); E2E's is the reference


# ---------------------------------------------------------------- model construction (child and parent)

def run_config(preset: str, stages: int, grad_ckpt: bool, ds_config: str = "auto", batch: int | None = None):
    """The run config of the measured steps: the preset at K stages (an ImageNet-1k head for ViT-B/L/H), PyTorch
    kernels, no stochastic depth, the ds_config and micro-batch of the engine."""
    from dsincubate.config import ModelConfig, RunConfig

    cfg = RunConfig(model=ModelConfig(preset=preset, num_stages=stages, kernel_backend="torch",
                                      grad_checkpointing=grad_ckpt,
                                      num_classes=1000 if preset in common.EXPECTED_PARAMS else None))
    cfg.ds_config = ds_config
    for name in dict.fromkeys(common.split_kind(k)[0] for k in kinds(stages)):
        cfg.train_config(name).drop_path = 0.0
        if batch:
            cfg.train_config(name).micro_batch = batch
    return cfg


def check_preset(preset: str, stages: int) -> dict:
    """The target's parameter count (meta device) and, for ViT-B/L/H, the check that it is the real model."""
    info = common.model_params(run_config(preset, stages, False))
    info["error"] = common.check_params(preset, info["params"], info["num_classes"], info["embed_dim"])
    return info


def make_phase(kind: str, preset: str, stages: int, grad_ckpt: bool = False, ds_config: str = "auto",
               batch: int | None = None):
    """The phase of a step kind (`kinds`), as the training loop makes it (no inputs)."""
    from dsincubate import phases
    from dsincubate.models import vit

    cfg = run_config(preset, stages, grad_ckpt, ds_config, batch)
    n_cls = int(vit.target_spec(cfg.model).kwargs["num_classes"]) or 1000
    name, index = common.split_kind(kind)
    return phases.make(name, cfg, Path("/nonexistent-step-cost-root"), n_cls, index, resolve=False)


def _materialize(module, device):
    """Weights for a module built on the meta device (values do not matter for cost; finite and ViT-like)."""
    import torch

    module.to_empty(device=device)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2 or name.endswith(("pos_embed", "cls_token")):
                torch.nn.init.trunc_normal_(p, std=0.02)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
    return module


def phase_model(phase, device="cpu"):
    """The phase's model (`build_model(load=False)`), built on the meta device and materialised on `device` (only
    what the phase keeps: an incubation's unused target stages never take memory)."""
    import torch

    with torch.device("meta"):
        model = phase.build_model(load=False)
    if str(device) != "meta":
        _materialize(model, device)
    if phase.cfg.model.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def build(kind: str, preset: str, stages: int, grad_ckpt: bool = False, device="cpu"):
    """The trained model of a step kind: e2e, finetune, meta or incubate<I>."""
    return phase_model(make_phase(kind, preset, stages, grad_ckpt), device)


def kinds(stages: int) -> list[str]:
    """The training steps of `METHODS` in the registry's order (e2e, meta, incubate0, ...); targets judge incubate<I>"""
    return common.step_kinds(METHODS, stages)


def reference_kind() -> str:
    return common.step_kinds(METHODS[:1], 1)[0]  # E2E's training step: what the others are compared with


def label(kind: str) -> str:
    name, index = common.split_kind(kind)
    return kind if index is None else f"{name}[{index}]"


def count_flops(kind: str, preset: str, stages: int, img_size: int) -> dict:
    from dsincubate import accounting

    return accounting.count_flops(lambda: build(kind, preset, stages, device="meta"), img_size)


def img_size_of(preset: str, stages: int) -> tuple[int, int, int]:
    phase = make_phase(reference_kind(), preset, stages)
    return phase.img_size, phase.num_classes, phase.target_spec().depth


# ---------------------------------------------------------------- the children: one configuration, or all interleaved

def _batch(spec: dict):
    """Threads, the device and the fixed random batch of a child."""
    import torch

    threads = common.set_threads(spec.get("threads") or None)
    cuda = torch.cuda.is_available() and spec["device"] != "cpu"
    dev = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    b, s = spec["batch"], spec["img_size"]
    x = torch.randn(b, 3, s, s, device=dev)
    y = torch.randint(0, spec["num_classes"], (b,), device=dev)
    return threads, dev, x, y


def _trainer(kind: str, spec: dict, dev, x, y):
    """The phase's DeepSpeed engine as training builds it (one rank) and one training step on it: forward in the
    engine's precision, the phase's loss, engine.backward, engine.step. Returns (model, engine, step, info)."""
    import torch

    from dsincubate import dist, dsconfig
    from dsincubate.engine import build_engine, resolve_ds_config

    phase = make_phase(kind, spec["preset"], spec["stages"], spec["grad_ckpt"], spec.get("ds_config", "auto"),
                       spec["batch"])
    ctx = dist.init()  # a one-rank world on a free port when no launcher set one
    ds_file, ds_cfg = resolve_ds_config(phase, ctx.has_cuda, ctx.world_size)
    engine = build_engine(phase, ctx, ds_cfg, load=False).engine
    dtype = dsconfig.precision(ds_cfg)
    xin = x.to(dtype)
    crit = torch.nn.CrossEntropyLoss()
    engine.train()

    def step():
        loss = phase.loss(engine(xin), y, crit)["loss"]
        engine.backward(loss)
        engine.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return loss

    info = {"ds_config_file": str(ds_file), "precision": str(dtype).removeprefix("torch."),
            "zero_stage": dsconfig.zero_stage(ds_cfg)}
    return engine.module, engine, step, info


def child(spec: dict) -> dict:
    import torch

    threads, dev, x, y = _batch(spec)
    cuda = dev.type == "cuda"
    rss_base = procutil.current_rss_bytes()
    model, engine, step, info = _trainer(spec["kind"], spec, dev, x, y)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        mem_before = torch.cuda.memory_allocated()
    reset = procutil.reset_peak_rss()
    times = []
    for k in range(spec["warmup"] + spec["steps"]):
        t0 = time.perf_counter()
        loss = step()
        if k >= spec["warmup"]:
            times.append(time.perf_counter() - t0)
    res = {"kind": spec["kind"], "threads": threads, "step_seconds_median": statistics.median(times),
           "step_seconds": times, "loss": float(loss), "params_trainable": trainable, "params_total": total, **info}
    if cuda:
        res.update(peak_bytes=torch.cuda.max_memory_allocated(), memory_kind="torch.cuda.max_memory_allocated",
                   peak_delta_bytes=torch.cuda.max_memory_allocated() - mem_before,
                   model_state_bytes_allocated=mem_before)
    else:
        peak = procutil.peak_rss_bytes() if reset else procutil.max_rss_bytes()
        res.update(peak_bytes=peak, memory_kind="process RSS high-water (VmHWM) during the steps" if reset else
                   "process RSS high-water (ru_maxrss, whole process)", peak_delta_bytes=peak - rss_base,
                   rss_before_model_bytes=rss_base)
    return res


def child_interleaved(spec: dict) -> dict:
    """Every configuration in one process, timed round-robin (one step each per round), so that a background load
    that changes over time hits all of them alike. Memory is not measured here (see `child`)."""
    threads, dev, x, y = _batch(spec)
    steps = {kind: _trainer(kind, spec, dev, x, y)[2] for kind in spec["kinds"]}  # one engine per kind
    times = {k: [] for k in steps}
    for r in range(spec["warmup"] + spec["steps"]):
        for kind, step in steps.items():
            t0 = time.perf_counter()
            step()
            if r >= spec["warmup"]:
                times[kind].append(time.perf_counter() - t0)
    return {"threads": threads, "step_seconds": times,
            "step_seconds_median": {k: statistics.median(v) for k, v in times.items()}}


# ---------------------------------------------------------------- the parent: all configurations, table, result

def measure_preset(preset: str, batch: int, args, dev: dict, model: dict | None = None) -> dict:
    img, ncls, depth = img_size_of(preset, args.stages)
    rows = []
    for kind in kinds(args.stages):
        spec = dict(kind=kind, preset=preset, stages=args.stages, grad_ckpt=args.grad_checkpointing, batch=batch,
                    img_size=img, num_classes=ncls, warmup=args.warmup, steps=args.steps, threads=args.threads,
                    ds_config=args.ds_config, device=dev["type"])
        print(f"[step_cost] {preset} batch {batch}: {label(kind)} ...", flush=True)
        res = procutil.run_child([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                                 timeout=args.timeout, cwd=common.ROOT)
        res["flops"] = count_flops(kind, preset, args.stages, img)
        res["label"] = label(kind)
        rows.append(res)
        if res.get("ok"):
            print(f"[step_cost]   {res['step_seconds_median'] * 1e3:.1f} ms/step, peak "
                  f"{res['peak_bytes'] / 2**20:.0f} MiB", flush=True)
        else:
            print(f"[step_cost]   failed: {res.get('error')}", flush=True)
    timing = "isolated"
    if not args.no_interleave:
        print(f"[step_cost] {preset}: interleaved timing of all steps in one process ...", flush=True)
        spec = dict(kinds=[r["kind"] for r in rows if r.get("ok")], preset=preset, stages=args.stages,
                    grad_ckpt=args.grad_checkpointing, batch=batch, img_size=img, num_classes=ncls,
                    warmup=args.warmup, steps=args.steps, threads=args.threads, ds_config=args.ds_config,
                    device=dev["type"])
        inter = procutil.run_child([sys.executable, str(Path(__file__).resolve()), "--child-interleaved",
                                    json.dumps(spec)], timeout=args.timeout * 2, cwd=common.ROOT)
        if inter.get("ok"):
            timing = "interleaved"
            for r in rows:
                if r["kind"] in inter["step_seconds_median"]:
                    r["isolated_step_seconds_median"] = r["step_seconds_median"]
                    r["step_seconds_median"] = inter["step_seconds_median"][r["kind"]]
                    r["interleaved_step_seconds"] = inter["step_seconds"][r["kind"]]
        else:
            print(f"[step_cost]   interleaved timing failed ({inter.get('error')}); using the isolated timings")
    ok = next((r for r in rows if r.get("ok")), {})
    dtype = f"{ok.get('precision', '?')} DeepSpeed engine ({Path(ok.get('ds_config_file', '?')).stem}, ZeRO " \
            f"{ok.get('zero_stage', '?')})"
    out = analyse(preset, batch, img, depth, dtype, rows, args)
    out["timing"] = timing
    out["model"] = model
    return out


def analyse(preset, batch, img, depth, dtype, rows, args) -> dict:
    e2e = next(r for r in rows if r["kind"] == reference_kind())
    checks = {"incubate_time_within_15pct_of_flop_ideal": True, "incubate_peak_memory_below_e2e": True}
    for r in rows:
        r["ideal_ratio"] = r["flops"]["train_step_per_image"] / e2e["flops"]["train_step_per_image"]
        if r.get("ok") and e2e.get("ok"):
            r["time_ratio"] = r["step_seconds_median"] / e2e["step_seconds_median"]
            r["time_vs_ideal"] = r["time_ratio"] / r["ideal_ratio"]
            r["achieved_tflops"] = r["flops"]["train_step_per_image"] * batch / r["step_seconds_median"] / 1e12
            if common.split_kind(r["kind"])[1] is not None:  # a per-stage step (incubate<I>)
                r["time_within_15pct"] = abs(r["time_vs_ideal"] - 1) <= TOLERANCE
                r["peak_below_e2e"] = r["peak_bytes"] < e2e["peak_bytes"]
                checks["incubate_time_within_15pct_of_flop_ideal"] &= r["time_within_15pct"]
                checks["incubate_peak_memory_below_e2e"] &= r["peak_below_e2e"]
        elif common.split_kind(r["kind"])[1] is not None:
            checks = {k: False for k in checks}
    return {"preset": preset, "batch": batch, "img_size": img, "depth": depth, "stages": args.stages,
            "dtype": dtype, "grad_checkpointing": args.grad_checkpointing, "warmup": args.warmup,
            "steps": args.steps, "rows": rows, "targets": checks}


def format_table(res: dict) -> str:
    head = ["step", "params", "trainable", "GFLOP/img", "ms/step", "time/E2E", "FLOP ideal", "time/ideal", "within 15%",
            "peak MiB", "delta MiB", "< E2E peak"]
    rows = []
    for r in res["rows"]:
        ok = r.get("ok")
        rows.append([r["label"], r.get("params_total"), r.get("params_trainable"),
                     r["flops"]["train_step_per_image"] / 1e9,
                     r["step_seconds_median"] * 1e3 if ok else r.get("error"), r.get("time_ratio"),
                     r["ideal_ratio"], r.get("time_vs_ideal"), r.get("time_within_15pct"),
                     r["peak_bytes"] / 2**20 if ok else None, r["peak_delta_bytes"] / 2**20 if ok else None,
                     r.get("peak_below_e2e")])
    t = common.table(head, rows, ["", "", "", ".4f", ".1f", ".3f", ".3f", ".3f", "", ".0f", ".0f", ""])
    tg = res["targets"]
    params = f"{res['model']['params'] / 1e6:.1f} M parameters, " if res.get("model") else ""
    return (f"preset {res['preset']} ({params}depth {res['depth']}, {res['img_size']}px, K={res['stages']}), "
            f"micro-batch {res['batch']}, {res['dtype']}, grad checkpointing {res['grad_checkpointing']}, median of "
            f"{res['steps']} steps after {res['warmup']} warmup ({res.get('timing', 'isolated')} timing)\n{t}\n"
            f"targets: every incubation step within 15% of its FLOP-ideal ratio: "
            f"{common.fmt(tg['incubate_time_within_15pct_of_flop_ideal'])}; every incubation peak below E2E: "
            f"{common.fmt(tg['incubate_peak_memory_below_e2e'])}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny", help="comma list of presets (tiny, vit_b16, vit_l16, vit_h14, ...)")
    ap.add_argument("--batch", default="64", help="micro-batch, or a comma list matching --preset")
    ap.add_argument("--stages", type=int, default=4, help="K (default 4)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads in each child (default: all cores)")
    ap.add_argument("--ds-config", default="auto",
                    help="ds_config of the engine (default auto, as the recipes: bf16 + ZeRO on a GPU, cpu without)")
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    ap.add_argument("--out", default=None,
                    help="result path (default benchmarks/results/step_cost_<device>_<date>.json)")
    ap.add_argument("--no-interleave", action="store_true",
                    help="time each configuration in its own process only (default: also time all of them "
                         "round-robin in one process and report those, robust to a changing background load)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-interleaved", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        procutil.emit_result(child(json.loads(args.child)))
        return 0
    if args.child_interleaved:
        procutil.emit_result(child_interleaved(json.loads(args.child_interleaved)))
        return 0
    presets = [p.strip() for p in args.preset.split(",") if p.strip()]
    batches = [int(b) for b in args.batch.split(",")]
    if len(batches) == 1:
        batches *= len(presets)
    if len(batches) != len(presets):
        ap.error("--batch: give one batch size or one per preset")
    models = {}
    for preset in presets:  # every preset's model checked before anything heavy starts
        try:
            models[preset] = check_preset(preset, args.stages)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if models[preset]["error"]:
            print(f"error: {models[preset]['error']}", file=sys.stderr)
            return 2
    dev = common.device()
    record = common.header("step_cost", dev)
    record["settings"] = {k: v for k, v in vars(args).items() if k != "child"}
    record["results"] = []
    tables = []
    for preset, batch in zip(presets, batches):
        res = measure_preset(preset, batch, args, dev, models[preset])
        record["results"].append(res)
        tables.append(format_table(res))
        print("\n" + tables[-1] + "\n", flush=True)
    text = f"device: {dev['name']}  ({common.now()})\n\n" + "\n\n".join(tables)
    path = common.write_result("step_cost", record, text, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
