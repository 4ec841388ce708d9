"""data.backend=dali on the CPU (device_id=None): the torch loader's semantics through DALI's webdataset reader.

Ranks are simulated by building each rank's loader with its own rank/world_size: that is the interface a rank uses
(one pipeline per rank). Samples carry their id in their pixels (dsincubate.data.synth), so checks are end to end.
Skipped when DALI is not installed (`pip install -e .[dali]`; the test extra installs it).

    pytest tests/unit/test_data_dali.py -q
"""
import dataclasses
import signal
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from dsincubate.data import DataConfig, build_train_loader, build_val_loader, resolve_data
from dsincubate.data.dali import dali_available, index_path, read_index, scan_tar
from dsincubate.data.synth import id_samples, ids_from_batch
from dsincubate.data.writer import write_shards
from dsincubate.errors import UserError
from test_data_bad import bad_dir  # noqa: F401 (the fuzzed shards of every kind of damage, as a fixture)

needs_dali = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI not installed (pip install -e .[dali])")
CLASSES = [f"c{i}" for i in range(10)]


@pytest.fixture(autouse=True)
def no_hang():
    def boom(*_):
        raise TimeoutError("DALI loader hung")
    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """410 train samples in 9 shards (the last one short), 130 val samples in 3 shards; one 1000-sample shard."""
    root = tmp_path_factory.mktemp("dali")
    write_shards(id_samples(410), str(root / "train"), CLASSES, prefix="train", maxcount=50, progress=False)
    write_shards(id_samples(130, start=1000), str(root / "val"), CLASSES, prefix="val", maxcount=50,
                 progress=False)
    write_shards(id_samples(1000, start=2000), str(root / "one"), CLASSES, prefix="one", maxcount=1000,
                 progress=False)
    return root


def cfg_for(root, **kw):
    base = dict(train=str(root / "train"), val=str(root / "val"), recipe="none", backend="dali", num_workers=1,
                resampled=False)
    return DataConfig(**{**base, **kw})


def ids_of(dl):
    out = []
    for x, _ in dl:
        out += ids_from_batch(x)
    return out


def test_shards_get_dali_index_files_identical_to_wds2idx(shards, tmp_path):
    tar = shards / "train" / "train-000000.tar"
    assert (shards / "train" / "train-000000.idx").is_file()
    groups, err = scan_tar(str(tar))
    assert err is None and [k for k, _ in groups] == [k for k, _ in read_index(index_path(str(tar)))]
    tool = pytest.importorskip("wds2idx")  # DALI's own index tool, installed with the wheel
    out = tmp_path / "ref.idx"
    subprocess.run([sys.executable, tool.__file__, str(tar), str(out)], check=True, capture_output=True)
    assert out.read_text() == (shards / "train" / "train-000000.idx").read_text()


@needs_dali
def test_missing_index_is_built_at_start(shards, tmp_path):
    d = tmp_path / "noidx"
    write_shards(id_samples(60), str(d), CLASSES, prefix="s", maxcount=30, progress=False)
    for p in d.glob("*.idx"):
        p.unlink()
    cfg = DataConfig(train=str(d), val=str(d), recipe="none", backend="dali", num_workers=1, resampled=False)
    dl = build_train_loader(cfg, resolve_data(cfg), batch_size=10, rank=0, world_size=1, epoch=0, seed=0,
                            img_size=8)
    assert sorted(ids_of(dl)) == list(range(60))
    assert sorted(p.name for p in d.glob("*.idx")) == ["s-000000.idx", "s-000001.idx"]


