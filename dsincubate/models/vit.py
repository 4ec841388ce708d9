"""Target and meta model specs: timm VisionTransformer names plus overrides, and the paper's presets.

A `ModelSpec` is the JSON-serialisable recipe for `timm.create_model(timm_name, **kwargs)`; it travels inside every
checkpoint so that a stage file, the meta model and the exported model can be checked against each other and rebuilt
anywhere. `target_spec(cfg)` / `meta_spec(cfg)` derive the two specs of a run; `build(spec)` creates the model (never
with pretrained weights: nothing is downloaded).
"""
from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field

import timm
import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer

from dsincubate.config import DEIT_T_PREFIX, ModelConfig, parse_deit_t
from dsincubate.errors import UserError

# name -> (timm architecture, overrides). Paper models: Tab. 1 (ViT-B/L/H), Tab. 6 (ViT-B-DN: depth 24, width 540,
# FLOPs of ViT-B), Sec. 4.2 (DeiT-Tiny of depth N on CIFAR-size images).
PRESETS: dict[str, tuple[str, dict]] = {
    "tiny": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=4, embed_dim=96, depth=8, num_heads=3, num_classes=10)),
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


@dataclass(frozen=True)
class ModelSpec:
    """Exactly what `timm.create_model` is called with."""

    timm_name: str
    kwargs: dict = field(default_factory=dict)

    @property
    def depth(self) -> int:
        return int(self.kwargs["depth"])

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelSpec":
        d = json.loads(text)
        return cls(d["timm_name"], dict(d["kwargs"]))

    def digest(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]


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
    if cfg.moe_every:
        if cfg.moe_every > full["depth"]:
            raise UserError(f"model.moe_every={cfg.moe_every} is above the depth {full['depth']}: no block would be MoE")
        full["moe"] = {"every": cfg.moe_every, "experts": cfg.moe_experts, "top_k": cfg.moe_top_k,
                       "capacity_factor": cfg.moe_capacity_factor,
                       "eval_capacity_factor": cfg.moe_eval_capacity_factor, "min_capacity": cfg.moe_min_capacity}
    return ModelSpec(arch, full)


def stage_depths(cfg: ModelConfig, depth: int) -> list[int]:
    """Blocks per stage of the target: explicit, or an even split (earlier stages take the remainder)."""
    k = cfg.num_stages
    if k < 1 or k > depth:
        raise UserError(f"K={k} stages does not fit a model of depth {depth} (need 1 <= K <= depth)")
    if cfg.stage_depths:
        if len(cfg.stage_depths) != k or sum(cfg.stage_depths) != depth or min(cfg.stage_depths) < 1:
            raise UserError(
                f"model.stage_depths={cfg.stage_depths} must be {k} positive numbers summing to depth {depth}"
            )
        return list(cfg.stage_depths)
    base, extra = divmod(depth, k)
    return [base + (1 if i < extra else 0) for i in range(k)]


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


_DEFERRED: ContextVar[list | None] = ContextVar("dsincubate_vit_deferred_init", default=None)


@contextmanager
def deferred_init():
    """Inside, `build` skips timm's weight initialisation and collects the models it builds (the yielded list); run
    `init_weights_gathered` on each afterwards. For building inside `deepspeed.zero.Init`, which partitions every
    submodule as soon as it is constructed: timm's initialisation at the end of the model's constructor would then
    write into empty shards (a silent no-op that leaves PyTorch's default init)."""
    built: list = []
    token = _DEFERRED.set(built)
    try:
        yield built
    finally:
        _DEFERRED.reset(token)


def build(spec: ModelSpec) -> VisionTransformer:
    pending = _DEFERRED.get()
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
    import deepspeed
    from timm.models._manipulate import named_apply
    from timm.models.vision_transformer import init_weights_vit_timm

    if getattr(model, "fix_init", False) or getattr(model, "weight_init_mode", "reset") not in ("reset", ""):
        raise ValueError("init_weights_gathered replays timm's default init only (no fix_init, no jax/moco modes)")

    def in_fp32(params, fn):
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            full = {p: p.data for p in params}
            for p in params:
                p.data = torch.empty(p.shape, dtype=torch.float32, device=full[p].device)
            try:
                fn()
            finally:
                for p in params:
                    p.data = full[p].copy_(p.data.to(full[p].dtype))

    def top():
        if model.pos_embed is not None:
            trunc_normal_(model.pos_embed, std=.02)
        if model.cls_token is not None:
            nn.init.normal_(model.cls_token, std=1e-6)
        if model.reg_token is not None:
            nn.init.normal_(model.reg_token, std=1e-6)

    in_fp32([p for p in (model.pos_embed, model.cls_token, model.reg_token) if p is not None], top)

    def each(module: nn.Module, name: str = "") -> None:
        # a module with its own init_weights (not a Linear) may set its children's parameters too
        if not isinstance(module, nn.Linear) and not hasattr(module, "init_weights"):
            return  # timm's init leaves it as constructed (needs_reset=False)
        recurse = not isinstance(module, nn.Linear)
        params = list(module.parameters(recurse=recurse))
        if params:
            in_fp32(params, lambda: init_weights_vit_timm(module, name, needs_reset=False))

    named_apply(each, model)


def set_drop_path(model: nn.Module, rate: float, mode: str) -> None:
    """Stochastic depth per block: 'linear' (timm/DeiT, 0 at the first block rising to `rate`) or 'uniform' (CaiT,
    `rate` everywhere; the paper's ViT-L/H E2E baselines). `model` is a VisionTransformer or anything whose
    `.blocks` / `.stages[*].blocks` hold timm blocks, in depth order."""
    from timm.layers import DropPath

    blocks = list(model.blocks) if hasattr(model, "blocks") else [b for s in model.stages for b in s.blocks]
    n = len(blocks)
    for i, block in enumerate(blocks):
        p = rate if mode == "uniform" else (rate * i / (n - 1) if n > 1 else 0.0)
        for attr in ("drop_path1", "drop_path2"):
            if hasattr(block, attr):
                setattr(block, attr, DropPath(p) if p > 0 else nn.Identity())


def same_architecture(a: ModelSpec, b: ModelSpec) -> bool:
    """Equal up to regularisation (drop path differs between phases but not the weights' meaning)."""
    strip = lambda s: {k: v for k, v in s.kwargs.items() if k != "drop_path_rate"}  # noqa: E731
    return a.timm_name == b.timm_name and strip(a) == strip(b)
