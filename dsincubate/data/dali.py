"""data.backend=dali: NVIDIA DALI decodes and augments the WebDataset shards `dsincubate shards` writes.

Install with `pip install -e .[dali]` (nvidia-dali-cuda130). With CUDA present the pipeline decodes with `mixed`
(nvJPEG / the hardware JPEG decoder) on this rank's GPU and augments there; without CUDA every operator runs on the
CPU (device_id=None), which is how CI tests it. One pipeline per rank, built per epoch like the torch loader, with
data.num_workers (or the cores this rank has, loader.default_workers) as DALI's thread count.

Semantics are the torch path's, because the plan is made by the same code and handed to DALI as index files:
DALI's `fn.readers.webdataset` reads the samples an index lists, in the index's order, from byte offsets. Each
shard gets the full index beside it (`<shard>.idx`, wds2idx's v1.2 format: written by `dsincubate shards`, built
at start for shards that lack one). Each epoch, each rank writes filtered copies into a private temp dir listing
exactly its samples in its order, so
  - the split across ranks (one pass: sample g of the selection goes to rank g % world), the steps per rank
    (samples_per_epoch // (batch x world), equal on every rank), resampled shards (drawn with replacement,
    weighted by selected samples), repeated augmentation (a group's stream dealt round-robin to its ranks, each
    rank indexing only its copies: subsets.repeat_group), DMT subsets and class-balanced fractions are identical
    to the torch loader's;
  - the order is seeded from (seed, epoch, rank): shard order permuted, samples permuted within each shard (DALI's
    own shuffle buffer is off: it would mix the next pass into the end of this one).
Bad data. DALI stops a pipeline on an undecodable image and its error does not name the sample, so what can be
checked cheaply is checked before DALI sees it, per sample, named and counted once: unopenable/empty/truncated
shards, missing image or label, labels that are not in range, images whose first bytes are no known image format
(`decode_error`). An image that passes that check but still fails DALI's decoder (e.g. a JPEG cut short) costs the
whole batch it is in: the batch is skipped and its samples are counted as `decode_error` without keys
(`dali_batch_errors` says how many batches). Everything counts against data.max_bad_fraction as in the torch path.
DeiT recipe: ROI random-resized crop (fn.decoders.image_random_crop: decodes only the crop), flip, RandAugment
(DALI's auto_aug: n=2, m=9 of timm's 10 levels; timm's magnitude noise mstd0.5 has no DALI equivalent; with
auto_augment="" timm's colour jitter instead, as fn.color_twist), then the
torch path's BatchPrep (normalise + timm's RandomErasing on the batch) and, in the trainer, timm's Mixup/CutMix.
"none"/eval: resize (shorter side S/0.875) + centre crop. "3aug" (DeiT-III's 3-Augment) is not on DALI: its
training loader falls back to the torch path with a warning (stats say backend "torch"); its val loader is DALI's.
"""
from __future__ import annotations

import logging
import os
import shutil
import tarfile
import tempfile
from collections import Counter

import numpy as np
import torch

from dsincubate.data.sources import IMAGE_EXTS, LABEL_EXTS, split_member
from dsincubate.errors import UserError

log = logging.getLogger("dsincubate.data")
INDEX_VERSION = "v1.2"
LABEL_BYTES = 16
DALI_RECIPES = ("deit", "none")
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")
_SCAN_CACHE: dict = {}


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def require_dali() -> None:
    """One line before anything heavy: DALI must be installed."""
    if not dali_available():
        raise UserError("data.backend=dali needs NVIDIA DALI: pip install -e '.[dali]' (nvidia-dali-cuda130), or "
                        "set data.backend=torch")


# ---- index files ---------------------------------------------------------------------------------------------------
def index_path(tar_path: str) -> str:
    return (tar_path[:-4] if tar_path.endswith(".tar") else tar_path) + ".idx"


