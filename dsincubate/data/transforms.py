"""Decoding and augmentation: timm's DeiT recipe, DeiT-III 3-Augment, plain eval, and seeded timm Mixup/CutMix.

Decoding uses torchvision.io.decode_image (libjpeg-turbo / libpng; measured ~1.5x faster than PIL for 224px JPEG and
32px PNG on this CPU), falling back to PIL for formats it lacks. The PIL-based timm augmentations then get a PIL image
built from the decoded array; eval and recipe "none" stay on uint8 tensors (resize, center crop).

Per-sample transforms end in uint8 [3,S,S], as timm's loader does with its prefetcher: DataLoader workers hand over
batches a quarter the size of float32 ones, and the per-batch `BatchPrep` (uint8 -> float, normalize, and when the
recipe asks for it timm's RandomErasing, seeded per batch) runs where the batch is used, on the GPU when there is one.

    from dsincubate.data.transforms import build_transform
    tf = build_transform("deit", cfg, img_size=224, train=True); u8 = tf(decode(jpeg_bytes))
    x = tf.batch_prep(u8[None], device="cuda", key=[seed, epoch, rank, step])
"""
from __future__ import annotations

import copy
import io
import math
import random
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import InterpolationMode, RandomCrop, RandomHorizontalFlip, Resize
from torchvision.transforms.v2 import functional as TF

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from timm.data import auto_augment as _timm_aa

# torchvision 0.29 deprecates its decoders in favour of torchcodec (not installed here) and warns on every call.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

DEFAULT_CROP_PCT = 0.875  # DeiT eval: resize to img_size / 0.875, center crop img_size


def _posterize(img, bits_to_keep, **__):
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:  # 'inc1' + magnitude noise can reach 0 bits: Pillow >= 10 raises, DeiT's Pillow gave black
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


# timm binds ops from this table when a RandAugment is built, so patching it here fixes every transform we build.
for _name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
    _timm_aa.NAME_TO_OP[_name] = _posterize


def decode(data: bytes) -> torch.Tensor:
    """Encoded image bytes -> uint8 tensor [3,H,W]. Raises on undecodable data."""
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        return decode_image(buf, mode=ImageReadMode.RGB)
    except RuntimeError:
        with Image.open(io.BytesIO(data)) as im:  # e.g. BMP/TIFF, which torchvision does not decode
            arr = np.asarray(im.convert("RGB"))
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def to_pil(img: torch.Tensor) -> Image.Image:
    return Image.fromarray(img.permute(1, 2, 0).contiguous().numpy())


class BatchPrep:
    """uint8 batch [B,3,S,S] -> float32 normalized batch on `device`, then (optionally) timm's RandomErasing.

    Erasing runs on normalized values (pixel mode draws N(0,1) noise), so it belongs here rather than in the
    per-sample uint8 stage; timm's prefetcher does the same. Its python/torch randomness is seeded from `key` and the
    caller's RNG states are restored, so a batch is erased identically wherever and whenever it is prepared.
    Not timm's PrefetchLoader: its erasing draws from the global RNG (a resumed run would erase differently) and it
    owns the iteration, where our loaders merge partial batches and count bad data.
    """

    def __init__(self, mean, std, erasing=None):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255
        self.inv_std = 1.0 / (torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255)
        self.erasing = erasing  # timm RandomErasing as create_transform built it, or None
        self._consts: dict = {}

    def __call__(self, x: torch.Tensor, device="cpu", key=()) -> torch.Tensor:
        device = torch.device(device)
        if device not in self._consts:
            erasing = None
            if self.erasing is not None:
                erasing = copy.copy(self.erasing)
                erasing.device = str(device)  # where its noise is drawn
            self._consts[device] = (self.mean.to(device), self.inv_std.to(device), erasing)
        mean, inv_std, erasing = self._consts[device]
        x = x.to(device, non_blocking=True).float().sub_(mean).mul_(inv_std)
        if erasing is not None:
            self._erase(erasing, x, device, key)
        return x

    @staticmethod
    def _erase(erasing, x: torch.Tensor, device: torch.device, key) -> None:
        seed = int(np.random.SeedSequence([0x45524153, *key]).generate_state(1)[0])
        outer = random.getstate()
        random.seed(seed)
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
                torch.manual_seed(seed)
                erasing(x)
        finally:
            random.setstate(outer)


