"""Resolve a data source string into an index of shards, keys and labels, without decoding any image.

A source is one of:
  * a directory holding WebDataset shards and `manifest.json` (what `dsincubate shards` writes);
  * a manifest file itself (`.../manifest.json`);
  * local shard paths or brace patterns (`/data/train-{000000..001023}.tar`), manifest looked up next to them;
  * `pipe:` commands (`pipe:cat /data/train-{000000..000009}.tar`, `pipe:curl -s URL`), which need a manifest:
    one next to a local `.tar` named in the command, or an explicit one;
  * a plain ImageFolder tree (one folder per class) or a list file of `path label` lines, read directly.

Classes come from the manifest, the ImageFolder's folders, or a `classes.txt` beside tars / a list file; without
any of these the source declares none and `with_classes` numbers `model.num_classes` of them. Labels are never
used to guess the count: a label outside the class list is a bad sample, named by shard and key when read.

The result (`DatasetIndex`) lists "shards": real tar shards, or chunks of image files for ImageFolder/list sources,
so the reader treats every kind the same way. Used by `resolve_data` (cheap) and the loaders (cached).

    from dsincubate.data.sources import load_index; idx = load_index("demo_data/demo-v1/train")
"""
from __future__ import annotations

import gzip
import json
import os
import shlex
import tarfile
import zlib
from dataclasses import dataclass, field, replace

import braceexpand
import numpy as np

from dsincubate.data.tario import iter_tar
from dsincubate.errors import UserError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "dsincubate-wds-v1"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff", "gif")
LABEL_EXTS = ("cls", "label")
FILE_CHUNK = 1000  # ImageFolder files per pseudo-shard: enough shards to split over ranks x workers


@dataclass
class ShardEntry:
    """One unit of reading: a tar shard (url) or a chunk of image files (files)."""
    url: str                                  # what wds.gopen opens (path or pipe:...); "" for file chunks
    name: str                                 # short name for warnings and stats
    keys: list[str] | None = None             # sample keys in shard order (None: unknown, pipe without manifest)
    labels: list[int] | None = None           # labels aligned with keys
    files: list[tuple[str, int]] | None = None  # (path, label) for ImageFolder/list chunks

    @property
    def samples(self) -> int:
        return len(self.keys) if self.keys is not None else 0


@dataclass
class DatasetIndex:
    """Everything known about a source before reading its images."""
    source: str
    class_names: list[str]
    shards: list[ShardEntry]
    manifest_path: str = ""
    image_size: tuple[int, int] | None = None
    kind: str = "wds"                         # "wds" | "files"
    extra: dict = field(default_factory=dict)
    # False for tars without a manifest and list files without a classes.txt: their labels do not say how many
    # classes there are (one mislabelled sample must not make a 10-class set a 1,000-class one), so the count comes
    # from model.num_classes (`with_classes`)
    classes_declared: bool = True

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def samples_per_class(self) -> list[int]:
        counts = np.zeros(self.num_classes, dtype=np.int64)
        for s in self.shards:
            lab = np.asarray([x for x in (s.labels or []) if 0 <= x < self.num_classes], dtype=np.int64)
            counts += np.bincount(lab, minlength=self.num_classes)
        return counts.tolist()


def read_manifest(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            man = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read shard manifest {path}: {e}") from e
    if man.get("format") != MANIFEST_FORMAT or "shards" not in man:
        raise UserError(f"{path} is not a dsincubate shard manifest (format {man.get('format')!r})")
    return man


def _entries_from_manifest(man: dict, mdir: str, urls: list[str] | None, names: list[str] | None) -> list[ShardEntry]:
    by_name = {s["name"]: s for s in man["shards"]}
    if urls is None:  # the whole manifest, shards next to it
        urls = [os.path.join(mdir, s["name"]) for s in man["shards"]]
        names = [s["name"] for s in man["shards"]]
    out = []
    for url, name in zip(urls, names):
        s = by_name.get(name)
        if s is None:
            raise UserError(f"shard {name} ({url}) is not listed in manifest {os.path.join(mdir, MANIFEST_NAME)}")
        out.append(ShardEntry(url=url, name=name, keys=list(s["keys"]), labels=[int(x) for x in s["labels"]]))
    return out


def scan_tar(path: str) -> tuple[list[str], list[int]]:
    """Keys and labels of a local tar, reading headers and the tiny label members only (image data is skipped).
    Stops quietly at damage (a cut, a bad header, not a tar): the keys before it are kept, and the reader reports
    the damage when it reads the shard."""
    keys: list[str] = []
    labels: dict[str, int] = {}
    try:
        opener = gzip.open if path.endswith((".gz", ".tgz")) else open
        with opener(path, "rb") as f:
            for name, data in iter_tar(f, want=lambda n: split_member(n)[1] in LABEL_EXTS):
                key, ext = split_member(name)
                if key is None:
                    continue
                if not keys or keys[-1] != key:
                    keys.append(key)
                if ext in LABEL_EXTS:
                    try:
                        labels[key] = int(data.decode().strip())
                    except (ValueError, UnicodeDecodeError):
                        labels[key] = -1
    except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error):
        pass
    return keys, [labels.get(k, -1) for k in keys]


