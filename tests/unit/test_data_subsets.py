"""Paper data splits from the manifest: class-balanced fractions and DMT subsets (disjoint, covering, balanced),
and loaders that read only the selected samples (and only the shards holding them).

    pytest tests/unit/test_data_subsets.py -q
"""
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsincubate.data import DataConfig, build_train_loader, resolve_data
from dsincubate.data.loader import cached_index
from dsincubate.data.subsets import (dealt_copies, group_shards, rank_counts, repeat_group, select_subset,
                                     split_by_sample, split_by_shard)
from dsincubate.data.synth import id_samples, ids_from_batch
from dsincubate.data.writer import write_shards
from dsincubate.errors import UserError

CLASSES = [f"c{i}" for i in range(10)]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("sub") / "train"
    write_shards(id_samples(1000), str(d), CLASSES, maxcount=50, progress=False)  # 20 shards, 100 per class
    return str(d)


def _selected(sel):
    return [k for ks in sel.keys for k in ks], Counter(lab for ls in sel.labels for lab in ls)


@pytest.mark.parametrize("fraction", [0.25, 0.5, 1.0])
def test_fraction_is_class_balanced(src, fraction):
    idx = cached_index(src)
    sel = select_subset(idx, fraction)
    keys, per_class = _selected(sel)
    assert len(keys) == len(set(keys)) == int(1000 * fraction)
    assert set(per_class.values()) == {int(100 * fraction)}
    assert sel.info["selected_samples"] == len(keys) and sel.info["train_fraction"] == fraction


@pytest.mark.parametrize("splits,fraction", [(4, 1.0), (3, 1.0), (2, 0.5)])
def test_dmt_subsets_disjoint_covering_balanced(src, splits, fraction):
    idx = cached_index(src)
    everything, _ = _selected(select_subset(idx, fraction))
    seen = []
    for i in range(splits):
        sel = select_subset(idx, fraction, splits, i)
        keys, per_class = _selected(sel)
        seen += keys
        n = 100 * fraction / splits
        assert all(int(n) <= c <= int(n) + 1 for c in per_class.values()) and len(per_class) == 10
        # contiguous chunks in shard order: a subset needs only about 1/splits of the shards (class boundaries
        # fall in different shards, so a few more)
        assert sel.info["selected_shards"] <= 2 * 20 * fraction / splits + 1
    assert sorted(seen) == sorted(everything) and len(seen) == len(set(seen))


def test_bad_subset_arguments(src):
    idx = cached_index(src)
    with pytest.raises(UserError):
        select_subset(idx, 0.0)
    with pytest.raises(UserError):
        select_subset(idx, 1.0, 4, 4)
    with pytest.raises(UserError):
        select_subset(idx, 1.0, 4, None)
    with pytest.raises(UserError, match="fewer than"):
        select_subset(idx, 0.01, 4, 0)


@pytest.mark.parametrize("world", [2, 3, 7])
def test_rank_splits_cover_without_overlap(src, world):
    sel = select_subset(cached_index(src), 0.5)
    for split in (split_by_sample, split_by_shard):
        parts = [[k for ks in split(sel, world, r) for k in ks] for r in range(world)]
        flat = [k for p in parts for k in p]
        assert sorted(flat) == sorted(k for ks in sel.keys for k in ks) and len(flat) == len(set(flat))
    counts = rank_counts(sel, world, by_shard=False)
    assert max(counts) - min(counts) <= 1


def test_loader_reads_only_its_dmt_subset(src):
    cfg = DataConfig(train=src, val=src, recipe="none", num_workers=2, resampled=False, dmt_splits=4,
                     shuffle_buffer=32)
    info = resolve_data(cfg)
    assert info.train_samples == 1000 and info.selected_train_samples == 250
    idx = cached_index(src)
    union = []
    for i in range(4):
        sel = select_subset(idx, 1.0, 4, i)
        want = {int(k[1:]) for ks in sel.keys for k in ks}
        dl = build_train_loader(cfg, info, batch_size=10, rank=0, world_size=1, epoch=0, seed=0, img_size=8,
                                subset_index=i)
        got = [j for x, _ in dl for j in ids_from_batch(x)]
        assert len(got) == len(set(got)) == 250 and set(got) == want
        st = dl.stats()
        assert st["subset"]["subset_index"] == i and st["subset"]["dmt_splits"] == 4
        assert st["shards_read"] == sel.info["selected_shards"] < 20
        union += got
    assert sorted(union) == list(range(1000))


