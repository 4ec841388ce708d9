"""DeepSpeed configs: find a `ds_configs/*.json`, check it, and fill in what the recipe owns.

The JSON holds engine concerns only (ZeRO stage, precision, offload, clipping, communication, activation
checkpointing options). Batch sizes, optimizer and scheduler belong to the recipe (`TrainConfig`) and are filled in
here; a JSON that sets them is rejected, and a key set in both places (gradient accumulation) is an error, so there
is never a question of which one won.

`ds_config=auto` (the default) picks the file per phase (`choose`), from the phase's optimizer, the target model's
size and the devices:
- no CUDA: `cpu` (ZeRO-0, fp32).
- LAMB: `zero0_autocast_bf16` (ZeRO-0, fp32 weights, gradients and optimizer state, bf16 compute through
  `torch.autocast`). Under ZeRO >= 1 DeepSpeed hands the optimizer one flat fp32 shard per parameter group, so LAMB's
  per-tensor trust ratios and its global gradient-norm clip would be computed over a rank's shard: `check_optimizer`
  refuses LAMB with any ZeRO stage >= 1. Under ZeRO-0 the optimizer gets the original tensors (fp32 ones, or with
  `bf16.enabled` DeepSpeed's unfused wrapper's per-tensor fp32 copies) and every rank holds all gradients.
- otherwise the lowest ZeRO stage whose model states fit in half a device (the other half is for activations,
  communication buckets and fragmentation), with P parameters, N ranks and bf16 weights (bytes per rank, Adam-type
  optimizer: 2 weights + 2 gradients + 12 fp32 master weights and two moments = 16 per parameter, ZeRO paper):
  ZeRO-2 `2P + 14P/N` (`zero2_bf16`; its reduce-scatter + all-gather move as much as one all-reduce), else ZeRO-3
  `16P/N` (`zero3_bf16`, which all-gathers every layer's weights in forward and backward), else `zero3_offload`.
  A V-MoE stays at ZeRO-2 (DeepSpeed's MoE layers do not support ZeRO-3). ViT-B/L/H (86.6/304/632 M) on
  8 x 80 GB: ZeRO-2 (632 M: 2.4 GB of model states per rank).
A ds_config named by the user (`--ds-config`, `--set ds_config=...`) always wins; LAMB under a ZeRO >= 1 file is then
refused in one line before anything starts.

The run config's `grad_reduce_dtype` (`fp32`: reduce gradients in fp32 although the model computes in bf16) is filled
in as DeepSpeed's `communication_data_type` (honoured by ZeRO-1/2/3 and the ZeRO-0 all-reduce); setting it in both
places is an error.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

from dsincubate.errors import UserError

import sys

CONFIG_DIR = Path(__file__).resolve().parent.parent / "ds_configs"  # a source checkout / editable install
if not CONFIG_DIR.is_dir():
    CONFIG_DIR = Path(sys.prefix) / "share" / "dsincubate" / "ds_configs"  # a wheel install (setup.py data_files)
RECIPE_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "optimizer", "scheduler")
_KNOWN_TOP = {
    "gradient_accumulation_steps", "gradient_clipping", "bf16", "fp16", "zero_optimization", "activation_checkpointing",
    "communication_data_type", "prescale_gradients", "gradient_predivide_factor", "steps_per_print",
    "wall_clock_breakdown", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "flops_profiler",
    "comms_logger", "seq_parallel_communication_data_type", "data_types", "dump_state", "memory_breakdown",
    "tensorboard", "checkpoint", "aio", "torch_autocast", "autotuning",
    "sparse_gradients", "amp", "elasticity", "compile",
}


def find(name: str, has_cuda: bool) -> Path:
    """The file of a ds_config name or path; 'auto' here is the run-wide default (evaluation's precision): training
    phases resolve 'auto' per phase with `choose`."""
    if name == "auto":
        name = "zero2_bf16" if has_cuda else "cpu"
    path = Path(name)
    if not path.suffix:
        path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))
        raise UserError(f"ds_config {name!r} not found (shipped: {shipped})")
    return path


def load(path: Path) -> dict:
    try:
        cfg = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"ds_config {path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    validate(cfg, str(path))
    return cfg


def validate(cfg: dict, where: str) -> None:
    if not isinstance(cfg, dict):
        raise UserError(f"ds_config {where}: expected a JSON object")
    for key in RECIPE_KEYS:
        if key in cfg:
            raise UserError(f"ds_config {where}: {key!r} belongs to the recipe (set it in the run config), not the "
                            "ds_config")
    unknown = set(cfg) - _KNOWN_TOP
    if unknown:
        raise UserError(f"ds_config {where}: unknown key(s) {sorted(unknown)}")
    zero = cfg.get("zero_optimization", {})
    if not isinstance(zero, dict) or zero.get("stage", 0) not in (0, 1, 2, 3):
        raise UserError(f"ds_config {where}: zero_optimization.stage must be 0, 1, 2 or 3")
    for key in ("bf16", "fp16", "activation_checkpointing"):
        if key in cfg and not isinstance(cfg[key], dict):
            raise UserError(f"ds_config {where}: {key!r} must be an object like {{\"enabled\": true}}")
    if cfg.get("bf16", {}).get("enabled") and cfg.get("fp16", {}).get("enabled"):
        raise UserError(f"ds_config {where}: bf16 and fp16 are both enabled")
    clip = cfg.get("gradient_clipping", 0.0)
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip >= 0:
        raise UserError(f"ds_config {where}: gradient_clipping must be a number >= 0 (got {clip!r})")
    ga = cfg.get("gradient_accumulation_steps", 1)
    if not isinstance(ga, int) or ga < 1:
        raise UserError(f"ds_config {where}: gradient_accumulation_steps must be a positive integer")


def resolve(base: dict, micro_batch: int, grad_accum: int | None, world_size: int, where: str,
            clip_grad: float | None = None, grad_reduce_dtype: str = "auto") -> dict:
    """The ds_config handed to `deepspeed.initialize`: the file's engine keys plus the recipe's batch sizes, gradient
    clipping and gradient-reduction dtype (a key set in both the file and the run config is an error, never a silent
    override)."""
    cfg = copy.deepcopy(base)
    if grad_reduce_dtype != "auto":
        if "communication_data_type" in cfg:
            raise UserError(f"the gradient-reduction dtype is set both in {where} (communication_data_type="
                            f"{cfg['communication_data_type']}) and in the run config (grad_reduce_dtype="
                            f"{grad_reduce_dtype}); set it in one place")
        cfg["communication_data_type"] = grad_reduce_dtype
    if clip_grad is not None:
        if cfg.get("gradient_clipping"):
            raise UserError(f"gradient clipping is set both in {where} ({cfg['gradient_clipping']}) and in the run "
                            f"config (clip_grad={clip_grad}); set it in one place")
        cfg["gradient_clipping"] = float(clip_grad)
    else:
        # clip_grad=None means no clipping; DeepSpeed 0.19.8 clips at 1.0 when the key is absent
        # (GRADIENT_CLIPPING_DEFAULT), so "off" has to be written out
        cfg.setdefault("gradient_clipping", 0.0)
    if grad_accum and "gradient_accumulation_steps" in cfg:
        raise UserError(
            f"gradient accumulation is set both in {where} ({cfg['gradient_accumulation_steps']}) and in the run "
            f"config ({grad_accum}); set it in one place"
        )
    if micro_batch < 1:
        raise UserError("micro_batch must be >= 1")
    accum = grad_accum or cfg.get("gradient_accumulation_steps", 1)
    cfg["gradient_accumulation_steps"] = accum
    cfg["train_micro_batch_size_per_gpu"] = micro_batch
    cfg["train_batch_size"] = micro_batch * accum * world_size
    cfg.setdefault("steps_per_print", 10**9)  # our own progress bar and logs report progress
    check_with_deepspeed(cfg, where)
    return cfg


_SECTION_OF_MODEL = {"DeepSpeedZeroConfig": "zero_optimization",
                     "DeepSpeedZeroOffloadParamConfig": "zero_optimization.offload_param",
                     "DeepSpeedZeroOffloadOptimizerConfig": "zero_optimization.offload_optimizer",
                     "DeepSpeedBF16Config": "bf16", "DeepSpeedFP16Config": "fp16"}


def check_with_deepspeed(cfg: dict, where: str) -> None:
    """Build DeepSpeed's own config object from `cfg` (no process group needed: it then assumes one rank, so the
    batch size is checked per rank), so a key or value DeepSpeed would refuse at `initialize` is refused here, in
    one line naming the key. Its pydantic models forbid unknown keys, which catches typos inside sections."""
    import logging

    import pydantic
    from deepspeed.runtime.config import DeepSpeedConfig, DeepSpeedConfigError

    import torch.distributed as tdist

    # DeepSpeedConfig checks the batch against the process group's world size once one exists (the trainer resolves
    # the ds_config again after init): a probe sized for one rank was refused on every multi-rank run
    ranks = tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1
    probe = dict(cfg, train_batch_size=cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"]
                 * ranks)
    log = logging.getLogger("DeepSpeed")
    level = log.level
    log.setLevel(logging.WARNING)  # its constructor logs INFO lines about the world size
    try:
        DeepSpeedConfig(probe)
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        key = ".".join([_SECTION_OF_MODEL.get(e.title, e.title)] + [str(x) for x in err["loc"]])
        raise UserError(f"ds_config {where}: {key}: {err['msg']} (got {err.get('input')!r})") from None
    except (DeepSpeedConfigError, AssertionError, ValueError, KeyError, TypeError, AttributeError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"ds_config {where}: DeepSpeed refuses it: {why}") from None
    finally:
        log.setLevel(level)


def precision(cfg: dict):
    """The weights' dtype, which inputs are cast to (fp32 under torch_autocast: autocast casts inside the engine)."""
    import torch

    if cfg.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if cfg.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