@needs_dali
@pytest.mark.parametrize("bs", [10, 16])
def test_one_pass_two_ranks_no_sample_twice_equal_steps(shards, bs):
    cfg = cfg_for(shards)
    info = resolve_data(cfg)
    per_rank, steps = [], set()
    for r in range(2):
        dl = build_train_loader(cfg, info, batch_size=bs, rank=r, world_size=2, epoch=0, seed=0, img_size=8)
        got = ids_of(dl)
        assert len(got) == len(dl) * bs and dl.stats()["samples_yielded"] == len(got)
        per_rank.append(got)
        steps.add(len(dl))
    assert steps == {410 // (bs * 2)}                          # the torch loader's epoch length, every rank
    allids = per_rank[0] + per_rank[1]
    assert len(allids) == len(set(allids))                     # no sample twice, on one rank or on two
    assert set(per_rank[0]).isdisjoint(per_rank[1])
    if bs == 10:                                               # 410 = 2 x 20 x 10 + 10: all but 10 samples read
        assert len(set(allids)) == 400


@needs_dali
def test_one_pass_uses_the_torch_loaders_split_and_reshuffles_each_epoch(shards):
    dali = cfg_for(shards)
    torch_cfg = cfg_for(shards, backend="torch", num_workers=0)
    info = resolve_data(dali)
    kw = dict(batch_size=41, world_size=2, seed=0, img_size=8)
    for r in range(2):   # 410 samples, one epoch = all of them: the same samples on the same rank as torch's
        a = ids_of(build_train_loader(dali, info, rank=r, epoch=0, **kw))
        b = ids_of(build_train_loader(torch_cfg, info, rank=r, epoch=0, **kw))
        assert sorted(a) == sorted(b)
        c = ids_of(build_train_loader(dali, info, rank=r, epoch=1, **kw))
        assert sorted(c) == sorted(a) and c != a
        assert ids_of(build_train_loader(dali, info, rank=r, epoch=0, **kw)) == a   # seeded: exact resume


@needs_dali
def test_resampled_epoch_length_and_samples_per_epoch(shards):
    cfg = cfg_for(shards, resampled=True, samples_per_epoch=300)
    info = resolve_data(cfg)
    for r in range(2):
        dl = build_train_loader(cfg, info, batch_size=10, rank=r, world_size=2, epoch=0, seed=0, img_size=8)
        got = ids_of(dl)
        assert len(dl) == 15 and len(got) == 150 and set(got) <= set(range(410))
        assert dl.stats()["samples_per_epoch"] == 300 and dl.stats()["mode"] == "resampled"


@needs_dali
def test_repeated_augmentation_deals_each_sample_once_to_each_of_k_ranks(shards):
    cfg = cfg_for(shards, train=str(shards / "one"), val=str(shards / "one"), resampled=True, repeated_aug=2,
                  samples_per_epoch=600)
    info = resolve_data(cfg)
    per_rank = []
    for r in range(2):
        dl = build_train_loader(cfg, info, batch_size=10, rank=r, world_size=2, epoch=0, seed=3, img_size=8)
        per_rank.append(ids_of(dl))
        assert len(dl) == 30
    counts = Counter(per_rank[0] + per_rank[1])
    assert set(counts.values()) == {2}                          # each drawn sample k=2 times over the ranks ...
    assert per_rank[0] == per_rank[1]                           # ... as neighbours in the stream, one per rank


@needs_dali
def test_repeated_augmentation_reads_each_ranks_share_only(shards):
    """Every rank plans (reads) only the copies dealt to it, so all ranks together read about one epoch of samples,
    not world_size times the shared stream (the torch path's cost: each rank reads the stream, keeps its share)."""
    cfg = cfg_for(shards, resampled=True, repeated_aug=3, samples_per_epoch=400)
    info = resolve_data(cfg)
    W, B = 4, 10
    planned = [build_train_loader(cfg, info, batch_size=B, rank=r, world_size=W, epoch=0, seed=1, img_size=8)
               .stats()["samples_planned"] for r in range(W)]
    steps = 400 // (B * W)
    assert all(steps * B <= p <= steps * B + 60 for p in planned), planned   # ~its own batches (+ the last draw)
    assert sum(planned) < 1.5 * 400


@needs_dali
def test_repeated_augmentation_groups_of_k_ranks_read_disjoint_shards_as_the_torch_path(shards):
    """From world >= 2k on, ranks form groups of k (subsets.repeat_group, as the torch loader): a group's members
    each get one copy of every sample of the group's stream, and groups read disjoint shards."""
    cfg = cfg_for(shards, resampled=True, repeated_aug=2, samples_per_epoch=400)
    info = resolve_data(cfg)
    loaders = [build_train_loader(cfg, info, batch_size=10, rank=r, world_size=4, epoch=1, seed=2, img_size=8)
               for r in range(4)]
    ids = [ids_of(dl) for dl in loaders]
    assert [dl.stats()["repeat_group"] for dl in loaders] == [[0, 2, 0, 2], [0, 2, 1, 2], [1, 2, 0, 2], [1, 2, 1, 2]]
    torch_cfg = dataclasses.replace(cfg, backend="torch")
    assert [build_train_loader(torch_cfg, info, batch_size=10, rank=r, world_size=4, epoch=1, seed=2, img_size=8)
            .stats()["repeat_group"] for r in range(4)] == [dl.stats()["repeat_group"] for dl in loaders]
    assert ids[0] == ids[1] and ids[2] == ids[3] and len(ids[0]) == 100
    assert not set(ids[0]) & set(ids[2])


@needs_dali
def test_val_every_sample_valid_once_equal_batches(shards):
    cfg = cfg_for(shards)
    info = resolve_data(cfg)
    ids, steps = [], set()
    for r in range(2):
        dl = build_val_loader(cfg, info, batch_size=16, rank=r, world_size=2, img_size=8)
        n = 0
        for x, y, valid in dl:
            n += 1
            ids += [i for i, ok in zip(ids_from_batch(x), valid.tolist()) if ok]
        steps.add(n)
    assert len(steps) == 1 and sorted(ids) == list(range(1000, 1130))


@needs_dali
@pytest.mark.parametrize("recipe", ["deit", "none"])
def test_deit_and_eval_recipes_give_normalised_batches_with_labels(shards, recipe):
    cfg = cfg_for(shards, recipe=recipe, resampled=True, samples_per_epoch=40, reprob=0.25)
    info = resolve_data(cfg)
    dl = build_train_loader(cfg, info, batch_size=20, rank=0, world_size=1, epoch=0, seed=0, img_size=32)
    batches = list(dl)
    assert len(batches) == 2
    for x, y in batches:
        assert x.shape == (20, 3, 32, 32) and x.dtype == torch.float32 and torch.isfinite(x).all()
        assert y.dtype == torch.int64 and y.min() >= 0 and y.max() < 10
        assert -3 < float(x.mean()) < 3


@needs_dali
def test_every_kind_of_bad_data_skipped_counted_once_and_named(bad_dir):  # noqa: F811
    cfg = DataConfig(train=str(bad_dir / "train"), val=str(bad_dir / "train"), recipe="none", backend="dali",
                     num_workers=1, resampled=False, max_bad_fraction=1.0)
    info = resolve_data(cfg)
    dl = build_val_loader(cfg, info, batch_size=16, rank=0, world_size=1, img_size=8)
    ids = [i for x, _, v in dl for i, ok in zip(ids_from_batch(x), v.tolist()) if ok]
    st = dl.stats()
    kinds = st["bad_by_kind"]
    assert kinds["decode_error"] == 1 and kinds["missing_label"] == 1 and kinds["missing_image"] >= 1
    assert kinds["bad_label"] == 2 and kinds["truncated_shard"] == 1
    assert kinds["empty_shard"] + kinds["unopenable_shard"] == 3   # empty.tar, zero.tar, gone.tar
    good = set(range(200)) | {905}
    assert good <= set(ids) and len(ids) == len(set(ids))
    assert set(ids) - good <= set(range(300, 320))
    assert st["samples_yielded"] + st["bad_samples"] == info.val_samples
    assert any("samples.tar" in e and "b000" in e for e in st["bad_examples"])


@needs_dali
@pytest.mark.parametrize("resampled", [False, True])
def test_bad_data_tolerated_gives_full_epochs_on_every_rank_and_too_much_stops(bad_dir, resampled):  # noqa: F811
    base = dict(train=str(bad_dir / "train"), val=str(bad_dir / "train"), recipe="none", backend="dali",
                num_workers=1, resampled=resampled)
    cfg = DataConfig(**base, max_bad_fraction=0.5)
    info = resolve_data(cfg)
    for rank in range(2):
        dl = build_train_loader(cfg, info, batch_size=8, rank=rank, world_size=2, epoch=0, seed=0, img_size=8)
        assert sum(1 for _ in dl) == len(dl)
    with pytest.raises(UserError, match="max_bad_fraction"):
        for _ in build_train_loader(DataConfig(**base), info, batch_size=8, rank=0, world_size=1, epoch=0, seed=0,
                                    img_size=8):
            pass


def test_dali_backend_refused_in_one_line_without_dali(shards, monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)   # import fails as it does where DALI is not installed
    with pytest.raises(UserError, match=r"data.backend=dali needs NVIDIA DALI: pip install"):
        resolve_data(cfg_for(shards))


@needs_dali
def test_3aug_training_falls_back_to_the_torch_path_with_a_warning(shards, caplog):
    cfg = cfg_for(shards, recipe="3aug", resampled=True, samples_per_epoch=20)
    dl = build_train_loader(cfg, resolve_data(cfg), batch_size=10, rank=0, world_size=1, epoch=0, seed=0,
                            img_size=16)
    assert sum(1 for _ in dl) == 2 and dl.stats().get("backend", "torch") == "torch"
    assert "not implemented on DALI" in caplog.text


@needs_dali
def test_benchmark_dali_rows_use_the_torch_rows_images_and_recipe(tmp_path, monkeypatch):
    """benchmarks/dataloader.py: every DALI row runs on the same shards with the same DataConfig as the torch row of
    the same name (only `backend` differs), and reports cores per H100 at 3,000 images/s."""
    import json
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks import dataloader as bench

    out = tmp_path / "r.json"
    monkeypatch.setattr(sys, "argv", ["dataloader.py", "--images", "24", "--batch", "8", "--size", "32",
                                      "--workers", "1", "--workdir", str(tmp_path / "w"), "--out", str(out)])
    assert bench.main() == 0
    rec = json.loads(out.read_text())
    cfgs, res = rec["row_configs"], rec["results"]
    dali_rows = [k for k in cfgs if k.startswith("DALI cpu")]
    assert len(dali_rows) == len(bench.LOADER_ROWS) == 3
    for row in dali_rows:
        twin = row.replace("DALI cpu", "ours webdataset")
        a, b = dict(cfgs[row]), dict(cfgs[twin])
        assert (a.pop("backend"), b.pop("backend")) == ("dali", "torch")
        assert a == b and a["train"].startswith(str(tmp_path / "w"))
        assert res[row]["images"] == res[twin]["images"] == 24
        assert res[row]["cores_per_h100"] == pytest.approx(3000 / res[row]["img_per_cpu_s"], abs=0.06)
    assert cfgs["DALI cpu [decode+crop+flip]"]["auto_augment"] == "" and cfgs["DALI cpu [deit]"]["auto_augment"]
    assert cfgs["DALI cpu [decode+crop+flip]"]["color_jitter"] == 0.0   # timm would jitter without RandAugment
    # the persistent-workers rows: 3 epochs of the torch [none] row's config, with and without persistence
    rebuilt, kept = "ours [none] 3 epochs, workers per epoch", "ours [none] 3 epochs, persistent workers"
    assert cfgs[rebuilt] == cfgs[kept] == cfgs["ours webdataset [none]"]
    assert res[rebuilt]["images"] == res[kept]["images"] == 3 * 24
    assert (res[rebuilt]["persistent_workers"], res[kept]["persistent_workers"]) == (False, True)


@needs_dali
@pytest.mark.parametrize("kw,subset", [({"train_fraction": 0.5}, None), ({"dmt_splits": 2}, 1)])
def test_fractions_and_dmt_subsets_select_the_torch_loaders_samples(shards, kw, subset):
    dali = cfg_for(shards, samples_per_epoch=None, **kw)
    torch_cfg = cfg_for(shards, backend="torch", num_workers=0, **kw)
    info = resolve_data(dali)
    args = dict(batch_size=5, rank=0, world_size=1, epoch=0, seed=0, img_size=8, subset_index=subset)
    a = ids_of(build_train_loader(dali, info, **args))
    b = ids_of(build_train_loader(torch_cfg, info, **args))
    assert sorted(a) == sorted(b) and len(set(a)) == len(a) and 150 <= len(a) <= 210


@needs_dali
def test_deit_without_randaugment_applies_colour_jitter_as_timm_does(shards):
    """timm's DeiT transform applies ColorJitter when auto_augment is off; so does the DALI recipe."""
    from dsincubate.data.dali_loader import build_pipeline
    tars = sorted(str(p) for p in (shards / "train").glob("*.tar"))
    out = {}
    for jitter in (0.0, 0.4):
        p = build_pipeline(train=True, recipe="deit", randaug=None, jitter=jitter, paths=tars,
                           idxs=[t[:-4] + ".idx" for t in tars], batch_size=8, img_size=16, threads=1, device_id=None,
                           seed=5)
        out[jitter] = [torch.from_numpy(np.array(p.run()[0].as_tensor())) for _ in range(2)]
    assert all(a.shape == (8, 3, 16, 16) for a in out[0.4])
    assert any(not torch.equal(a, b) for a, b in zip(out[0.0], out[0.4]))   # same seed, only the jitter differs


@needs_dali
def test_image_that_only_fails_in_dalis_decoder_costs_its_batch_counted_never_a_crash(tmp_path):
    """A JPEG header followed by garbage passes the cheap check and fails inside DALI, which does not name the
    sample: the batch is skipped and counted (decode_error, dali_batch_errors), the epoch keeps its length."""
    import io
    import json
    import tarfile
    d = tmp_path / "t"
    man = write_shards(id_samples(59), str(d), CLASSES, prefix="s", maxcount=60, progress=False)
    with tarfile.open(d / "bad.tar", "w") as tf:
        for name, data in (("x0.jpg", b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4), ("x0.cls", b"1")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    m = json.loads((d / "manifest.json").read_text())
    m["shards"] = man["shards"] + [{"name": "bad.tar", "samples": 1, "keys": ["x0"], "labels": [1]}]
    m["num_samples"] = 60   # one pass reads all 60: the bad one is in the epoch
    (d / "manifest.json").write_text(json.dumps(m))
    cfg = DataConfig(train=str(d), val=str(d), recipe="none", backend="dali", num_workers=1, resampled=False,
                     max_bad_fraction=0.5)
    info = resolve_data(cfg)
    dl = build_train_loader(cfg, info, batch_size=10, rank=0, world_size=1, epoch=0, seed=0, img_size=8)
    got = ids_of(dl)
    st = dl.stats()
    assert len(got) == len(dl) * 10 == 60 and set(got) <= set(range(59))   # topped up from the next pass
    assert st["dali_batch_errors"] >= 1 and st["bad_by_kind"]["decode_error"] >= 10


@needs_dali
def test_resampled_deit_epoch_rebuilt_for_a_resume_is_bit_identical(shards):
    """A resumed run builds the DALI loader of its next epoch in a new pipeline: that epoch's images (DeiT
    augmentation and random erasing included) and labels are bit-identical to the epoch the uninterrupted run
    read after its earlier epochs, and differ from the previous epoch's."""
    cfg = cfg_for(shards, recipe="deit", resampled=True, samples_per_epoch=80, reprob=0.25)
    info = resolve_data(cfg)
    kw = dict(batch_size=20, rank=1, world_size=2, seed=3, img_size=16)

    def epoch(e):
        batches = list(build_train_loader(cfg, info, epoch=e, **kw))
        return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])

    uninterrupted = [epoch(0), epoch(1)]
    resumed = epoch(1)
    assert torch.equal(resumed[0], uninterrupted[1][0]) and torch.equal(resumed[1], uninterrupted[1][1])
    assert not torch.equal(uninterrupted[0][0], uninterrupted[1][0])
