"""Fuzzed shards: damaged tars never crash, hang, write files or miscount.

Cuts at every byte offset of a small shard (with a manifest, and indexed by scanning without one), random member
names (absolute, `..`, very long, non-UTF-8, empty), random label payloads, zero-size members and implausible header
sizes. Properties: the reader never raises; every sample whose image and label members were read whole is
delivered exactly once; every other sample the shard promised is counted exactly once (incomplete or missing);
the loader counts a bad sample once per epoch in every reading mode.

    pytest tests/unit/test_data_fuzz.py -q
"""
import io
import json
import os
import signal
import tarfile
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsincubate.data import DataConfig, build_train_loader, resolve_data
from dsincubate.data.pipeline import BAD_SAMPLE_KINDS, PlanItem, ShardStream
from dsincubate.data.sources import scan_tar
from dsincubate.data.synth import id_image, id_samples, ids_from_batch
from dsincubate.data.writer import image_bytes, write_shards
from dsincubate.errors import UserError

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(autouse=True)
def no_hang():
    def boom(*_):
        raise TimeoutError("shard reading hung")
    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _tar(members: list[tuple[str, bytes]], fmt=tarfile.GNU_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _read(path: str, keys=None, expected=0, num_classes=10):
    """Run one shard through the worker's reader: (delivered keys, bad records, per-kind counts)."""
    s = ShardStream([], transform=None, batch_size=1, img_size=8, num_classes=num_classes, seed=0, epoch=0, rank=0)
    s.stats, s.examples, s.warned, s.bad_new = Counter(), [], 0, []
    item = PlanItem(url=path, name=os.path.basename(path), keys=keys, expected=expected)
    got = [k for k, _, _, _ in s._read(item)]
    return got, list(s.bad_new), s.stats


SAMPLES = [(f"k{i}", image_bytes(id_image(i)), str(i % 10).encode()) for i in range(3)]
SHARD = _tar([m for k, img, lab in SAMPLES for m in ((f"{k}.png", img), (f"{k}.cls", lab))])


def _sample_ends(raw: bytes) -> dict[str, int]:
    """Byte offset where each sample's last member (data and padding) ends: read whole only at or after it."""
    ends = {}
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        for m in tf:
            ends[m.name.split(".")[0]] = m.offset_data + -(-m.size // 512) * 512
    return ends


def test_cut_at_every_byte_keeps_whole_samples_and_counts_the_rest_once(tmp_path):
    ends = _sample_ends(SHARD)
    stop = ends["k2"] + 512  # the first end-of-archive block (the reader, like GNU tar, ends there)
    path = str(tmp_path / "cut.tar")
    for cut in range(stop + 1):
        with open(path, "wb") as f:
            f.write(SHARD[:cut])
        whole = [k for k, _, _ in SAMPLES if ends[k] <= cut]
        got, bad, _ = _read(path, expected=3)  # a manifest promises 3 samples
        assert got == whole, cut
        lost = sum(n for kind, _, _, n in bad if kind in BAD_SAMPLE_KINDS)
        assert len(got) + lost == 3, (cut, bad)  # every promised sample: delivered or counted bad, once
        bad_keys = [key for kind, _, key, _ in bad if kind == "incomplete_sample"]
        assert len(set(bad_keys)) == len(bad_keys) and not set(bad_keys) & set(got), (cut, bad)
        if cut < stop:  # no end-of-archive marker: the shard itself is reported damaged
            assert any(kind in ("truncated_shard", "empty_shard", "unopenable_shard") for kind, *_ in bad), cut
        else:
            assert bad == [], cut
        # without a manifest: the scan keeps the keys before the damage and the reader delivers the same samples
        keys, labels = scan_tar(path)
        assert keys[:len(whole)] == whole and all(lab == int(k[1:]) % 10 for k, lab in zip(whole, labels))
        got2, bad2, _ = _read(path, expected=len(keys))
        assert got2 == whole, cut
        assert len({(kind, key) for kind, _, key, _ in bad2}) == len(bad2)


NAMES = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=40),
    st.builds(lambda a, b: f"/{a}/../{b}", st.text("ab./", max_size=8), st.text("ab.", max_size=8)),
    st.builds(lambda n, e: "d/" * n + "x" * (3 * n) + e, st.integers(1, 120), st.sampled_from([".png", ".cls", ""])),
    st.binary(min_size=1, max_size=30).map(lambda b: b.replace(b"\0", b"_").decode("utf-8", "surrogateescape")),
)


@FUZZ
@given(names=st.lists(NAMES, min_size=1, max_size=6), payloads=st.lists(st.binary(max_size=12), min_size=1,
                                                                       max_size=6),
       fmt=st.sampled_from([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]))
def test_random_member_names_and_labels_never_crash_or_touch_the_filesystem(tmp_path, names, payloads, fmt):
    members = [(n, payloads[i % len(payloads)]) for i, n in enumerate(names)]
    members += [("good.png", image_bytes(id_image(7))), ("good.cls", b"7")]
    try:
        raw = _tar(members, fmt)
    except (ValueError, UnicodeError, tarfile.TarError):
        return  # tarfile cannot write this name: nothing to read
    d = tmp_path / "shard"
    d.mkdir(exist_ok=True)
    (d / "f.tar").write_bytes(raw)
    before = sorted(os.listdir(tmp_path)), sorted(os.listdir(os.getcwd()))
    keys, labels = scan_tar(str(d / "f.tar"))
    got, bad, _ = _read(str(d / "f.tar"), expected=len(keys))
    assert "good" in got  # a damaged neighbour never costs a good sample
    assert len(got) + sum(n for kind, _, _, n in bad if kind in BAD_SAMPLE_KINDS) >= len(keys)
    assert (sorted(os.listdir(tmp_path)), sorted(os.listdir(os.getcwd()))) == before
    for k, lab in zip(keys, labels):  # a label is kept only when it parses into the class range
        if k in got:
            assert 0 <= lab < 10


