"""Train and val loaders of data.backend=dali: the torch loader's plan (loader.py, subsets.py) run by a DALI pipeline.

What is planned where, and what DALI can report per sample: dsincubate/data/dali.py. Called through
dsincubate.data.build_train_loader / build_val_loader when cfg.backend == "dali"; the loaders have the torch
loaders' interface (len(), iteration, stats()). Run the tests with `pytest tests/unit/test_data_dali.py -q`.
"""
from __future__ import annotations

import math
import re
import warnings

import numpy as np
import torch

from dsincubate.data.dali import (LABEL_BYTES, BadLog, EpochDir, checked_plan, labels_from, write_epoch_indexes)
from dsincubate.data.loader import check_bad_fraction, resolve_workers
from dsincubate.data.pipeline import BAD_SAMPLE_KINDS, BAD_SHARD_KINDS
from dsincubate.data.sources import IMAGE_EXTS, LABEL_EXTS
from dsincubate.data.subsets import (dealt_copies, group_shards, repeat_group, select_subset, split_by_sample,
                                     split_by_shard)
from dsincubate.errors import UserError

# DALI's own auto_aug calls its deprecated fn.experimental aliases (at graph build and first run)
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"nvidia\.dali")
CROP_PCT = 0.875  # timm's eval crop (DEFAULT_CROP_PCT), as the torch path's "none"/eval transform


def _seed(*key) -> int:
    return int(np.random.SeedSequence([0x44414C49, *key]).generate_state(1)[0] % (1 << 31))


def parse_randaugment(spec: str) -> tuple[int, int] | None:
    """timm's 'rand-m9-n2-mstd0.5-inc1' -> (n, m) on timm's 10 magnitude levels; None for no RandAugment."""
    if not spec:
        return None
    if not spec.startswith("rand"):
        raise UserError(f"data.auto_augment={spec!r}: the DALI backend runs RandAugment ('rand-m9-...') only")
    n, m = 2, 10
    for part in spec.split("-")[1:]:
        g = re.fullmatch(r"([a-z]+)([0-9.]+)", part)
        if g and g.group(1) == "m":
            m = int(float(g.group(2)))
        elif g and g.group(1) == "n":
            n = int(g.group(2))
    return n, min(max(m, 0), 10)


def build_pipeline(*, train: bool, recipe: str, randaug, paths, idxs, batch_size: int, img_size: int,
                   threads: int, device_id, seed: int, jitter: float = 0.0):
    """The DALI pipeline: (uint8 CHW images [B,3,S,S], zero-padded label text [B, LABEL_BYTES])."""
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.auto_aug import rand_augment

    gpu = device_id is not None
    S = img_size

    @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=device_id, seed=seed,
                  enable_conditionals=randaug is not None, exec_dynamic=True, prefetch_queue_depth=2)
    def pipe():
        raw, cls = fn.readers.webdataset(paths=paths, index_paths=idxs, ext=[";".join(IMAGE_EXTS),
                                         ";".join(LABEL_EXTS)], random_shuffle=False, name="reader",
                                         missing_component_behavior="error")
        dec = "mixed" if gpu else "cpu"
        mirror = 0
        if train and recipe == "deit":
            # decodes only the drawn region (ROI): timm's RandomResizedCrop scale (0.08, 1), ratio (3/4, 4/3)
            img = fn.decoders.image_random_crop(raw, device=dec, output_type=types.RGB, random_area=[0.08, 1.0],
                                                random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10)
            img = fn.resize(img, resize_x=S, resize_y=S, interp_type=types.INTERP_CUBIC, antialias=True)
            if randaug is not None:
                # timm's m on 10 levels = DALI's bin m of 11; flip commutes with it in distribution
                img = rand_augment.rand_augment(img, n=randaug[0], m=randaug[1], num_magnitude_bins=11,
                                                shape=[S, S])
            elif jitter > 0:  # timm applies ColorJitter(b, c, s) only when there is no RandAugment
                rng = [max(0.0, 1 - jitter), 1 + jitter]
                img = fn.color_twist(img, brightness=fn.random.uniform(range=rng),
                                     contrast=fn.random.uniform(range=rng), saturation=fn.random.uniform(range=rng))
            mirror = fn.random.coin_flip(probability=0.5)
            out = fn.crop_mirror_normalize(img, dtype=types.UINT8, output_layout="CHW", mirror=mirror)
        else:
            img = fn.decoders.image(raw, device=dec, output_type=types.RGB)
            img = fn.resize(img, resize_shorter=int(math.floor(S / CROP_PCT)), interp_type=types.INTERP_CUBIC,
                            antialias=True)
            out = fn.crop_mirror_normalize(img, dtype=types.UINT8, output_layout="CHW", crop=(S, S),
                                           crop_pos_x=0.5, crop_pos_y=0.5)
        cls = fn.pad(cls, axes=[0], shape=[LABEL_BYTES], fill_value=0)
        return out, cls

    with warnings.catch_warnings():  # DALI's own auto_aug still calls its deprecated fn.experimental aliases
        warnings.simplefilter("ignore", DeprecationWarning)
        p = pipe()
        p.build()
    return p


