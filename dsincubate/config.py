"""Typed run configuration: model, per-phase training recipe, data, engine.

A run is described by one `RunConfig`. Recipes (`dsincubate.recipes`) build it; the command line overrides single
fields with `--set section.field=value`; the resolved config is saved next to every phase's output as `config.json`,
and `RunConfig.from_dict` reads it back (so `--config out/config.json` repeats a run exactly).

Engine concerns (ZeRO stage, precision, offload, clipping, communication) live in `ds_configs/*.json`, not here; see
`dsincubate.dsconfig` for how the two are merged.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Any

from dsincubate.data import DataConfig
from dsincubate.errors import UserError


@dataclass
class ModelConfig:
    """The target model and how it is divided."""

    preset: str = "tiny"
    """A preset name (see `dsincubate.models.vit.PRESETS`) or any timm VisionTransformer name."""
    depth: int = 0
    """Override the number of blocks (0 keeps the preset's)."""
    embed_dim: int = 0
    """Override the width (0 keeps the preset's)."""
    num_heads: int = 0
    """Override the number of attention heads (0 keeps the preset's)."""
    img_size: int = 0
    """Override the input resolution (0 keeps the preset's)."""
    patch_size: int = 0
    """Override the patch size (0 keeps the preset's)."""
    num_classes: int = 0
    """Number of classes (0 = taken from the dataset)."""
    num_stages: int = 4
    """K, the number of modules the target is divided into (paper default 4)."""
    stage_depths: list[int] = field(default_factory=list)
    """Explicit blocks per stage, summing to the depth; empty = even split."""
    meta_depth_per_stage: int = 1
    """Blocks per stage of the meta model (paper: 1, the shallowest possible)."""
    kernel_backend: str = "auto"
    """'auto' (fused csrc kernels where they pass their self-check), 'cuda' or 'torch' (PyTorch references)."""
    grad_checkpointing: bool = False
    """Recompute each block's activations in backward (needed for ViT-H at useful batch sizes)."""


@dataclass
class TrainConfig:
    """The recipe of one training phase (DeiT defaults, paper Sec. 4)."""

    epochs: int = 10
    """Epochs of this phase (an epoch is the data config's samples per epoch)."""
    micro_batch: int = 64
    """Micro-batch per rank; the global batch is micro_batch x grad_accum x world size."""
    grad_accum: int = 0
    """Gradient accumulation steps; 0 = take it from the ds_config (or 1). Setting it in both places is an error."""
    optimizer: str = "adamw"
    """'adamw' or 'lamb' (the paper's large-model E2E baselines use LAMB)."""
    lr: float = 5e-4
    """Peak learning rate for a global batch of 512; scaled linearly by global batch / 512 (DeiT)."""
    min_lr: float = 1e-5
    """Floor of the cosine schedule (scaled like lr)."""
    warmup_epochs: float = 5.0
    """Linear warmup length in epochs (0 for fine-tuning, as in the paper)."""
    warmup_lr: float = 1e-6
    """Learning rate at the start of warmup (scaled like lr)."""
    weight_decay: float = 0.05
    """AdamW/LAMB weight decay; biases, norms, class token and position embedding get none."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    drop_path: float = 0.1
    """Stochastic depth rate of the trained model (target: 0.1 ViT-B, 0.5 ViT-L, 0.6 ViT-H in the paper)."""
    imitation: bool = False
    """Incubation only: train by Module Imitation (L1 to the meta stage's output) instead of Module Incubation."""
    eval_every: int = 1
    """Evaluate every N epochs (and always after the last)."""
    ckpt_every: int = 1
    """Save a resumable checkpoint every N epochs (and always after the last)."""
    keep_checkpoints: int = 2
    """Resumable checkpoints to keep per phase."""


@dataclass
class RunConfig:
    """Everything a pipeline run needs; one per output directory."""

    name: str = "demo"
    """Recipe name, for the record."""
    seed: int = 0
    """Seed for initialisation, data order and augmentation."""
    ds_config: str = "auto"
    """A file in ds_configs/ (name or path); 'auto' = zero2_bf16 with CUDA, cpu without."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    meta: TrainConfig = field(default_factory=TrainConfig)
    """Pre-training of the meta model."""
    incubate: TrainConfig = field(default_factory=TrainConfig)
    """Training of each target module inside the frozen meta model."""
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(warmup_epochs=0.0))
    """Fine-tuning of the assembled model (no warmup)."""
    e2e: TrainConfig = field(default_factory=TrainConfig)
    """The end-to-end baseline."""
    stop_after_epochs: int = 0
    """Stop each phase after this many epochs in one invocation (0 = run to the end); the next invocation resumes.
    For time-limited or preemptible jobs."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        return _from_dict(cls, d, "")

    def save(self, path) -> None:
        from dsincubate.checkpoint import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True))

    def train_config(self, phase: str) -> TrainConfig:
        return getattr(self, phase)


def _from_dict(cls, d: dict[str, Any], where: str):
    if not isinstance(d, dict):
        raise UserError(f"config{where}: expected an object, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise UserError(f"config{where}: unknown field(s) {sorted(unknown)}")
    kwargs = {}
    for key, value in d.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _from_dict(hint, value, f"{where}.{key}")
        else:
            kwargs[key] = _coerce(value, hint, f"{where}.{key}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    try:
        if origin in (list, tuple):
            if isinstance(value, str):
                value = [v for v in value.split(",") if v.strip()]
            (inner, *_) = typing.get_args(hint) or (str,)
            items = [_coerce(v, inner, where) for v in value]
            return tuple(items) if origin is tuple else items
        if hint is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if hint in (int, float, str):
            if hint is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return hint(value)
    except (TypeError, ValueError):
        raise UserError(f"config{where}: cannot read {value!r} as {getattr(hint, '__name__', hint)}") from None
    return value


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply `section.field=value` overrides (e.g. `incubate.epochs=3`, `model.stage_depths=2,4,4,2`)."""
    d = cfg.to_dict()
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected key=value")
        key, value = item.split("=", 1)
        node = d
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise UserError(f"--set {key}: no such section {part!r}")
            node = node[part]
        if parts[-1] not in node:
            raise UserError(f"--set {key}: no such field {parts[-1]!r}")
        node[parts[-1]] = value
    return RunConfig.from_dict(d)


def config_lines(cls) -> list[str]:
    """Field documentation, for `dsincubate config --help-fields`."""
    import ast
    import inspect

    src = inspect.getsource(cls)
    tree = ast.parse(src).body[0]
    lines, last = [], None
    for node in tree.body:
        if isinstance(node, ast.AnnAssign):
            last = node.target.id
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and last:
            lines.append(f"{cls.__name__}.{last}: {' '.join(node.value.value.split())}")
            last = None
    return lines