def split_member(name: str) -> tuple[str | None, str]:
    """WebDataset convention: key = member path up to the first dot of its basename; ext = the rest (lowercased)."""
    base = name.rsplit("/", 1)[-1]
    if base.startswith(".") or "." not in base:
        return None, ""
    i = len(name) - len(base) + base.index(".")
    return name[:i], name[i + 1:].lower()


def _tars_in(cmd: str) -> list[str]:
    """Tokens of a pipe: command that name a .tar (the shard name is the last one's basename)."""
    try:
        toks = shlex.split(cmd)
    except ValueError:
        toks = cmd.split()
    return [t for t in toks if t.endswith(".tar")]


def _index_tars(source: str, urls: list[str], manifest: str) -> DatasetIndex:
    pipe = urls[0].startswith("pipe:") or "://" in urls[0]
    if pipe:
        tars = [_tars_in(u[5:] if u.startswith("pipe:") else u) for u in urls]
        names = [t[-1].rsplit("/", 1)[-1] if t else u for u, t in zip(urls, tars)]
        local = [p for t in tars for p in t if os.path.isfile(p)]
        if not manifest and local:
            cand = os.path.join(os.path.dirname(local[0]), MANIFEST_NAME)
            manifest = cand if os.path.isfile(cand) else ""
        if not manifest:
            raise UserError(f"source {source!r}: pipe:/remote shards need a manifest ({MANIFEST_NAME} next to a local "
                            "tar named in the command, or the --*-manifest option)")
    else:
        missing = [u for u in urls if not os.path.isfile(u)]
        if missing:
            raise UserError(f"source {source!r}: {len(missing)} shard file(s) not found, e.g. {missing[0]}")
        names = [os.path.basename(u) for u in urls]
        if not manifest:
            cand = os.path.join(os.path.dirname(os.path.abspath(urls[0])), MANIFEST_NAME)
            manifest = cand if os.path.isfile(cand) else ""
    if manifest:
        man = read_manifest(manifest)
        if not pipe and os.path.isdir(os.path.dirname(manifest)):
            known = {s["name"] for s in man["shards"]}
            if not all(n in known for n in names):  # a manifest that does not describe these shards: scan instead
                manifest = ""
    if manifest:
        entries = _entries_from_manifest(man, os.path.dirname(manifest), urls, names)
        return DatasetIndex(source=source, class_names=list(man["class_names"]), shards=entries,
                            manifest_path=manifest, image_size=_size(man.get("image_size")))
    # No manifest: index local tars by their headers (slower for huge sets; `dsincubate shards` writes one).
    entries = []
    for u, n in zip(urls, names):
        keys, labels = scan_tar(u)  # what precedes damage; the reader counts the damage when it gets there
        entries.append(ShardEntry(url=u, name=n, keys=keys, labels=labels))
    classes = declared_classes(os.path.dirname(os.path.abspath(urls[0])))
    return DatasetIndex(source=source, class_names=classes or [], shards=entries, classes_declared=classes is not None)


CLASSES_NAME = "classes.txt"