def _header_with_size(name: str, size_field: bytes) -> bytes:
    hdr = bytearray(tarfile.TarInfo(name).tobuf(tarfile.USTAR_FORMAT)[:512])
    hdr[124:136] = size_field
    hdr[148:156] = b" " * 8
    hdr[148:156] = f"{sum(hdr):06o}\0 ".encode()
    return bytes(hdr)


@pytest.mark.parametrize("size_field", [b"77777777777\0", b"\x80" + b"\xff" * 11, b"00000000000\0", b"zzzzzzzzzzz\0"])
def test_zero_and_huge_header_sizes_are_counted_not_allocated(tmp_path, size_field):
    good = _tar([("a.png", image_bytes(id_image(1))), ("a.cls", b"1")])
    ends = _sample_ends(good)
    raw = good[:ends["a"]] + _header_with_size("b.png", size_field) + b"\0" * 600
    (tmp_path / "h.tar").write_bytes(raw)
    got, bad, _ = _read(str(tmp_path / "h.tar"), expected=2)
    assert got == ["a"]  # the sample before the damage is kept
    assert len(got) + sum(n for kind, _, _, n in bad if kind in BAD_SAMPLE_KINDS) == 2, bad


@pytest.fixture(scope="module")
def onepass_dir(tmp_path_factory):
    """100 good samples in 4 shards + one shard of 3 samples without a label, all in the manifest."""
    d = tmp_path_factory.mktemp("onepass") / "train"
    man = write_shards(id_samples(100), str(d), [f"c{i}" for i in range(10)], prefix="g", maxcount=25, progress=False)
    (d / "nolabel.tar").write_bytes(_tar([(f"n{i}.png", image_bytes(id_image(900 + i))) for i in range(3)]))
    man["shards"].append({"name": "nolabel.tar", "samples": 3, "size": 0, "sha256": "", "keys": ["n0", "n1", "n2"],
                          "labels": [0, 1, 2]})
    man["num_samples"] += 3
    (d / "manifest.json").write_text(json.dumps(man))
    return d


@pytest.mark.parametrize("resampled", [False, True])
def test_bad_samples_counted_once_per_epoch_in_every_reading_mode(onepass_dir, resampled):
    # one pass: 103 samples over 2 ranks at batch 17 (3 steps = 51 samples a rank) leave both ranks short once
    # their bad samples (2 and 1) are skipped, so a top-up pass re-reads the same shards and meets them again;
    # counted once, 2 of 51 is under the 6% threshold (counted twice, 4 would stop the run)
    cfg = DataConfig(train=str(onepass_dir), val=str(onepass_dir), recipe="none", num_workers=0, resampled=resampled,
                     shuffle_buffer=0, max_bad_fraction=0.06, samples_per_epoch=None if not resampled else 400)
    info = resolve_data(cfg)
    for rank in range(2):
        dl = build_train_loader(cfg, info, batch_size=17, rank=rank, world_size=2, epoch=0, seed=0, img_size=8)
        ids = [i for x, _ in dl for i in ids_from_batch(x)]
        st_ = dl.stats()
        if not resampled:
            assert st_["bad_by_kind"] == {"missing_label": 2 - rank}
            assert len(ids) == len(dl) * 17 and set(ids) <= set(range(100))
        else:
            assert st_["bad_by_kind"].get("missing_label", 0) <= 3


def test_label_outside_the_declared_classes_is_a_named_bad_sample_not_a_bigger_head(tmp_path, caplog):
    d = tmp_path / "nomanifest"
    d.mkdir()
    members = [(f"s{i}.png", image_bytes(id_image(i))) for i in range(20)]
    members = [m for i, (n, img) in enumerate(members) for m in ((n, img), (f"s{i}.cls", b"999" if i == 5 else
                                                                            str(i % 10).encode()))]
    (d / "a.tar").write_bytes(_tar(members))
    cfg = DataConfig(train=str(d / "a.tar"), val=str(d / "a.tar"), recipe="none", num_workers=0, resampled=False,
                     shuffle_buffer=0, max_bad_fraction=0.1)
    with pytest.raises(UserError, match="declares no classes"):
        resolve_data(cfg)  # no manifest, no classes.txt, no model.num_classes: the class count is not guessed
    info = resolve_data(cfg, num_classes=10)
    assert info.num_classes == 10
    (d / "classes.txt").write_text("\n".join(f"c{i}" for i in range(10)) + "\n")
    assert resolve_data(cfg).num_classes == 10
    dl = build_train_loader(cfg, info, batch_size=4, rank=0, world_size=1, epoch=0, seed=0, img_size=8)
    with caplog.at_level("WARNING"):
        ids = [i for x, _ in dl for i in ids_from_batch(x)]
    assert 5 not in ids and dl.stats()["bad_by_kind"] == {"bad_label": 1}
    assert "a.tar" in caplog.text and "'s5'" in caplog.text
