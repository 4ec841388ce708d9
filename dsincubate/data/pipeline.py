"""The per-worker reading pipeline: shards -> samples -> shuffle buffer -> decode + augment -> batches.

One `ShardStream` is the IterableDataset a DataLoader worker runs. It reads tar streams through WebDataset's
`gopen` (local files, `pipe:` commands, URLs) and groups members by key the WebDataset way; member names are only
ever dictionary keys, never filesystem paths. Bad data never stops or stalls it: an unopenable, truncated or empty
shard, a sample without image or label, an out-of-range label or an undecodable image is skipped with a warning
naming shard and key, and counted. Counts travel to the main process inside every item the worker yields
(cumulative per worker, and each bad record (kind, shard, key) once, so the loader counts a bad sample once per
epoch however often it is read), plus a final stats-only item (loader.py checks the max-bad-fraction threshold).
A shard cut mid-way keeps every sample whose image and label members were read whole before the cut.

Workers yield full batches and, at the end of a one-pass stream, one partial batch; the loader merges partial
batches, so a one-pass epoch delivers every sample exactly once however shards fall on workers. Resampled streams
draw shards with replacement (weighted by selected samples) and stop after the worker's batch quota.

Randomness (shard order, shuffle buffer, augmentation via python/numpy/torch global RNGs) is seeded from
(seed, epoch, rank, worker, attempt); with num_workers=0 the caller's global RNG states are swapped out around every
step so the training loop's own randomness is untouched.
"""
from __future__ import annotations

import gzip
import logging
import os
import random
import tarfile
import zlib
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from webdataset import gopen

from dsincubate.data.sources import IMAGE_EXTS, LABEL_EXTS, split_member
from dsincubate.data.subsets import dealt_copies
from dsincubate.data.tario import MemberCut, iter_tar
from dsincubate.data.transforms import decode

log = logging.getLogger("dsincubate.data")
BAD_SAMPLE_KINDS = ("decode_error", "missing_image", "missing_label", "bad_label", "unreadable_file",
                    "incomplete_sample", "transform_error", "missing_samples")
BAD_SHARD_KINDS = ("unopenable_shard", "truncated_shard", "empty_shard")
MAX_WARNINGS = 20  # per worker and epoch; the counts stay exact


@dataclass
class PlanItem:
    url: str                               # tar to open ("" for a file chunk)
    name: str                              # shard name for warnings/stats
    keys: frozenset | None                 # selected keys (None: every sample)
    expected: int                          # selected samples the manifest promises (for lost-sample accounting)
    files: list[tuple[str, int]] | None = None   # (path, label) for ImageFolder/list chunks


