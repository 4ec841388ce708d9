"""Reader and loader tests: exact one-pass epochs over 2 ranks x 2 workers, equal step counts (resampled train and
padded val), determinism, pipe:/ImageFolder/pattern sources, mixup, API errors.

Ranks are simulated by building each rank's loader with its own rank/world_size (the loaders take them as
arguments). Samples carry their id in their pixels (dsincubate.data.synth), so checks are end to end.

    pytest tests/unit/test_data_loader.py -q
"""
import os
from collections import Counter

import pytest
import torch

from dsincubate.data import (DataConfig, build_mixup, build_train_loader, build_val_loader, resolve_data)
from dsincubate.data.synth import id_image, id_samples, ids_from_batch
from dsincubate.data.writer import image_bytes, write_shards
from dsincubate.errors import UserError

CLASSES = [f"c{i}" for i in range(10)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """400 train samples in 8 shards of 50, 130 val samples in 3 shards."""
    root = tmp_path_factory.mktemp("ids")
    write_shards(id_samples(400), str(root / "train"), CLASSES, prefix="train", maxcount=50, progress=False)
    write_shards(id_samples(130, start=1000), str(root / "val"), CLASSES, prefix="val", maxcount=50,
                 progress=False)
    return root


def cfg_for(root, **kw):
    base = dict(train=str(root / "train"), val=str(root / "val"), recipe="none", num_workers=2,
                shuffle_buffer=64, resampled=False)
    base.update(kw)
    return DataConfig(**base)


def run_train(cfg, info, world, epoch=0, seed=0, bs=10, img=8, **kw):
    out = {}
    for r in range(world):
        dl = build_train_loader(cfg, info, batch_size=bs, rank=r, world_size=world, epoch=epoch, seed=seed,
                                img_size=img, **kw)
        batches = [(x, y) for x, y in dl]
        assert len(batches) == len(dl)
        out[r] = (dl, batches)
    return out


def test_one_pass_two_ranks_two_workers_every_sample_once(shards):
    cfg = cfg_for(shards)
    info = resolve_data(cfg)
    assert (info.train_samples, info.val_samples, info.num_classes) == (400, 130, 10)
    res = run_train(cfg, info, world=2)
    ids, steps = [], set()
    for r, (dl, batches) in res.items():
        steps.add(len(batches))
        for x, y in batches:
            assert x.shape == (10, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
            got = ids_from_batch(x)
            assert [i % 10 for i in got] == y.tolist()  # labels travel with their images
            ids += got
        assert dl.stats()["bad_samples"] == 0
    assert steps == {20}
    assert sorted(ids) == list(range(400))


def test_one_pass_uneven_total_drops_only_the_tail(shards, tmp_path):
    write_shards(id_samples(203), str(tmp_path / "t"), CLASSES, maxcount=40, progress=False)
    cfg = cfg_for(shards, train=str(tmp_path / "t"))
    info = resolve_data(cfg)
    res = run_train(cfg, info, world=2, bs=8)
    ids = [i for _, batches in res.values() for x, _ in batches for i in ids_from_batch(x)]
    assert {len(b) for _, b in res.values()} == {203 // 16}
    assert len(ids) == len(set(ids)) == 203 // 16 * 16


def test_one_pass_order_changes_with_epoch_and_is_reproducible(shards):
    cfg = cfg_for(shards)
    info = resolve_data(cfg)
    a = [ids_from_batch(x) for x, _ in run_train(cfg, info, 1, epoch=3)[0][1]]
    b = [ids_from_batch(x) for x, _ in run_train(cfg, info, 1, epoch=3)[0][1]]
    c = [ids_from_batch(x) for x, _ in run_train(cfg, info, 1, epoch=4)[0][1]]
    assert a == b and a != c
    assert sorted(sum(a, [])) == sorted(sum(c, []))


def test_resampled_same_steps_on_every_rank(shards):
    cfg = cfg_for(shards, resampled=True, samples_per_epoch=330)
    info = resolve_data(cfg)
    res = run_train(cfg, info, world=3, bs=8)
    for dl, batches in res.values():
        assert len(dl) == len(batches) == 330 // 24
        assert dl.stats()["samples_yielded"] == 13 * 8
    # different ranks draw different samples
    assert ids_from_batch(res[0][1][0][0]) != ids_from_batch(res[1][1][0][0])


@pytest.mark.parametrize("recipe", ["deit", "3aug"])
def test_augmented_stream_deterministic_per_seed_epoch_rank(shards, recipe):
    cfg = cfg_for(shards, resampled=True, recipe=recipe)
    info = resolve_data(cfg)

    def grab(**kw):
        dl = build_train_loader(cfg, info, batch_size=16, world_size=2, img_size=16, **kw)
        return torch.cat([x for x, _ in dl])

    a = grab(rank=1, epoch=2, seed=7)
    assert torch.equal(a, grab(rank=1, epoch=2, seed=7))
    assert not torch.equal(a, grab(rank=1, epoch=3, seed=7))
    assert not torch.equal(a, grab(rank=0, epoch=2, seed=7))


def test_workers_zero_leaves_caller_rng_alone(shards):
    cfg = cfg_for(shards, resampled=True, recipe="deit", num_workers=0)
    info = resolve_data(cfg)
    torch.manual_seed(123)
    expect = torch.rand(3)
    torch.manual_seed(123)
    dl = build_train_loader(cfg, info, batch_size=16, rank=0, world_size=1, epoch=0, seed=0, img_size=16)
    for _ in dl:
        pass
    assert torch.equal(torch.rand(3), expect)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_val_equal_batches_every_sample_valid_once(shards, world):
    cfg = cfg_for(shards)
    info = resolve_data(cfg)
    ids, lens = [], set()
    for r in range(world):
        dl = build_val_loader(cfg, info, batch_size=16, rank=r, world_size=world, img_size=8)
        n = 0
        for x, y, valid in dl:
            n += 1
            assert x.shape[0] == y.shape[0] == valid.shape[0] == 16 and valid.dtype == torch.bool
            ids += [i for i, v in zip(ids_from_batch(x), valid.tolist()) if v]
        assert n == len(dl)
        lens.add(n)
        st = dl.stats()
        assert st["samples_yielded"] + st["padded_samples"] == n * 16
    assert len(lens) == 1
    assert sorted(ids) == list(range(1000, 1130))


def test_pipe_and_brace_pattern_sources(shards):
    pattern = str(shards / "train" / "train-{000000..000007}.tar")
    for src in (f"pipe:cat {pattern}", pattern):
        cfg = cfg_for(shards, train=src)
        info = resolve_data(cfg)
        assert info.train_samples == 400 and info.train_manifest.endswith("manifest.json")
        ids = [i for x, _ in build_train_loader(cfg, info, batch_size=10, rank=0, world_size=1, epoch=0, seed=0,
                                                img_size=8) for i in ids_from_batch(x)]
        assert sorted(ids) == list(range(400))


def test_pipe_without_manifest_is_a_user_error(shards):
    with pytest.raises(UserError, match="manifest"):
        resolve_data(cfg_for(shards, train="pipe:curl -s http://example.invalid/x-{0..3}.tar"))


def test_image_folder_and_tars_without_manifest(shards, tmp_path):
    for i in range(60):
        d = tmp_path / "folder" / f"cls{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i}.png").write_bytes(image_bytes(id_image(i)))
    cfg = cfg_for(shards, train=str(tmp_path / "folder"), val=str(tmp_path / "folder"))
    info = resolve_data(cfg)
    assert info.class_names == ["cls0", "cls1", "cls2"] and info.train_samples == 60
    batches = list(build_train_loader(cfg, info, batch_size=6, rank=0, world_size=1, epoch=0, seed=0, img_size=8))
    got = {i: int(y) for x, ys in batches for i, y in zip(ids_from_batch(x), ys)}
    assert got == {i: i % 3 for i in range(60)}
    # the same tars, with the manifest gone: indexed from the tar headers
    os.makedirs(tmp_path / "bare")
    for f in os.listdir(shards / "train"):
        if f.endswith(".tar"):
            os.link(shards / "train" / f, tmp_path / "bare" / f)
    cfg = cfg_for(shards, train=str(tmp_path / "bare"))
    info = resolve_data(cfg)
    assert info.train_samples == 400 and info.num_classes == 10 and info.train_manifest == ""


def test_missing_and_empty_sources_name_the_path(tmp_path):
    with pytest.raises(UserError, match="nope"):
        resolve_data(DataConfig(train=str(tmp_path / "nope"), val=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty"):
        resolve_data(DataConfig(train=str(tmp_path / "empty"), val=str(tmp_path / "empty")))
    with pytest.raises(UserError, match="not found"):
        resolve_data(DataConfig(train=str(tmp_path / "x-{000..003}.tar"), val=str(tmp_path / "x")))
    with pytest.raises(UserError, match="recipe"):
        resolve_data(DataConfig(recipe="fancy", demo_root=str(tmp_path)))


def test_batch_larger_than_data_is_a_user_error(shards):
    cfg = cfg_for(shards)
    info = resolve_data(cfg)
    with pytest.raises(UserError, match="batch size"):
        build_train_loader(cfg, info, batch_size=256, rank=0, world_size=2, epoch=0, seed=0, img_size=8)


def test_mixup_soft_targets_seeded():
    cfg = DataConfig()
    m1, m2 = build_mixup(cfg, 10, seed=1), build_mixup(cfg, 10, seed=1)
    x, y = torch.randn(8, 3, 8, 8), torch.arange(8) % 10
    (a, ta), (b, tb) = m1(x.clone(), y), m2(x.clone(), y)
    assert ta.shape == (8, 10) and torch.allclose(ta.sum(1), torch.ones(8))
    assert torch.equal(a, b) and torch.equal(ta, tb)
    assert ta.max() < 1.0  # label smoothing 0.1 is in
    assert build_mixup(DataConfig(mixup=0, cutmix=0), 10) is None
    with pytest.raises(ValueError):
        m1(torch.randn(3, 3, 8, 8), torch.arange(3))


def test_demo_end_to_end(tmp_path):
    cfg = DataConfig(demo_root=str(tmp_path), num_workers=2)
    info = resolve_data(cfg)
    assert info.num_classes == 10 and info.train_samples == 3000 and info.val_samples == 600
    assert info.image_size == (32, 32)
    dl = build_train_loader(cfg, info, batch_size=64, rank=0, world_size=2, epoch=0, seed=0, img_size=32)
    assert len(dl) == 3000 // 128
    n = 0
    for x, y in dl:
        assert x.shape == (64, 3, 32, 32) and int(y.max()) < 10
        n += 1
    assert n == len(dl)
    counts = Counter()
    for r in range(2):
        for x, y, v in build_val_loader(cfg, info, batch_size=64, rank=r, world_size=2, img_size=32):
            counts.update(y[v].tolist())
    assert counts == {c: 60 for c in range(10)}


# ---- worker count from the cores a rank has (issue 21 item 4) -------------------------------------------------------
from dsincubate.data.loader import default_workers, resolve_workers  # noqa: E402


@pytest.mark.parametrize("env,cores,want", [
    ({}, 16, 15),                                            # one process: all its cores less its own thread
    ({"LOCAL_WORLD_SIZE": "8"}, 128, 15),                    # torchrun: 8 ranks share 128 cores
    ({"LOCAL_SIZE": "4"}, 16, 3),                            # DeepSpeed's launcher
    ({"SLURM_NTASKS_PER_NODE": "4(x2)"}, 32, 7),             # srun's per-node count in its compressed form
    ({"LOCAL_WORLD_SIZE": "2"}, 2, 0),                       # this CI box: 1 core per rank, read in the rank
    ({"LOCAL_WORLD_SIZE": "8", "SLURM_CPUS_PER_TASK": "6"}, 6, 5),   # SLURM bound each task to its own 6 cores
    ({"LOCAL_WORLD_SIZE": "8", "SLURM_CPUS_PER_TASK": "6"}, 48, 5),  # affinity spans the node: divide by ranks
])
def test_default_workers_divides_the_rank_affinity_by_the_ranks_on_the_node(env, cores, want):
    assert default_workers(env, affinity=cores) == want


def test_default_workers_follow_this_process_affinity_not_the_machine_core_count(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    assert default_workers() == len(os.sched_getaffinity(0)) - 1
    assert resolve_workers(DataConfig()) == len(os.sched_getaffinity(0)) - 1   # None: derived
    assert resolve_workers(DataConfig(num_workers=3)) == 3                     # the override stays
    assert resolve_workers(DataConfig(num_workers=0)) == 0


def test_derived_worker_count_is_what_the_loader_runs_and_records(shards, monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "64")   # more ranks than cores: no workers, read in the rank
    cfg = cfg_for(shards, num_workers=None)
    info = resolve_data(cfg)
    dl = build_train_loader(cfg, info, batch_size=10, rank=0, world_size=2, epoch=0, seed=0, img_size=8)
    assert dl.num_workers == 0 and dl.stats()["num_workers"] == 0
    assert len([b for b in dl]) == len(dl) == 20


def _epochs(cfg, info, persistent, epochs=(0, 1, 2), stop_early_at=None):
    """Each epoch's images and the worker pids that delivered them; loaders built per epoch as the trainer does."""
    out = []
    for e in epochs:
        dl = build_train_loader(cfg, info, batch_size=10, rank=1, world_size=2, epoch=e, seed=4, img_size=8,
                                persistent=persistent)
        batches = []
        for x, _ in dl:
            batches.append(x)
            if e == stop_early_at and len(batches) == 2:
                break  # the consumer leaves mid-epoch: the workers' unread batches must not leak into the next
        out.append((torch.cat(batches), set(dl.worker_pids)))
    return out


@pytest.mark.parametrize("resampled", [False, True])
def test_persistent_workers_serve_every_epoch_and_read_what_fresh_workers_read(shards, resampled):
    """The torch loader's workers start once and serve the next epochs' loaders (same arguments but the epoch);
    what they deliver is bit-identical to workers started for that epoch alone (so resumes stay exact), and each
    epoch is still its own (epoch-seeded order and augmentation)."""
    cfg = cfg_for(shards, resampled=resampled, recipe="deit", samples_per_epoch=200)
    info = resolve_data(cfg)
    kept = _epochs(cfg, info, persistent=True, stop_early_at=1)
    fresh = _epochs(cfg, info, persistent=False)
    assert len({frozenset(p) for _, p in kept}) == 1 and len(kept[0][1]) == 2      # the same 2 workers throughout
    assert len({frozenset(p) for _, p in fresh}) == 3                               # new ones every epoch
    assert torch.equal(kept[0][0], fresh[0][0]) and torch.equal(kept[2][0], fresh[2][0])
    assert torch.equal(kept[1][0], fresh[1][0][:len(kept[1][0])])                  # epoch 1 stopped after 2 batches
    assert not torch.equal(kept[0][0], kept[2][0])


def test_two_loaders_of_one_key_iterated_at_once_each_read_their_own_epoch(shards):
    """A loader of the persistent pool's key that starts while the pool is busy gets workers of its own."""
    cfg = cfg_for(shards, resampled=True, samples_per_epoch=200)
    info = resolve_data(cfg)
    kw = dict(batch_size=10, rank=0, world_size=1, seed=2, img_size=8)
    a, b = (build_train_loader(cfg, info, epoch=e, **kw) for e in (0, 1))
    both = [(xa, xb) for (xa, _), (xb, _) in zip(a, b)]
    assert len(both) == len(a) and not a.worker_pids & b.worker_pids
    for e in (0, 1):
        ref = torch.cat([x for x, _ in build_train_loader(cfg, info, epoch=e, persistent=False, **kw)])
        assert torch.equal(torch.cat([p[e] for p in both]), ref)


def _evaluate(cfg, info, persistent, stop_early=False):
    """One evaluation as the trainer runs it: (images, targets, valid) of every batch, stats, worker pids."""
    dl = build_val_loader(cfg, info, batch_size=16, rank=0, world_size=1, img_size=8, persistent=persistent)
    batches = []
    for x, y, valid in dl:
        batches.append((x, y, valid))
        if stop_early and len(batches) == 2:
            break  # an evaluation cut short: its unread batches must not leak into the next one
    cat = tuple(torch.cat([b[i] for b in batches]) for i in range(3))
    return cat, dl.stats(), set(dl.worker_pids)


def test_val_workers_persist_across_evaluations_and_read_what_fresh_workers_read(shards):
    """The torch val loader's workers start at the first evaluation and serve the later ones, which deliver exactly
    what workers started for that evaluation deliver; the train pool survives the evaluations between its epochs."""
    cfg = cfg_for(shards, resampled=True, samples_per_epoch=200)
    info = resolve_data(cfg)
    fresh, fresh_stats, fresh_pids = _evaluate(cfg, info, persistent=False)
    evals, train_pids = [], []
    for e, stop_early in zip(range(3), (False, True, False)):
        train = build_train_loader(cfg, info, batch_size=10, rank=0, world_size=1, epoch=e, seed=4, img_size=8)
        assert len([b for b in train]) == len(train)
        train_pids.append(frozenset(train.worker_pids))
        evals.append(_evaluate(cfg, info, persistent=True, stop_early=stop_early))
    assert len(set(train_pids)) == 1 and len(train_pids[0]) == 2            # the same 2 train workers throughout
    val_pids = {frozenset(p) for _, _, p in evals}
    assert len(val_pids) == 1 and len(fresh_pids) == 2                        # the same val workers every time
    assert not val_pids.pop() & (train_pids[0] | fresh_pids)
    for i in (0, 2):
        got, stats, _ = evals[i]
        assert all(torch.equal(a, b) for a, b in zip(got, fresh))
        assert {k: v for k, v in stats.items() if k != "bad_examples"} == \
            {k: v for k, v in fresh_stats.items() if k != "bad_examples"}
    assert torch.equal(evals[1][0][0], fresh[0][:32])                         # the cut evaluation's 2 batches