def _to_torch(t, device: torch.device) -> torch.Tensor:
    t = t.as_tensor()
    if hasattr(t, "as_cpu") and device.type == "cuda":  # a GPU tensor: copy into torch memory on this device
        from nvidia.dali.plugin.pytorch import feed_ndarray
        out = torch.empty(t.shape(), dtype=torch.uint8, device=device)
        feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(device))
        return out
    return torch.from_numpy(np.array(t))


class DaliLoader:
    """Iterates one epoch (train: (images, targets); val: (images, targets, valid)); len() = steps on every rank."""

    def __init__(self, *, chunks, good: int, steps: int, batch_size: int, img_size: int, train: bool, recipe: str,
                 randaug, threads: int, device, seed: int, bad: BadLog, expected: int, max_bad: float, info: dict,
                 prep, prep_key: list, jitter: float = 0.0):
        self.chunks, self.good, self.steps, self.batch_size, self.img_size = chunks, good, steps, batch_size, img_size
        self.train, self.recipe, self.randaug, self.threads, self.seed = train, recipe, randaug, threads, seed
        self.device = torch.device(device)
        self.bad, self.expected, self.max_bad, self.info = bad, expected, max_bad, info
        self.prep, self.prep_key, self.jitter = prep, list(prep_key), jitter
        self.num_workers = threads
        self._yielded = self._padded = self._batch_errors = self._lost = 0
        self._check()  # bad data found while planning: stop before any decoding

    def __len__(self) -> int:
        return self.steps

    def stats(self) -> dict:
        kinds = self.bad.by_kind()
        kinds["decode_error"] += self._lost
        bad = sum(kinds[k] for k in BAD_SAMPLE_KINDS)
        read = self._yielded + bad
        return {**self.info, "steps": self.steps, "batch_size": self.batch_size, "samples_decoded": self._yielded,
                "samples_yielded": self._yielded, "padded_samples": self._padded, "samples_read": read,
                "bad_samples": bad, "bad_fraction": bad / max(1, self.expected, read),
                "bad_by_kind": {k: kinds[k] for k in BAD_SAMPLE_KINDS + BAD_SHARD_KINDS if kinds[k]},
                "dali_batch_errors": self._batch_errors, "bad_examples": list(self.bad.examples)}

    def _check(self) -> None:
        check_bad_fraction(self.stats(), self.expected, self.max_bad)

    def _batches(self):
        """(uint8 images, labels) per step; a batch DALI fails to decode is skipped and counted."""
        tmp = EpochDir()
        try:
            paths, idxs = write_epoch_indexes(self.chunks, tmp.path)
            device_id = self.device.index if self.device.type == "cuda" else None
            if device_id is None and self.device.type == "cuda":
                device_id = torch.cuda.current_device()
            pipe = build_pipeline(train=self.train, recipe=self.recipe, randaug=self.randaug, paths=paths,
                                  idxs=idxs, batch_size=self.batch_size, img_size=self.img_size,
                                  threads=self.threads, device_id=device_id, seed=self.seed, jitter=self.jitter)
            fails = 0
            while True:
                try:
                    x, cls = pipe.run()
                except Exception as e:  # noqa: BLE001 - DALI raises on an undecodable image: lose the batch
                    fails += 1
                    self._batch_errors += 1
                    self._lost += self.batch_size
                    if len(self.bad.examples) < 5:  # DALI's error names the operator, not the sample
                        self.bad.examples.append(f"decode_error: a batch DALI could not decode ({str(e)[:120]})")
                    self._check()
                    if fails > 50:
                        raise UserError(f"DALI failed {fails} batches in a row on rank {self.info.get('rank', 0)}: "
                                        f"{str(e).strip().splitlines()[-1][:200]}") from None
                    yield None
                    continue
                fails = 0
                yield _to_torch(x, self.device), labels_from(np.array(cls.as_tensor()))
        finally:
            tmp.close()

    def _iterate(self):
        B, S = self.batch_size, self.img_size
        self._yielded = self._padded = self._batch_errors = self._lost = 0
        remaining = self.good if not self.train else None  # val: each good sample valid once, then padding
        it = self._batches() if self.good else iter(())
        emitted = 0
        while emitted < self.steps:
            if remaining is not None and remaining <= 0:
                x = torch.zeros(B, 3, S, S, dtype=torch.uint8)
                self._padded += B
                emitted += 1
                yield x, torch.zeros(B, dtype=torch.int64), torch.zeros(B, dtype=torch.bool)
                continue
            got = next(it)
            if got is None:
                if remaining is not None:
                    remaining -= B  # those positions of the val list are lost (counted), never shown twice
                continue
            x, y = got
            valid = torch.ones(B, dtype=torch.bool)
            if remaining is not None:
                k = min(B, remaining)
                valid[k:] = False  # the reader wrapped around into the list's start: padding
                remaining -= B
                self._padded += B - k
                self._yielded += k
            else:
                self._yielded += B
            emitted += 1
            yield x, y, valid
        if hasattr(it, "close"):
            it.close()  # ends the pipeline and removes the epoch's index files

    def __iter__(self):
        for i, (x, y, valid) in enumerate(self._iterate()):
            x = self.prep(x, self.device, self.prep_key + [i])
            yield (x, y) if self.train else (x, y, valid)