def scan_tar(tar_path: str) -> tuple[list[tuple[str, list[tuple]]], str | None]:
    """[(key, [(ext, data offset, size, member name), ...])] in tar order, plus an error ("empty_shard",
    "unopenable_shard", "truncated_shard") or None. Members that do not lie whole inside the file are left out."""
    groups: list = []
    err = None
    try:
        size = os.path.getsize(tar_path)
        with tarfile.open(tar_path, "r:") as tf:
            for m in tf:
                if not m.isreg():
                    continue
                key, ext = split_member(m.name)
                if m.offset_data + m.size > size:  # the file ends inside this member: cut short
                    err = "truncated_shard"
                    break
                if key is None:
                    continue
                if not groups or groups[-1][0] != key:
                    groups.append((key, []))
                groups[-1][1].append((ext, m.offset_data, m.size, m.name))
    except (tarfile.ReadError, EOFError) as e:
        err = "empty_shard" if "empty" in str(e) else ("truncated_shard" if groups else "unopenable_shard")
    except (OSError, tarfile.TarError) as e:
        err = "truncated_shard" if groups else "unopenable_shard"
        log.debug("scan %s: %s", tar_path, e)
    if err is None and not groups:
        err = "empty_shard"
    return groups, err


def write_index(tar_path: str, groups=None) -> str:
    """Write DALI's index (wds2idx v1.2: `ext offset size name` per member, one sample a line) beside the shard."""
    if groups is None:
        groups, _ = scan_tar(tar_path)
    out = index_path(tar_path)
    _write_lines(out, [g for _, g in groups])
    return out


def _write_lines(path: str, samples: list[list[tuple]]) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(f"{INDEX_VERSION} {len(samples)}\n")
        for comps in samples:
            f.write(" ".join(f"{e} {o} {s} {n}" for e, o, s, n in comps) + "\n")
    os.replace(tmp, path)


def read_index(path: str) -> list[tuple[str, list[tuple]]]:
    with open(path) as f:
        head = f.readline().split()
        if not head or head[0] != INDEX_VERSION:
            raise ValueError(f"{path}: not a DALI {INDEX_VERSION} index")
        out = []
        for line in f:
            p = line.split()
            comps = [(p[i], int(p[i + 1]), int(p[i + 2]), p[i + 3]) for i in range(0, len(p) - 3, 4)]
            if comps:
                out.append((split_member(comps[0][3])[0], comps))
    return out


def shard_samples(tar_path: str) -> tuple[dict, str | None]:
    """key -> components of one shard (from its index; the index is built and written when missing or older than
    the shard), and the shard-level error if the shard is damaged. Cached per (path, mtime)."""
    try:
        mtime = os.path.getmtime(tar_path)
    except OSError:
        return {}, "unopenable_shard"
    ck = (tar_path, mtime)
    if ck not in _SCAN_CACHE:
        idx = index_path(tar_path)
        groups, err = None, None
        if os.path.isfile(idx) and os.path.getmtime(idx) >= mtime:
            try:
                groups = read_index(idx)
            except (OSError, ValueError, IndexError):
                groups = None
        if groups is None:
            groups, err = scan_tar(tar_path)
            if err is None:
                try:
                    write_index(tar_path, groups)
                except OSError as e:  # a read-only dataset: keep the index in memory only
                    log.warning("cannot write DALI index beside %s (%s); building it at every start", tar_path, e)
        _SCAN_CACHE[ck] = ({k: c for k, c in groups}, err)
    return _SCAN_CACHE[ck]


def ensure_indexes(out_dir: str) -> int:
    """Write the index of every shard in out_dir that lacks one (what `dsincubate shards` calls); returns how many."""
    n = 0
    for name in sorted(os.listdir(out_dir)):
        p = os.path.join(out_dir, name)
        if name.endswith(".tar") and not os.path.isfile(index_path(p)):
            write_index(p)
            n += 1
    return n


# ---- per-sample checks -------------------------------------------------------------------------------------------
def check_sample(f, comps: list[tuple], num_classes: int) -> tuple[str | None, tuple | None, int]:
    """(bad kind or None, (image component, label component), label) for one sample, reading only its label and the
    image's first bytes from the open shard file `f`."""
    by_ext = {c[0]: c for c in comps}
    img = next((by_ext[e] for e in IMAGE_EXTS if e in by_ext), None)
    if img is None:
        return "missing_image", None, -1
    lab = next((by_ext[e] for e in LABEL_EXTS if e in by_ext), None)
    if lab is None:
        return "missing_label", None, -1
    if lab[2] > LABEL_BYTES:  # the pipeline pads label text to LABEL_BYTES; a longer one is no class index
        return "bad_label", None, -1
    f.seek(lab[1])
    raw = f.read(lab[2])
    try:
        label = int(raw.decode().strip())
    except (ValueError, UnicodeDecodeError):
        label = -1
    if not 0 <= label < num_classes:
        return "bad_label", None, -1
    f.seek(img[1])
    head = f.read(16)
    riff = head[:4] == b"RIFF" and head[8:12] == b"WEBP"
    if not (riff or any(head.startswith(m) for m in _MAGIC)):
        return "decode_error", None, -1
    return None, (img, lab), label


