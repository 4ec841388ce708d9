"""Building a phase's DeepSpeed engine: the one place that turns a Phase and a ds_config into a training engine.

`build_engine(phase, ctx, ds_cfg, steps_per_epoch)` builds the phase's model (loading what earlier phases handed over;
under ZeRO-3 inside `deepspeed.zero.Init`, see `Phase.build_model_zero3`),
swaps in the fused kernels, hands only the trainable parameters to the optimizer, builds the per-step warmup + cosine
schedule and calls `deepspeed.initialize`. The training loop (`dsincubate.trainer`), `dsincubate tune` and the
benchmarks all call it, so the learning-rate rule (peak lr x global batch / 512, DeiT), the optimizer and the kernels
are the same everywhere.

    ds_file, ds_cfg = resolve_ds_config(phase, ctx.has_cuda, ctx.world_size)
    built = build_engine(phase, ctx, ds_cfg, steps_per_epoch=100)   # built.engine, built.optimizer, built.scheduler
"""
from __future__ import annotations

import fnmatch
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dsincubate import dist, dsconfig
from dsincubate.config import TrainConfig
from dsincubate.errors import UserError

LR_BASE_BATCH = 512  # DeiT: lr is given for a global batch of 512 and scaled linearly


def scaled_lr(lr: float, global_batch: int) -> float:
    return lr * global_batch / LR_BASE_BATCH


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


def param_groups(model: torch.nn.Module, weight_decay: float, no_weight_decay: set[str]) -> list[dict]:
    """timm's `param_groups_weight_decay` rule (trainable parameters only; no decay for 1-D tensors, biases and the
    model's `no_weight_decay` names), judged on each parameter's full shape: under ZeRO-3 a partitioned parameter is
    an empty 1-D placeholder (its shape is `ds_shape`), which timm's rule takes for a bias, so every weight of a model
    built inside `deepspeed.zero.Init` would lose its weight decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))
        skip = ndim <= 1 or name.endswith(".bias") or any(fnmatch.fnmatch(name, pat) for pat in no_weight_decay)
        (no_decay if skip or not weight_decay else decay).append(p)
    return [g for g in ({"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay})
            if g["params"]]


def build_optimizer(model: torch.nn.Module, tc: TrainConfig, lr: float, ds_cfg: dict):
    nwd = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    groups = param_groups(model, tc.weight_decay, set(nwd))
    if any(getattr(p, "allreduce", True) is False for g in groups for p in g["params"]):
        # a V-MoE: expert parameters go into their own groups (reduced over the expert-data-parallel group, not
        # the whole world), as DeepSpeed's MoE engine and ZeRO expect
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        for i, g in enumerate(groups):
            g["name"] = f"group{i}"
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    if tc.optimizer == "adamw":
        if dsconfig.offloads_optimizer(ds_cfg):
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(groups, lr=lr, betas=tc.betas, adamw_mode=True)
        # torch's fused AdamW (CPU and CUDA) updates each tensor in one pass: the default foreach path allocates
        # full-size temporaries per step, which is what ran a 2-rank ZeRO-3 ViT-H fine-tune out of RAM.
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for g in groups for p in g["params"])
        return torch.optim.AdamW(groups, lr=lr, betas=tc.betas, fused=fused)
    if tc.optimizer == "lamb":
        # LAMB's trust ratios are per tensor: under ZeRO >= 1 it would get flat shards (refused, whoever calls this)
        dsconfig.check_optimizer("lamb", ds_cfg, "the ds_config", "optimizer")
        from timm.optim import Lamb

        return Lamb(groups, lr=lr, betas=tc.betas)
    if tc.optimizer == "sgd":
        # elementwise (momentum buffer, L2 decay per group), so a ZeRO shard is updated as its tensors would be
        dsconfig.check_optimizer("sgd", ds_cfg, "the ds_config", "optimizer")
        return torch.optim.SGD(groups, lr=lr, momentum=tc.momentum, nesterov=tc.momentum > 0)
    raise UserError(f"unknown optimizer {tc.optimizer!r} (adamw, lamb or sgd)")


def apply_kernels(model, backend: str) -> dict:
    """Swap timm's LayerNorm/attention for the csrc kernels where they pass their self-check; the choice made."""
    if backend == "torch":  # timm's own modules, untouched
        return {"requested": "torch", "layernorm": "torch", "attention": "torch"}
    from dsincubate.ops import apply_kernel_backend

    return apply_kernel_backend(model, backend)


