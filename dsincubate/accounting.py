"""What a run cost and what it reached: FLOPs, device-seconds, `run.json`, metric logs, the pipeline summary.

- `count_flops` counts a phase's FLOPs per image with `torch.utils.flop_counter` on a copy of its model built on the
  meta device (no memory, no weights): the forward of the model as trained, and one training step (forward +
  backward, so an incubation step counts the frozen stages before I as forward only, as they run).
- `run_record` is the `run.json` of a phase: phase, module, resolved config and ds_config, world size, device,
  wall seconds, device-seconds (= wall x devices), images processed, FLOPs per image, final metrics.
- `MetricLogger` writes `metrics.jsonl` and TensorBoard events (tensorboardX) on rank 0.
- `summarize(root)` builds the pipeline's `summary.json` and table: E2E versus Deep Incubation, top-1 and device-hours
  per phase and in total.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from dsincubate.checkpoint import atomic_write_json, complete


def count_flops(build_model, img_size: int) -> dict:
    """FLOPs per image of the model `build_model()` returns (built on the meta device: no memory, no weights)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build_model()
    model.train()
    x = torch.randn(2, 3, img_size, img_size, device="meta")
    with FlopCounterMode(display=False) as fwd:
        out = model(x)
    # imitation's / m2mKD's `Paired` (trained, frozen teacher) or the decoupled baselines' `PerModule` outputs: the
    # backward of the sum reaches every output with a graph (the elementwise terms count no FLOPs)
    from dsincubate.models.staged import output_tensors

    loss = out.float().mean() if isinstance(out, torch.Tensor) else sum(o.float().mean() for o in output_tensors(out))
    with FlopCounterMode(display=False) as bwd:
        loss.backward()
    model.eval()
    with FlopCounterMode(display=False) as inf:
        model(x)
    return {"forward_per_image": fwd.get_total_flops() / 2, "train_step_per_image":
            (fwd.get_total_flops() + bwd.get_total_flops()) / 2, "inference_per_image": inf.get_total_flops() / 2}


def progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, leave=False,
                mininterval=0.5 if sys.stderr.isatty() else 10.0)


class MetricLogger:
    """metrics.jsonl + TensorBoard, rank 0 only. Every scalar's step is the global optimizer step (epoch metrics at
    the epoch's last step), so one purge step can drop everything a killed run logged after its checkpoint."""

    def __init__(self, out_dir: Path, enabled: bool):
        self.enabled = enabled
        self.writer = None
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / "metrics.jsonl"
        self.purge_step = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def _tb(self):
        # opened on first use, after `truncate_after` has set the purge step of a resume
        if self.writer is None:
            from tensorboardX import SummaryWriter

            tb = self.out_dir / "tb"
            # one file per session, named to sort after the earlier ones even within the same second (the file name
            # holds only seconds and the host; without a suffix a quick re-run would overwrite the killed run's file)
            n = len(list(tb.glob("events.out.tfevents.*"))) if tb.is_dir() else 0
            self.writer = SummaryWriter(str(tb), purge_step=self.purge_step, filename_suffix=f".{n:04d}")
        return self.writer

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.enabled:
            self._tb().add_scalar(tag, value, step)

    def epoch(self, metrics: dict, step: int) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"time": time.time(), "step": step, **metrics}) + "\n")
        for k, v in metrics.items():
            if k != "epoch" and isinstance(v, (int, float)):
                self._tb().add_scalar(f"epoch/{k}", v, step)
        self._tb().flush()

    def truncate_after(self, epoch: int) -> None:
        """Drop what was logged after epoch `epoch` (a resume trains it again; a kill between logging an epoch and
        saving its checkpoint would otherwise leave it twice): its metrics.jsonl lines, and in TensorBoard every event
        past that epoch's last step (a purge step: TensorBoard hides the earlier session's events from it on)."""
        if not self.enabled:
            return
        from dsincubate.checkpoint import atomic_write_text

        lines = [ln for ln in self.path.read_text().splitlines() if ln.strip()] if self.path.is_file() else []
        keep = [ln for ln in lines if json.loads(ln).get("epoch", 0) <= epoch]
        if self.path.is_file():
            atomic_write_text(self.path, "".join(ln + "\n" for ln in keep))
        self.purge_step = (json.loads(keep[-1])["step"] + 1) if keep else 0

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def run_record(*, phase, ds_cfg, ds_file, ctx, wall_seconds, state, flops, kernels, trainable, engine_module,
               info, frozen) -> dict:
    names = set(trainable)
    n_trainable = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                      for n, p in engine_module.named_parameters() if n in names)
    n_total = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine_module.parameters())
    final = dict(state.history[-1]) if state.history else {}
    tc = phase.train_cfg
    return {
        "phase": phase.name,
        "stage_index": phase.stage_index,
        "settings": {"meta_model": tc.meta_model, "imitation": tc.imitation, "clip_grad": tc.clip_grad,
                     "drop_path": tc.drop_path, "drop_path_mode": tc.drop_path_mode,
                     "num_stages": phase.cfg.model.num_stages,
                     "meta_depth_per_stage": phase.cfg.model.meta_depth_per_stage,
                     "train_fraction": phase.cfg.data.train_fraction, "dmt_splits": phase.cfg.data.dmt_splits,
                     "repeated_aug": phase.cfg.data.repeated_aug},
        "config": phase.cfg.to_dict(),
        "ds_config": ds_cfg,
        "ds_config_file": str(ds_file),
        "world_size": ctx.world_size,
        "device_type": ctx.device_type,
        "device_name": ctx.device_name,
        "wall_seconds": wall_seconds,
        "device_seconds": device_seconds(wall_seconds, ctx.world_size),
        "images_processed": state.images,
        "optimizer_steps": state.global_step,
        "epochs": state.epoch,
        "flops": flops,
        "params_trainable": n_trainable,
        "params_total": n_total,
        "frozen_params": dict(frozen, count=n_total - n_trainable),
        "kernels": kernels,
        "data": {"num_classes": info.num_classes, "train_samples": info.train_samples,
                 "val_samples": info.val_samples, "stats": state.data_stats},
        "final": final,
        "history": state.history,
    }