def test_fraction_loader_resampled_stays_inside_subset(src):
    cfg = DataConfig(train=src, val=src, recipe="none", num_workers=1, train_fraction=0.25, samples_per_epoch=500)
    info = resolve_data(cfg)
    want = {int(k[1:]) for ks in select_subset(cached_index(src), 0.25).keys for k in ks}
    dl = build_train_loader(cfg, info, batch_size=10, rank=0, world_size=1, epoch=0, seed=0, img_size=8)
    got = [j for x, _ in dl for j in ids_from_batch(x)]
    assert len(got) == 500 and set(got) <= want  # same step budget as asked, samples only from the subset
    assert dl.stats()["subset"]["selected_samples"] == 250


@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_fraction_keeps_the_full_set_number_of_steps(src, fraction):
    """Paper Tab. 5: a subset trains for the full set's iterations (samples_per_epoch unset = the whole set)."""
    full = DataConfig(train=src, val=src, recipe="none", num_workers=1)
    part = DataConfig(train=src, val=src, recipe="none", num_workers=1, train_fraction=fraction)
    kw = dict(batch_size=10, rank=0, world_size=1, epoch=0, seed=0, img_size=8)
    dl_full = build_train_loader(full, resolve_data(full), **kw)
    dl_part = build_train_loader(part, resolve_data(part), **kw)
    assert len(dl_part) == len(dl_full) == 100
    want = {int(k[1:]) for ks in select_subset(cached_index(src), fraction).keys for k in ks}
    assert {j for x, _ in dl_part for j in ids_from_batch(x)} <= want


def test_dmt_meta_and_finetune_read_the_full_set(src):
    """With dmt_splits, only incubation jobs (which pass a stage index) read a subset; meta pre-training and
    fine-tuning (no stage index) read every sample."""
    cfg = DataConfig(train=src, val=src, recipe="none", num_workers=2, resampled=False, dmt_splits=4,
                     shuffle_buffer=32)
    dl = build_train_loader(cfg, resolve_data(cfg), batch_size=10, rank=0, world_size=1, epoch=0, seed=0, img_size=8)
    got = [j for x, _ in dl for j in ids_from_batch(x)]
    assert sorted(got) == list(range(1000))


