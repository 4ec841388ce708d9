"""Train and val loaders: plan which samples this rank reads, run ShardStream in DataLoader workers, assemble
batches, keep the step count identical on every rank, and account for bad data.

Train, resampled (default): every rank draws shards with replacement (rank/worker-seeded) and yields exactly
    len(loader) = samples_per_epoch // (batch_size * world_size) batches, split into per-worker quotas.
Train, one pass (resampled=False): the g-th selected sample (shard order) belongs to rank g % world, so ranks
    differ by at most one sample and every rank yields the same number of full batches; the sample order is
    reshuffled each epoch (shard order + shuffle buffer). If bad data leaves a rank short, a second seeded pass
    tops it up so no rank ever runs fewer steps (which would hang a collective).
Val: whole shards per rank (sample split when there are fewer shards than ranks); every rank yields
    max_r ceil(n_r / batch_size) batches, padded with valid=False rows, so ZeRO-3 ranks run the same forwards.
Repeated augmentation (resampled only): ranks in groups of about `repeated_aug` (subsets.repeat_group); a group
    draws from its own shards and its members keep their dealt copies, so reads stay ~one epoch over all ranks.
Workers: a loader built with a pool key (build_train_loader's and build_val_loader's default) runs on persistent
    DataLoader workers that later loaders of the same key reuse: the next epochs' train loaders, the next
    evaluations' val loaders (_Pool: the epoch travels in shared memory; bit-identical to workers started for the
    epoch). One train pool and one val pool live at a time (a run trains one phase at a time).

Called through dsincubate.data.build_train_loader / build_val_loader.
"""
from __future__ import annotations

import atexit
import math
import os
from collections import Counter

import torch
from torch.utils.data import DataLoader

from dsincubate.data.pipeline import BAD_SAMPLE_KINDS, BAD_SHARD_KINDS, PlanItem, ShardStream
from dsincubate.data.sources import CLASSES_NAME, DatasetIndex, load_index
from dsincubate.data.subsets import (Selection, group_shards, repeat_group, select_subset, split_by_sample,
                                     split_by_shard)
from dsincubate.errors import UserError

_INDEX_CACHE: dict = {}
INDEX_CACHE_SIZE = 4  # indexes kept by cached_index; memory stays bounded


def cached_index(source: str, manifest: str = "") -> DatasetIndex:
    """load_index, cached per (source, manifest, manifest mtime): loaders are built every epoch (their workers
    persist, see _Pool)."""
    folder = source if os.path.isdir(source) else os.path.dirname(source)
    mpath = manifest or (os.path.join(source, "manifest.json") if os.path.isdir(source) else source)
    key = (source, manifest, _mtime(mpath), _mtime(os.path.join(folder, CLASSES_NAME)))
    if key not in _INDEX_CACHE:
        # the train and val index of one run (and of a second one) stay: evicting train's at each evaluation gave
        # the next epoch a new index object, hence a new pool key, and restarted the persistent train workers
        while len(_INDEX_CACHE) >= INDEX_CACHE_SIZE:
            del _INDEX_CACHE[next(iter(_INDEX_CACHE))]  # the oldest (dicts keep insertion order)
        try:
            _INDEX_CACHE[key] = load_index(source, manifest)
        except OSError as e:  # permissions, a directory where a file should be, ...: the user's to fix
            raise UserError(f"data source {source!r}: {e}") from None
    return _INDEX_CACHE[key]


def _mtime(path: str) -> float | None:
    try:
        return os.path.getmtime(path)
    except OSError:
        return None