def compute_dtype(cfg: dict):
    """The dtype the matmuls run in: `precision` (the weights' and inputs' dtype), or torch_autocast's dtype."""
    import torch

    ac = cfg.get("torch_autocast", {})
    if isinstance(ac, dict) and ac.get("enabled"):
        return {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
                "fp16": torch.float16}.get(str(ac.get("dtype", "bfloat16")).removeprefix("torch."), torch.bfloat16)
    return precision(cfg)


def offloads_optimizer(cfg: dict) -> bool:
    off = cfg.get("zero_optimization", {}).get("offload_optimizer", {})
    return isinstance(off, dict) and off.get("device", "none") not in ("none", None)


def zero_stage(cfg: dict) -> int:
    return int(cfg.get("zero_optimization", {}).get("stage", 0))


# Bytes per parameter of mixed-precision training with an Adam-type optimizer (ZeRO paper, Sec. 3.1): bf16 weights
# and gradients, and fp32 master weights + two moments (12) in the optimizer.
WEIGHT_BYTES, GRAD_BYTES, OPTIM_BYTES = 2, 2, 12
STATE_FRACTION = 0.5  # of a device's memory for model states; the rest for activations, buckets, fragmentation


def model_state_bytes(n_params: int, stage: int, world_size: int) -> float:
    """Bytes of weights + gradients + optimizer state per rank under a ZeRO stage (bf16 training)."""
    n = max(1, world_size)
    w, g, o = WEIGHT_BYTES * n_params, GRAD_BYTES * n_params, OPTIM_BYTES * n_params
    return {0: w + g + o, 1: w + g + o / n, 2: w + (g + o) / n, 3: (w + g + o) / n}[stage]


