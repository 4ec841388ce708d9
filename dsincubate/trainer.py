"""The one training loop, shared by every phase: train, evaluate, checkpoint/resume, record.

    record = run_phase(phases.make("incubate", cfg, root, num_classes, 2), ctx, info)
    record = run_phase(checks.check_plan(phase, info, world_size, has_cuda), ctx, info)   # the CLI: a checked plan

`run_phase` is an outline of named steps: `prepare` (the phase's plan, `dsincubate.checks.check_plan`: resolved
ds_config, steps, output check; taken as given when the CLI made it; then skip a complete output), `build_engine`
(dsincubate.engine), `resume`, then `train_epoch` / `train_step` per epoch and `end_epoch` (evaluate, log, checkpoint,
stop), and `finish` (gather the trained weights, check the frozen ones did not move, save the output and, last, its
MANIFEST.json). Every `ckpt_every` epochs a DeepSpeed checkpoint is saved that a re-run of the same command resumes
from, equal to an uninterrupted run (seeded per-epoch data order and augmentation; the `TrainState` is saved).

On clusters: every rank writes where it runs (`<phase>/ranks/rank_<r>.json`: host, address, pid, start time) before
the process group exists, so a job that hangs can still be told apart from one on the wrong host, and run.json lists
every rank's host with the phase's start and end times and when its process began (`process_started_at`). When stderr
is not a terminal (SLURM, pdsh, a log file), rank 0 prints one progress line every `log_every` steps (images/s, loss,
lr, ETA) instead of progress-bar frames; every line this module prints starts with the rank's host and rank.
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from dsincubate import PROCESS_STARTED_AT, accounting, checkpoint as ckpt, dist, dsconfig
from dsincubate.checks import PhasePlan, check_output, check_plan, output_key
from dsincubate.data import DataInfo, build_mixup, build_train_loader, build_val_loader
from dsincubate.engine import Built, build_engine
from dsincubate.errors import UserError
from dsincubate.evaluate import accuracy
from dsincubate.models import moe
from dsincubate.phase_base import Phase

SYNC_EVERY = 20  # training steps between host reads of the loss


@dataclass
class TrainState:
    """What a resume needs besides the engine's own state; saved as the checkpoint's client state."""

    epoch: int = 0
    global_step: int = 0
    images: int = 0
    wall_seconds: float = 0.0
    history: list = field(default_factory=list)
    data_stats: list = field(default_factory=list)

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, d: dict) -> None:
        for f in dataclasses.fields(self):
            if f.name in d:  # DeepSpeed adds keys of its own to the client state
                setattr(self, f.name, d[f.name])


@dataclass
class Run:
    """One phase in training: its engine, data and bookkeeping (built by `prepare` + `build_engine`)."""

    phase: Phase
    ctx: dist.DistContext
    info: DataInfo
    ds_file: Path
    ds_cfg: dict
    steps_per_epoch: int
    built: Built | None = None
    state: TrainState = field(default_factory=TrainState)
    logger: accounting.MetricLogger | None = None
    mixup: object = None
    criterion: object = None
    flops: dict = field(default_factory=dict)
    t_start: float = field(default_factory=time.time)
    prior_wall: float = 0.0
    epochs_this_run: int = 0

    @property
    def ckpt_dir(self) -> Path:
        return self.phase.out_dir / "checkpoints"

    @property
    def dtype(self):
        return dsconfig.precision(self.ds_cfg)

    def train_loader(self, epoch: int, device="cpu"):
        cfg = self.phase.cfg
        return build_train_loader(cfg.data, self.info, batch_size=self.phase.train_cfg.micro_batch,
                                  rank=self.ctx.rank, world_size=self.ctx.world_size, epoch=epoch, seed=cfg.seed,
                                  img_size=self.phase.img_size, subset_index=self.phase.stage_index, device=device)


def run_phase(phase: Phase | PhasePlan, ctx: dist.DistContext, info: DataInfo) -> dict:
    """Train one phase (or execute its plan) to completion (or to `stop_after_epochs`); returns its run record."""
    run = prepare(phase, ctx, info)
    if isinstance(run, dict):  # already complete
        return run
    from deepspeed.accelerator import get_accelerator

    record = _train(run)
    del run  # the engine's last references went with _train's frame: free it before the next phase builds one
    while gc.collect():  # until nothing is left: freeing the engine's cycles (tensor finalizers) frees more
        pass
    get_accelerator().empty_cache()
    return record


def _train(run: Run) -> dict:
    """Build the engine, resume, train the epochs, finish (or stop), release the engine; the run's record."""
    phase = run.phase
    run.built = build_engine(phase, run.ctx, run.ds_cfg, run.steps_per_epoch)
    frozen_before = frozen_digest(run.built.engine.module)
    start_outputs(run)
    resume(run)
    record = None
    while record is None and run.state.epoch < phase.train_cfg.epochs:
        stats = train_epoch(run)
        if end_epoch(run, stats):
            record = {"phase": phase.name, "stage_index": phase.stage_index, "stopped_at_epoch": run.state.epoch}
    record = record or finish(run, frozen_before)
    # on success only (a failing rank's error line comes first, then its process ends): the engine goes before the
    # next phase of this process builds one (dist.release_engine), its cycles once this frame is gone (run_phase)
    engine, run.built = run.built.engine, None
    dist.release_engine(engine)
    return record


