"""Bad data: every kind is skipped with a warning naming shard and key, counted exactly, and too much of it stops
the run with a UserError; nothing hangs (each loader runs under an alarm).

    pytest tests/unit/test_data_bad.py -q
"""
import json
import logging
import os
import signal
import tarfile

import pytest

from dsincubate.data import DataConfig, build_train_loader, build_val_loader, resolve_data
from dsincubate.data.synth import id_image, id_samples, ids_from_batch
from dsincubate.data.writer import image_bytes, sha256_file, write_shards
from dsincubate.errors import UserError

CLASSES = [f"c{i}" for i in range(10)]


@pytest.fixture(autouse=True)
def no_hang():
    def boom(*_):
        raise TimeoutError("data loader hung")
    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _add(tf, name, data):
    import io
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory):
    """Good shards (ids 0..199, 4 x 50) plus one shard per kind of damage, all listed in the manifest."""
    root = tmp_path_factory.mktemp("bad")
    d = root / "train"
    man = write_shards(id_samples(200), str(d), CLASSES, prefix="good", maxcount=50, progress=False)
    shards = list(man["shards"])

    def entry(name, keys, labels):
        path = d / name
        shards.append({"name": name, "samples": len(keys), "size": os.path.getsize(path) if path.exists() else 0,
                       "sha256": sha256_file(path) if path.exists() else "", "keys": keys, "labels": labels})

    # per-sample damage: undecodable image, no label, out-of-range label, no image, label that is not a number
    with tarfile.open(d / "samples.tar", "w") as tf:
        _add(tf, "b000.png", b"not an image at all")
        _add(tf, "b000.cls", b"1")
        _add(tf, "b001.png", image_bytes(id_image(901)))
        _add(tf, "b002.png", image_bytes(id_image(902)))
        _add(tf, "b002.cls", b"17")
        _add(tf, "b003.cls", b"3")
        _add(tf, "b004.png", image_bytes(id_image(904)))
        _add(tf, "b004.cls", b"seven")
        _add(tf, "../../escape/b005.png", image_bytes(id_image(905)))  # member names are never used as paths
        _add(tf, "../../escape/b005.cls", b"5")
    entry("samples.tar", ["b000", "b001", "b002", "b003", "b004", "../../escape/b005"], [1, 0, 17, 3, -1, 5])
    # truncated shard: 20 samples, cut in the middle
    write_shards(id_samples(20, start=300), str(root / "tmp_trunc"), CLASSES, prefix="t", progress=False)
    raw = (root / "tmp_trunc" / "t-000000.tar").read_bytes()
    (d / "trunc.tar").write_bytes(raw[:len(raw) // 2 + 100])
    entry("trunc.tar", [f"k{i:06d}" for i in range(300, 320)], [i % 10 for i in range(300, 320)])
    # empty shard (valid tar, no members) and an unopenable one (listed, but gone)
    with tarfile.open(d / "empty.tar", "w"):
        pass
    entry("empty.tar", ["e0", "e1"], [0, 1])           # the manifest promises samples the file does not hold
    (d / "zero.tar").write_bytes(b"")
    entry("zero.tar", ["z0"], [0])
    entry("gone.tar", ["g0", "g1", "g2"], [0, 1, 2])
    mpath = d / "manifest.json"
    m = json.loads(mpath.read_text())
    m["shards"] = shards
    m["num_samples"] = sum(s["samples"] for s in shards)
    mpath.write_text(json.dumps(m))
    return root


def _cfg(root, **kw):
    base = dict(train=str(root / "train"), val=str(root / "train"), recipe="none", num_workers=2, resampled=False,
                shuffle_buffer=0)
    return DataConfig(**{**base, **kw})


def test_every_kind_skipped_counted_and_named(bad_dir, caplog):
    cfg = _cfg(bad_dir, max_bad_fraction=1.0)
    info = resolve_data(cfg)
    caplog.set_level(logging.WARNING, logger="dsincubate.data")
    dl = build_val_loader(cfg, info, batch_size=16, rank=0, world_size=1, img_size=8)
    ids = [i for x, _, v in dl for i, ok in zip(ids_from_batch(x), v.tolist()) if ok]
    st = dl.stats()
    kinds = st["bad_by_kind"]
    assert kinds["decode_error"] == 1 and kinds["missing_label"] == 1
    # b003, plus possibly the sample cut by the truncation (a shard's .cls member precedes its image)
    assert 1 <= kinds["missing_image"] <= 2
    assert kinds["bad_label"] == 2                      # 17 (out of range) and "seven"
    assert kinds["truncated_shard"] == 1 and kinds["empty_shard"] == 2 and kinds["unopenable_shard"] == 1
    assert kinds["missing_samples"] > 3 + 3             # gone.tar 3, the empty ones 3, the cut part of trunc.tar
    good = set(range(200)) | {905}                      # b001 (901) has no label
    assert good <= set(ids) and len(ids) == len(set(ids))
    assert set(ids) - good <= set(range(300, 320))       # what survived of the truncated shard
    # the loader's accounting: every manifest sample is good, bad or missing
    assert st["samples_yielded"] + st["bad_samples"] == info.val_samples
    text = caplog.text if caplog.text else ""
    assert "b000" in text or st["bad_examples"]          # warnings (from workers) or the examples name the key
    assert any("samples.tar" in e and "b000" in e for e in st["bad_examples"] + [text])
    assert not os.path.exists(bad_dir / "escape") and not os.path.exists(bad_dir.parent / "escape")


def test_threshold_stops_the_run(bad_dir):
    cfg = _cfg(bad_dir)  # default max_bad_fraction 0.01
    info = resolve_data(cfg)
    with pytest.raises(UserError, match="max_bad_fraction"):
        for _ in build_train_loader(cfg, info, batch_size=8, rank=0, world_size=1, epoch=0, seed=0, img_size=8):
            pass


@pytest.mark.parametrize("resampled", [False, True])
def test_bad_but_tolerated_gives_full_epochs_on_every_rank(bad_dir, resampled):
    cfg = _cfg(bad_dir, max_bad_fraction=0.5, resampled=resampled)
    info = resolve_data(cfg)
    for rank in range(2):
        dl = build_train_loader(cfg, info, batch_size=8, rank=rank, world_size=2, epoch=0, seed=0, img_size=8)
        assert sum(1 for _ in dl) == len(dl)


def test_all_shards_bad_raises_instead_of_hanging(tmp_path):
    d = tmp_path / "t"
    write_shards(id_samples(40), str(d), CLASSES, maxcount=10, progress=False)
    for f in os.listdir(d):
        if f.endswith(".tar"):
            (d / f).write_bytes(b"\0garbage" * 10)
    for resampled in (True, False):
        cfg = DataConfig(train=str(d), val=str(d), recipe="none", num_workers=2, resampled=resampled,
                         max_bad_fraction=1.0)
        info = resolve_data(cfg)
        with pytest.raises(UserError, match="ran out|bad"):
            for _ in build_train_loader(cfg, info, batch_size=4, rank=0, world_size=1, epoch=0, seed=0,
                                        img_size=8):
                pass


def test_failing_pipe_command_is_an_unopenable_shard(bad_dir):
    src = f"pipe:cat {bad_dir}/train/{{good-000000,gone}}.tar"
    cfg = _cfg(bad_dir, train=src, max_bad_fraction=1.0)
    info = resolve_data(cfg)
    assert info.train_samples == 53
    dl = build_train_loader(cfg, info, batch_size=10, rank=0, world_size=1, epoch=0, seed=0, img_size=8)
    assert sum(1 for _ in dl) == len(dl) == 5
    st = dl.stats()
    assert st["bad_by_kind"]["unopenable_shard"] == 1 and st["bad_by_kind"]["missing_samples"] == 3


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_tar_reader_matches_tarfile_and_sees_cuts(fmt):
    import io
    from dsincubate.data.tario import iter_tar
    buf = io.BytesIO()
    names = ["d/" + "x" * 90 + ".png", "short.cls", "a/b/c.jpg"] + (["ü/" + "y" * 120 + ".png"] if fmt != tarfile.USTAR_FORMAT else [])
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for n in names:
            _add(tf, n, n.encode() * 7)
        d = tarfile.TarInfo("adir")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
    raw = buf.getvalue()
    assert list(iter_tar(io.BytesIO(raw))) == [(n, n.encode() * 7) for n in names]
    first = raw.index(names[1].encode()[:5]) // 512 * 512  # a cut exactly at a member boundary
    with pytest.raises(EOFError):
        list(iter_tar(io.BytesIO(raw[:first])))
    with pytest.raises((EOFError, tarfile.TarError)):
        list(iter_tar(io.BytesIO(raw[:first + 700])))