def device_seconds(wall_seconds: float, devices: int) -> float:
    return wall_seconds * devices


def _load(path: Path) -> dict | None:
    from dsincubate.errors import UserError

    if not complete(path):
        return None
    try:
        return json.loads((path / "run.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"summary: {path / 'run.json'} of a finished phase is unreadable ({e})") from None


def summarize(root: Path, num_stages: int, write: bool = True) -> dict:
    """summary.json of a pipeline run: what finished, final top-1 and device-hours per phase and in total (written
    unless `write` is false). UserError when no phase of the run has finished."""
    from dsincubate.errors import UserError
    from dsincubate.layout import RunLayout

    layout = RunLayout(root)
    hours = lambda r: r["device_seconds"] / 3600 if r else None  # noqa: E731
    meta = _load(layout.phase_dir("meta"))
    inc = [_load(layout.phase_dir("incubate", i)) for i in range(num_stages)]
    ft = _load(layout.phase_dir("finetune"))
    e2e = _load(layout.phase_dir("e2e"))
    e2e_tune = _load(layout.phase_dir("e2e_tune"))
    assembled = json.loads((layout.assemble_dir / "eval.json").read_text()) \
        if (layout.assemble_dir / "eval.json").is_file() else {}
    students = [_load(layout.phase_dir("m2mkd", i)) for i in range(num_stages)]
    kd_ft = _load(layout.phase_dir("m2mkd_finetune"))
    others = _other_phases(layout, num_stages, hours)
    if not any([meta, ft, e2e, e2e_tune, kd_ft, *inc, *students, others]):
        raise UserError(f"summary: no finished phase under {root} (is --output the run directory?)")
    device = next((r["device_name"] for r in [meta, ft, e2e, *inc] if r), "unknown")
    di_hours = None
    if meta and ft and all(inc):
        di_hours = hours(meta) + sum(hours(r) for r in inc) + hours(ft)
    summary = {
        "device": device,
        "e2e": {"top1": e2e["final"].get("top1") if e2e else None, "device_hours": hours(e2e),
                "epochs": e2e["epochs"] if e2e else None},
        "deep_incubation": {
            "top1": ft["final"].get("top1") if ft else None,
            "meta_top1": meta["final"].get("top1") if meta else None,
            "device_hours": di_hours,
            "phases": {"meta": hours(meta), "incubate": [hours(r) for r in inc], "finetune": hours(ft)},
            "incubate_top1": [r["final"].get("top1") if r else None for r in inc],
            "assembled_top1": assembled.get("top1"),
        },
    }
    if e2e_tune:
        summary["e2e_tune"] = {"top1": e2e_tune["final"].get("top1"),
                               "device_hours": hours(e2e) + hours(e2e_tune) if e2e else None}
    if kd_ft or any(students):
        kd_eval = layout.assemble_dir_of("m2mkd") / "eval.json"
        summary["m2mkd"] = {
            "top1": kd_ft["final"].get("top1") if kd_ft else None,
            # the meta model's cost counts (it is trained for m2mKD too); the teacher's does not (a reused model)
            "device_hours": hours(meta) + sum(hours(r) for r in students) + hours(kd_ft)
            if meta and kd_ft and all(students) else None,
            "phases": {"students": [hours(r) for r in students], "finetune": hours(kd_ft)},
            "student_top1": [r["final"].get("top1") if r else None for r in students],
            "assembled_top1": json.loads(kd_eval.read_text()).get("top1") if kd_eval.is_file() else None,
        }
    summary.update(others)
    if write:
        atomic_write_json(layout.summary, summary)
    return summary


def _other_phases(layout, num_stages: int, hours) -> dict:
    """{"phases": {label: {"top1", "device_hours"}}} for the registered phases with a summary row of their own."""
    from dsincubate import registry

    rows = {}
    for name in registry.summarized():
        spec = registry.phase(name)
        for i in range(num_stages) if spec.per_stage else [None]:
            r = _load(layout.phase_dir(name, i))
            if r:
                rows[spec.summary if i is None else f"{spec.summary} module {i}"] = {
                    "top1": r["final"].get("top1"), "device_hours": hours(r)}
    return {"phases": rows} if rows else {}


def format_summary(s: dict) -> str:
    f = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    di, e2e = s["deep_incubation"], s["e2e"]
    rows = [("E2E", f(e2e["top1"], ".2f"), f(e2e["device_hours"], ".4f"))]
    rows.append(("DI: meta pretrain", f(di["meta_top1"], ".2f"), f(di["phases"]["meta"], ".4f")))
    if "m2mkd" not in s or di["phases"]["finetune"] is not None or any(di["phases"]["incubate"]):
        for i, (h, t) in enumerate(zip(di["phases"]["incubate"], di["incubate_top1"])):
            rows.append((f"DI: incubate module {i}", f(t, ".2f"), f(h, ".4f")))
        if di.get("assembled_top1") is not None:
            rows.append(("DI: assembled, before finetune", f(di["assembled_top1"], ".2f"), "-"))
        rows.append(("DI: finetune (final)", f(di["top1"], ".2f"), f(di["phases"]["finetune"], ".4f")))
        rows.append(("Deep Incubation total", f(di["top1"], ".2f"), f(di["device_hours"], ".4f")))
    if "e2e_tune" in s:
        rows.append(("E2E + tuning (total)", f(s["e2e_tune"]["top1"], ".2f"), f(s["e2e_tune"]["device_hours"], ".4f")))
    if "m2mkd" in s:
        kd = s["m2mkd"]
        for i, (h, t) in enumerate(zip(kd["phases"]["students"], kd["student_top1"])):
            rows.append((f"m2mKD: student module {i}", f(t, ".2f"), f(h, ".4f")))
        if kd.get("assembled_top1") is not None:
            rows.append(("m2mKD: assembled, before finetune", f(kd["assembled_top1"], ".2f"), "-"))
        rows.append(("m2mKD: finetune (final)", f(kd["top1"], ".2f"), f(kd["phases"]["finetune"], ".4f")))
        rows.append(("m2mKD total (meta, not teacher)", f(kd["top1"], ".2f"), f(kd["device_hours"], ".4f")))
    rows += [(label, f(r["top1"], ".2f"), f(r["device_hours"], ".4f")) for label, r in s.get("phases", {}).items()]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'run':<{width}}  {'top-1 %':>8}  {'device-hours':>12}   (device: {s['device']})"]
    lines += [f"{a:<{width}}  {b:>8}  {c:>12}" for a, b, c in rows]
    return "\n".join(lines)