class BadLog:
    """Bad records as the torch loader keeps them: (kind, shard, key) -> count, each once per epoch."""

    def __init__(self):
        self.records: dict = {}
        self.examples: list[str] = []
        self.warned = 0

    def add(self, kind: str, shard: str, key: str, count: int = 1, why: object = "") -> None:
        self.records[(kind, shard, key)] = max(count, self.records.get((kind, shard, key), 0))
        if len(self.examples) < 5:
            self.examples.append(f"{kind}: shard {shard} key {key!r}")
        self.warned += 1
        if self.warned <= 20:
            log.warning("skipping bad data (%s) in shard %s, key %r %s", kind, shard, key, why)

    def by_kind(self) -> Counter:
        c = Counter()
        for (kind, _, _), n in self.records.items():
            c[kind] += n
        return c


def checked_plan(index, keys_per_shard: list[list[str]], num_classes: int, bad: BadLog) -> list[tuple]:
    """[(tar path, shard name, [(key, (image, label) components, label), ...])] of the good selected samples per
    shard, in selection order; every bad one recorded in `bad`."""
    out = []
    for entry, keys in zip(index.shards, keys_per_shard):
        if not keys:
            continue
        if entry.files is not None or not entry.url or entry.url.startswith(("pipe:", "http:", "https:")) \
                or entry.url.endswith((".gz", ".tgz")):
            raise UserError(f"data.backend=dali reads local uncompressed .tar shards; {entry.url or entry.name!r} "
                            "is not one: use data.backend=torch (or write shards with `dsincubate shards`)")
        samples, err = shard_samples(entry.url)
        if err:
            bad.add(err, entry.name, "(whole shard)")
        good, missing = [], 0
        if samples:
            with open(entry.url, "rb") as f:
                for k in keys:
                    comps = samples.get(k)
                    if comps is None:
                        missing += 1
                        continue
                    kind, pair, label = check_sample(f, comps, num_classes)
                    if kind:
                        bad.add(kind, entry.name, k)
                    else:
                        good.append((k, pair, label))
        else:
            missing = len(keys)
        if missing and samples and not err:  # tarfile ends quietly at a member boundary: only the count tells
            bad.add("truncated_shard", entry.name, "(whole shard)")
        if missing:  # samples the manifest promised that the shard does not hold (whole)
            bad.add("missing_samples", entry.name, "(never arrived)", count=missing)
        out.append((entry.url, entry.name, good))
    return out


def write_epoch_indexes(chunks: list[tuple[str, list[tuple]]], folder: str) -> tuple[list[str], list[str]]:
    """One index per (tar, [(image, label) components] in reading order) chunk; a tar may appear in several chunks
    (resampled draws). Returns (paths, index paths) for fn.readers.webdataset."""
    paths, idxs = [], []
    for i, (tar, samples) in enumerate(chunks):
        if not samples:
            continue
        p = os.path.join(folder, f"{i:06d}.idx")
        # the label travels as the sample's own .cls member: DALI hands its bytes over with the image
        _write_lines(p, [list(pair) for pair in samples])
        paths.append(tar)
        idxs.append(p)
    return paths, idxs


class EpochDir:
    """A private temp folder for one epoch's index files, removed when the loader is done with it."""

    def __init__(self):
        self.path = tempfile.mkdtemp(prefix="dsi-dali-")

    def close(self):
        shutil.rmtree(self.path, ignore_errors=True)

    def __del__(self):
        self.close()


def labels_from(cls_batch: np.ndarray) -> torch.Tensor:
    """[B, LABEL_BYTES] uint8 label text, zero padded (checked to be an int in range before the epoch) -> int64 [B]."""
    return torch.tensor([int(bytes(row).rstrip(b"\0").decode()) for row in cls_batch], dtype=torch.int64)
