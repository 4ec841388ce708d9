"""The model-family seam: what Deep Incubation needs from a model family, and the one registry of families.

The algorithm (`dsincubate.models.staged`, the phases, m2mKD, assembly, export, import, eval) never reads an
attribute of a particular architecture; it asks the spec's family (`family_of(spec)`), in the spirit of timm's
`forward_features` / `forward_head` split:

    family_of(x)                      the Family of a ModelSpec, a ModelConfig, a preset name or a built model
    fam.target_spec(cfg, n, dp)       the target's ModelSpec from the run's ModelConfig (bad fields: UserError)
    fam.meta_spec(cfg, target, dp)    the meta model's spec: K stages of `meta_depth_per_stage` blocks, matching the
                                      target's width and token/feature shape at every stage boundary
    fam.build(spec)                   the whole model (never pretrained weights)
    fam.depth(spec)                   blocks in all; fam.check_depths(spec, depths): may the target divide there?
    fam.divide(model, depths)         K `staged.Stage`s (embedding in stage 0, final norm + head in stage K-1)
    fam.stage_only(spec, depths, i)   stage i without keeping the rest of a whole model (ZeRO-3 incubation)
    fam.boundary_width(spec, i)       the width of stage i's output (i < K-1): where stitches are needed
    fam.boundary_shape(spec, i)       one sample's features there (`Boundary`): the decoupled baselines' heads
    fam.with_img_size(spec, size)     the spec at another resolution (a high-resolution fine-tune)
    fam.resample(tensors, spec, a, b) stage tensors moved from resolution a to b (position embeddings; else as is)
    fam.set_drop_path(blocks, rates)  stochastic depth per block; `drop_path_rates` gives the one schedule
    fam.init_weights_gathered(model)  the family's init replayed under ZeRO-3 (built inside `deferred_init`)
    fam.timm_native(spec)             whether timm.create_model(spec.timm_name) rebuilds it (else model.json does)
    fam.create_args(spec)             the builder's arguments an export records (timm.create_model's for a ViT)
    fam.input_size(model)             the image side a whole model was built for (a Stage: `input_size()`)
    fam.drop_path_units(block)        the modules with drop path in a block of division (a Swin stage: its blocks);
    fam.units(spec, a, b)             how many of them blocks a..b of division hold
    fam.classifier_name               the classifier's key prefix; block_prefix: the whole model's name of the
                                      blocks of division (`blocks`; a Swin: `layers`);
                                      default_num_stages / default_meta_depth: the paper's

Whole-model key names are the stages' keys with block indices made global and `blocks` named `fam.block_prefix`
(`staged.stage_to_timm_keys`). Adding a family: a module under `dsincubate/models/` with a Family
subclass registered in `_load()` below, and a recipe.
"""
from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from dsincubate.errors import UserError


