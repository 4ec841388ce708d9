"""Built-in demo dataset: 10 classes of 32x32 RGB images told apart by shape and texture.

Classes: circle, ring, square, diamond, triangle, cross, x_shape (solid shapes) and stripes, checker, dots (textured
square patches, so "square" vs "checker" is a texture question). Each image has a random position, scale, rotation,
colours, a textured background (gradient, blotches or faint stripes) and pixel noise: learnable by a small ViT, not
trivially. Generated with seeded numpy (each sample from its own seed, so the content never depends on order), stored
as PNG inside real WebDataset shards with the shard writer's manifest: train 3000 samples in 6 shards, val 600 in 2,
so the demo goes through exactly the reader a user's ImageNet shards go through.

Generation takes about a second. Concurrent ranks are safe: each writes a private temp dir and renames it into place;
the first rename wins and the others discard their (identical) copy.

    python -m dsincubate.data.demo [ROOT]     # writes ROOT/demo-v1/{train,val}/ (default demo_data)
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

import numpy as np

from dsincubate.data.sources import MANIFEST_NAME
from dsincubate.data.writer import Sample, image_bytes, write_shards
from dsincubate.errors import UserError

VERSION = "demo-v1"
CLASSES = ["circle", "ring", "square", "diamond", "triangle", "cross", "x_shape", "stripes", "checker", "dots"]
SIZE = 32
SPLITS = {"train": (3000, 500, 1), "val": (600, 300, 2)}   # samples, samples per shard, seed stream
SEED = 20240607

_SS = 2  # supersampling for anti-aliased shape edges
_g = (np.arange(SIZE * _SS, dtype=np.float32) + 0.5) / _SS
_Y, _X = np.meshgrid(_g, _g, indexing="ij")


def _mask(label: int, rng: np.random.Generator) -> np.ndarray:
    """Soft foreground mask in [0,1] of shape SIZE x SIZE; textured classes return mask * pattern."""
    r = rng.uniform(6.0, 11.5)
    cx, cy = rng.uniform(r * 0.7 + 2, SIZE - r * 0.7 - 2, size=2)
    name = CLASSES[label]
    jitter = np.deg2rad(rng.uniform(-15, 15))
    theta = {"diamond": np.pi / 4, "x_shape": np.pi / 4}.get(name, 0.0) + jitter
    if name in ("triangle", "stripes", "checker", "dots"):
        theta = rng.uniform(0, 2 * np.pi)
    dx, dy = _X - cx, _Y - cy
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    if name == "circle":
        m = u * u + v * v <= r * r
    elif name == "ring":
        d = np.sqrt(u * u + v * v)
        m = (d <= r) & (d >= r * rng.uniform(0.45, 0.65))
    elif name in ("square", "diamond"):
        m = np.maximum(np.abs(u), np.abs(v)) <= r * 0.8
    elif name == "triangle":
        m = np.ones_like(u, dtype=bool)
        for k in range(3):
            a = 2 * np.pi * k / 3
            m &= u * np.cos(a) + v * np.sin(a) <= r * 0.6
    elif name in ("cross", "x_shape"):
        w = r * rng.uniform(0.22, 0.34)
        m = ((np.abs(u) <= w) & (np.abs(v) <= r)) | ((np.abs(v) <= w) & (np.abs(u) <= r))
    else:
        patch = np.maximum(np.abs(u), np.abs(v)) <= r * 0.85
        p = rng.uniform(3.0, 5.0)
        if name == "stripes":
            pat = np.sin(2 * np.pi * u / p) > 0
        elif name == "checker":
            pat = (np.floor(u / p * 1.4) + np.floor(v / p * 1.4)) % 2 == 0
        else:  # dots
            uu, vv = np.mod(u, p) - p / 2, np.mod(v, p) - p / 2
            pat = uu * uu + vv * vv <= (p * 0.32) ** 2
        m = patch & pat
    m = m.astype(np.float32).reshape(SIZE, _SS, SIZE, _SS).mean(axis=(1, 3))
    return m


def _background(rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
    kind = rng.integers(3)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / SIZE
    if kind == 0:  # linear gradient
        a = rng.uniform(0, 2 * np.pi)
        t = (np.cos(a) * xx + np.sin(a) * yy)[..., None] * rng.uniform(-60, 60, size=3)
    elif kind == 1:  # low-frequency blotches
        low = rng.normal(0, 25, size=(4, 4, 3)).astype(np.float32)
        t = np.kron(low, np.ones((8, 8, 1), np.float32))
    else:  # faint stripes of random orientation and period
        a, p = rng.uniform(0, np.pi), rng.uniform(0.15, 0.4)
        t = (np.sin(2 * np.pi * (np.cos(a) * xx + np.sin(a) * yy) / p) * rng.uniform(8, 20))[..., None]
    return base[None, None, :] + t


def render(label: int, rng: np.random.Generator) -> np.ndarray:
    """One HxWx3 uint8 image of class `label`."""
    bg = rng.uniform(30, 225, size=3).astype(np.float32)
    while True:  # foreground colour with enough contrast to the background
        fg = rng.uniform(0, 255, size=3).astype(np.float32)
        if np.abs(fg - bg).sum() > 150:
            break
    img = _background(rng, bg)
    m = _mask(label, rng)[..., None]
    img = img * (1 - m) + fg[None, None, :] * m
    img += rng.normal(0, rng.uniform(3, 12), size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_samples(split: str) -> list[Sample]:
    n, _, stream = SPLITS[split]
    out = []
    for i in range(n):
        label = i % len(CLASSES)  # exactly class-balanced
        data = image_bytes(render(label, np.random.default_rng([SEED, stream, i])), "PNG")
        out.append(Sample(key=f"{split}{i:06d}", label=label, ext="png", size=len(data), read=lambda d=data: d))
    return out


def _complete(root: str) -> bool:
    for split in SPLITS:
        p = os.path.join(root, split, MANIFEST_NAME)
        try:
            with open(p, encoding="utf-8") as f:
                if not json.load(f).get("complete"):
                    return False
        except (OSError, ValueError):
            return False
    return True


def ensure_demo(demo_root: str = "demo_data") -> str:
    """Generate the demo under demo_root (once) and return its directory (holding train/ and val/)."""
    final = os.path.join(demo_root, VERSION)
    if _complete(final):
        return final
    if os.path.exists(final):
        raise UserError(f"demo data at {final} is incomplete or damaged; delete that directory to regenerate it")
    os.makedirs(demo_root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{VERSION}.tmp", dir=demo_root)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the renamed demo should be readable like any other data
    try:
        for split, (_, per_shard, _) in SPLITS.items():
            write_shards(make_samples(split), os.path.join(tmp, split), CLASSES, prefix=split,
                         maxcount=per_shard, seed=SEED, image_size=(SIZE, SIZE), progress=False)
        try:
            os.rename(tmp, final)  # atomic; fails if another rank already put its copy there
        except OSError:
            if not _complete(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


if __name__ == "__main__":
    print(ensure_demo(sys.argv[1] if len(sys.argv) > 1 else "demo_data"))
