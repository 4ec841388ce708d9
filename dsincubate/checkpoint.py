"""Checkpoint files: atomic writes, model-only safetensors hand-offs with provenance, manifests, resume points.

Rules (the README's "Outputs and resuming"): every write goes to a temporary file in the same directory and is
renamed into place, so a crash never leaves a half-written file under the final name; a phase's output counts only
once its `MANIFEST.json` exists (written last, listing each file's sha256); hand-offs between phases are safetensors
(no pickle), with the provenance (model spec, K, stage index, meta hash) in the safetensors metadata; anything
loaded with `torch.load` uses `weights_only=True`.

Resumable training state is DeepSpeed's own checkpoint (`engine.save_checkpoint`) under `<phase>/checkpoints/<tag>`;
a tag counts only when our `MANIFEST.json` is in it, and the latest is chosen by the epoch number, not by name.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from dsincubate.errors import UserError

MANIFEST = "MANIFEST.json"
_TAG = re.compile(r"^epoch(\d+)$")


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    _atomic(Path(path), write)


def atomic_write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_tensors(path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Model-only safetensors file; `meta` (JSON-serialisable) goes into the header under 'dsincubate'."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic(Path(path), lambda tmp: save_file(tensors, tmp, metadata={"dsincubate": json.dumps(meta, sort_keys=True)}))


def load_tensors(path) -> tuple[dict[str, torch.Tensor], dict]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("dsincubate", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, ValueError, SafetensorError) as e:
        raise UserError(f"{path}: not a readable safetensors checkpoint ({e})") from None
    return tensors, _current_names(meta)


def _current_names(meta: dict) -> dict:
    """A stage file's stage index is "stage_index"; files written before that name (2026-12-06) say "index", which
    reads as "stage_index", so they still assemble and evaluate."""
    if meta.get("kind") == "stage" and "index" in meta and "stage_index" not in meta:
        meta["stage_index"] = meta.pop("index")
    return meta


def read_meta(path) -> dict:
    """The provenance header `save_tensors` wrote (old key names read as the current ones)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return _current_names(json.loads((f.metadata() or {}).get("dsincubate", "{}")))
    except (OSError, ValueError, SafetensorError) as e:
        raise UserError(f"{path}: not a readable safetensors checkpoint ({e})") from None


def write_manifest(directory, files: list[str], extra: dict | None = None) -> None:
    directory = Path(directory)
    entries = {name: {"sha256": sha256_file(directory / name), "bytes": (directory / name).stat().st_size}
               for name in files}
    atomic_write_json(directory / MANIFEST, {"files": entries, **(extra or {})})


def read_manifest(directory) -> dict | None:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def complete(directory) -> bool:
    """A phase output counts only when its manifest exists and lists files that are all present."""
    m = read_manifest(directory)
    return m is not None and all((Path(directory) / f).is_file() for f in m.get("files", {}))


# ---- resumable DeepSpeed checkpoints -------------------------------------------------------------------------------

def tag_for_epoch(epoch: int) -> str:
    return f"epoch{epoch:05d}"


def latest_resume_tag(ckpt_dir) -> tuple[str, int] | None:
    """The newest complete resumable checkpoint, by epoch number (epoch99 < epoch100)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None
    found = []
    for d in ckpt_dir.iterdir():
        m = _TAG.match(d.name)
        if m and d.is_dir() and (d / MANIFEST).is_file():
            found.append((int(m.group(1)), d.name))
    if not found:
        return None
    epoch, tag = max(found)
    return tag, epoch


def prune_resume_tags(ckpt_dir, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints, and any incomplete one older than the newest."""
    ckpt_dir = Path(ckpt_dir)
    tags = sorted((int(m.group(1)), d) for d in ckpt_dir.iterdir() if (m := _TAG.match(d.name)) and d.is_dir())
    complete_tags = [(e, d) for e, d in tags if (d / MANIFEST).is_file()]
    if not complete_tags:
        return
    keep_set = {d for _, d in complete_tags[-max(keep, 1):]}
    newest = complete_tags[-1][0]
    for e, d in tags:
        if d not in keep_set and e <= newest:
            # The manifest goes first, so a crash midway leaves an incomplete (ignored) directory, never a bad one.
            (d / MANIFEST).unlink(missing_ok=True)
            shutil.rmtree(d, ignore_errors=True)
