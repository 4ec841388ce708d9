"""The ViT family (timm's VisionTransformer): specs, presets, build, and its side of the seam in `family.py`.

A `ModelSpec` here is the JSON-serialisable recipe for `timm.create_model(timm_name, **kwargs)`; it travels inside
every checkpoint so that a stage file, the meta model and the exported model can be checked against each other and
rebuilt anywhere. `target_spec(cfg)` / `meta_spec(cfg)` derive the two specs of a run; `build(spec)` creates the
model (never with pretrained weights: nothing is downloaded). `ViTStage` / `divide` split a VisionTransformer into
stages (stage 0 owns the patch embedding, class token and position embedding, the last stage the final norm and the
head; their forwards call timm's own `_pos_embed` and `pool`, so the composition is exactly timm's forward).
"""
from __future__ import annotations

import timm
import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer

from dsincubate.config import ModelConfig, parse_deit_t
from dsincubate.errors import UserError
from dsincubate.models import family, staged
from dsincubate.models.family import ModelSpec

# name -> (timm architecture, overrides). Paper models: Tab. 1 (ViT-B/L/H), Tab. 6 (ViT-B-DN: depth 24, width 540,
# FLOPs of ViT-B), Sec. 4.2 (DeiT-Tiny of depth N on CIFAR-size images).
PRESETS: dict[str, tuple[str, dict]] = {
    "tiny": ("vit_tiny_patch16_224",
             dict(img_size=32, patch_size=4, embed_dim=96, depth=8, num_heads=3, num_classes=10)),
    "vit_b16": ("vit_base_patch16_224", {}),
    "vit_l16": ("vit_large_patch16_224", {}),
    "vit_h14": ("vit_huge_patch14_224", {}),
    "vit_b_dn": ("vit_base_patch16_224", dict(depth=24, embed_dim=540, num_heads=12)),
    # the official code's ViT-H/14 (its own vision_transformer.py): no qkv bias, torch's LayerNorm eps 1e-5
    "vit_h14_official": ("vit_huge_patch14_224", dict(qkv_bias=False, norm_eps=1e-5)),
}
# spec keys that are not timm.create_model arguments (applied after construction): the official ViT-H's LayerNorm eps,
# and a V-MoE's MoE layers (dsincubate.models.moe)
SPEC_ONLY = ("norm_eps", "moe")


def _preset(name: str) -> tuple[str, dict]:
    if name in PRESETS:
        arch, kw = PRESETS[name]
        return arch, dict(kw)
    depth = parse_deit_t(name)
    if depth is not None:
        return "deit_tiny_patch16_224", dict(img_size=32, patch_size=4, depth=depth, num_classes=100)
    if name in timm.list_models("*vit*") + timm.list_models("deit*"):
        return name, {}
    raise UserError(
        f"unknown model {name!r}: use a preset ({', '.join(PRESETS)}, deit_t_<depth>) or a timm ViT name"
    )


def _arch_defaults(arch: str) -> dict:
    """The architecture's own hyper-parameters, read from an instance on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        probe = timm.create_model(arch, pretrained=False)
    _check_supported(probe, arch)
    return dict(
        depth=len(probe.blocks),
        embed_dim=probe.embed_dim,
        num_heads=probe.blocks[0].attn.num_heads,
        patch_size=probe.patch_embed.patch_size[0],
        img_size=probe.patch_embed.img_size[0],
        num_classes=probe.num_classes,
    )


def _check_supported(model: nn.Module, name: str) -> None:
    if not isinstance(model, VisionTransformer):
        raise UserError(f"model {name!r} is not a timm VisionTransformer")
    if model.reg_token is not None or model.attn_pool is not None or model.dynamic_img_size:
        raise UserError(f"model {name!r}: register tokens, attention pooling and dynamic image size are not supported")


def target_spec(cfg: ModelConfig, num_classes: int | None = None, drop_path: float = 0.0) -> ModelSpec:
    arch, kw = _preset(cfg.preset)
    full = _arch_defaults(arch)
    full.update(kw)
    for key in ("depth", "embed_dim", "num_heads", "img_size", "patch_size"):
        if getattr(cfg, key):
            full[key] = getattr(cfg, key)
    if cfg.num_classes:
        full["num_classes"] = cfg.num_classes
    elif num_classes:
        full["num_classes"] = num_classes
    if full["embed_dim"] % full["num_heads"]:
        raise UserError(f"model: width {full['embed_dim']} is not divisible by {full['num_heads']} heads")
    if full["img_size"] % full["patch_size"]:
        raise UserError(f"model: image size {full['img_size']} is not divisible by patch size {full['patch_size']}")
    full["drop_path_rate"] = float(drop_path)
    if cfg.layer_scale_init:  # timm's LayerScale (ls1/ls2 per block); the fused block patch applies it too
        full["init_values"] = float(cfg.layer_scale_init)
    if cfg.moe_every:
        if cfg.moe_every > full["depth"]:
            raise UserError(f"model.moe_every={cfg.moe_every} is above the depth {full['depth']}: no block would be "
                            "MoE")
        full["moe"] = {"every": cfg.moe_every, "experts": cfg.moe_experts, "top_k": cfg.moe_top_k,
                       "capacity_factor": cfg.moe_capacity_factor,
                       "eval_capacity_factor": cfg.moe_eval_capacity_factor, "min_capacity": cfg.moe_min_capacity}
    return ModelSpec(arch, full)


def meta_spec(cfg: ModelConfig, target: ModelSpec, drop_path: float = 0.0) -> ModelSpec:
    """The meta model: the target's architecture, width, patch size and classes, `meta_depth_per_stage` x K blocks."""
    if cfg.meta_depth_per_stage < 1:
        raise UserError("model.meta_depth_per_stage must be >= 1")
    kw = dict(target.kwargs, depth=cfg.num_stages * cfg.meta_depth_per_stage, drop_path_rate=float(drop_path))
    kw.pop("moe", None)  # the meta model is a dense ViT (a V-MoE target incubates inside it)
    if cfg.meta_embed_dim:  # a meta model of another width: incubation stitches each module in
        kw["embed_dim"] = cfg.meta_embed_dim
        kw["num_heads"] = cfg.meta_num_heads or kw["num_heads"]
    elif cfg.meta_num_heads:
        kw["num_heads"] = cfg.meta_num_heads
    if kw["embed_dim"] % kw["num_heads"]:
        raise UserError(f"meta model: width {kw['embed_dim']} is not divisible by {kw['num_heads']} heads "
                        "(set model.meta_num_heads)")
    return ModelSpec(target.timm_name, kw)


