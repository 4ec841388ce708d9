"""Synthetic datasets whose images carry their own id, for tests and the dataloader benchmark.

`id_samples` makes flat-colour images encoding a sample id in the red/green channels (a flat image survives
resize, crop and lossless PNG exactly), so a test can read ids back from the loader's normalized output with
`ids_from_batch` and check "every sample exactly once" end to end. `jpeg_folder` writes an ImageFolder tree of
natural-looking JPEGs (smooth gradients + noise) for throughput measurements.

    samples = id_samples(400, num_classes=10); write_shards(samples, out, CLASSES, maxcount=50)
"""
from __future__ import annotations

import os

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from dsincubate.data.writer import Sample, image_bytes


def id_image(i: int, size: int = 8) -> np.ndarray:
    img = np.zeros((size, size, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = i // 256, i % 256, 128
    return img


def id_samples(n: int, num_classes: int = 10, size: int = 8, start: int = 0) -> list[Sample]:
    out = []
    for i in range(start, start + n):
        data = image_bytes(id_image(i, size), "PNG")
        out.append(Sample(key=f"k{i:06d}", label=i % num_classes, ext="png", size=len(data),
                          read=lambda d=data: d))
    return out


def ids_from_batch(images: torch.Tensor, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD) -> list[int]:
    """Inverse of id_image after the eval transform (resize + center crop + normalize)."""
    m = torch.tensor(mean).view(1, 3) * 255
    s = torch.tensor(std).view(1, 3) * 255
    px = images[:, :, images.shape[2] // 2, images.shape[3] // 2] * s + m
    px = px.round().long()
    return (px[:, 0] * 256 + px[:, 1]).tolist()


def jpeg_folder(root: str, n: int, size: int = 224, num_classes: int = 10, seed: int = 0,
                quality: int = 90, height: int | None = None) -> list[str]:
    """ImageFolder tree of n JPEGs, `size` wide and `height` (default `size`) high (existing files are kept);
    returns the file paths."""
    rng = np.random.default_rng(seed)
    h = height or size
    yy, xx = np.mgrid[0:h, 0:size].astype(np.float32) / size
    paths = []
    for i in range(n):
        d = os.path.join(root, f"class{i % num_classes:03d}")
        os.makedirs(d, exist_ok=True)
        p = os.path.join(d, f"img{i:06d}.jpg")
        paths.append(p)
        if os.path.exists(p):
            continue
        a, b = rng.uniform(0, 2 * np.pi, 2)
        base = rng.uniform(40, 200, 3)
        wave = np.sin(2 * np.pi * (np.cos(a) * xx + np.sin(a) * yy) * rng.uniform(1, 6) + b)[..., None]
        img = base + wave * rng.uniform(20, 60, 3) + rng.normal(0, 12, (h, size, 3))
        with open(p, "wb") as f:
            f.write(image_bytes(np.clip(img, 0, 255).astype(np.uint8), "JPEG", quality))
    return paths
