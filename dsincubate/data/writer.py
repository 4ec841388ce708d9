"""Shard writer: ImageFolder tree or `path label` list file -> WebDataset tar shards + JSON manifest.

Image bytes are copied as they are (no re-encoding). Samples are shuffled across shards with a fixed seed, so shard
boundaries and contents depend only on the input: a re-run keeps every shard that is already complete and matches
the manifest (name, keys, labels and sha256) and rewrites only the rest. Each shard is written to a temp file and
renamed, and the manifest is rewritten (atomically) after every shard, so an interrupted run resumes cleanly.

Each shard gets DALI's index beside it (`<name>.idx`, wds2idx's format; data.backend=dali reads it).
Manifest (`manifest.json` next to the shards; read by `sources.load_index`):
    {"format": "dsincubate-wds-v1", "num_samples", "num_classes", "class_names", "samples_per_class",
     "image_size" (or null), "complete": bool,
     "shards": [{"name", "samples", "size", "sha256", "keys": [...], "labels": [...]}]}

Run it as `dsincubate shards SRC OUT_DIR` (see shards_cli.py) or call `write_shards` / `convert` from Python.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass
from typing import Callable

import numpy as np
import webdataset as wds
from tqdm import tqdm

from dsincubate.checkpoint import atomic_write_json, sha256_file
from dsincubate.data.dali import index_path, write_index
from dsincubate.data.sources import (IMAGE_EXTS, MANIFEST_FORMAT, MANIFEST_NAME, read_list_file, split_member,
                                     scan_image_folder)
from dsincubate.errors import UserError

TAR_OVERHEAD = 3 * 512  # two member headers + padding, for the maxsize estimate


@dataclass
class Sample:
    key: str                       # unique, no dots or slashes (WebDataset splits keys at the first dot)
    label: int
    ext: str                       # image extension: jpg, png, ...
    size: int                      # byte size (for maxsize planning)
    read: Callable[[], bytes]      # returns the encoded image bytes


def plan_shards(samples: list[Sample], maxcount: int, maxsize: float) -> list[list[Sample]]:
    shards: list[list[Sample]] = [[]]
    size = 0
    for s in samples:
        need = s.size + TAR_OVERHEAD
        if shards[-1] and (len(shards[-1]) >= maxcount or size + need > maxsize):
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += need
    return [sh for sh in shards if sh]


def write_shards(samples: list[Sample], out_dir: str, class_names: list[str], *, prefix: str = "shard",
                 maxcount: int = 1000, maxsize: float = 1e9, seed: int = 0, image_size=None,
                 progress: bool = True) -> dict:
    """Shuffle `samples` (fixed seed), split them into shards and write what is not already there. Returns the
    manifest; its "written"/"kept" fields say how many shards this call wrote and kept."""
    if not samples:
        raise UserError("no samples to write")
    if maxcount < 1 or maxsize <= 0:
        raise UserError("--maxcount must be >= 1 and --maxsize > 0")
    os.makedirs(out_dir, exist_ok=True)
    order = np.random.default_rng(seed).permutation(len(samples))
    planned = plan_shards([samples[i] for i in order], maxcount, maxsize)
    mpath = os.path.join(out_dir, MANIFEST_NAME)
    old = _old_shards(mpath)
    num_classes = len(class_names)
    counts = np.bincount([s.label for s in samples], minlength=num_classes)
    manifest = {"format": MANIFEST_FORMAT, "num_samples": len(samples), "num_classes": num_classes,
                "class_names": list(class_names), "samples_per_class": counts.tolist(),
                "image_size": list(image_size) if image_size else None, "complete": False, "shards": []}
    written = kept = 0
    bar = tqdm(total=len(samples), desc=f"shards {out_dir}", unit="img", disable=not progress)
    for i, shard in enumerate(planned):
        name = f"{prefix}-{i:06d}.tar"
        entry = _kept_shard(old.get(name), os.path.join(out_dir, name), shard)
        if entry is not None:
            kept += 1
        else:
            entry = _write_shard(os.path.join(out_dir, name), shard)
            written += 1
        manifest["shards"].append(entry)
        bar.update(len(shard))
        atomic_write_json(mpath, manifest)  # after every shard: an interrupted run resumes from here
    bar.close()
    _remove_stale(out_dir, prefix, set(old) - {s["name"] for s in manifest["shards"]})
    manifest["complete"] = True
    atomic_write_json(mpath, manifest)
    return {**manifest, "written": written, "kept": kept}


def _old_shards(mpath: str) -> dict:
    """name -> shard entry of an existing manifest ({} when there is none or it is unreadable: rewrite all)."""
    if not os.path.isfile(mpath):
        return {}
    try:
        with open(mpath, encoding="utf-8") as f:
            return {s["name"]: s for s in json.load(f).get("shards", [])}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _kept_shard(prev: dict | None, path: str, shard: list[Sample]) -> dict | None:
    """The manifest entry `prev` when the shard on disk is complete and matches it (keys, labels, size, sha256),
    with DALI's index written if it lacks one; None when the shard must be (re)written."""
    keys, labels = [s.key for s in shard], [int(s.label) for s in shard]
    if not (prev and prev.get("keys") == keys and prev.get("labels") == labels and os.path.isfile(path)
            and os.path.getsize(path) == prev.get("size") and sha256_file(path) == prev.get("sha256")):
        return None
    if not os.path.isfile(index_path(path)):  # shards written before indexes were
        write_index(path)
    return prev


