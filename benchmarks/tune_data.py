"""The held-out split of `paper_claims.py --tune` (`benchmarks/tuning.py`): the data the tuning runs train and are
scored on, never the validation split the tables report.

For a dataset that ships one (Fashion-MNIST's `tune/`, benchmarks/fashion_mnist.py) `--tune-data TRAIN,TUNE` names
it; for the built-in data `holdout` writes `--tune-per-class` images of every class of its training shards into a
tune split and the rest into a smaller training split (shards, by the shard writer), under the work directory.
"""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

from dsincubate.data.sources import MANIFEST_NAME, split_member
from dsincubate.data.writer import Sample, write_shards
from dsincubate.errors import UserError

from benchmarks import common
from benchmarks.fashion_mnist import split_indices


def _read_split(src: Path) -> tuple[dict, dict[str, tuple[int, bytes, str]]]:
    man = json.loads((src / MANIFEST_NAME).read_text())
    samples: dict[str, tuple[int, bytes, str]] = {}
    for shard in man["shards"]:
        labels = dict(zip(shard["keys"], shard["labels"]))
        with tarfile.open(src / shard["name"]) as tf:
            for m in tf:
                key, ext = split_member(m.name)
                if m.isfile() and key in labels and ext not in ("cls", "label"):
                    samples[key] = (int(labels[key]), tf.extractfile(m).read(), ext)
    return man, samples


def holdout(src: Path, out: Path, per_class: int, seed: int = 0) -> tuple[Path, Path]:
    """Split a shard directory's samples into out/train and out/tune (`per_class` of every class, fixed seed),
    both written as shards; returns (train, tune). Keeps what a previous call with the same arguments wrote."""
    man, samples = _read_split(src)
    keys = sorted(samples)
    members = [[k for k in keys if samples[k][0] == c] for c in range(man["num_classes"])]
    for c, m in enumerate(members):
        if len(m) <= per_class:
            raise UserError(f"{src}: class {c} has {len(m)} images, too few to hold out {per_class}")
    # the converter's class-balanced split with no val part: the same per-class draw
    picks = split_indices([len(m) for m in members], val=0, tune=per_class, train=None, seed=seed)["tune"]
    tune = {members[c][i] for c, pick in enumerate(picks) for i in pick}
    for split, chosen in (("train", [k for k in keys if k not in tune]), ("tune", sorted(tune))):
        write_shards([Sample(key=k, label=samples[k][0], ext=samples[k][2], size=len(samples[k][1]),
                             read=lambda b=samples[k][1]: b) for k in chosen], str(out / split),
                     man["class_names"], prefix=split, maxcount=1000, seed=seed,
                     image_size=man.get("image_size"), progress=False)
    return out / "train", out / "tune"


def tune_extra(tune_data: str, extra: list[str], work: Path, per_class: int) -> list[str]:
    """The pipeline arguments of the tuning runs: `extra` with its --train/--val replaced by the held-out split
    (`tune_data` "TRAIN,TUNE", or for the built-in data a `holdout` of its training shards under `work`)."""
    pairs = [i for i, a in enumerate(extra[:-1]) if a in ("--train", "--val")]
    rest = [a for i, a in enumerate(extra) if i not in pairs and i - 1 not in pairs]
    if tune_data:
        parts = [p.strip() for p in tune_data.split(",")]
        if len(parts) != 2 or not all(parts):
            raise UserError(f"--tune-data takes TRAIN,TUNE (two shard directories), not {tune_data!r}")
        train, tune = parts
    elif pairs:
        raise UserError("--tune with your own --train/--val needs --tune-data TRAIN,TUNE: a split held out from "
                        "the training data (benchmarks/fashion_mnist.py writes one)")
    else:
        from dsincubate.data.demo import ensure_demo

        src = Path(ensure_demo(str(common.ROOT / "demo_data"))) / "train"
        train, tune = (str(p) for p in holdout(src, work / "tune" / f"builtin_holdout_{per_class}", per_class))
    return rest + ["--train", train, "--val", tune]
