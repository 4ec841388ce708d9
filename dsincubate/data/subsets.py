"""Sample selection from the manifest, without rewriting data: the paper's data splits and the per-rank split.

* Class-balanced fraction (data-efficiency study, 25% / 50% of ImageNet): per class, the first round(f * n_c)
  samples in shard order.
* Decentralized modular training (DMT): per class, the (fraction-selected) samples in shard order cut into N
  contiguous, nearly equal chunks; job I keeps chunk I. The N subsets are disjoint, cover the set and are
  class-balanced (per class sizes differ by at most one).
* Repeated augmentation's rank groups (`repeat_group`, `group_shards`, `dealt_copies`): which shards a rank's
  group draws from and which copies of the group's stream the rank keeps (both backends use them).
Shard order is a fixed-seed shuffle made by the shard writer, so "first in shard order" is a random sample, and
contiguous chunks mean job I needs only about 1/N of the shards (only shards holding selected keys are opened).

    sel = select_subset(index, fraction=0.25, splits=4, subset_index=1); sel.keys[s] -> keys kept from shard s
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dsincubate.data.sources import DatasetIndex
from dsincubate.errors import UserError


@dataclass
class Selection:
    keys: list[list[str]]       # per shard of the index: selected keys, in shard order
    labels: list[list[int]]     # aligned labels
    info: dict                  # what was selected, for stats / run.json

    @property
    def num_samples(self) -> int:
        return sum(len(k) for k in self.keys)


def select_subset(index: DatasetIndex, fraction: float = 1.0, splits: int = 0,
                  subset_index: int | None = None) -> Selection:
    if not 0.0 < fraction <= 1.0:
        raise UserError(f"train_fraction must be in (0, 1], got {fraction}")
    if splits < 0:
        raise UserError(f"dmt_splits must be >= 0, got {splits}")
    if splits > 0 and (subset_index is None or not 0 <= subset_index < splits):
        raise UserError(f"dmt_splits={splits} needs a subset index in [0, {splits}), got {subset_index}")
    nc = index.num_classes
    if fraction == 1.0 and splits == 0:
        keys = [list(s.keys or []) for s in index.shards]
        labels = [list(s.labels or []) for s in index.shards]
    else:
        # positions (shard, offset) of every sample, grouped by class, in shard order
        per_class: list[list[tuple[int, int]]] = [[] for _ in range(nc)]
        for si, s in enumerate(index.shards):
            for off, lab in enumerate(s.labels or []):
                if 0 <= lab < nc:  # unlabelled / out-of-range samples belong to no class-balanced subset
                    per_class[lab].append((si, off))
        chosen = []
        for c, pos in enumerate(per_class):
            take = pos[:max(1, int(round(fraction * len(pos))))] if pos else []
            if splits > 0:
                if len(take) < splits:
                    raise UserError(f"class {index.class_names[c]!r} has {len(take)} selected samples, fewer than "
                                    f"dmt_splits={splits}: subsets could not all be class-balanced")
                part = np.array_split(np.arange(len(take)), splits)[subset_index]
                take = [take[i] for i in part]
            chosen.extend(take)
        chosen.sort()
        keys = [[] for _ in index.shards]
        labels = [[] for _ in index.shards]
        for si, off in chosen:
            keys[si].append(index.shards[si].keys[off])
            labels[si].append(index.shards[si].labels[off])
    counts = np.bincount([lab for ls in labels for lab in ls if 0 <= lab < nc], minlength=nc)
    info = {"train_fraction": fraction, "dmt_splits": splits, "subset_index": subset_index if splits else None,
            "selected_samples": int(sum(len(k) for k in keys)), "total_samples": index.num_samples,
            "selected_shards": int(sum(1 for k in keys if k)), "total_shards": len(index.shards),
            "samples_per_class_min": int(counts.min()) if nc else 0,
            "samples_per_class_max": int(counts.max()) if nc else 0}
    return Selection(keys=keys, labels=labels, info=info)


def split_by_sample(sel: Selection, world: int, rank: int) -> list[list[str]]:
    """Selected keys of this rank: the g-th selected sample (shard order) goes to rank g % world. Ranks differ by at
    most one sample, so a one-pass epoch gives every rank the same number of full batches."""
    out, g = [], 0
    for ks in sel.keys:
        start = (rank - g) % world
        out.append(ks[start::world])
        g += len(ks)
    return out


def shard_owners(sizes: list[int], parts: int) -> dict[int, int]:
    """Shard index -> owner in [0, parts): non-empty shards, largest first onto the least-loaded owner."""
    load = [0] * parts
    owner = {}
    for si in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        if sizes[si]:
            r = min(range(parts), key=lambda j: (load[j], j))
            owner[si] = r
            load[r] += sizes[si]
    return owner


def split_by_shard(sel: Selection, world: int, rank: int) -> list[list[str]]:
    """Whole shards per rank, balanced by selected-sample count (largest first onto the lightest rank). Each rank
    opens only its shards; counts may differ between ranks (the val loader pads)."""
    owner = shard_owners([len(k) for k in sel.keys], world)
    return [ks if owner.get(si) == rank else [] for si, ks in enumerate(sel.keys)]


# ---- repeated augmentation at scale ---------------------------------------------------------------------------------
# DeiT's RASampler deals each sample's `repeat` copies round-robin to all ranks, so on a stream every rank would read
# the whole shared stream to keep 1/world of it (storage reads world/repeat times an epoch). Instead the ranks form
# groups of about `repeat`; a group draws its own stream from its own shards, and its members deal the copies among
# themselves: a sample is read only by the members of its group, which all keep a copy.
def repeat_group(rank: int, world: int, repeat: int) -> tuple[int, int, int, int]:
    """(group, groups, member, size) of `rank`: max(1, world // repeat) contiguous groups whose sizes differ by at
    most one (so size >= repeat when world >= repeat, and size < 2 * repeat); member = rank's place in its group."""
    groups = max(1, world // max(1, repeat))
    base, extra = divmod(world, groups)
    big = extra * (base + 1)  # the first `extra` groups have one member more
    if rank < big:
        return rank // (base + 1), groups, rank % (base + 1), base + 1
    return extra + (rank - big) // base, groups, (rank - big) % base, base


def group_shards(sizes: list[int], groups: int, group: int) -> list[int]:
    """The shards (indices; sizes = selected samples per shard) a repeated-augmentation group draws from: disjoint
    whole-shard sets balanced by samples (split_by_shard's rule), or every non-empty shard for every group when
    there are fewer of them than groups."""
    if sum(1 for n in sizes if n) < groups:
        return [i for i, n in enumerate(sizes) if n]
    owner = shard_owners(sizes, groups)
    return sorted(i for i, g in owner.items() if g == group)


def dealt_copies(n: int, start: int, repeat: int, size: int, member: int) -> list[int]:
    """Copies `member` keeps of each of n consecutive stream samples whose first copy is at stream position
    `start`: sample i's copies take positions start + i*repeat + j (j < repeat), dealt round-robin to the group's
    `size` members (RASampler's rule within the group)."""
    return [sum(1 for j in range(repeat) if (start + i * repeat + j) % size == member) for i in range(n)]


def rank_counts(sel: Selection, world: int, by_shard: bool) -> list[int]:
    f = split_by_shard if by_shard else split_by_sample
    return [sum(len(k) for k in f(sel, world, r)) for r in range(world)]