def build(spec: ModelSpec) -> VisionTransformer:
    pending = family.deferring()
    kwargs = {k: v for k, v in spec.kwargs.items() if k not in SPEC_ONLY}
    if pending is not None:
        kwargs["weight_init"] = "skip"
    model = timm.create_model(spec.timm_name, pretrained=False, **kwargs)
    if "norm_eps" in spec.kwargs:  # timm's kwargs cannot set it (its LayerNorm defaults to 1e-6)
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.eps = float(spec.kwargs["norm_eps"])
    _check_supported(model, spec.timm_name)
    if spec.kwargs.get("moe"):
        from dsincubate.models import moe

        moe.apply(model, spec.kwargs["moe"])
    if pending is not None:
        pending.append(model)
    return model


def init_weights_gathered(model: VisionTransformer) -> None:
    """timm's `VisionTransformer.init_weights` (its default 'timm' mode, as at construction) for a model built inside
    `deepspeed.zero.Init` under `deferred_init`: the same calls in the same order, hence the same random draws as an
    unsharded build, each on one module's parameters gathered (and re-partitioned right after, rank 0's values
    kept), so no rank ever holds more than one module in full. Values are drawn in fp32 and then rounded to the
    parameters' dtype (bf16 under bf16 ZeRO-3), as an unsharded build followed by DeepSpeed's cast gives."""
    if getattr(model, "fix_init", False) or getattr(model, "weight_init_mode", "reset") not in ("reset", ""):
        raise ValueError("init_weights_gathered replays timm's default init only (no fix_init, no jax/moco modes)")

    def top():
        if model.pos_embed is not None:
            trunc_normal_(model.pos_embed, std=.02)
        if model.cls_token is not None:
            nn.init.normal_(model.cls_token, std=1e-6)
        if model.reg_token is not None:
            nn.init.normal_(model.reg_token, std=1e-6)

    family.gathered_init([p for p in (model.pos_embed, model.cls_token, model.reg_token) if p is not None], top)
    replay_timm_init(model)


def replay_timm_init(model: nn.Module) -> None:
    """timm's `init_weights_vit_timm` over the modules of `model` (named_apply order), each module's parameters
    gathered under ZeRO-3 (`family.gathered_init`): the module part of a ViT's or a Swin's default init."""
    from timm.models._manipulate import named_apply
    from timm.models.vision_transformer import init_weights_vit_timm

    def each(module: nn.Module, name: str = "") -> None:
        # a module with its own init_weights (not a Linear) may set its children's parameters too
        if not isinstance(module, nn.Linear) and not hasattr(module, "init_weights"):
            return  # timm's init leaves it as constructed (needs_reset=False)
        recurse = not isinstance(module, nn.Linear)
        params = list(module.parameters(recurse=recurse))
        if params:
            family.gathered_init(params, lambda: init_weights_vit_timm(module, name, needs_reset=False))

    named_apply(each, model)


def set_drop_path(blocks, rates: list[float]) -> None:
    """Stochastic depth of each timm block (`family.drop_path_rates` gives the rates)."""
    from timm.layers import DropPath

    for block, p in zip(blocks, rates):
        for attr in ("drop_path1", "drop_path2"):
            if hasattr(block, attr):
                setattr(block, attr, DropPath(p) if p > 0 else nn.Identity())


