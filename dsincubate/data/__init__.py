"""Data for dsincubate: WebDataset shards (or ImageFolder trees) -> augmented, rank-split batches.

The training engine uses exactly this API:

    info = resolve_data(cfg)                               # cheap: validates sources, builds the demo if needed
    train = build_train_loader(cfg, info, batch_size=64, rank=r, world_size=w, epoch=e, seed=s, img_size=224)
    for images, targets in train: ...                      # len(train) steps, identical on every rank
    val = build_val_loader(cfg, info, batch_size=64, rank=r, world_size=w, img_size=224)
    for images, targets, valid in val: ...                 # same batch count on every rank; padding has valid=False
    mixup = build_mixup(cfg, info.num_classes, seed=s, rank=r); mixup.set_epoch(e)   # or None
    train.stats(), val.stats()                             # bad-data counts, samples, subset info for run.json

With train="" / val="" the built-in demo (10 shape/texture classes, 32x32) is generated under cfg.demo_root.
Pieces: sources.py (what a source holds), pipeline.py (worker reading), loader.py (batches, ranks),
transforms.py (timm augmentation), subsets.py (paper splits), writer.py + shards_cli.py (`dsincubate shards`),
demo.py (demo data).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from dsincubate.data.demo import ensure_demo
from dsincubate.data.loader import TrainLoader, ValLoader, cached_index, train_loader, val_loader
from dsincubate.data.subsets import select_subset
from dsincubate.data.transforms import SeededMixup, build_mixup_fn, build_transform
from dsincubate.errors import UserError

__all__ = ["DataConfig", "DataInfo", "resolve_data", "build_train_loader", "build_val_loader", "build_mixup",
           "TrainLoader", "ValLoader", "SeededMixup"]

RECIPES = ("deit", "3aug", "none")


@dataclass
class DataConfig:
    """Data options. Defaults suit the built-in demo; the DeiT values are the paper's ImageNet recipe."""
    train: str = ""                 # train source: shard dir with manifest, manifest .json, shard paths/brace
    #                                 pattern, pipe: command, ImageFolder tree or `path label` list; "" = demo
    val: str = ""                   # val source, same forms; "" = built-in demo
    train_manifest: str = ""        # manifest for train shards when it is not next to them (pipe:/remote)
    val_manifest: str = ""          # same for val
    demo_root: str = "demo_data"    # where the demo shards are generated (once; safe with concurrent ranks)
    num_workers: int = 2            # DataLoader worker processes per rank (0 = read in the training process);
    #                                 sample order is reproducible for a given (seed, epoch, rank, num_workers)
    shuffle_buffer: int = 1000      # samples held per worker for shuffling across shard boundaries
    resampled: bool = True          # draw shards with replacement, fixed samples per epoch (multi-node safe);
    #                                 False = exact one pass over the (selected) data per epoch
    samples_per_epoch: int = 0      # 0 = number of selected training samples (whole set, or the subset)
    recipe: str = "deit"            # "deit" | "3aug" (DeiT-III 3-Augment) | "none" (resize + center crop)
    auto_augment: str = "rand-m9-mstd0.5-inc1"  # timm RandAugment spec (deit recipe)
    color_jitter: float = 0.4       # deit recipe; timm disables it under RandAugment as DeiT does; 3aug uses 0.3
    reprob: float = 0.25            # random erasing probability (DeiT-III 3aug used 0.0: set it so)
    mixup: float = 0.8              # Mixup alpha (0 with cutmix 0 disables build_mixup)
    cutmix: float = 1.0             # CutMix alpha
    smoothing: float = 0.1          # label smoothing applied inside Mixup
    train_fraction: float = 1.0     # class-balanced subset of the training set (paper: 0.25, 0.5)
    dmt_splits: int = 0             # decentralized modular training: N disjoint class-balanced subsets (0 = off)
    max_bad_fraction: float = 0.01  # bad samples above this fraction of an epoch's samples stop the run