def target_params(phase) -> int | None:
    """Parameters of the phase's target model, counted on the meta device (no memory, no init); None for a V-MoE."""
    if phase.cfg.model.moe_every:
        return None
    return _count_params(phase.target_spec(0.0).to_json())


@functools.lru_cache(maxsize=16)
def _count_params(spec_json: str) -> int:
    from dsincubate.models import family

    with torch.device("meta"):
        model = family.build(family.ModelSpec.from_json(spec_json))
    return sum(p.numel() for p in model.parameters())


def device_memory(has_cuda: bool) -> int | None:
    if not has_cuda:
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory


def resolve_ds_config(phase, has_cuda: bool, world_size: int, device_bytes: int | None = None) -> tuple[Path, dict]:
    """The ds_config file of the phase and the dict handed to `deepspeed.initialize` (recipe keys filled in).

    `ds_config=auto` is chosen here per phase (`dsconfig.choose`: the phase's optimizer, the target's parameter
    count, the world size and `device_bytes`, by default this host's GPU memory); a named one is taken as it is.
    LAMB under a ZeRO >= 1 ds_config is refused here, so before anything starts (the CLI's checks call this)."""
    tc, name = phase.train_cfg, phase.cfg.ds_config
    if name == "auto":
        n_params = None
        if has_cuda and tc.optimizer != "lamb":  # the only case the model's size and the devices decide
            n_params = target_params(phase)
            device_bytes = device_bytes or device_memory(has_cuda)
        name = dsconfig.choose(has_cuda, tc.optimizer, n_params, world_size, device_bytes,
                               moe=bool(phase.cfg.model.moe_every))
    ds_file = dsconfig.find(name, has_cuda)
    base = dsconfig.load(ds_file)
    dsconfig.check_optimizer(tc.optimizer, base, f"ds_config {ds_file.stem}", f"{phase.name}.optimizer")
    ds_cfg = dsconfig.resolve(base, tc.micro_batch, tc.grad_accum, world_size, str(ds_file),
                              clip_grad=tc.clip_grad, grad_reduce_dtype=phase.cfg.grad_reduce_dtype)
    if tc.optimizer == "sgd" and dsconfig.zero_stage(ds_cfg) >= 1:  # DeepSpeed lists Adam-type optimizers only
        ds_cfg["zero_allow_untested_optimizer"] = True
    return ds_file, ds_cfg


@dataclass
class Built:
    """What `build_engine` returns."""

    engine: object
    optimizer: object
    scheduler: object
    kernels: dict = field(default_factory=dict)


def build_engine(phase, ctx: dist.DistContext, ds_cfg: dict, steps_per_epoch: int | None = None,
                 load: bool = True) -> Built:
    """The phase's model, kernels, optimizer (trainable parameters only) and schedule inside a DeepSpeed engine.

    `steps_per_epoch` sets the warmup + cosine schedule over the phase's epochs; None = a constant peak lr (tune and
    the benchmarks, which time steps, not schedules). `load=False` skips loading earlier phases' weights.
    """
    import deepspeed

    from dsincubate.models import moe

    tc, cfg = phase.train_cfg, phase.cfg
    dist.seed_everything(cfg.seed)
    with moe.expert_parallel(cfg.model.moe_ep_size if cfg.model.moe_every else 1):  # a V-MoE's local experts
        if dsconfig.zero_stage(ds_cfg) == 3:  # partitioned while it is built: no rank holds the whole model
            model = phase.build_model_zero3(ds_cfg, load=load)
        else:
            model = phase.build_model(load=load)
    kernels = apply_kernels(model, cfg.model.kernel_backend)
    if cfg.model.grad_checkpointing:
        model.set_grad_checkpointing(True)
    optimizer = build_optimizer(model, tc, scaled_lr(tc.lr, ds_cfg["train_batch_size"]), ds_cfg)
    scheduler = None
    if steps_per_epoch is not None:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(
            steps_per_epoch * tc.epochs, int(tc.warmup_epochs * steps_per_epoch), tc.warmup_lr / tc.lr,
            tc.min_lr / tc.lr))
    if not ds_cfg.get("torch_autocast", {}).get("enabled"):
        # DeepSpeed keeps "torch_autocast was initialised" in a module global once any engine used it; ZeRO engines
        # built later in the same process (a pipeline's next phase) would then reduce each gradient in its
        # parameter's dtype and ignore communication_data_type
        from deepspeed.runtime import torch_autocast

        torch_autocast.TORCH_AUTOCAST_INITIALIZED = False
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                           config=ds_cfg)
    if moe.layers(model):
        moe.check_layout(cfg.model.moe_ep_size)
    return Built(engine, optimizer, scheduler, kernels)