class ShardStream(IterableDataset):
    def __init__(self, plan: list[PlanItem], *, transform, batch_size: int, img_size: int, num_classes: int,
                 seed: int, epoch: int, rank: int, attempt: int = 0, resampled: bool = False,
                 quotas: list[int] | None = None, shuffle_buffer: int = 0, shuffle_plan: bool = False,
                 repeat: int = 1, world_size: int = 1, ra_group: tuple[int, int, int, int] | None = None):
        self.plan, self.transform, self.batch_size, self.img_size = plan, transform, batch_size, img_size
        self.repeat, self.rank, self.world_size = repeat, rank, world_size
        # repeated augmentation: (group, groups, member, size) of subsets.repeat_group; `plan` is the group's shards
        self.ra_group = ra_group or (0, 1, rank, world_size)
        self.num_classes, self.resampled, self.quotas = num_classes, resampled, quotas
        self.seed, self.seed_key = seed, [seed, epoch, rank, attempt]
        self.shuffle_buffer, self.shuffle_plan = shuffle_buffer, shuffle_plan
        # (epoch, attempt) in shared memory: persistent DataLoader workers hold their own copy of this object from
        # the first epoch on and read what the main process set here each time it starts an epoch (set_epoch)
        self.epoch_attempt = torch.tensor([epoch, attempt], dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int, attempt: int = 0) -> None:
        """The epoch (and top-up pass) the next iteration reads: what a new ShardStream for it would read."""
        self.epoch_attempt[0], self.epoch_attempt[1] = epoch, attempt

    # ---- entry point -------------------------------------------------------------------------------------------
    def __iter__(self):
        wi = get_worker_info()
        wid, nw = (wi.id, wi.num_workers) if wi is not None else (0, 1)
        epoch, attempt = (int(v) for v in self.epoch_attempt.tolist())
        self.seed_key = [self.seed, epoch, self.rank, attempt]
        ss = np.random.SeedSequence(self.seed_key + [wid])
        s = int(ss.generate_state(1)[0])  # augmentation: this rank's own randomness
        # repeated augmentation: every rank of a group draws the group's shards in the same order (the group, not
        # the rank, in the seed) and keeps its share of the repeated stream; otherwise each rank draws its own
        seed, epoch, _, attempt = self.seed_key
        group, groups = self.ra_group[:2]
        draw = ss if self.repeat == 1 else np.random.SeedSequence([seed, epoch, attempt, wid, 0x5A] +
                                                                  ([group] if groups > 1 else []))
        if wi is not None:
            _seed_globals(s)
            return self._run(wid, nw, draw)
        return _isolated(self._run(wid, nw, draw), s)

    # ---- reading -----------------------------------------------------------------------------------------------
    def _bad(self, kind: str, name: str, key: str, err: object = "", count: int = 1) -> None:
        self.stats[kind] += count
        # the record the loader dedupes on: a bad sample read twice in an epoch (a top-up pass, a shard drawn
        # again) is one bad sample
        self.bad_new.append((kind, name, key, count))
        if len(self.examples) < 5:
            self.examples.append(f"{kind}: shard {name} key {key!r}")
        self.warned += 1
        if self.warned <= MAX_WARNINGS:
            log.warning("skipping bad data (%s) in shard %s, key %r: %s", kind, name, key, err)
            if self.warned == MAX_WARNINGS:
                log.warning("further bad-data warnings from this worker are suppressed (counts stay exact)")

    def _read(self, item: PlanItem):
        """Yield (key, shard name, image bytes, label) of the selected samples of one plan item."""
        self.stats["shards_read"] += 1
        if item.files is not None:
            yield from self._read_files(item)
            return
        seen, error = yield from self._read_tar(item)
        self._account_shard(item, seen, error)

    def _read_files(self, item: PlanItem):
        """The samples of an ImageFolder / list-file chunk: one file each, unreadable files and bad labels counted."""
        for path, label in item.files:
            if item.keys is not None and path not in item.keys:
                continue
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as e:
                self._bad("unreadable_file", item.name, path, e)
                continue
            if not 0 <= label < self.num_classes:
                self._bad("bad_label", item.name, path, label)
                continue
            yield path, item.name, data, label

    def _read_tar(self, item: PlanItem):
        """Yield the selected samples of one tar shard; return (selected samples seen, (bad-shard kind, error) or
        None). Any failure to open, read or close the stream is the shard's error, never a crash."""
        try:
            stream = gopen(item.url, "rb")
        except Exception as e:  # noqa: BLE001 - any failure to open is a bad shard, never a crash
            return 0, ("unopenable_shard", e)
        st, error = _TarState(), None
        try:
            yield from self._members(item, stream, st)
        except (tarfile.TarError, EOFError, OSError, zlib.error, ValueError) as e:
            error = yield from self._cut(item, st, e)
        finally:
            try:
                stream.close()  # a failed pipe: command reports its exit status here
            except Exception as e:  # noqa: BLE001
                if st.seen == 0:  # the command failed before giving anything: it could not open the shard
                    error = ("unopenable_shard", e)
                elif error is None:
                    error = ("truncated_shard", e)
        return st.seen, error

    def _members(self, item: PlanItem, stream, st: "_TarState"):
        """Group an open tar stream's members by key (the WebDataset way) and yield the selected samples; `st`
        holds the sample being read, which _cut needs when the stream breaks."""
        stream_in = gzip.GzipFile(fileobj=stream) if item.url.endswith((".gz", ".tgz")) else stream
        for mname, mdata in iter_tar(stream_in):
            k, ext = split_member(mname)
            if k is None:
                continue
            if k != st.key:
                if st.key is not None and st.wanted:
                    st.seen += 1
                    yield from self._finish(item.name, st.key, st.group)
                st.key, st.group = k, {}
                st.wanted = item.keys is None or k in item.keys
            if st.wanted:
                st.group[ext] = mdata
        if st.key is not None and st.wanted:
            st.seen += 1
            yield from self._finish(item.name, st.key, st.group)
        st.key = None

    def _cut(self, item: PlanItem, st: "_TarState", e: Exception):
        """The stream broke: keep the sample being read when it is whole, count the samples it cut; return the
        shard's error (empty / unopenable when nothing usable came, else truncated)."""
        cut = split_member(e.name)[0] if isinstance(e, MemberCut) else None
        if st.key is not None and st.wanted:
            # the sample being read when the stream broke: whole if its image and label members were read
            # (or the cut is inside the next sample's member, so its own members had ended); else lost
            st.seen += 1
            if _complete(st.group) or (cut is not None and cut != st.key):
                yield from self._finish(item.name, st.key, st.group)
            else:
                self._bad("incomplete_sample", item.name, st.key, "stream ended inside this sample")
        if cut is not None and cut != st.key and (item.keys is None or cut in item.keys):
            st.seen += 1  # a sample whose first member was cut
            self._bad("incomplete_sample", item.name, cut, "stream ended inside this sample")
        if st.seen == 0:  # nothing usable: an empty file, or not a tar at all
            return ("empty_shard" if "empty" in str(e) else "unopenable_shard", e)
        return ("truncated_shard", e)

    def _account_shard(self, item: PlanItem, seen: int, error) -> None:
        """Count a shard's error once, and the samples its manifest promised that never arrived."""
        if error is None and seen == 0:
            error = ("empty_shard", "no samples")
        elif error is None and seen < item.expected:
            # tarfile treats a stream cut at a member boundary as a normal end: only the manifest count tells
            error = ("truncated_shard", f"ended after {seen} of {item.expected} samples")
        if error is not None:
            self._bad(error[0], item.name, "(whole shard)", error[1])
        if item.expected > seen:  # samples the manifest promised that never arrived
            self._bad("missing_samples", item.name, "(never arrived)", f"{item.expected - seen} samples",
                      count=item.expected - seen)

    def _finish(self, name: str, key: str, group: dict):
        """Yield the sample of one key's members, or count it as bad (missing image/label, label out of range)."""
        img = next((group[e] for e in IMAGE_EXTS if e in group), None)
        if img is None:
            self._bad("missing_image", name, key, f"members {sorted(group)}")
            return
        raw = next((group[e] for e in LABEL_EXTS if e in group), None)
        if raw is None:
            self._bad("missing_label", name, key, f"members {sorted(group)}")
            return
        try:
            label = int(raw.decode().strip())
        except (ValueError, UnicodeDecodeError):
            label = -1
        if not 0 <= label < self.num_classes:
            self._bad("bad_label", name, key, f"label {raw[:20]!r} not in [0, {self.num_classes})")
            return
        yield key, name, img, label

    def _items(self, wid: int, nw: int, rng: np.random.Generator):
        # Not wds.split_by_worker / ResampledShards: the split here follows the manifest's per-shard sample counts
        # (weights, quotas, subsets) and is seeded from (seed, epoch, rank, worker), which exact resume needs.
        if self.resampled:
            weights = np.array([max(p.expected, 0) for p in self.plan], dtype=np.float64)
            if weights.sum() == 0:
                return
            weights /= weights.sum()
            while True:
                yield self.plan[int(rng.choice(len(self.plan), p=weights))]
        else:
            plan = list(self.plan)
            if self.shuffle_plan:  # same permutation in every worker of this rank (no worker id in the seed)
                perm = np.random.default_rng(np.random.SeedSequence(self.seed_key)).permutation(len(plan))
                plan = [plan[i] for i in perm]
            yield from plan[wid::nw]

    def _samples(self, wid: int, nw: int, rng: np.random.Generator):
        empty_run = 0
        for item in self._items(wid, nw, rng):
            good = 0
            for s in self._read(item):
                good += 1
                self.stats["samples_streamed"] += 1  # read from storage (with repeated augmentation: before dealing)
                yield s
            # resampling from shards that give nothing would spin forever: give up after enough fruitless draws
            empty_run = 0 if good else empty_run + 1
            if self.resampled and empty_run > max(20, 2 * len(self.plan)):
                log.warning("worker %d: %d shard draws in a row gave no usable sample; stopping", wid, empty_run)
                return

    def _shuffled(self, samples, rnd: random.Random):
        # Not wds.shuffle: its buffer draws from the global `random` state, which the augmentation also consumes,
        # so the order would depend on what the transforms drew; a private Random keeps data order exact on resume.
        if self.shuffle_buffer <= 1:
            yield from samples
            return
        buf = []
        for s in samples:
            if len(buf) < self.shuffle_buffer:
                buf.append(s)
                continue
            i = rnd.randrange(len(buf))
            buf[i], s = s, buf[i]
            yield s
        rnd.shuffle(buf)
        yield from buf

    def _dealt(self, samples):
        """Repeated augmentation (DeiT's RASampler on a stream): the stream a group's ranks read alike, each sample
        `repeat` times in a row, dealt round-robin to the group's members (subsets.dealt_copies); each copy is
        augmented by the rank that gets it. Not timm's RepeatAugSampler: it samples indices of a map-style set."""
        p, k, (_, _, member, size) = 0, self.repeat, self.ra_group
        for s in samples:
            for _ in range(dealt_copies(1, p, k, size, member)[0]):
                yield s
            p += k

    def _run(self, wid: int, nw: int, ss: np.random.SeedSequence):
        self.stats, self.examples, self.warned, self.bad_new = Counter(), [], 0, []
        rng = np.random.default_rng(ss.spawn(1)[0])
        rnd = random.Random(int(rng.integers(1 << 62)))
        quota = self.quotas[wid] if self.quotas is not None else None
        B, S = self.batch_size, self.img_size
        done = 0
        shared = get_worker_info() is not None
        x, y, n = _alloc((B, 3, S, S), shared), torch.empty(B, dtype=torch.int64), 0
        if quota != 0:
            stream = self._shuffled(self._samples(wid, nw, rng), rnd)
            if self.repeat > 1:
                stream = self._dealt(stream)
            for key, name, data, label in stream:
                try:
                    img = decode(data)
                except Exception as e:  # noqa: BLE001 - undecodable/corrupt image: skip and count
                    self._bad("decode_error", name, key, e)
                    continue
                try:
                    self.transform(img, x[n])
                except Exception as e:  # noqa: BLE001 - e.g. a degenerate image the augmentation cannot handle
                    self._bad("transform_error", name, key, e)
                    continue
                y[n] = label
                n += 1
                self.stats["samples"] += 1
                if n == B:
                    yield self._item(wid, x, y, n)
                    done += 1
                    x, y, n = _alloc((B, 3, S, S), shared), torch.empty(B, dtype=torch.int64), 0
                    if quota is not None and done >= quota:
                        break
        if n and quota is None:
            yield self._item(wid, x[:n].clone(), y[:n].clone(), n)
        yield self._item(wid, None, None, 0)  # final stats

    def _item(self, wid, x, y, n) -> dict:
        stats = {k: v for k, v in self.stats.items() if not k.startswith("_")}
        bad, self.bad_new = self.bad_new, []  # only what is new since the last item: cheap per batch
        return {"x": x, "y": y, "n": n, "wid": wid, "pid": os.getpid(), "stats": stats, "examples": list(self.examples),
                "bad": bad}