def default_workers(env=None, affinity: int | None = None) -> int:
    """Loader workers for one rank: the cores this process may run on, shared by the ranks on this node, less one
    for the rank's own thread (the training loop, or the GPU feeding it); >= 0 (0 = read in the rank itself).

    The cores come from the CPU affinity (what taskset / cgroups / SLURM's binding allow), not os.cpu_count(), which
    counts the whole machine. When SLURM binds each task to its own cores (SLURM_CPUS_PER_TASK, affinity no larger),
    the affinity already is this rank's share and is not divided again.
    """
    env = os.environ if env is None else env
    cores = affinity if affinity is not None else len(os.sched_getaffinity(0))
    per_task = int(env.get("SLURM_CPUS_PER_TASK", "0") or 0)
    if per_task and cores <= per_task:
        ranks = 1
    else:  # torchrun sets LOCAL_WORLD_SIZE, DeepSpeed's launcher LOCAL_SIZE, srun SLURM_NTASKS_PER_NODE ("4(x2)")
        raw = env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or env.get("SLURM_NTASKS_PER_NODE", "1")
        try:
            ranks = max(1, int(str(raw).split("(")[0].split(",")[0]))
        except ValueError:
            ranks = 1
    return max(0, cores // ranks - 1)


def resolve_workers(cfg) -> int:
    """cfg.num_workers when set (the override), else default_workers()."""
    return default_workers() if cfg.num_workers is None else cfg.num_workers


def make_plan(index: DatasetIndex, keys_per_shard: list[list[str]]) -> list[PlanItem]:
    plan = []
    for entry, keys in zip(index.shards, keys_per_shard):
        if not keys:
            continue  # shards without selected samples are never opened
        every = len(keys) == entry.samples
        files = None
        if entry.files is not None:
            kept = set(keys)
            files = [(p, lab) for p, lab in entry.files if p in kept]
        plan.append(PlanItem(url=entry.url, name=entry.name, keys=None if every else frozenset(keys),
                             expected=len(keys), files=files))
    return plan


def check_bad_fraction(st: dict, expected: int, max_bad: float) -> None:
    """Stop the run when a loader's bad samples exceed `max_bad` of the samples this epoch (torch and DALI loaders).

    Counted against the samples read: what the epoch planned, more when bad data made it read further."""
    if st["bad_samples"] > max_bad * max(expected, st["samples_read"]):
        raise UserError(
            f"too much bad data on rank {st.get('rank', 0)}: {st['bad_samples']} bad samples for "
            f"{expected} expected this epoch (max_bad_fraction={max_bad}); by kind "
            f"{st['bad_by_kind']}; e.g. {'; '.join(st['bad_examples'][:3])}. Fix or rewrite the shards, or "
            "raise max_bad_fraction")


class _Pool:
    """Persistent DataLoader workers over one ShardStream, kept from epoch to epoch: each epoch sets the stream's
    shared (epoch, attempt) and restarts the same workers, which then read exactly what fresh ones would."""

    def __init__(self, stream: ShardStream, num_workers: int, device: torch.device):
        self.stream, self.busy = stream, False
        self.loader = _data_loader(stream, num_workers, device, persistent=True)


_POOLS: dict = {}  # pool key -> _Pool; one per split (key[0], "train" / "val") at a time, see _pool


def _data_loader(stream: ShardStream, num_workers: int, device: torch.device, persistent: bool) -> DataLoader:
    return DataLoader(stream, batch_size=None, num_workers=num_workers, prefetch_factor=4 if num_workers else None,
                      generator=torch.Generator().manual_seed(0), persistent_workers=persistent and num_workers > 0,
                      pin_memory=device.type == "cuda")  # so the uint8 upload can overlap compute


def _pool(key: tuple, make_stream, num_workers: int, device: torch.device) -> _Pool:
    """The pool of `key`, started on first use; a pool of another key of the same split (key[0]: the previous
    phase's train or val loader) is closed first, so the train pool survives evaluations and the val pool epochs."""
    if key not in _POOLS:
        for old_key, old in list(_POOLS.items()):
            if old_key[0] == key[0] and not old.busy:
                close_pool(old)
        _POOLS[key] = _Pool(make_stream(), num_workers, device)
    return _POOLS[key]


def close_pool(pool: _Pool) -> None:
    """Stop a pool's workers now (not at garbage collection) and forget it."""
    for k in [k for k, v in _POOLS.items() if v is pool]:
        del _POOLS[k]
    it = pool.loader._iterator  # DataLoader keeps its persistent iterator here; shutting it down joins the workers
    pool.loader._iterator = None
    if it is not None:
        it._shutdown_workers()


def close_pools() -> None:
    """Stop every persistent worker (at exit, before multiprocessing's own exit handler reaps daemons)."""
    for pool in list(_POOLS.values()):
        close_pool(pool)


atexit.register(close_pools)


class _Loader:
    """Shared iteration: DataLoader over ShardStream, partial-batch merging, stats, threshold."""

    def __init__(self, make_stream, *, steps: int, batch_size: int, img_size: int, num_workers: int,
                 expected: int, max_bad_fraction: float, pad: bool, attempts: int, info: dict, prep, device,
                 prep_key: list, pool_key: tuple | None = None):
        self.make_stream, self.steps, self.batch_size, self.img_size = make_stream, steps, batch_size, img_size
        self.prep, self.device, self.prep_key = prep, torch.device(device), list(prep_key)
        self.num_workers, self.expected, self.max_bad = num_workers, expected, max_bad_fraction
        self.pad, self.attempts, self.info = pad, attempts, info
        # with a pool key the workers persist across epochs (loaders built with the same key share them)
        self.pool_key, self.epoch = pool_key, int(info.get("epoch", 0))
        self.worker_pids: set = set()  # the worker processes that delivered this loader's last epoch
        self._worker_stats: dict = {}
        self._bad: dict = {}  # (kind, shard, key) -> count: each bad sample once per epoch, however often read
        self._examples: list[str] = []
        self._yielded = 0
        self._padded = 0

    def __len__(self) -> int:
        return self.steps

    def stats(self) -> dict:
        total = Counter()
        for st in self._worker_stats.values():
            total.update(st)
        for k in BAD_SAMPLE_KINDS + BAD_SHARD_KINDS:  # the per-read counters double count re-reads: use records
            total[k] = 0
        for (kind, _, _), n in self._bad.items():
            total[kind] += n
        bad_samples = sum(total[k] for k in BAD_SAMPLE_KINDS)
        read = total["samples"] + bad_samples
        out = {"steps": self.steps, "batch_size": self.batch_size, "samples_decoded": total["samples"],
               "samples_yielded": self._yielded, "padded_samples": self._padded, "samples_read": read,
               "bad_samples": bad_samples, "bad_fraction": bad_samples / max(1, self.expected, read),
               "bad_by_kind": {k: total[k] for k in BAD_SAMPLE_KINDS + BAD_SHARD_KINDS if total[k]},
               "shards_read": total["shards_read"], "samples_streamed": total["samples_streamed"],
               "bad_examples": list(self._examples)}
        return {**self.info, **out}

    def _check(self, final: bool) -> None:
        st = self.stats()
        check_bad_fraction(st, self.expected, self.max_bad)
        if final and not self.pad and self._emitted < self.steps:
            raise UserError(f"data ran out on rank {self.info.get('rank', 0)}: {self._emitted} of {self.steps} "
                            f"batches; bad data {st['bad_by_kind']}")

    def _open(self, attempt: int):
        """(items of this epoch's pass `attempt`, the pool it runs on or None): the persistent workers when this
        loader has a pool key and its pool is free, else a DataLoader whose workers live for this pass only."""
        if self.pool_key is not None and self.num_workers > 0:
            pool = _pool(self.pool_key, lambda: self.make_stream(0), self.num_workers, self.device)
            if not pool.busy:  # another loader of the same key iterating right now gets its own workers
                pool.busy = True
                pool.stream.set_epoch(self.epoch, attempt)
                return iter(pool.loader), pool
        return iter(_data_loader(self.make_stream(attempt), self.num_workers, self.device, persistent=False)), None

    def _batches(self):
        self.worker_pids = set()
        for attempt in range(self.attempts):
            items, pool = self._open(attempt)
            try:
                yield from self._pass(items, attempt)
            except GeneratorExit:
                raise  # the consumer stopped early: the pool's workers drain the rest when it is next started
            except BaseException:
                if pool is not None:
                    close_pool(pool)  # its iterator may be mid-way through anything: never reuse it
                raise
            finally:
                if pool is not None:
                    pool.busy = False
            if self.pad or self._emitted >= self.steps:
                return

    def _pass(self, items, attempt: int):
        for item in items:
            self.worker_pids.add(item["pid"])
            self._worker_stats[(attempt, item["wid"])] = item["stats"]
            for kind, shard, key, n in item["bad"]:
                self._bad[(kind, shard, key)] = max(n, self._bad.get((kind, shard, key), 0))
            for e in item["examples"]:
                if len(self._examples) < 5 and e not in self._examples:
                    self._examples.append(e)
            self._check(final=False)
            if item["x"] is None:
                continue
            yield item["x"], item["y"], item["n"]
            if self._emitted >= self.steps:
                return

    def _iterate(self):
        self._worker_stats, self._examples, self._yielded, self._padded, self._emitted = {}, [], 0, 0, 0
        self._bad = {}
        B, S = self.batch_size, self.img_size
        px, py, pn = [], [], 0   # pending partial batches
        for x, y, n in self._batches():
            if n == B and not pn:
                self._emitted += 1
                self._yielded += B
                yield x, y, torch.ones(B, dtype=torch.bool)
                continue
            px.append(x[:n])
            py.append(y[:n])
            pn += n
            if pn >= B:
                cx, cy = torch.cat(px), torch.cat(py)
                self._emitted += 1
                self._yielded += B
                yield cx[:B], cy[:B], torch.ones(B, dtype=torch.bool)
                px, py, pn = ([cx[B:]], [cy[B:]], pn - B) if pn > B else ([], [], 0)
            if self._emitted >= self.steps:
                break
        if self.pad:
            while self._emitted < self.steps:  # pad: tail of real samples, then whole invalid batches
                x = torch.zeros(B, 3, S, S, dtype=torch.uint8)
                y = torch.zeros(B, dtype=torch.int64)
                valid = torch.zeros(B, dtype=torch.bool)
                if pn:
                    k = min(pn, B)
                    x[:k], y[:k], valid[:k] = torch.cat(px)[:k], torch.cat(py)[:k], True
                    self._yielded += k
                    px, py, pn = [], [], 0
                self._padded += int((~valid).sum())
                self._emitted += 1
                yield x, y, valid
        self._check(final=True)


class TrainLoader(_Loader):
    """Iterable of (images float32 [B,3,S,S] normalized on `device`, targets int64 [B]); len() = steps per epoch,
    equal on all ranks."""

    def __iter__(self):
        for i, (x, y, _) in enumerate(self._iterate()):
            yield self.prep(x, self.device, self.prep_key + [i]), y


class ValLoader(_Loader):
    """Iterable of (images on `device`, targets, valid bool [B]); every sample valid exactly once over all ranks."""

    def __iter__(self):
        for i, (x, y, valid) in enumerate(self._iterate()):
            yield self.prep(x, self.device, self.prep_key + [i]), y, valid


def train_loader(cfg, index: DatasetIndex, sel: Selection, transform, *, batch_size: int, rank: int,
                 world_size: int, epoch: int, seed: int, img_size: int, device="cpu",
                 pool_key: tuple | None = None) -> TrainLoader:
    """One epoch's loader; with `pool_key` (everything it was built from except the epoch) its DataLoader workers
    are started once and reused by the following epochs' loaders of the same key."""
    n = sel.num_samples
    # None = the whole set's size, also for a fraction or a DMT subset: the paper keeps the full set's iterations
    per_epoch = cfg.samples_per_epoch or index.num_samples
    if not cfg.resampled:
        per_epoch = min(per_epoch, n)  # one pass cannot hold more than the (selected) data
    steps = per_epoch // (batch_size * world_size)
    if steps == 0:
        raise UserError(f"batch size {batch_size} x {world_size} rank(s) exceeds the {per_epoch} training samples "
                        "per epoch: lower the batch size")
    ra_group = repeat_group(rank, world_size, cfg.repeated_aug) if cfg.repeated_aug > 1 else None
    if cfg.resampled:
        keys = sel.keys
        if ra_group is not None:  # the group reads its own shards only (subsets.py: repeated augmentation at scale)
            mine = set(group_shards([len(k) for k in keys], ra_group[1], ra_group[0]))
            keys = [k if i in mine else [] for i, k in enumerate(keys)]
        plan = make_plan(index, keys)
        nw = max(0, min(resolve_workers(cfg), steps))
        quotas = [steps // max(nw, 1) + (w < steps % max(nw, 1)) for w in range(max(nw, 1))]
    else:
        plan = make_plan(index, split_by_sample(sel, world_size, rank))
        nw = max(0, min(resolve_workers(cfg), len(plan)))
        quotas = None
    tf_seed = [seed, epoch, rank]

    def make_stream(attempt: int) -> ShardStream:
        return ShardStream(plan, transform=transform, batch_size=batch_size, img_size=img_size,
                           num_classes=index.num_classes, seed=tf_seed[0], epoch=tf_seed[1], rank=tf_seed[2],
                           attempt=attempt, resampled=cfg.resampled, quotas=quotas,
                           repeat=cfg.repeated_aug, world_size=world_size, ra_group=ra_group,
                           shuffle_buffer=cfg.shuffle_buffer, shuffle_plan=True)

    info = {"split": "train", "rank": rank, "world_size": world_size, "epoch": epoch, "seed": seed,
            "mode": "resampled" if cfg.resampled else "one_pass", "num_workers": nw, "repeated_aug": cfg.repeated_aug,
            "repeat_group": list(ra_group) if ra_group else None, "samples_per_epoch": steps * batch_size * world_size,
            "recipe": cfg.recipe, "subset": sel.info, "source": index.source}
    return TrainLoader(make_stream, steps=steps, batch_size=batch_size, img_size=img_size, num_workers=nw,
                       expected=steps * batch_size, max_bad_fraction=cfg.max_bad_fraction, pad=False,
                       attempts=2, info=info, prep=transform.batch_prep, device=device, prep_key=tf_seed,
                       pool_key=None if pool_key is None else ("train", *pool_key, id(index), nw))  # nw: env-derived


def val_loader(cfg, index: DatasetIndex, transform, *, batch_size: int, rank: int, world_size: int,
               img_size: int, device="cpu", pool_key: tuple | None = None) -> ValLoader:
    """One evaluation's loader; with `pool_key` (everything it was built from) its DataLoader workers are started
    once and reused by later evaluations' loaders of the same key (the val stream is the same every time)."""
    sel = select_subset(index)
    used = sum(1 for k in sel.keys if k)
    split = split_by_shard if used >= world_size else split_by_sample
    counts = [sum(len(k) for k in split(sel, world_size, r)) for r in range(world_size)]
    steps = max(math.ceil(c / batch_size) for c in counts)
    plan = make_plan(index, split(sel, world_size, rank))
    nw = max(0, min(resolve_workers(cfg), len(plan)))

    def make_stream(attempt: int) -> ShardStream:
        return ShardStream(plan, transform=transform, batch_size=batch_size, img_size=img_size,
                           num_classes=index.num_classes, seed=0, epoch=0, rank=rank, attempt=attempt)

    info = {"split": "val", "rank": rank, "world_size": world_size, "samples": counts[rank],
            "total_samples": sel.num_samples, "split_by": "shard" if split is split_by_shard else "sample",
            "source": index.source}
    return ValLoader(make_stream, steps=steps, batch_size=batch_size, img_size=img_size, num_workers=nw,
                     expected=counts[rank], max_bad_fraction=cfg.max_bad_fraction, pad=True, attempts=1,
                     info=info, prep=transform.batch_prep, device=device, prep_key=[0, 0, rank],
                     pool_key=None if pool_key is None else ("val", *pool_key, id(index), nw))
