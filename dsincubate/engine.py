"""The one training loop, shared by every phase: DeepSpeed engine, train, evaluate, checkpoint/resume, accounting.

`run_phase(phase, cfg, ctx)` validates everything cheap first (data sources, ds_config, checkpoints the phase needs,
an existing output made with another config), then builds the phase's model, hands only its trainable parameters to
`deepspeed.initialize`, and trains with `engine.backward` / `engine.step`. Every epoch it evaluates top-1/top-5 on the
validation split; every `ckpt_every` epochs it saves a DeepSpeed checkpoint that a re-run of the same command resumes
from (the result equals an uninterrupted run: data order and augmentation are seeded per epoch). At the end it saves
the phase's model-only safetensors, `run.json` and, last, the `MANIFEST.json` that makes the output count.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import param_groups_weight_decay

from dsincubate import accounting, checkpoint as ckpt, dist, dsconfig
from dsincubate.config import RunConfig, TrainConfig
from dsincubate.data import DataInfo, build_mixup, build_train_loader, build_val_loader
from dsincubate.errors import UserError
from dsincubate.phases import Phase


class WarmupCosine:
    """LR factor per optimizer step: linear warmup from warmup_lr, then cosine from lr down to min_lr (DeiT, per step).

    A plain object (not a closure) so that LambdaLR's state_dict, saved in DeepSpeed checkpoints, round-trips.
    """

    def __init__(self, total_steps: int, warmup_steps: int, warmup_ratio: float, min_ratio: float):
        self.total, self.warmup, self.warmup_ratio, self.min_ratio = total_steps, warmup_steps, warmup_ratio, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.warmup_ratio + (1 - self.warmup_ratio) * step / self.warmup
        t = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def build_optimizer(model: torch.nn.Module, tc: TrainConfig, lr: float, ds_cfg: dict):
    nwd = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    groups = param_groups_weight_decay(model, tc.weight_decay, no_weight_decay_list=nwd)  # trainable params only
    if tc.optimizer == "adamw":
        if dsconfig.offloads_optimizer(ds_cfg):
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(groups, lr=lr, betas=tc.betas, adamw_mode=True)
        # torch's fused AdamW (CPU and CUDA) updates each tensor in one pass: the default foreach path allocates
        # full-size temporaries per step, which is what ran a 2-rank ZeRO-3 ViT-H fine-tune out of RAM.
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for g in groups for p in g["params"])
        return torch.optim.AdamW(groups, lr=lr, betas=tc.betas, fused=fused)
    if tc.optimizer == "lamb":
        if dsconfig.offloads_optimizer(ds_cfg):
            raise UserError("optimizer 'lamb' cannot be used with optimizer offload; use adamw or a ds_config without offload")
        from timm.optim import Lamb

        ds_cfg["zero_allow_untested_optimizer"] = True
        return Lamb(groups, lr=lr, betas=tc.betas)
    raise UserError(f"unknown optimizer {tc.optimizer!r} (adamw or lamb)")


SYNC_EVERY = 20  # training steps between host reads of the loss


def _check_finite(loss: torch.Tensor, loss_sum: torch.Tensor, phase: Phase, state: dict, ckpt_dir, ctx) -> float:
    """The last step's loss as a float; stops the run when any loss on any rank since the epoch began was not
    finite (decided together, so no rank stops while the others wait in a collective)."""
    last, total = loss.item(), loss_sum.item()
    bad = torch.tensor([0.0 if math.isfinite(last) and math.isfinite(total) else 1.0], device=ctx.device)
    if dist.all_reduce_sum(bad).item() > 0:
        found = ckpt.latest_resume_tag(ckpt_dir)
        kept = f"the last complete checkpoint ({ckpt_dir / found[0]}) is kept" if found else "nothing was saved"
        raise UserError(f"{phase.label}: non-finite loss (last {last}) within the {SYNC_EVERY} steps before step "
                        f"{state['global_step']} of epoch {state['epoch'] + 1}; {kept}; lower the learning rate")
    return last


def _criterion(mixup, smoothing: float):
    if mixup is not None:
        return SoftTargetCrossEntropy()
    if smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing)
    return torch.nn.CrossEntropyLoss()


def _check_output(phase: Phase) -> None:
    """Refuse to resume into (or overwrite) an output directory made with another config."""
    saved = phase.out_dir / "config_key.json"
    if saved.is_file():
        old = json.loads(saved.read_text())
        new = json.loads(json.dumps(phase.config_key(), default=str))
        if old != new:
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise UserError(f"{phase.out_dir} holds a {phase.label} run with another config (differs in: "
                            f"{', '.join(changed)}); use another --output")


def evaluate(engine, loader, ctx, dtype) -> dict:
    engine.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # loss, top1, top5, count
    with torch.no_grad():
        for images, targets, valid in loader:
            logits = engine(images.to(ctx.device, dtype)).float().cpu()
            targets, valid = targets.cpu(), valid.cpu().bool()
            loss = torch.nn.functional.cross_entropy(logits, targets.clamp(min=0), reduction="none")
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hit = top5 == targets[:, None]
            sums += torch.tensor([loss[valid].sum().item(), hit[valid, 0].sum().item(),
                                  hit[valid].any(1).sum().item(), valid.sum().item()], dtype=torch.float64)
    sums = dist.all_reduce_sum(sums.to(ctx.device)).cpu()
    n = max(sums[3].item(), 1.0)
    return {"val_loss": sums[0].item() / n, "top1": 100 * sums[1].item() / n, "top5": 100 * sums[2].item() / n,
            "val_samples": int(sums[3].item())}


def run_phase(phase: Phase, cfg: RunConfig, ctx: dist.DistContext, info: DataInfo) -> dict:
    """Train one phase to completion (or to `stop_after_epochs`); returns its run record."""
    import deepspeed

    tc = phase.train_cfg
    out = phase.out_dir
    phase.check_inputs()
    ds_file = dsconfig.find(cfg.ds_config, ctx.has_cuda)
    ds_cfg = dsconfig.resolve(dsconfig.load(ds_file), tc.micro_batch, tc.grad_accum, ctx.world_size, str(ds_file))
    _check_output(phase)
    if ckpt.complete(out):
        record = json.loads((out / "run.json").read_text())
        if ctx.is_main:
            print(f"[dsincubate] {phase.label}: already complete in {out}, skipping")
        return record
    dtype = dsconfig.precision(ds_cfg)
    accum = ds_cfg["gradient_accumulation_steps"]
    global_batch = ds_cfg["train_batch_size"]
    mixup = build_mixup(cfg.data, phase.num_classes, seed=cfg.seed, rank=ctx.rank)
    if mixup is not None and tc.micro_batch % 2:
        raise UserError(f"{phase.label}: mixup/cutmix need an even micro_batch (got {tc.micro_batch})")
    t_start = time.time()

    # ---- model, optimizer, schedule, engine ----
    dist.seed_everything(cfg.seed)
    model = phase.build_model(load=True)
    kernel_info = _apply_kernels(model, cfg.model.kernel_backend)
    if cfg.model.grad_checkpointing:
        model.set_grad_checkpointing(True)
    flops = accounting.count_flops(phase, cfg.model.img_size or phase.target_spec().kwargs["img_size"])
    lr_scale = global_batch / 512
    optimizer = build_optimizer(model, tc, tc.lr * lr_scale, ds_cfg)
    probe = build_train_loader(cfg.data, info, batch_size=tc.micro_batch, rank=ctx.rank, world_size=ctx.world_size,
                               epoch=0, seed=cfg.seed, img_size=_img_size(phase), subset_index=phase.module)
    micro_steps = len(probe)
    del probe
    if micro_steps < accum:
        raise UserError(f"{phase.label}: an epoch has {micro_steps} micro-batches per rank, fewer than gradient "
                        f"accumulation {accum}; lower micro_batch or use more data")
    steps_per_epoch = micro_steps // accum
    total_steps = steps_per_epoch * tc.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(
        total_steps, int(tc.warmup_epochs * steps_per_epoch), tc.warmup_lr / tc.lr, tc.min_lr / tc.lr))
    engine, optimizer, _, sched = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=sched,
                                                       config=ds_cfg)
    trainable = phase.output_names(engine.module)
    frozen_before = _frozen_digest(engine.module)

    # ---- outputs and resume ----
    logger = accounting.MetricLogger(out, enabled=ctx.is_main)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.json")
        ckpt.atomic_write_json(out / "ds_config.json", ds_cfg)
        ckpt.atomic_write_json(out / "config_key.json", phase.config_key())
    ckpt_dir = out / "checkpoints"
    state = {"epoch": 0, "global_step": 0, "images": 0, "wall_seconds": 0.0, "history": [], "data_stats": []}
    found = ckpt.latest_resume_tag(ckpt_dir)
    if found:
        tag, _ = found
        _, client = engine.load_checkpoint(str(ckpt_dir), tag, load_module_strict=False)
        state.update({k: client[k] for k in state if k in client})  # DeepSpeed adds keys of its own
        if ctx.is_main:
            print(f"[dsincubate] {phase.label}: resumed from {ckpt_dir / tag} (epoch {state['epoch']})")
    prior_wall = state["wall_seconds"]  # earlier invocations' wall time, so device-hours count every attempt
    criterion = _criterion(mixup, cfg.data.smoothing)
    epochs_this_run = 0

    # ---- the loop ----
    while state["epoch"] < tc.epochs:
        epoch = state["epoch"]
        dist.seed_everything(cfg.seed + 1_000_003 * (epoch + 1) + 7919 * ctx.rank)
        loader = build_train_loader(cfg.data, info, batch_size=tc.micro_batch, rank=ctx.rank,
                                    world_size=ctx.world_size, epoch=epoch, seed=cfg.seed, img_size=_img_size(phase),
                                    subset_index=phase.module, device=ctx.device)
        if mixup is not None:
            mixup.set_epoch(epoch)
        engine.train()
        bar = accounting.progress(len(loader), f"{phase.label} {epoch + 1}/{tc.epochs}", ctx.is_main)
        # the loss stays on the device: reading it back every step would stall the host behind the accelerator,
        # so the finiteness check, progress bar and TensorBoard read it every SYNC_EVERY steps and at epoch end
        # (before anything is saved); a NaN poisons the running sum, so none is missed
        loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
        n_micro, t0 = 0, time.time()
        try:
            for images, targets in loader:
                images, targets = images.to(ctx.device, non_blocking=True), targets.to(ctx.device, non_blocking=True)
                if mixup is not None:
                    images, targets = mixup(images, targets)
                output = engine(images.to(dtype))
                loss = phase.loss(output, targets, criterion)
                engine.backward(loss)
                engine.step()
                loss_sum += loss.detach().double()
                n_micro += 1
                state["images"] += images.shape[0] * ctx.world_size
                if n_micro % accum == 0:
                    state["global_step"] += 1
                if bar is not None:
                    bar.update(1)
                if n_micro % SYNC_EVERY == 0:
                    last = _check_finite(loss, loss_sum, phase, state, ckpt_dir, ctx)
                    if bar is not None:
                        rate = n_micro * images.shape[0] * ctx.world_size / max(time.time() - t0, 1e-9)
                        bar.set_postfix(loss=f"{last:.3f}", lr=f"{sched.get_last_lr()[0]:.2e}", img_s=f"{rate:.0f}")
                    if ctx.is_main:
                        logger.scalar("train/loss", last, state["global_step"])
                        logger.scalar("train/lr", sched.get_last_lr()[0], state["global_step"])
            if n_micro:
                _check_finite(loss, loss_sum, phase, state, ckpt_dir, ctx)
        finally:  # a bar left open would swallow the start of an error line
            if bar is not None:
                bar.close()
        train_loss = (dist.all_reduce_sum(loss_sum.reshape(1)).cpu() / max(n_micro * ctx.world_size, 1)).item()
        epoch_seconds = time.time() - t0
        state["epoch"] = epoch + 1
        metrics = {"epoch": epoch + 1, "train_loss": train_loss, "lr": sched.get_last_lr()[0],
                   "epoch_seconds": epoch_seconds,
                   "images_per_second": n_micro * tc.micro_batch * ctx.world_size / max(epoch_seconds, 1e-9)}
        if state["epoch"] % tc.eval_every == 0 or state["epoch"] == tc.epochs:
            val = build_val_loader(cfg.data, info, batch_size=tc.micro_batch, rank=ctx.rank,
                                   world_size=ctx.world_size, img_size=_img_size(phase), device=ctx.device)
            metrics.update(evaluate(engine, val, ctx, dtype))
        state["history"].append(metrics)
        state["data_stats"] = [loader.stats()]
        logger.epoch(metrics, state["global_step"])
        if ctx.is_main:
            print(f"[dsincubate] {phase.label} epoch {epoch + 1}/{tc.epochs}: " + ", ".join(
                f"{k} {v:.4g}" for k, v in metrics.items() if k not in ("epoch", "lr")))
        state["wall_seconds"] = prior_wall + (time.time() - t_start)
        epochs_this_run += 1
        stopping = cfg.stop_after_epochs and epochs_this_run >= cfg.stop_after_epochs and state["epoch"] < tc.epochs
        if state["epoch"] % tc.ckpt_every == 0 or stopping:
            _save_resume(engine, ckpt_dir, state, tc, ctx)
        if stopping:
            if ctx.is_main:
                print(f"[dsincubate] {phase.label}: stopping after {epochs_this_run} epoch(s) as asked; "
                      f"run the same command again to resume")
            logger.close()
            return {"phase": phase.name, "module": phase.module, "stopped_at_epoch": state["epoch"]}

    # ---- results ----
    tensors = {}
    for name, param in engine.module.named_parameters():
        if name in trainable:
            tensors[name] = _full_fp32(param)
    frozen = {"sha256_before": frozen_before, "sha256_after": _frozen_digest(engine.module)}
    if frozen["sha256_before"] != frozen["sha256_after"]:
        raise RuntimeError(f"{phase.label}: frozen parameters changed during training; refusing to save")
    wall = prior_wall + (time.time() - t_start)
    record = accounting.run_record(
        phase=phase, cfg=cfg, ds_cfg=ds_cfg, ds_file=ds_file, ctx=ctx, wall_seconds=wall, state=state, flops=flops,
        kernels=kernel_info, trainable=trainable, engine_module=engine.module, info=info, frozen=frozen)
    if ctx.is_main:
        files = phase.save_output(tensors)
        ckpt.atomic_write_json(out / "run.json", record)
        ckpt.write_manifest(out, files + ["run.json"], {"phase": phase.name, "module": phase.module})
        print(f"[dsincubate] {phase.label}: done in {wall:.1f}s; top1 {record['final'].get('top1', float('nan')):.2f}")
    dist.barrier()
    logger.close()
    return record


def _img_size(phase: Phase) -> int:
    return int(phase.target_spec().kwargs["img_size"])


def _frozen_digest(module: torch.nn.Module) -> str | None:
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


def _save_resume(engine, ckpt_dir: Path, state: dict, tc: TrainConfig, ctx) -> None:
    tag = ckpt.tag_for_epoch(state["epoch"])
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=dict(state), exclude_frozen_parameters=True)
    dist.barrier()
    if ctx.is_main:
        ckpt.atomic_write_json(ckpt_dir / tag / ckpt.MANIFEST, {"epoch": state["epoch"], "step": state["global_step"]})
        ckpt.prune_resume_tags(ckpt_dir, tc.keep_checkpoints)
    dist.barrier()


def _apply_kernels(model, backend: str) -> dict:
    if backend not in ("auto", "cuda", "torch"):
        raise UserError(f"model.kernel_backend {backend!r}: use auto, cuda or torch")
    if backend == "torch":  # timm's own modules, untouched
        return {"requested": "torch", "layernorm": "torch", "attention": "torch"}
    from dsincubate.ops import apply_kernel_backend

    return apply_kernel_backend(model, backend)