def _write_shard(path: str, shard: list[Sample]) -> dict:
    """Write one shard (temp file + rename) and its DALI index; its manifest entry."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        # mtime fixed and encoder off: identical input gives byte-identical shards; an int mtime keeps
        # tarfile from adding a PAX header per member (a float one does), which halves header parsing
        tw = wds.TarWriter(f, encoder=False, mtime=0)
        for s in shard:
            tw.write({"__key__": s.key, s.ext: s.read(), "cls": str(int(s.label)).encode()})
        tw.close()
    os.replace(tmp, path)
    write_index(path)  # DALI's webdataset reader needs it (data.backend=dali); cheap: headers only
    return {"name": os.path.basename(path), "samples": len(shard), "size": os.path.getsize(path),
            "sha256": sha256_file(path), "keys": [s.key for s in shard], "labels": [int(s.label) for s in shard]}


def _remove_stale(out_dir: str, prefix: str, names: set) -> None:
    """Shards of an earlier, larger plan are no longer described by the manifest: remove them and their indexes
    (only our own names)."""
    for name in names:
        if name.startswith(prefix + "-") and name.endswith(".tar") and "/" not in name:
            for stale in (os.path.join(out_dir, name), index_path(os.path.join(out_dir, name))):
                try:
                    os.remove(stale)
                except FileNotFoundError:
                    pass


def _file_sample(i: int, path: str, label: int) -> Sample:
    ext = path.rsplit(".", 1)[-1].lower()

    def read(p=path) -> bytes:
        with open(p, "rb") as f:
            return f.read()
    return Sample(key=f"{i:09d}", label=label, ext=ext, size=os.path.getsize(path), read=read)


def collect(src: str, num_classes: int | None = None) -> tuple[list[Sample], list[str]]:
    """Samples of an ImageFolder tree or list file, keyed by their position in the sorted input (stable). A list
    file's classes come from a classes.txt beside it or `num_classes`, never from its largest label."""
    if os.path.isdir(src):
        items, classes = scan_image_folder(src)
    elif os.path.isfile(src):
        items, classes = read_list_file(src)
        if classes is None:
            if not num_classes:
                raise UserError(f"list file {src!r} declares no classes: give --num-classes or add a classes.txt "
                                "beside it")
            classes = [str(i) for i in range(num_classes)]
    else:
        raise UserError(f"shard writer input {src!r} not found")
    if not items:
        raise UserError(f"shard writer input {src!r} holds no images ({', '.join(IMAGE_EXTS)})")
    missing = [p for p, _ in items if not os.path.isfile(p)]
    if missing:
        raise UserError(f"{len(missing)} listed image(s) not found, e.g. {missing[0]}")
    bad = [(p, lab) for p, lab in items if not 0 <= lab < len(classes)]
    if bad:
        raise UserError(f"label {bad[0][1]} of {bad[0][0]} is outside the {len(classes)} classes "
                        f"[0, {len(classes)}) ({len(bad)} such line(s))")
    return [_file_sample(i, p, lab) for i, (p, lab) in enumerate(items)], classes


def convert(src: str, out_dir: str, num_classes: int | None = None, **kw) -> dict:
    samples, classes = collect(src, num_classes)
    return write_shards(samples, out_dir, classes, **kw)


def verify_shards(out_dir: str) -> list[str]:
    """Problems found comparing the manifest with the shards on disk (empty list: all consistent)."""
    with open(os.path.join(out_dir, MANIFEST_NAME), encoding="utf-8") as f:
        man = json.load(f)
    problems = []
    for s in man["shards"]:
        path = os.path.join(out_dir, s["name"])
        if not os.path.isfile(path) or sha256_file(path) != s["sha256"]:
            problems.append(f"{s['name']}: missing or sha256 mismatch")
            continue
        with tarfile.open(path) as tf:
            names = [m.name for m in tf if m.isfile()]
        keys = list(dict.fromkeys(k for k, _ in map(split_member, names) if k is not None))
        if keys != s["keys"] or len(keys) != s["samples"]:
            problems.append(f"{s['name']}: keys differ from manifest")
    if sum(s["samples"] for s in man["shards"]) != man["num_samples"]:
        problems.append("sum of shard samples != num_samples")
    return problems


def image_bytes(arr: np.ndarray, fmt: str = "PNG", quality: int = 90) -> bytes:
    from PIL import Image
    b = io.BytesIO()
    Image.fromarray(arr).save(b, fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return b.getvalue()