def choose(has_cuda: bool, optimizer: str, n_params: int | None, world_size: int, device_bytes: int | None,
           moe: bool = False) -> str:
    """The shipped ds_config 'auto' stands for in a phase (the rule is the module docstring's)."""
    if not has_cuda:
        return "cpu"
    if optimizer == "lamb":
        return "zero0_autocast_bf16"
    if moe or n_params is None or not device_bytes:
        return "zero2_bf16"
    budget = STATE_FRACTION * device_bytes
    if model_state_bytes(n_params, 2, world_size) <= budget:
        return "zero2_bf16"
    if model_state_bytes(n_params, 3, world_size) <= budget:
        return "zero3_bf16"
    return "zero3_offload"


def check_optimizer(optimizer: str, cfg: dict, where: str, field: str) -> None:
    """Refuse an optimizer that cannot be itself under this ds_config (one line naming the field)."""
    if optimizer == "sgd":  # elementwise: right on ZeRO shards, but DeepSpeed's offload steps its own CPU Adam
        if offloads_optimizer(cfg):
            raise UserError(f"{field}=sgd cannot be used with optimizer offload ({where}): DeepSpeed's offload runs "
                            "its own CPU Adam; use adamw or a ds_config without offload")
        if zero_stage(cfg) >= 1 and cfg.get("zero_allow_untested_optimizer") is False:
            raise UserError(f"{field}=sgd under ZeRO stage {zero_stage(cfg)} needs zero_allow_untested_optimizer "
                            f"(DeepSpeed lists Adam-type optimizers only); {where} sets it false")
        return
    if optimizer != "lamb":
        return
    stage = zero_stage(cfg)
    if stage >= 1:
        raise UserError(f"{field}=lamb cannot run under ZeRO stage {stage} ({where}): DeepSpeed hands the optimizer "
                        "flat shards, so LAMB's per-tensor trust ratios would be wrong; use ds_config=auto (ZeRO-0 for "
                        "LAMB phases), a ZeRO-0 ds_config, or adamw")
    if offloads_optimizer(cfg):
        raise UserError(f"{field}=lamb cannot be used with optimizer offload ({where}); use adamw or a ds_config "
                        "without offload")