@pytest.mark.parametrize("world,k", [(1, 3), (2, 3), (3, 3), (4, 2), (6, 3)])
def test_repeated_augmentation_uses_each_sample_k_times_across_ranks(src, world, k):
    """DeiT's RASampler on a stream: over all ranks each drawn sample appears k times per draw (a copy cut off by
    the end of the epoch aside), copies are augmented separately, and the epoch length does not change. From
    world >= 2k on, ranks form groups of k that read disjoint shards, every member one copy of each sample."""
    cfg = DataConfig(train=src, val=src, recipe="none", num_workers=2, repeated_aug=k, samples_per_epoch=600,
                     shuffle_buffer=64)
    base = DataConfig(train=src, val=src, recipe="none", num_workers=2, samples_per_epoch=600, shuffle_buffer=64)
    info = resolve_data(cfg)
    kw = dict(batch_size=10, world_size=world, epoch=0, seed=3, img_size=8)
    counts, per_rank = Counter(), []
    for r in range(world):
        dl = build_train_loader(cfg, info, rank=r, **kw)
        assert len(dl) == len(build_train_loader(base, info, rank=r, **kw))  # same steps per epoch
        got = [j for x, _ in dl for j in ids_from_batch(x)]
        per_rank.append(got)
        counts.update(got)
    total = sum(counts.values())
    assert total == 600 // (10 * world) * 10 * world
    # shards are drawn with replacement, so a sample drawn twice has 2k copies: only the cut breaks multiples of k
    assert sum(1 for n in counts.values() if n % k) <= 2 * 2 * world
    groups = [per_rank[g * k:(g + 1) * k] for g in range(world // k)] if world >= 2 * k else []
    for members in groups:  # each member of a group gets one copy of each of the group's samples, in one order
        assert all(m == members[0] for m in members)
    for a in range(len(groups)):  # groups read disjoint shards
        assert all(not set(groups[a][0]) & set(groups[b][0]) for b in range(a))
    with pytest.raises(UserError, match="resampled"):
        build_train_loader(DataConfig(train=src, val=src, recipe="none", repeated_aug=3, resampled=False), info,
                           rank=0, **kw)


def _stream_read(need: int, repeat: int, size: int, member: int) -> int:
    """Samples of its group's stream a member reads before it has kept `need` copies (subsets.dealt_copies)."""
    kept, n = 0, 0
    while kept < need:
        kept += dealt_copies(1, n * repeat, repeat, size, member)[0]
        n += 1
    return n


@settings(max_examples=60, deadline=None)
@given(world=st.integers(1, 64), repeat=st.integers(2, 4), need=st.integers(1, 300),
       sizes=st.lists(st.integers(0, 60), min_size=1, max_size=120))
def test_repeat_groups_read_each_sample_only_on_the_ranks_that_keep_its_copies(world, repeat, need, sizes):
    """The repeated-augmentation plan for any world of 1..64 ranks: the ranks split into groups of about `repeat`
    (contiguous, sizes differ by one, >= repeat when the world allows); groups draw from disjoint shards covering the
    set; inside a group every sample's `repeat` copies are dealt round-robin (on distinct ranks when the group is
    large enough). So a rank reads about `need` * size / repeat samples to keep `need` copies: all ranks together
    read at most ~2x an epoch (exactly 1x when repeat divides the world), where one stream shared by all ranks
    costs world / repeat times an epoch."""
    plan = [repeat_group(r, world, repeat) for r in range(world)]
    groups = plan[0][1]
    assert groups == max(1, world // repeat) and all(p[1] == groups for p in plan)
    assert [p[0] for p in plan] == sorted(p[0] for p in plan) and {p[0] for p in plan} == set(range(groups))
    members = {g: [p for p in plan if p[0] == g] for g in range(groups)}
    for g, ps in members.items():
        assert [p[2] for p in ps] == list(range(len(ps))) and all(p[3] == len(ps) for p in ps)
    group_sizes = [len(ps) for ps in members.values()]
    assert max(group_sizes) - min(group_sizes) <= 1
    assert min(group_sizes) >= min(repeat, world) and (groups == 1 or max(group_sizes) < 2 * repeat)
    shard_sets = [set(group_shards(sizes, groups, g)) for g in range(groups)]
    nonempty = {i for i, n in enumerate(sizes) if n}
    if len(nonempty) >= groups:
        assert set().union(*shard_sets) == nonempty and sum(map(len, shard_sets)) == len(nonempty)
    for size in set(group_sizes):
        copies = [dealt_copies(7, 0, repeat, size, m) for m in range(size)]
        assert [sum(c) for c in zip(*copies)] == [repeat] * 7                     # k copies of every sample
        assert max(max(c) for c in copies) == -(-repeat // size)                  # spread over the members
    reads = [_stream_read(need, repeat, p[3], p[2]) for p in plan]
    for (_, _, _, size), n in zip(plan, reads):
        assert n <= need * size / repeat + size                                   # its share, up to a round
    assert sum(reads) <= 2 * world * need + world * world
    if world % repeat == 0:
        assert sum(reads) <= world * need + world                                 # one epoch of reads in all
    shared = [_stream_read(need, repeat, world, r) for r in range(world)]         # one stream for all ranks
    assert sum(shared) >= world * (need * world / repeat) - world * world
    if world >= 2 * repeat and need >= 2 * world:
        assert sum(reads) < sum(shared)


@pytest.mark.parametrize("world", [4, 8])
def test_repeated_augmentation_reads_about_each_ranks_own_samples_from_storage(src, world):
    """Built per rank (the loader's plan, not a training run): with repeat 2 each rank streams about the samples it
    trains on (+ the shuffle buffer and the rest of a shard), not world/2 times that."""
    cfg = DataConfig(train=src, val=src, recipe="none", num_workers=1, repeated_aug=2, samples_per_epoch=200 * world,
                     shuffle_buffer=16)
    info = resolve_data(cfg)
    for r in range(world):
        dl = build_train_loader(cfg, info, batch_size=10, rank=r, world_size=world, epoch=0, seed=5, img_size=8)
        n = sum(len(y) for _, y in dl)
        assert n == 200 and dl.stats()["samples_streamed"] <= n + 16 + 50, dl.stats()