def dali_train_loader(cfg, index, sel, prep, *, batch_size: int, rank: int, world_size: int, epoch: int,
                      seed: int, img_size: int, device="cpu") -> DaliLoader:
    per_epoch = cfg.samples_per_epoch or index.num_samples
    if not cfg.resampled:
        per_epoch = min(per_epoch, sel.num_samples)
    steps = per_epoch // (batch_size * world_size)
    if steps == 0:
        raise UserError(f"batch size {batch_size} x {world_size} rank(s) exceeds the {per_epoch} training samples "
                        "per epoch: lower the batch size")
    bad = BadLog()
    K, W = cfg.repeated_aug, world_size
    if cfg.resampled:
        # every rank draws its own shards with replacement, weighted by selected samples (repeated augmentation:
        # the ranks of a group draw the group's stream from the group's shards and each keeps its round-robin share
        # of the repeated copies, as the torch path: subsets.repeat_group)
        group, groups, member, size = repeat_group(rank, W, K) if K > 1 else (0, 1, rank, W)
        keys = sel.keys
        if groups > 1:
            mine = set(group_shards([len(k) for k in keys], groups, group))
            keys = [k if i in mine else [] for i, k in enumerate(keys)]
        plan = checked_plan(index, keys, index.num_classes, bad)
        weights = np.array([len(k) for k in keys if k], dtype=np.float64)
        draw_key = [rank] if K == 1 else [group] if groups > 1 else []
        rng = np.random.default_rng(np.random.SeedSequence([seed, epoch] + draw_key))
        need = steps * batch_size + batch_size  # this rank's samples (its dealt copies), one batch to spare
        chunks, total, p, dry = [], 0, 0, 0
        while total < need and dry < max(20, 2 * len(plan)):
            tar, _, good = plan[int(rng.choice(len(plan), p=weights / weights.sum()))]
            pairs = [good[i][1] for i in rng.permutation(len(good))]
            dry = 0 if pairs else dry + 1
            if K > 1:
                copies = dealt_copies(len(pairs), p, K, size, member)
                p += len(pairs) * K
                pairs = [pair for pair, c in zip(pairs, copies) for _ in range(c)]
            total += len(pairs)
            chunks.append((tar, pairs))
    else:
        plan = checked_plan(index, split_by_sample(sel, W, rank), index.num_classes, bad)
        rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, rank]))
        chunks = [(plan[i][0], [plan[i][2][j][1] for j in rng.permutation(len(plan[i][2]))])
                  for i in rng.permutation(len(plan))]
    # what this rank reads this epoch: with repeated augmentation only its dealt copies (the index lists them), so
    # storage reads stay ~one epoch of samples over all ranks instead of every rank reading the shared stream
    good = sum(len(c[1]) for c in chunks)
    if good == 0:
        raise UserError(f"no usable training sample for rank {rank}: bad data {dict(bad.by_kind())}")
    threads = max(1, resolve_workers(cfg))
    info = {"split": "train", "rank": rank, "world_size": W, "epoch": epoch, "seed": seed, "backend": "dali",
            "mode": "resampled" if cfg.resampled else "one_pass", "repeated_aug": K, "num_workers": threads,
            "repeat_group": list(repeat_group(rank, W, K)) if K > 1 and cfg.resampled else None,
            "samples_per_epoch": steps * batch_size * W, "samples_planned": good, "recipe": cfg.recipe,
            "subset": sel.info, "source": index.source,
            "dali_device": "gpu" if torch.device(device).type == "cuda" else "cpu"}
    return DaliLoader(chunks=chunks, good=good, steps=steps, batch_size=batch_size, img_size=img_size, train=True,
                      recipe=cfg.recipe, randaug=parse_randaugment(cfg.auto_augment) if cfg.recipe == "deit"
                      else None, threads=threads, device=device, seed=_seed(seed, epoch, rank), bad=bad,
                      expected=steps * batch_size, max_bad=cfg.max_bad_fraction, info=info, prep=prep,
                      prep_key=[seed, epoch, rank], jitter=cfg.color_jitter if cfg.recipe == "deit" else 0.0)


