"""The Swin Transformer family (timm's SwinTransformer) on the model-family seam (family.py).

A Swin is divided at its own stage boundaries: K = 4 modules, module i = Swin stage i (`layers.<i>`: its patch
merging, which halves the resolution and doubles the width, and its blocks), stage 0 with the patch embedding, stage 3
with the final norm and the classifier. The unit of division is therefore the Swin stage (`fam.depth(spec)` = 4 and
the only division is [1, 1, 1, 1]); the meta model is the same Swin with `meta_depth_per_stage` blocks in each stage
(the paper's one layer per module), so its patch merging matches the target's width and resolution at every
boundary. Between modules the features travel as tokens, (batch, H x W, width) in row-major order, as a ViT's (and
timm's Swin before 0.9) do; each stage turns them back into timm's (batch, H, W, width) map (`boundary_shape`: the
tokens' count and width and the grid (H, W); the decoupled baselines' auxiliary heads read it). Stochastic depth is per
Swin block (`drop_path_units`), with the linear schedule over all of them as timm's. Exports are timm's own:
`timm.create_model(model_name, **args)` loads the weights (keys `layers.<i>.`).

    dsincubate pipeline --recipe swin_b_deit3 --set data.train=/data/in1k/train --set data.val=/data/in1k/val
"""
from __future__ import annotations

import timm
import torch
import torch.nn as nn
from timm.models.swin_transformer import SwinTransformer

from dsincubate.errors import UserError
from dsincubate.models import family, staged, vit
from dsincubate.models.family import ModelSpec

# name -> (timm architecture, create args). swin_b: Swin-B (supplementary Tab. 1, the DeiT-III row); swin_debug: a
# 4-stage Swin of 5 blocks on 32 px images, for tests.
PRESETS: dict[str, tuple[str, dict]] = {
    "swin_b": ("swin_base_patch4_window7_224", dict(img_size=224, window_size=7, embed_dim=128, depths=[2, 2, 18, 2],
                                                    num_heads=[4, 8, 16, 32], num_classes=1000)),
    "swin_debug": ("swin_base_patch4_window7_224", dict(img_size=32, window_size=2, embed_dim=32, depths=[1, 1, 2, 1],
                                                        num_heads=[1, 2, 4, 8], num_classes=10)),
}
# ModelConfig fields a Swin preset fixes: refused, not ignored
FIXED = ("depth", "embed_dim", "num_heads", "patch_size", "img_size", "meta_embed_dim", "meta_num_heads",
         "moe_every", "layer_scale_init")


class SwinStage(staged.Stage):
    """Whole Swin stages (`layers.<i>`) of a SwinTransformer: [patch embedding] + stages + [norm and head]."""

    def __init__(self, model: SwinTransformer, start: int, stop: int, first: bool, last: bool):
        embed = [("patch_embed", model.patch_embed)]
        head = [("norm", model.norm), ("head", model.head)]
        super().__init__(embed, [model.layers[j] for j in range(start, stop)], head, start, first, last)
        self.grid = tuple(model.layers[start].input_resolution)  # the (H, W) this stage's input tokens lie on

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.first:  # tokens from the stage before -> timm's (batch, H, W, width) map
            x = x.unflatten(1, self.grid)
        x = super().forward(x)
        return x if self.last else x.flatten(1, 2)  # views: the assembly's forward stays timm's to the bit

    def forward_embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch_embed(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x))

    def classifier(self) -> nn.Module:
        return self.head.fc

    def input_size(self) -> int:
        return int(self.patch_embed.img_size[0])


class SwinFamily(family.Family):
    name = "swin"
    model_type = SwinTransformer
    classifier_name = "head.fc"
    block_prefix = "layers"
    default_num_stages = 4  # Swin's four stages, one module each
    default_meta_depth = 1

    def owns_preset(self, preset: str) -> bool:
        return preset in PRESETS

    def owns_spec(self, spec: ModelSpec) -> bool:
        return spec.timm_name.startswith("swin_")

    def target_spec(self, cfg, num_classes=None, drop_path=0.0) -> ModelSpec:
        bad = [f"model.{k}" for k in FIXED if getattr(cfg, k)]
        if bad:
            raise UserError(f"{', '.join(bad)}: not a setting of {cfg.preset} (a Swin preset fixes its architecture)")
        arch, kw = PRESETS[cfg.preset]
        kw = dict(kw, num_classes=cfg.num_classes or num_classes or kw["num_classes"], drop_path_rate=float(drop_path))
        return ModelSpec(arch, kw)

    def meta_spec(self, cfg, target, drop_path=0.0) -> ModelSpec:
        if cfg.meta_depth_per_stage < 1:
            raise UserError("model.meta_depth_per_stage must be >= 1")
        depths = [cfg.meta_depth_per_stage] * len(target.kwargs["depths"])
        return ModelSpec(target.timm_name, dict(target.kwargs, depths=depths, drop_path_rate=float(drop_path)))

    def build(self, spec: ModelSpec) -> nn.Module:
        pending = family.deferring()
        model = timm.create_model(spec.timm_name, pretrained=False, **spec.kwargs,
                                  **({"weight_init": "skip"} if pending is not None else {}))
        if pending is not None:
            pending.append(model)
        return model

    def depth(self, spec) -> int:
        return len(spec.kwargs["depths"])  # the unit of division: a Swin stage

    def check_depths(self, spec, depths) -> None:
        n = len(spec.kwargs["depths"])
        if list(depths) != [1] * n:
            raise UserError(f"a Swin divides at its stage boundaries only (where the meta model matches its width "
                            f"and resolution): K={n}, one Swin stage per module, not stage depths {list(depths)}")

    def divide(self, model, depths):
        return family.split_stages(model, depths, SwinStage, len(model.layers))

    def stage_only(self, spec, depths, i):
        # built whole (no drop path) and stage i kept: a Swin stage needs the grid of the stages before it
        return self.divide(self.build(ModelSpec(spec.timm_name, dict(spec.kwargs, drop_path_rate=0.0))), depths)[i]

    def boundary_width(self, spec, i) -> int:
        return int(spec.kwargs["embed_dim"]) * 2 ** i  # every stage after the first doubles the width

    def boundary_shape(self, spec, i) -> family.Boundary:
        # patch embedding: img_size / 4 per side (timm's patch_size default); every stage after the first halves it
        side = int(spec.kwargs["img_size"]) // int(spec.kwargs.get("patch_size", 4)) // 2 ** i
        return family.Boundary((side * side, self.boundary_width(spec, i)), (side, side))

    def with_img_size(self, spec, size, where) -> ModelSpec:
        raise UserError(f"{where}.img_size={size}: a Swin's attention windows are laid out for its preset's "
                        f"resolution ({spec.kwargs['img_size']}); fine-tune at that size")

    def drop_path_units(self, block) -> list:
        return list(block.blocks)

    def units(self, spec, start: int, stop: int) -> int:
        return sum(spec.kwargs["depths"][start:stop])

    def set_drop_path(self, blocks, rates):
        vit.set_drop_path(blocks, rates)

    def init_weights_gathered(self, model):
        vit.replay_timm_init(model)  # timm's Swin init is its ViT init (get_init_weights_vit), module by module

    def timm_native(self, spec) -> bool:
        return True

    def input_size(self, model) -> int:
        return int(model.patch_embed.img_size[0])


FAMILY = family.register(SwinFamily())