@dataclass
class _TarState:
    """The sample a tar stream is in the middle of (key, its members so far, selected?) and the selected samples
    seen so far in the shard."""
    key: str | None = None
    group: dict = field(default_factory=dict)
    wanted: bool = False
    seen: int = 0


def _complete(group: dict) -> bool:
    return any(e in group for e in IMAGE_EXTS) and any(e in group for e in LABEL_EXTS)


def _alloc(shape, shared: bool) -> torch.Tensor:
    """uint8 batch buffer; in a worker it lives in shared memory from the start (as DataLoader's own collate does),
    so handing it to the main process does not copy it."""
    if not shared:
        return torch.empty(shape, dtype=torch.uint8)
    numel = int(np.prod(shape))
    proto = torch.empty(0, dtype=torch.uint8)
    return proto.new(proto._typed_storage()._new_shared(numel, device="cpu")).view(shape)


def _seed_globals(s: int) -> None:
    random.seed(s)
    np.random.seed(s % (1 << 32))
    torch.manual_seed(s)


def _isolated(gen, s: int):
    """Run `gen` with its own python/numpy/torch global RNG states, restoring the caller's around each step."""
    mine = None
    while True:
        outer = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        if mine is None:
            _seed_globals(s)
        else:
            random.setstate(mine[0]), np.random.set_state(mine[1]), torch.set_rng_state(mine[2])
        try:
            item = next(gen)
        except StopIteration:
            return
        finally:
            mine = (random.getstate(), np.random.get_state(), torch.get_rng_state())
            random.setstate(outer[0]), np.random.set_state(outer[1]), torch.set_rng_state(outer[2])
        yield item