def prepare(target: Phase | PhasePlan, ctx: dist.DistContext, info: DataInfo) -> Run | dict:
    """The phase's plan (made here unless given: `checks.check_plan`) and what the run needs besides the engine; the
    saved record when the output is already complete."""
    plan = target if isinstance(target, PhasePlan) else None
    phase = plan.phase if plan else target
    if plan is None or (plan.world_size, plan.has_cuda) != (ctx.world_size, ctx.has_cuda):
        plan = check_plan(phase, info, ctx.world_size, ctx.has_cuda)
    elif plan.output_key != output_key(phase):  # its inputs resolved since (the meta model's sha256, the teacher)
        check_output(phase)
    if ckpt.complete(phase.out_dir):
        if ctx.is_main:
            print(f"{dist.log_prefix()} [dsincubate] {phase.label}: already complete in {phase.out_dir}, skipping")
        return json.loads((phase.out_dir / "run.json").read_text())
    mixup = build_mixup(phase.cfg.data, phase.num_classes, seed=phase.cfg.seed, rank=ctx.rank)
    return Run(phase, ctx, info, plan.ds_file, copy.deepcopy(plan.ds_cfg), plan.steps_per_epoch, mixup=mixup,
               criterion=_criterion(mixup, phase.cfg.data.smoothing),
               flops=accounting.count_flops(lambda: phase.build_model(load=False), phase.img_size))


def start_outputs(run: Run) -> None:
    phase, out = run.phase, run.phase.out_dir
    run.logger = accounting.MetricLogger(out, enabled=run.ctx.is_main)
    if run.ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        phase.cfg.save(out / "config.json")
        ckpt.atomic_write_json(out / "ds_config.json", run.ds_cfg)
        ckpt.atomic_write_json(out / "config_key.json", phase.config_key())


def resume(run: Run) -> None:
    found = ckpt.latest_resume_tag(run.ckpt_dir)
    if found:
        tag, _ = found
        damaged = UserError(f"{run.phase.label}: the checkpoint {run.ckpt_dir / tag} cannot be loaded (damaged or "
                            "incomplete); remove it to resume from an earlier one or start the phase again")
        try:
            path, client = run.built.engine.load_checkpoint(str(run.ckpt_dir), tag, load_module_strict=False)
        except (AssertionError, RuntimeError, OSError, KeyError, ValueError, EOFError) as e:
            raise damaged from e  # DeepSpeed asserts on missing files, torch raises on truncated ones
        if path is None or not client:  # or DeepSpeed only warns and returns nothing
            raise damaged
        run.state.load_state_dict(client)
        if run.ctx.is_main:
            print(f"{dist.log_prefix()} [dsincubate] {run.phase.label}: resumed from {run.ckpt_dir / tag} "
                  f"(epoch {run.state.epoch})")
    if run.ctx.is_main:  # epochs logged after the last checkpoint (a kill before it was saved) are trained again
        run.logger.truncate_after(run.state.epoch)
    run.prior_wall = run.state.wall_seconds  # earlier invocations' wall time: device-hours count every attempt