@dataclass
class DataInfo:
    """What resolve_data found; plain values only (JSON-friendly: use asdict / to_dict for run.json)."""
    num_classes: int
    class_names: list[str]
    train_samples: int              # samples in the whole training source (before fraction / DMT selection)
    val_samples: int
    train_source: str               # resolved sources (the demo's directories when cfg.train/val == "")
    val_source: str
    mean: tuple = IMAGENET_DEFAULT_MEAN
    std: tuple = IMAGENET_DEFAULT_STD
    image_size: tuple | None = None  # native (H, W) when the manifest records it (demo: 32x32)
    selected_train_samples: int = 0  # after train_fraction / dmt_splits (a DMT subset's size varies by <= classes)
    train_manifest: str = ""
    val_manifest: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _check_cfg(cfg: DataConfig) -> None:
    if cfg.recipe not in RECIPES:
        raise UserError(f"unknown augmentation recipe {cfg.recipe!r}; choose one of {', '.join(RECIPES)}")
    if cfg.num_workers < 0 or cfg.shuffle_buffer < 0 or cfg.samples_per_epoch < 0:
        raise UserError("num_workers, shuffle_buffer and samples_per_epoch must be >= 0")
    if not 0.0 <= cfg.max_bad_fraction <= 1.0:
        raise UserError(f"max_bad_fraction must be in [0, 1], got {cfg.max_bad_fraction}")


def resolve_data(cfg: DataConfig) -> DataInfo:
    """Validate the sources (UserError naming a missing path or an empty shard list), generate the demo if a
    source is "", and return DataInfo. Reads manifests / directory listings only, never images."""
    _check_cfg(cfg)
    demo = ensure_demo(cfg.demo_root) if not (cfg.train and cfg.val) else ""
    train_src = cfg.train or os.path.join(demo, "train")
    val_src = cfg.val or os.path.join(demo, "val")
    tr = cached_index(train_src, cfg.train_manifest)
    va = cached_index(val_src, cfg.val_manifest)
    numeric = [str(i) for i in range(tr.num_classes)]  # list files / scanned tars have no real class names
    if tr.num_classes != va.num_classes or (tr.class_names != va.class_names and numeric not in
                                            (tr.class_names, va.class_names)):
        raise UserError(f"train ({train_src}: {tr.num_classes} classes) and val ({val_src}: "
                        f"{va.num_classes} classes) have different class lists")
    sel = select_subset(tr, cfg.train_fraction, cfg.dmt_splits, 0 if cfg.dmt_splits else None)
    return DataInfo(num_classes=tr.num_classes, class_names=list(tr.class_names), train_samples=tr.num_samples,
                    val_samples=va.num_samples, train_source=train_src, val_source=val_src,
                    image_size=tr.image_size, selected_train_samples=sel.num_samples,
                    train_manifest=tr.manifest_path, val_manifest=va.manifest_path)


def build_train_loader(cfg: DataConfig, info: DataInfo, *, batch_size: int, rank: int, world_size: int, epoch: int,
                       seed: int, img_size: int, subset_index: int | None = None, device="cpu") -> TrainLoader:
    """Loader for one training epoch (build one per epoch). subset_index picks DMT subset I when dmt_splits > 0.
    Workers hand over uint8 batches; normalization (and random erasing) run on `device`."""
    _check_cfg(cfg)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    index = cached_index(info.train_source, cfg.train_manifest)
    sel = select_subset(index, cfg.train_fraction, cfg.dmt_splits, subset_index if cfg.dmt_splits else None)
    tf = build_transform(cfg.recipe, cfg, img_size=img_size, train=True, mean=info.mean, std=info.std)
    return train_loader(cfg, index, sel, tf, batch_size=batch_size, rank=rank, world_size=world_size, epoch=epoch,
                        seed=seed, img_size=img_size, device=device)


def build_val_loader(cfg: DataConfig, info: DataInfo, *, batch_size: int, rank: int, world_size: int,
                     img_size: int, device="cpu") -> ValLoader:
    """Loader over the whole val set: each sample valid exactly once across ranks, equal batch count per rank."""
    _check_cfg(cfg)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    index = cached_index(info.val_source, cfg.val_manifest)
    tf = build_transform("none", cfg, img_size=img_size, train=False, mean=info.mean, std=info.std)
    return val_loader(cfg, index, tf, batch_size=batch_size, rank=rank, world_size=world_size, img_size=img_size,
                      device=device)


def build_mixup(cfg: DataConfig, num_classes: int, *, seed: int = 0, rank: int = 0) -> SeededMixup | None:
    """timm Mixup/CutMix with label smoothing (None when mixup == cutmix == 0): mixup(images, targets) ->
    (images, soft targets [B, num_classes]); needs an even batch. Call .set_epoch(epoch) for exact resumes."""
    return build_mixup_fn(cfg, num_classes, seed=seed, rank=rank)