def dali_val_loader(cfg, index, prep, *, batch_size: int, rank: int, world_size: int, img_size: int,
                    device="cpu") -> DaliLoader:
    sel = select_subset(index)
    used = sum(1 for k in sel.keys if k)
    split = split_by_shard if used >= world_size else split_by_sample
    counts = [sum(len(k) for k in split(sel, world_size, r)) for r in range(world_size)]
    steps = max(math.ceil(c / batch_size) for c in counts)
    bad = BadLog()
    plan = checked_plan(index, split(sel, world_size, rank), index.num_classes, bad)
    chunks = [(tar, [g[1] for g in good]) for tar, _, good in plan]
    threads = max(1, resolve_workers(cfg))
    info = {"split": "val", "rank": rank, "world_size": world_size, "samples": counts[rank], "backend": "dali",
            "total_samples": sel.num_samples, "split_by": "shard" if split is split_by_shard else "sample",
            "source": index.source, "num_workers": threads}
    return DaliLoader(chunks=chunks, good=sum(len(c[1]) for c in chunks), steps=steps, batch_size=batch_size,
                      img_size=img_size, train=False, recipe="none", randaug=None, threads=threads, device=device,
                      seed=_seed(0, 0, rank), bad=bad, expected=counts[rank], max_bad=cfg.max_bad_fraction,
                      info=info, prep=prep, prep_key=[0, 0, rank])
