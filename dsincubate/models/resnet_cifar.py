"""ResNet for CIFAR (He et al. 2016, Sec. 4.2) in timm's style, and its side of the model-family seam (family.py).

ResNet-110 (`model.preset=resnet110_cifar`): a 3x3 stem convolution of 16 channels, three stages of 18 basic blocks
(timm's `BasicBlock`) of widths 16/32/64, the first block of stages 2 and 3 with stride 2 and a 1x1 convolution + BN
shortcut, global average pooling and a linear classifier: 1.73 M parameters. Initialisation and shortcut follow
InfoPro's code (github.com/blackfeather-wang/InfoPro-Pytorch, networks/resnet.py), whose ResNet-110 the paper's
Tab. 2 compares with: convolutions N(0, 2 / (k^2 out)), BN weight 1 and bias 0, PyTorch's default Linear.
timm's own ResNet cannot express it: it always downsamples 4x in its stem (7x7 or deep convolution, then max pool)
and its forward reads `layer4`.

Deep Incubation divides it into K = 3 modules at its stage boundaries (paper Tab. 2: ResNet-110, K = 3): module i is
stage i (stage 0 with the stem, stage 2 with pooling and classifier). The meta model is the same network with
`meta_depth_per_stage` blocks per stage (the paper's one layer per module: 1); the first block of each stage
downsamples exactly as the target's, so the width and resolution agree with the target's at every boundary.
`model.depth` is the number of blocks (a multiple of 3; ResNet-110 has 54), `model.img_size` the image side.
There is no timm architecture to name, so an export's model.json carries the spec that rebuilds it:

    from dsincubate.models import family
    model = family.build(family.ModelSpec.from_json(json.load(open("model.json"))["spec"]))
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from timm.layers import DropPath
from timm.models.resnet import BasicBlock

from dsincubate.errors import UserError
from dsincubate.models import family, staged
from dsincubate.models.family import ModelSpec

ARCH = "resnet_cifar"
PRESETS = {"resnet20_cifar": 3, "resnet32_cifar": 5, "resnet56_cifar": 9, "resnet110_cifar": 18}  # blocks per stage
WIDTHS = (16, 32, 64)
# ModelConfig fields a ResNet has no use for: refused, not ignored
VIT_ONLY = ("embed_dim", "num_heads", "patch_size", "meta_embed_dim", "meta_num_heads", "moe_every",
            "layer_scale_init")


def _init_module(m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d):
        n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class ResNetCifar(nn.Module):
    """3x3 stem, len(layers) stages of timm BasicBlocks (stride 2 entering every stage but the first), avg pool, fc.
    The blocks of all stages are one `blocks` sequence (so stage boundaries are block indices, as for a ViT)."""

    def __init__(self, layers=(18, 18, 18), widths=WIDTHS, num_classes: int = 100, img_size: int = 32,
                 in_chans: int = 3, drop_path_rate: float = 0.0, weight_init: str = ""):
        super().__init__()
        self.num_classes, self.img_size, self.num_features = num_classes, img_size, widths[-1]
        self.conv1 = nn.Conv2d(in_chans, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.act1 = nn.ReLU(inplace=True)
        rates = family.drop_path_rates(drop_path_rate, "linear", sum(layers))
        blocks, inplanes = [], widths[0]
        for s, (n, width) in enumerate(zip(layers, widths)):
            for j in range(n):
                stride = 2 if s > 0 and j == 0 else 1
                down = None
                if stride != 1 or inplanes != width:
                    down = nn.Sequential(nn.Conv2d(inplanes, width, 1, stride=stride, bias=False),
                                         nn.BatchNorm2d(width))
                p = rates[len(blocks)]
                blocks.append(BasicBlock(inplanes, width, stride, down, drop_path=DropPath(p) if p > 0 else None))
                inplanes = width
        self.blocks = nn.Sequential(*blocks)
        self.global_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.fc = nn.Linear(widths[-1], num_classes)
        if weight_init != "skip":
            for m in self.modules():
                _init_module(m)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.act1(self.bn1(self.conv1(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc


class ResNetStage(staged.Stage):
    """A slice of a ResNetCifar: [stem] + blocks + [pool and classifier]."""

    def __init__(self, model: ResNetCifar, start: int, stop: int, first: bool, last: bool):
        embed = [("conv1", model.conv1), ("bn1", model.bn1), ("act1", model.act1), ("img_size", model.img_size)]
        head = [("global_pool", model.global_pool), ("fc", model.fc)]
        super().__init__(embed, [model.blocks[j] for j in range(start, stop)], head, start, first, last)

    def forward_embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.act1(self.bn1(self.conv1(x)))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.global_pool(x))

    def classifier(self) -> nn.Module:
        return self.fc

    def input_size(self) -> int:
        return int(self.img_size)


class ResNetCifarFamily(family.Family):
    name = "resnet_cifar"
    model_type = ResNetCifar
    classifier_name = "fc"
    default_num_stages = 3  # paper Tab. 2: ResNet-110 with K = 3, one module per stage
    default_meta_depth = 1  # the paper's one layer per module (Sec. 3)

    def owns_preset(self, preset: str) -> bool:
        return preset in PRESETS

    def owns_spec(self, spec: ModelSpec) -> bool:
        return spec.timm_name == ARCH

    def target_spec(self, cfg, num_classes=None, drop_path=0.0) -> ModelSpec:
        bad = [f"model.{k}" for k in VIT_ONLY if getattr(cfg, k)]
        if bad:
            raise UserError(f"{', '.join(bad)}: not a setting of {cfg.preset} (a ResNet; only ViTs have it)")
        n = PRESETS[cfg.preset]
        if cfg.depth:
            if cfg.depth % len(WIDTHS):
                raise UserError(f"model.depth={cfg.depth}: a CIFAR ResNet has {len(WIDTHS)} stages of equal depth; "
                                f"give a multiple of {len(WIDTHS)} blocks")
            n = cfg.depth // len(WIDTHS)
        kw = dict(layers=[n] * len(WIDTHS), widths=list(WIDTHS), num_classes=cfg.num_classes or num_classes or 100,
                  img_size=cfg.img_size or 32, drop_path_rate=float(drop_path))
        return ModelSpec(ARCH, kw)

    def meta_spec(self, cfg, target, drop_path=0.0) -> ModelSpec:
        if cfg.meta_depth_per_stage < 1:
            raise UserError("model.meta_depth_per_stage must be >= 1")
        layers = [cfg.meta_depth_per_stage] * len(target.kwargs["layers"])
        return ModelSpec(ARCH, dict(target.kwargs, layers=layers, drop_path_rate=float(drop_path)))

    def build(self, spec: ModelSpec) -> nn.Module:
        pending = family.deferring()
        model = ResNetCifar(**spec.kwargs, weight_init="skip" if pending is not None else "")
        if pending is not None:
            pending.append(model)
        return model

    def depth(self, spec) -> int:
        return sum(spec.kwargs["layers"])

    def check_depths(self, spec, depths) -> None:
        layers = list(spec.kwargs["layers"])
        if list(depths) != layers:
            raise UserError(f"a CIFAR ResNet divides at its stage boundaries only (where the meta model matches "
                            f"its width and resolution): K={len(layers)}, stage depths {layers}, not {list(depths)}")

    def divide(self, model, depths):
        return family.split_stages(model, depths, ResNetStage)

    def stage_only(self, spec, depths, i):
        # ResNet-110 has 1.7 M parameters: built whole (no drop path) and stage i kept, the rest dropped
        return self.divide(self.build(ModelSpec(ARCH, dict(spec.kwargs, drop_path_rate=0.0))), depths)[i]

    def boundary_width(self, spec, i) -> int:
        return int(spec.kwargs["widths"][i])

    def boundary_shape(self, spec, i) -> family.Boundary:
        side = int(spec.kwargs["img_size"]) // 2 ** i  # every stage but the first halves the resolution
        return family.Boundary((self.boundary_width(spec, i), side, side))

    def set_drop_path(self, blocks, rates):
        for block, p in zip(blocks, rates):
            block.drop_path = DropPath(p) if p > 0 else None

    def init_weights_gathered(self, model):
        for m in model.modules():
            params = list(m.parameters(recurse=False))
            if params and isinstance(m, (nn.Conv2d, nn.BatchNorm2d)):
                family.gathered_init(params, lambda m=m: _init_module(m))

    def input_size(self, model) -> int:
        return int(model.img_size)


FAMILY = family.register(ResNetCifarFamily())