def train_epoch(run: Run) -> dict:
    """One epoch of training steps; returns the epoch's training metrics (loss read back every SYNC_EVERY steps)."""
    phase, ctx, state, engine = run.phase, run.ctx, run.state, run.built.engine
    tc, epoch, accum = phase.train_cfg, state.epoch, run.ds_cfg["gradient_accumulation_steps"]
    dist.seed_everything(phase.cfg.seed + 1_000_003 * (epoch + 1) + 7919 * ctx.rank)
    loader = run.train_loader(epoch, device=ctx.device)
    if run.mixup is not None:
        run.mixup.set_epoch(epoch)
    engine.train()
    # a progress bar only on a terminal: in SLURM/pdsh logs its carriage-return frames are unreadable; there rank 0
    # prints one line every log_every steps instead (_report)
    bar = accounting.progress(len(loader), f"{phase.label} {epoch + 1}/{tc.epochs}",
                              ctx.is_main and sys.stderr.isatty())
    log_every = phase.cfg.log_every
    # the loss stays on the device: reading it back every step would stall the host behind the accelerator, so the
    # finiteness check, progress bar and TensorBoard read it every SYNC_EVERY steps and at epoch end (before anything
    # is saved); a NaN poisons the running sum, so none is missed
    loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
    term_sums: dict[str, torch.Tensor] = {}  # the loss dict's other terms (moe_aux, m2mKD's ce/kl), summed likewise
    n_micro, t0, loss = 0, time.time(), None
    try:
        for images, targets in loader:
            losses = train_step(run, images, targets)
            loss = losses["loss"]
            loss_sum += loss.detach().double()
            for k, v in losses.items():
                if k != "loss":
                    term_sums[k] = term_sums.get(k, 0.0) + v.detach().double()
            n_micro += 1
            if n_micro % accum == 0:
                state.global_step += 1
            if n_micro % SYNC_EVERY == 0 or n_micro % log_every == 0:  # the same steps on every rank (collective)
                last = _check_finite(run, loss, loss_sum)
                elapsed = max(time.time() - t0, 1e-9)
                _report(run, bar, last, n_micro * images.shape[0] * ctx.world_size / elapsed,
                        line=bar is None and n_micro % log_every == 0, step=(n_micro, len(loader)), elapsed=elapsed)
            if bar is not None:
                bar.update(1)
        if n_micro:
            _check_finite(run, loss, loss_sum)
    finally:  # a bar left open would swallow the start of an error line
        if bar is not None:
            bar.close()
    seconds = time.time() - t0
    # one collective for the loss and its terms (every rank has the same terms: the phase and model decide them)
    names = sorted(term_sums)
    sums = torch.stack([loss_sum] + [term_sums[k].reshape(()) for k in names])
    means = (dist.all_reduce_sum(sums).cpu() / max(n_micro * ctx.world_size, 1)).tolist()
    state.epoch = epoch + 1
    state.data_stats = [loader.stats()]
    return {"epoch": epoch + 1, "train_loss": means[0], **{f"train_{k}": v for k, v in zip(names, means[1:])},
            "lr": run.built.scheduler.get_last_lr()[0], "epoch_seconds": seconds,
            "images_per_second": n_micro * tc.micro_batch * ctx.world_size / max(seconds, 1e-9)}