class TensorEval:
    """Resize shorter side to img_size/crop_pct (bicubic, antialiased), center crop; uint8 out."""

    def __init__(self, img_size: int, crop_pct: float = DEFAULT_CROP_PCT, mean=IMAGENET_DEFAULT_MEAN,
                 std=IMAGENET_DEFAULT_STD):
        self.img_size = img_size
        self.resize = int(math.floor(img_size / crop_pct))
        self.batch_prep = BatchPrep(mean, std)

    def __call__(self, img: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if min(img.shape[-2:]) != self.resize:
            img = TF.resize(img, [self.resize], interpolation=InterpolationMode.BICUBIC, antialias=True)
        return _into(TF.center_crop(img, [self.img_size, self.img_size]), out)


class PILPipeline:
    """Decoded uint8 tensor -> PIL -> timm's PIL augmentations -> uint8 tensor (timm's ToTensor/Normalize and
    RandomErasing become the per-batch BatchPrep)."""

    def __init__(self, pil_tf, mean, std, erasing=None):
        self.pil_tf = pil_tf
        self.batch_prep = BatchPrep(mean, std, erasing)

    def __call__(self, img: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        pil = self.pil_tf(to_pil(img))
        arr = np.asarray(pil if pil.mode == "RGB" else pil.convert("RGB"))  # read-only view of PIL's pixels
        if out is None:
            out = torch.empty(3, *arr.shape[:2], dtype=torch.uint8)
        np.copyto(out.permute(1, 2, 0).numpy(), arr)  # one HWC -> CHW copy into the batch slot
        return out


def _into(img: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """Write uint8 [3,S,S] into `out` (the batch slot, already in shared memory in a worker) when given."""
    if out is None:
        return img.clone(memory_format=torch.contiguous_format)  # a crop is a view of the decoded image
    return out.copy_(img)


def _erasing(final):
    """timm's RandomErasing from its final Compose (None when it has none); the other members are ToTensor and
    Normalize, which BatchPrep replaces."""
    ops = [t for t in final.transforms if type(t).__name__ not in ("MaybeToTensor", "ToTensor", "Normalize")]
    unknown = [type(t).__name__ for t in ops if type(t).__name__ != "RandomErasing"]
    if unknown:
        raise ValueError(f"unexpected tensor transforms from timm: {unknown}")
    return ops[0] if ops and ops[0].probability > 0 else None


def build_transform(recipe: str, cfg, *, img_size: int, train: bool, mean=IMAGENET_DEFAULT_MEAN,
                    std=IMAGENET_DEFAULT_STD):
    """The per-sample transform for `recipe` ("deit" | "3aug" | "none"); eval always resize + center crop."""
    if not train or recipe == "none":
        return TensorEval(img_size, mean=mean, std=std)
    if recipe == "deit":
        # DeiT: RandomResizedCrop + flip + RandAugment + (colour jitter, which timm turns off under RandAugment,
        # as DeiT does) + random erasing in pixel mode.
        primary, secondary, final = create_transform(
            img_size, is_training=True, auto_augment=cfg.auto_augment or None, color_jitter=cfg.color_jitter,
            re_prob=cfg.reprob, re_mode="pixel", re_count=1, interpolation="bicubic", mean=mean, std=std,
            separate=True)
        import torchvision.transforms as T
        return PILPipeline(T.Compose([primary, secondary]), mean, std, _erasing(final))
    if recipe == "3aug":
        # DeiT-III 3-Augment: simple random crop (resize, reflect-padded crop) + flip, then one of
        # grayscale/solarize/gaussian blur (timm's '3a' policy), colour jitter 0.3, normalize (+ erasing if asked).
        _, secondary, final = create_transform(
            img_size, is_training=True, auto_augment="3a", color_jitter=0.3, re_prob=cfg.reprob, re_mode="pixel",
            interpolation="bicubic", mean=mean, std=std, separate=True)
        import torchvision.transforms as T
        primary = T.Compose([Resize(img_size, interpolation=InterpolationMode.BICUBIC),
                             RandomCrop(img_size, padding=4, padding_mode="reflect"), RandomHorizontalFlip()])
        return PILPipeline(T.Compose([primary, secondary]), mean, std, _erasing(final))
    raise ValueError(f"unknown augmentation recipe {recipe!r} (deit, 3aug, none)")


class SeededMixup:
    """timm Mixup/CutMix with label smoothing, drawing from its own numpy RandomState.

    timm's Mixup draws from numpy's global RNG; this wrapper swaps in a private state seeded from
    (seed, epoch, rank), so a resumed run mixes exactly like an uninterrupted one once set_epoch(epoch) is called,
    and the engine's own use of numpy is not disturbed. Needs an even batch size.
    """

    def __init__(self, mixup: Mixup, seed: int = 0, rank: int = 0):
        self.mixup, self.seed, self.rank = mixup, seed, rank
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        ss = np.random.SeedSequence([self.seed, epoch, self.rank, 0x6d6978])
        self._state = np.random.RandomState(ss.generate_state(1)[0]).get_state()

    def __call__(self, images: torch.Tensor, targets: torch.Tensor):
        if images.shape[0] % 2:
            raise ValueError(f"mixup/cutmix needs an even batch size, got {images.shape[0]}")
        outer = np.random.get_state()
        np.random.set_state(self._state)
        try:
            return self.mixup(images, targets)
        finally:
            self._state = np.random.get_state()
            np.random.set_state(outer)


def build_mixup_fn(cfg, num_classes: int, seed: int = 0, rank: int = 0) -> SeededMixup | None:
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    return SeededMixup(Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=1.0, switch_prob=0.5,
                             mode="batch", label_smoothing=cfg.smoothing, num_classes=num_classes), seed, rank)