def declared_classes(folder: str) -> list[str] | None:
    """Class names from `classes.txt` (one per line, label i = line i) in `folder`, or None when there is none."""
    path = os.path.join(folder, CLASSES_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read class list {path}: {e}") from None
    if not names:
        raise UserError(f"class list {path} is empty")
    return names


def with_classes(index: DatasetIndex, num_classes: int | None) -> DatasetIndex:
    """`index` with its class list: the declared one, else `num_classes` numbered classes; UserError if neither."""
    if index.classes_declared:
        return index
    if not num_classes:
        raise UserError(f"data source {index.source!r} declares no classes (no {MANIFEST_NAME}, no {CLASSES_NAME}): "
                        "set model.num_classes, add a classes.txt, or write a manifest with `dsincubate shards`")
    return replace(index, class_names=[str(i) for i in range(num_classes)], classes_declared=True)


def _size(v) -> tuple[int, int] | None:
    return (int(v[0]), int(v[1])) if v else None


def _files_index(source: str, items: list[tuple[str, int]], class_names: list[str]) -> DatasetIndex:
    # Fixed-seed shuffle before chunking: chunks are class-mixed, like shards written by the shard writer.
    order = np.random.default_rng(0).permutation(len(items))
    items = [items[i] for i in order]
    entries = []
    for c in range(0, len(items), FILE_CHUNK):
        chunk = items[c:c + FILE_CHUNK]
        entries.append(ShardEntry(url="", name=f"files-{c // FILE_CHUNK:06d}", keys=[p for p, _ in chunk],
                                  labels=[lab for _, lab in chunk], files=chunk))
    return DatasetIndex(source=source, class_names=class_names, shards=entries, kind="files")


def scan_image_folder(root: str) -> tuple[list[tuple[str, int]], list[str]]:
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    items = []
    for ci, c in enumerate(classes):
        for dirpath, dirnames, files in os.walk(os.path.join(root, c), followlinks=True):
            dirnames.sort()
            for f in sorted(files):
                if f.rsplit(".", 1)[-1].lower() in IMAGE_EXTS and not f.startswith("."):
                    items.append((os.path.join(dirpath, f), ci))
    return items, classes


def read_list_file(path: str) -> tuple[list[tuple[str, int]], list[str] | None]:
    base = os.path.dirname(os.path.abspath(path))
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            p, _, lab = line.rpartition(" ")
            try:
                items.append((p if os.path.isabs(p) else os.path.join(base, p), int(lab)))
            except ValueError as e:
                raise UserError(f"{path}:{n}: expected 'path label', got {line!r}") from e
    return items, declared_classes(base)


def load_index(source: str, manifest: str = "") -> DatasetIndex:
    """Resolve `source` (see module docstring); UserError naming the source when it is missing or empty."""
    if not source:
        raise UserError("empty data source")
    if source.startswith("pipe:") or "://" in source:
        idx = _index_tars(source, list(braceexpand.braceexpand(source)), manifest)
    elif os.path.isdir(source):
        if os.path.isfile(os.path.join(source, MANIFEST_NAME)):
            mpath = os.path.join(source, MANIFEST_NAME)
            man = read_manifest(mpath)
            idx = DatasetIndex(source=source, class_names=list(man["class_names"]),
                               shards=_entries_from_manifest(man, source, None, None), manifest_path=mpath,
                               image_size=_size(man.get("image_size")))
        else:
            tars = sorted(os.path.join(source, f) for f in os.listdir(source) if f.endswith(".tar"))
            if tars:
                idx = _index_tars(source, tars, manifest)
            else:
                items, classes = scan_image_folder(source)
                if not items:
                    raise UserError(f"data source {source!r} holds no shards, no {MANIFEST_NAME} and no "
                                    "ImageFolder class folders with images")
                idx = _files_index(source, items, classes)
    elif source.endswith(".json"):
        if not os.path.isfile(source):
            raise UserError(f"data manifest {source!r} not found")
        man = read_manifest(source)
        idx = DatasetIndex(source=source, class_names=list(man["class_names"]),
                           shards=_entries_from_manifest(man, os.path.dirname(source), None, None),
                           manifest_path=source, image_size=_size(man.get("image_size")))
    elif source.endswith((".txt", ".lst", ".list")) and os.path.isfile(source):
        items, classes = read_list_file(source)
        idx = _files_index(source, items, classes or [])
        idx.classes_declared = classes is not None
    else:
        urls = list(braceexpand.braceexpand(source))
        if len(urls) == 1 and not os.path.exists(urls[0]):
            raise UserError(f"data source {source!r} not found")
        idx = _index_tars(source, urls, manifest)
    if not idx.shards or idx.num_samples == 0:
        raise UserError(f"data source {source!r} has no samples (empty shard list)")
    if idx.classes_declared and idx.num_classes == 0:
        raise UserError(f"data source {source!r} has no classes")
    return idx