def train_step(run: Run, images: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Forward, the phase's loss, backward, step; returns the loss dict (on the device): "loss", the minimised
    total, and the phase's other terms (logged per epoch as train_<term>)."""
    ctx, engine = run.ctx, run.built.engine
    images, targets = images.to(ctx.device, non_blocking=True), targets.to(ctx.device, non_blocking=True)
    if run.mixup is not None:
        images, targets = run.mixup(images, targets)
    losses = run.phase.objective(engine.module, engine(images.to(run.dtype)), targets, run.criterion)
    engine.backward(losses["loss"])
    engine.step()
    run.state.images += images.shape[0] * ctx.world_size
    return losses


def end_epoch(run: Run, metrics: dict) -> bool:
    """Evaluate, log, checkpoint; True when the run stops here (stop_after_epochs) before the phase's end."""
    phase, ctx, state, tc = run.phase, run.ctx, run.state, run.phase.train_cfg
    if state.epoch % tc.eval_every == 0 or state.epoch == tc.epochs:
        val = build_val_loader(phase.cfg.data, run.info, batch_size=tc.micro_batch, rank=ctx.rank,
                               world_size=ctx.world_size, img_size=phase.img_size, device=ctx.device)
        metrics.update(accuracy(run.built.engine, val, ctx, run.dtype))
    state.history.append(metrics)
    run.logger.epoch(metrics, state.global_step)
    if ctx.is_main:
        print(f"{dist.log_prefix()} [dsincubate] {phase.label} epoch {state.epoch}/{tc.epochs}: " + ", ".join(
            f"{k} {v:.4g}" for k, v in metrics.items() if k not in ("epoch", "lr")))
    state.wall_seconds = run.prior_wall + (time.time() - run.t_start)
    run.epochs_this_run += 1
    stop_after = phase.cfg.stop_after_epochs
    stopping = bool(stop_after) and run.epochs_this_run >= stop_after and state.epoch < tc.epochs
    if state.epoch % tc.ckpt_every == 0 or stopping:
        _save_resume(run)
    if stopping:
        if ctx.is_main:
            print(f"{dist.log_prefix()} [dsincubate] {phase.label}: stopping after {run.epochs_this_run} epoch(s) "
                  f"as asked; run the same command again to resume")
        run.logger.close()
    return stopping


def finish(run: Run, frozen_before: str | None) -> dict:
    """Gather the trained weights, check the frozen ones, write the output, run.json and (last) the manifest."""
    phase, ctx, module = run.phase, run.ctx, run.built.engine.module
    trainable = phase.output_names(module)
    tensors = {name: _full_fp32(p) for name, p in module.named_parameters() if name in trainable}
    # buffers the phase outputs (a BatchNorm's running statistics; a ViT has none): never partitioned
    tensors.update({name: b.detach().cpu().clone().float() if b.is_floating_point() else b.detach().cpu().clone()
                    for name, b in module.named_buffers() if name in trainable})
    if moe.layers(module):  # every expert of every rank, under its global index (a collective)
        tensors = moe.gather_experts(tensors, phase.cfg.model.moe_ep_size)
    frozen = {"sha256_before": frozen_before, "sha256_after": frozen_digest(module)}
    if frozen["sha256_before"] != frozen["sha256_after"]:
        raise RuntimeError(f"{phase.label}: frozen parameters changed during training; refusing to save")
    wall = run.prior_wall + (time.time() - run.t_start)
    record = accounting.run_record(
        phase=phase, ds_cfg=run.ds_cfg, ds_file=run.ds_file, ctx=ctx, wall_seconds=wall, state=run.state,
        flops=run.flops, kernels=run.built.kernels, trainable=trainable, engine_module=module, info=run.info,
        frozen=frozen)
    record.update(process_started_at=PROCESS_STARTED_AT, started_at=run.t_start, ranks=_gather_hosts(run))
    record["finished_at"] = time.time()
    if ctx.is_main:
        files = phase.save_output(tensors) + ["run.json"]
        ckpt.atomic_write_json(phase.out_dir / "run.json", record)
        ckpt.write_manifest(phase.out_dir, files, {"phase": phase.name, "stage_index": phase.stage_index})
        top1 = record["final"].get("top1", float("nan"))
        print(f"{dist.log_prefix()} [dsincubate] {phase.label}: done in {wall:.1f}s; top1 {top1:.2f}")
    dist.barrier()
    run.logger.close()
    return record


# ---------------------------------------------------------------- helpers of the steps above

def _gather_hosts(run: Run) -> list[dict]:
    """Every rank's host record (this invocation's), in rank order (a collective)."""
    import torch.distributed as tdist

    mine = dict(dist.host_record(), started_at=run.t_start)
    if not (tdist.is_initialized() and run.ctx.world_size > 1):
        return [mine]
    out = [None] * run.ctx.world_size
    tdist.all_gather_object(out, mine)
    return out


def _eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _report(run: Run, bar, last: float, rate: float, line: bool = False, step=(0, 0), elapsed: float = 0.0) -> None:
    lr = run.built.scheduler.get_last_lr()[0]
    if bar is not None:
        bar.set_postfix(loss=f"{last:.3f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}")
    if line and run.ctx.is_main:
        done, total = step
        tc = run.phase.train_cfg
        per_step = elapsed / max(done, 1)
        left = (total - done) + (tc.epochs - run.state.epoch - 1) * total  # this epoch's rest + the later epochs'
        print(f"{dist.log_prefix()} [dsincubate] {run.phase.label} epoch {run.state.epoch + 1}/{tc.epochs} step "
              f"{done}/{total}: {rate:.1f} img/s, loss {last:.4f}, lr {lr:.3e}, ETA {_eta(left * per_step)}",
              flush=True)
    if run.ctx.is_main:
        run.logger.scalar("train/loss", last, run.state.global_step)
        run.logger.scalar("train/lr", lr, run.state.global_step)


def _check_finite(run: Run, loss: torch.Tensor, loss_sum: torch.Tensor) -> float:
    """The last step's loss as a float; stops the run when any loss on any rank since the epoch began was not
    finite (decided together, so no rank stops while the others wait in a collective)."""
    last, total = loss.item(), loss_sum.item()
    bad = torch.tensor([0.0 if math.isfinite(last) and math.isfinite(total) else 1.0], device=run.ctx.device)
    if dist.all_reduce_sum(bad).item() > 0:
        found = ckpt.latest_resume_tag(run.ckpt_dir)
        kept = f"the last complete checkpoint ({run.ckpt_dir / found[0]}) is kept" if found else "nothing was saved"
        raise UserError(f"{run.phase.label}: non-finite loss (last {last}) within the {SYNC_EVERY} steps before step "
                        f"{run.state.global_step} of epoch {run.state.epoch + 1}; {kept}; lower the learning rate")
    return last


def _criterion(mixup, smoothing: float):
    if mixup is not None:
        return SoftTargetCrossEntropy()
    return LabelSmoothingCrossEntropy(smoothing) if smoothing > 0 else torch.nn.CrossEntropyLoss()


def frozen_digest(module: torch.nn.Module) -> str | None:
    """sha256 over the frozen parameters as the engine holds them (gathered under ZeRO-3; a collective)."""
    import deepspeed

    frozen = [(n, p) for n, p in module.named_parameters() if not p.requires_grad]
    if not frozen:
        return None
    h = hashlib.sha256()
    with deepspeed.zero.GatheredParameters([p for _, p in frozen], modifier_rank=None):
        for name, p in frozen:
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def _full_fp32(param: torch.Tensor) -> torch.Tensor:
    """The full-precision master copy of a trainable parameter, gathered across ZeRO partitions (collective)."""
    from deepspeed.utils import safe_get_full_fp32_param

    full = safe_get_full_fp32_param(param)
    return (param.data if full is None else full).detach().float().cpu().clone()


def _save_resume(run: Run) -> None:
    state, ctx = run.state, run.ctx
    tag = ckpt.tag_for_epoch(state.epoch)
    run.built.engine.save_checkpoint(str(run.ckpt_dir), tag=tag, client_state=state.state_dict(),
                                     exclude_frozen_parameters=True)
    dist.barrier()
    if ctx.is_main:
        ckpt.atomic_write_json(run.ckpt_dir / tag / ckpt.MANIFEST, {"epoch": state.epoch, "step": state.global_step})
        ckpt.prune_resume_tags(run.ckpt_dir, run.phase.train_cfg.keep_checkpoints)
    dist.barrier()
