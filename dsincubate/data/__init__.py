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

import logging
import os
from dataclasses import asdict, dataclass, field

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from dsincubate.config import AUG_RECIPES, DataConfig, _check_domains
from dsincubate.data.dali import DALI_RECIPES
from dsincubate.data.demo import ensure_demo
from dsincubate.data.loader import TrainLoader, ValLoader, cached_index, train_loader, val_loader
from dsincubate.data.sources import with_classes
from dsincubate.data.subsets import select_subset
from dsincubate.data.transforms import SeededMixup, build_mixup_fn, build_transform
from dsincubate.errors import UserError

__all__ = ["DataConfig", "DataInfo", "resolve_data", "build_train_loader", "build_val_loader", "build_mixup",
           "TrainLoader", "ValLoader", "SeededMixup"]

RECIPES = AUG_RECIPES
log = logging.getLogger("dsincubate.data")


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
    _check_domains(cfg, "data")  # a config mutated after construction is checked again here
    if cfg.repeated_aug > 1 and not cfg.resampled:
        raise UserError(f"data.repeated_aug={cfg.repeated_aug} needs data.resampled=true")
    if cfg.backend == "dali":
        from dsincubate.data.dali import require_dali
        require_dali()


def resolve_data(cfg: DataConfig, num_classes: int | None = None) -> DataInfo:
    """Validate the sources (UserError naming a missing path or an empty shard list), generate the demo if a
    source is "", and return DataInfo. Reads manifests / directory listings only, never images. `num_classes`
    (model.num_classes) is the class count of sources that declare none (tars without a manifest or classes.txt)."""
    _check_cfg(cfg)
    demo = ensure_demo(cfg.demo_root) if not (cfg.train and cfg.val) else ""
    train_src = cfg.train or os.path.join(demo, "train")
    val_src = cfg.val or os.path.join(demo, "val")
    tr = cached_index(train_src, cfg.train_manifest)
    va = cached_index(val_src, cfg.val_manifest)
    if not num_classes:  # a source that declares its classes tells the other one how many there are
        num_classes = next((x.num_classes for x in (tr, va) if x.classes_declared), None)
    tr, va = with_classes(tr, num_classes), with_classes(va, num_classes)
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
                       seed: int, img_size: int, subset_index: int | None = None, device="cpu",
                       persistent: bool = True) -> TrainLoader:
    """Loader for one training epoch (build one per epoch). subset_index picks DMT subset I when dmt_splits > 0.
    Workers hand over uint8 batches; normalization (and random erasing) run on `device`. torch backend: with
    `persistent` the DataLoader workers are started once and kept for the next epochs' loaders built with the same
    arguments (epoch aside), which read exactly what fresh workers would; persistent=False starts them per epoch."""
    _check_cfg(cfg)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    index = with_classes(cached_index(info.train_source, cfg.train_manifest), info.num_classes)
    # DMT: only incubation jobs (which pass their stage index) read a subset; meta and fine-tune read the full set
    dmt = cfg.dmt_splits if subset_index is not None else 0
    sel = select_subset(index, cfg.train_fraction, dmt, subset_index if dmt else None)
    tf = build_transform(cfg.recipe, cfg, img_size=img_size, train=True, mean=info.mean, std=info.std)
    if cfg.backend == "dali" and cfg.recipe not in DALI_RECIPES:
        log.warning("data.recipe=%s is not implemented on DALI: this training loader uses data.backend=torch",
                    cfg.recipe)
    elif cfg.backend == "dali":  # same selection and plan; DALI decodes, the same BatchPrep normalises and erases
        from dsincubate.data.dali_loader import dali_train_loader
        return dali_train_loader(cfg, index, sel, tf.batch_prep, batch_size=batch_size, rank=rank,
                                 world_size=world_size, epoch=epoch, seed=seed, img_size=img_size, device=device)
    key = (repr(cfg), repr(info), batch_size, rank, world_size, seed, img_size, subset_index, str(device))
    return train_loader(cfg, index, sel, tf, batch_size=batch_size, rank=rank, world_size=world_size, epoch=epoch,
                        seed=seed, img_size=img_size, device=device, pool_key=key if persistent else None)


def build_val_loader(cfg: DataConfig, info: DataInfo, *, batch_size: int, rank: int, world_size: int,
                     img_size: int, device="cpu", persistent: bool = True) -> ValLoader:
    """Loader over the whole val set: each sample valid exactly once across ranks, equal batch count per rank.
    torch backend: with `persistent` the DataLoader workers are started at the first evaluation and kept for the
    next ones built with the same arguments (they read exactly what fresh workers would); False starts them per
    evaluation. The DALI backend builds its pipeline (threads, no processes) per evaluation."""
    _check_cfg(cfg)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    index = with_classes(cached_index(info.val_source, cfg.val_manifest), info.num_classes)
    tf = build_transform("none", cfg, img_size=img_size, train=False, mean=info.mean, std=info.std)
    if cfg.backend == "dali":
        from dsincubate.data.dali_loader import dali_val_loader
        return dali_val_loader(cfg, index, tf.batch_prep, batch_size=batch_size, rank=rank, world_size=world_size,
                               img_size=img_size, device=device)
    key = (repr(cfg), repr(info), batch_size, rank, world_size, img_size, str(device))
    return val_loader(cfg, index, tf, batch_size=batch_size, rank=rank, world_size=world_size, img_size=img_size,
                      device=device, pool_key=key if persistent else None)


def build_mixup(cfg: DataConfig, num_classes: int, *, seed: int = 0, rank: int = 0) -> SeededMixup | None:
    """timm Mixup/CutMix with label smoothing (None when mixup == cutmix == 0): mixup(images, targets) ->
    (images, soft targets [B, num_classes]); needs an even batch. Call .set_epoch(epoch) for exact resumes."""
    return build_mixup_fn(cfg, num_classes, seed=seed, rank=rank)