@dataclass(frozen=True)
class ModelSpec:
    """Exactly what the family's builder is called with (for a ViT: `timm.create_model(timm_name, **kwargs)`)."""

    timm_name: str
    kwargs: dict = field(default_factory=dict)

    @property
    def depth(self) -> int:
        return family_of(self).depth(self)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelSpec":
        d = json.loads(text)
        return cls(d["timm_name"], dict(d["kwargs"]))

    def digest(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Boundary:
    """One sample's features at a stage boundary: a feature map `shape` = (channels, height, width), or tokens
    `shape` = (count, width) of which the last grid[0] x grid[1] are the image's patches in row-major order (the
    first ones: class/register tokens). Read by the decoupled baselines' auxiliary heads (`dsincubate.decoupled`)."""

    shape: tuple
    grid: tuple | None = None


def same_architecture(a: ModelSpec, b: ModelSpec) -> bool:
    """Equal up to regularisation (drop path differs between phases but not the weights' meaning)."""
    strip = lambda s: {k: v for k, v in s.kwargs.items() if k != "drop_path_rate"}  # noqa: E731
    return a.timm_name == b.timm_name and strip(a) == strip(b)


def drop_path_rates(rate: float, mode: str, total: int) -> list[float]:
    """Stochastic depth of each of `total` blocks: 'linear' (timm/DeiT: 0 at the first block rising to `rate`) or
    'uniform' (CaiT: `rate` everywhere; the paper's ViT-L/H E2E baselines). The one schedule of the project."""
    if mode == "uniform":
        return [rate] * total
    return [rate * k / (total - 1) if total > 1 else 0.0 for k in range(total)]


_DEFERRED: ContextVar[list | None] = ContextVar("dsincubate_deferred_init", default=None)


@contextmanager
def deferred_init():
    """Inside, `build` skips the family's weight initialisation and collects the models it builds (the yielded
    list); run `init_weights_gathered` on each afterwards. For building inside `deepspeed.zero.Init`, which partitions
    every submodule as soon as it is constructed: an initialisation at the end of the model's constructor would then
    write into empty shards (a silent no-op that leaves PyTorch's default init)."""
    built: list = []
    token = _DEFERRED.set(built)
    try:
        yield built
    finally:
        _DEFERRED.reset(token)


def deferring() -> list | None:
    """The list `deferred_init` collects into, or None outside it (for a family's `build`)."""
    return _DEFERRED.get()


class Family:
    """What the algorithm needs from a model family. Subclasses implement every method that raises here."""

    name = ""
    model_type: type = nn.Module  # the class `build` returns (how `family_of(model)` finds the family)
    classifier_name = "head"
    block_prefix = "blocks"
    default_num_stages = 4
    default_meta_depth = 1
    fallback = False  # True: the family of whatever no other family claims (the ViT)

    def owns_preset(self, preset: str) -> bool:
        raise NotImplementedError

    def owns_spec(self, spec: ModelSpec) -> bool:
        raise NotImplementedError

    def target_spec(self, cfg, num_classes: int | None = None, drop_path: float = 0.0) -> ModelSpec:
        raise NotImplementedError

    def meta_spec(self, cfg, target: ModelSpec, drop_path: float = 0.0) -> ModelSpec:
        raise NotImplementedError

    def build(self, spec: ModelSpec) -> nn.Module:
        raise NotImplementedError

    def depth(self, spec: ModelSpec) -> int:
        return int(spec.kwargs["depth"])

    def check_depths(self, spec: ModelSpec, depths: list[int]) -> None:
        """Raise UserError if the target cannot be divided at `depths` (any division fits by default)."""

    def divide(self, model: nn.Module, depths: list[int]) -> list:
        raise NotImplementedError

    def stage_only(self, spec: ModelSpec, depths: list[int], i: int):
        raise NotImplementedError

    def boundary_width(self, spec: ModelSpec, i: int) -> int:
        raise NotImplementedError

    def boundary_shape(self, spec: ModelSpec, i: int) -> Boundary:
        """One sample's features at stage i's output (i < K-1)."""
        raise NotImplementedError

    def with_img_size(self, spec: ModelSpec, size: int, where: str) -> ModelSpec:
        return ModelSpec(spec.timm_name, dict(spec.kwargs, img_size=size))

    def resample(self, tensors: dict, spec: ModelSpec, old_size: int, new_size: int) -> dict:
        return tensors  # nothing depends on the resolution

    def set_drop_path(self, blocks, rates: list[float]) -> None:
        raise NotImplementedError

    def drop_path_units(self, block: nn.Module) -> list:
        return [block]

    def units(self, spec: ModelSpec, start: int, stop: int) -> int:
        return stop - start

    def init_weights_gathered(self, model: nn.Module) -> None:
        raise NotImplementedError

    def timm_native(self, spec: ModelSpec) -> bool:
        return False

    def create_args(self, spec: ModelSpec) -> dict:
        """The builder's arguments recorded in an export's model.json (timm.create_model's for a timm family)."""
        return dict(spec.kwargs)

    def input_size(self, model: nn.Module) -> int:
        """The image side a whole model of this family was built for."""
        raise NotImplementedError


_FAMILIES: list[Family] = []


def register(family: Family) -> Family:
    _FAMILIES.append(family)
    return family


def _load() -> list[Family]:
    from dsincubate.models import resnet_cifar, swin, vit  # noqa: F401  (each registers itself; they import this)

    return sorted(_FAMILIES, key=lambda f: f.fallback)


def family_of(x) -> Family:
    """The family of a ModelSpec, a ModelConfig (its preset), a preset name or a built model."""
    families = _load()
    if isinstance(x, ModelSpec):
        found = [f for f in families if f.owns_spec(x)]
    elif isinstance(x, nn.Module):
        found = [f for f in families if isinstance(x, f.model_type)]
    else:
        preset = x if isinstance(x, str) else x.preset
        found = [f for f in families if f.owns_preset(preset)]
    if not found:
        raise UserError(f"no model family knows {getattr(x, 'preset', x)!r}")
    return found[0]


def target_spec(cfg, num_classes: int | None = None, drop_path: float = 0.0) -> ModelSpec:
    return family_of(cfg).target_spec(cfg, num_classes, drop_path)


def build(spec: ModelSpec) -> nn.Module:
    return family_of(spec).build(spec)


def stage_depths(cfg, spec: ModelSpec) -> list[int]:
    """Blocks per stage of the target: explicit, or an even split (earlier stages take the remainder)."""
    depth, k = spec.depth, cfg.num_stages
    if k < 1 or k > depth:
        raise UserError(f"K={k} stages does not fit a model of depth {depth} (need 1 <= K <= depth)")
    if cfg.stage_depths:
        if len(cfg.stage_depths) != k or sum(cfg.stage_depths) != depth or min(cfg.stage_depths) < 1:
            raise UserError(
                f"model.stage_depths={cfg.stage_depths} must be {k} positive numbers summing to depth {depth}"
            )
        depths = list(cfg.stage_depths)
    else:
        base, extra = divmod(depth, k)
        depths = [base + (1 if i < extra else 0) for i in range(k)]
    family_of(spec).check_depths(spec, depths)
    return depths


def split_stages(model: nn.Module, depths: list[int], stage_cls, n_blocks: int | None = None) -> list:
    """K stages `stage_cls(model, start, stop, first, last)` of `depths` blocks over the model's `n_blocks` blocks
    of division (default: `model.blocks`) (a family's `divide`)."""
    n = len(model.blocks) if n_blocks is None else n_blocks
    if sum(depths) != n:
        raise ValueError(f"stage depths {depths} do not sum to the model depth {n}")
    stages, start = [], 0
    for i, d in enumerate(depths):
        stages.append(stage_cls(model, start, start + d, first=i == 0, last=i == len(depths) - 1))
        start += d
    return stages


def build_staged(spec: ModelSpec, depths: list[int]):
    """The model of `spec` divided into stages of `depths` blocks: a `staged.StagedModel`."""
    from dsincubate.models import staged

    fam = family_of(spec)
    return staged.StagedModel(fam.divide(fam.build(spec), depths))


def apply_drop_path(spec: ModelSpec, stages, rate: float, mode: str, start: int = 0, total: int | None = None) -> None:
    """Set stochastic depth on the blocks of `stages`, which start at block `start` of a model of `total` blocks
    (default: they are the whole model); the schedule runs over the family's drop-path units."""
    fam = family_of(spec)
    units = [u for s in stages for b in s.blocks for u in fam.drop_path_units(b)]
    first = fam.units(spec, 0, start)
    rates = drop_path_rates(rate, mode, fam.units(spec, 0, total) if total is not None else len(units))
    fam.set_drop_path(units, rates[first:first + len(units)])


def init_weights_gathered(model: nn.Module) -> None:
    family_of(model).init_weights_gathered(model)


def classifier(model: nn.Module) -> nn.Module:
    """The final linear layer of a staged model (its last stage's) or a whole model (timm's `get_classifier`)."""
    return model.stages[-1].classifier() if hasattr(model, "stages") else model.get_classifier()


def input_size(model: nn.Module) -> int:
    """The image side the model was built for (a staged model: its first stage's)."""
    return model.stages[0].input_size() if hasattr(model, "stages") else family_of(model).input_size(model)


def gathered_init(params: list, fn) -> None:
    """Run `fn` (an initialisation writing `params`) on the parameters gathered under ZeRO-3, in fp32, rank 0's
    values kept and re-partitioned; the values are then rounded to the parameters' dtype (bf16 under bf16 ZeRO-3),
    as an unsharded build followed by DeepSpeed's cast gives."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        full = {p: p.data for p in params}
        for p in params:
            p.data = torch.empty(p.shape, dtype=torch.float32, device=full[p].device)
        try:
            fn()
        finally:
            for p in params:
                p.data = full[p].copy_(p.data.to(full[p].dtype))