_EMBED_ATTRS = ("patch_embed", "cls_token", "reg_token", "pos_embed", "pos_drop", "patch_drop", "norm_pre")
_EMBED_FLAGS = ("num_prefix_tokens", "no_embed_class", "dynamic_img_size")
_HEAD_ATTRS = ("norm", "fc_norm", "head_drop", "head", "attn_pool")
_HEAD_FLAGS = ("global_pool", "num_prefix_tokens", "pool_include_prefix")


class ViTStage(staged.Stage):
    """A slice of a VisionTransformer; the embedding and head call timm's own `_pos_embed` and `pool`."""

    def __init__(self, vit: VisionTransformer, start: int, stop: int, first: bool, last: bool):
        embed = [(n, getattr(vit, n)) for n in _EMBED_ATTRS + _EMBED_FLAGS]
        head = [(n, getattr(vit, n)) for n in _HEAD_ATTRS + _HEAD_FLAGS]
        super().__init__(embed, [vit.blocks[j] for j in range(start, stop)], head, start, first, last)

    def forward_embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = VisionTransformer._pos_embed(self, x)
        x = self.patch_drop(x)
        return self.norm_pre(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        x = VisionTransformer.pool(self, x)
        x = self.fc_norm(x)
        x = self.head_drop(x)
        return self.head(x)

    def classifier(self) -> nn.Module:
        return self.head

    def input_size(self) -> int:
        return int(self.patch_embed.img_size[0])

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "pos_embed"} if self.first else set()


def divide(vit: VisionTransformer, depths: list[int]) -> list[ViTStage]:
    return family.split_stages(vit, depths, ViTStage)


class ViTFamily(family.Family):
    """timm's VisionTransformer (and a V-MoE built on it)."""

    name = "vit"
    model_type = VisionTransformer
    fallback = True

    def owns_preset(self, preset: str) -> bool:
        return True  # the default family: `_preset` names the presets and timm ViTs, and refuses the rest

    def owns_spec(self, spec: ModelSpec) -> bool:
        return True

    def target_spec(self, cfg, num_classes=None, drop_path=0.0) -> ModelSpec:
        return target_spec(cfg, num_classes, drop_path)

    def meta_spec(self, cfg, target, drop_path=0.0) -> ModelSpec:
        return meta_spec(cfg, target, drop_path)

    def build(self, spec: ModelSpec) -> nn.Module:
        return build(spec)

    def divide(self, model, depths):
        return divide(model, depths)

    def stage_only(self, spec, depths, i):
        """Stage i built from a model of stage i's depth alone (no drop path)."""
        part = build(ModelSpec(spec.timm_name, dict(spec.kwargs, depth=depths[i], drop_path_rate=0.0)))
        stage = ViTStage(part, 0, depths[i], first=i == 0, last=i == len(depths) - 1)
        stage.block_offset = sum(depths[:i])
        return stage

    def boundary_width(self, spec, i) -> int:
        return int(spec.kwargs["embed_dim"])  # every block keeps the width

    def boundary_shape(self, spec, i) -> family.Boundary:
        kw = spec.kwargs  # timm's token layout: [class token] [register tokens] patches, row-major
        grid = int(kw["img_size"]) // int(kw["patch_size"])
        prefix = int(kw.get("class_token", True)) + int(kw.get("reg_tokens") or 0)
        return family.Boundary((prefix + grid * grid, self.boundary_width(spec, i)), (grid, grid))

    def with_img_size(self, spec, size, where) -> ModelSpec:
        if size % spec.kwargs["patch_size"]:
            raise UserError(f"{where}.img_size={size} is not a multiple of the patch size {spec.kwargs['patch_size']}")
        return ModelSpec(spec.timm_name, dict(spec.kwargs, img_size=size))

    def resample(self, tensors, spec, old_size, new_size):
        """The position embedding (stage 0's) resampled to the new grid of patches."""
        from timm.layers import resample_abs_pos_embed

        patch, key = spec.kwargs["patch_size"], "stages.0.pos_embed"
        tensors[key] = resample_abs_pos_embed(tensors[key], new_size=[new_size // patch] * 2,
                                              old_size=[old_size // patch] * 2, num_prefix_tokens=1)
        return tensors

    def set_drop_path(self, blocks, rates):
        set_drop_path(blocks, rates)

    def init_weights_gathered(self, model):
        init_weights_gathered(model)

    def timm_native(self, spec) -> bool:
        return not spec.kwargs.get("moe")  # a V-MoE's MoE layers are DeepSpeed's, not timm's

    def create_args(self, spec) -> dict:
        return {k: v for k, v in spec.kwargs.items() if k not in SPEC_ONLY}

    def input_size(self, model) -> int:
        return int(model.patch_embed.img_size[0])


FAMILY = family.register(ViTFamily())
