"""Shard writer and demo: the manifest matches the shards, re-runs rewrite nothing, list-file input, CLI, demo
determinism and concurrent generation.

    pytest tests/unit/test_data_writer.py -q
"""
import argparse
import json
import multiprocessing as mp
import os
import tarfile

import pytest

from dsincubate.data import demo, shards_cli
from dsincubate.data.sources import load_index
from dsincubate.data.synth import id_image
from dsincubate.data.writer import convert, sha256_file, verify_shards
from dsincubate.data.writer import image_bytes
from dsincubate.errors import UserError


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "folder"
    for i in range(57):
        d = root / f"class_{'abc'[i % 3]}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"im{i:03d}.png").write_bytes(image_bytes(id_image(i)))
    return root


def _cli(argv):
    p = argparse.ArgumentParser()
    shards_cli.add_arguments(p)
    return shards_cli.run(p.parse_args(argv))


def test_manifest_matches_shards(folder, tmp_path):
    out = tmp_path / "out"
    man = convert(str(folder), str(out), prefix="train", maxcount=10, progress=False)
    assert man["written"] == 6 and man["kept"] == 0 and man["complete"]
    disk = json.loads((out / "manifest.json").read_text())
    assert disk["num_samples"] == 57 and disk["num_classes"] == 3
    assert disk["class_names"] == ["class_a", "class_b", "class_c"] and disk["samples_per_class"] == [19, 19, 19]
    assert verify_shards(str(out)) == []
    labels_seen = []
    for s in disk["shards"]:
        path = out / s["name"]
        assert s["sha256"] == sha256_file(str(path)) and s["size"] == os.path.getsize(path)
        with tarfile.open(path) as tf:
            members = [m.name for m in tf]
            assert [m.split(".")[0] for m in members[::2]] == s["keys"]  # members grouped by key, in order
            assert sorted(members) == sorted(f"{k}.{e}" for k in s["keys"] for e in ("png", "cls"))
            labels = [int(tf.extractfile(f"{k}.cls").read()) for k in s["keys"]]
        assert labels == s["labels"] and s["samples"] == len(s["keys"]) <= 10
        labels_seen += labels
    # shuffled across shards: the first shard is not one class
    assert len(set(disk["shards"][0]["labels"])) > 1 and sorted(labels_seen) == sorted(i % 3 for i in range(57))
    idx = load_index(str(out))
    assert idx.num_samples == 57 and idx.samples_per_class() == [19, 19, 19]


def test_rerun_rewrites_nothing_and_repairs_damage(folder, tmp_path):
    out = tmp_path / "out"
    convert(str(folder), str(out), maxcount=10, progress=False)
    stamps = {f: os.stat(out / f).st_mtime_ns for f in os.listdir(out) if f.endswith(".tar")}
    man = convert(str(folder), str(out), maxcount=10, progress=False)
    assert man["written"] == 0 and man["kept"] == 6
    assert stamps == {f: os.stat(out / f).st_mtime_ns for f in os.listdir(out) if f.endswith(".tar")}
    # a damaged shard is rewritten, the rest kept; the result is byte-identical to the first run
    good = (out / "shard-000002.tar").read_bytes()
    (out / "shard-000002.tar").write_bytes(good[:500])
    man = convert(str(folder), str(out), maxcount=10, progress=False)
    assert man["written"] == 1 and man["kept"] == 5
    assert (out / "shard-000002.tar").read_bytes() == good
    # a different plan (smaller shards) rewrites and removes shards no longer listed
    man = convert(str(folder), str(out), maxcount=30, progress=False)
    assert len(man["shards"]) == 2 and sorted(f for f in os.listdir(out) if f.endswith(".tar")) == \
        ["shard-000000.tar", "shard-000001.tar"]
    assert verify_shards(str(out)) == []


def test_maxsize_and_list_file(folder, tmp_path):
    lst = tmp_path / "list.txt"
    files = sorted(folder.rglob("*.png"))
    lst.write_text("".join(f"{p.relative_to(tmp_path)} {i % 5}\n" for i, p in enumerate(files)))
    out = tmp_path / "fromlist"
    one = os.path.getsize(files[0])
    man = convert(str(lst), str(out), num_classes=5, maxsize=4 * (one + 3 * 512), progress=False)
    assert man["num_classes"] == 5 and all(s["samples"] <= 4 for s in man["shards"])
    assert sum(s["samples"] for s in man["shards"]) == 57


def test_cli(folder, tmp_path, capsys):
    out = tmp_path / "cli"
    assert _cli([str(folder), str(out), "--maxcount", "20", "--no-progress"]) == 0
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rep["shards"] == 3 and rep["written"] == 3
    assert _cli(["--verify", str(out)]) == 0
    with pytest.raises(UserError):
        _cli([str(tmp_path / "missing"), str(out)])


def test_demo_deterministic(tmp_path):
    a = demo.ensure_demo(str(tmp_path / "a"))
    b = demo.ensure_demo(str(tmp_path / "b"))
    for split in ("train", "val"):
        ma = json.loads(open(os.path.join(a, split, "manifest.json")).read())
        mb = json.loads(open(os.path.join(b, split, "manifest.json")).read())
        assert [s["sha256"] for s in ma["shards"]] == [s["sha256"] for s in mb["shards"]]
        assert ma["samples_per_class"] == [demo.SPLITS[split][0] // 10] * 10
    assert len(ma["shards"]) == 2 and verify_shards(os.path.join(a, "train")) == []
    assert demo.ensure_demo(str(tmp_path / "a")) == a  # second call reuses


def _gen(root, q):
    q.put(demo.ensure_demo(root))


def test_demo_concurrent_generation(tmp_path):
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_gen, args=(str(tmp_path), q)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert {q.get(), q.get()} == {os.path.join(str(tmp_path), demo.VERSION)}
    assert os.listdir(tmp_path) == [demo.VERSION]  # temp dirs gone
    assert verify_shards(os.path.join(str(tmp_path), demo.VERSION, "val")) == []
