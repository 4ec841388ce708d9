"""Decoding and augmentation: timm's DeiT recipe, DeiT-III 3-Augment, plain eval, and seeded timm Mixup/CutMix.

Decoding uses torchvision.io.decode_image (libjpeg-turbo / libpng; measured ~1.5x faster than PIL for 224px JPEG and
32px PNG on this CPU), falling back to PIL for formats it lacks. The PIL-based timm augmentations then get a PIL image
built from the decoded array; eval and recipe "none" stay on uint8 tensors (resize, center crop, normalize), which is
the cheapest path.

    from dsincubate.data.transforms import build_transform
    tf = build_transform("deit", cfg, img_size=224, train=True); x = tf(decode(jpeg_bytes))
"""
from __future__ import annotations

import io
import math
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
# PIL images come back as read-only numpy arrays; they are only ever copied from, never written.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)

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


class TensorEval:
    """Resize shorter side to img_size/crop_pct (bicubic, antialiased), center crop, scale and normalize."""

    def __init__(self, img_size: int, crop_pct: float = DEFAULT_CROP_PCT, mean=IMAGENET_DEFAULT_MEAN,
                 std=IMAGENET_DEFAULT_STD):
        self.img_size = img_size
        self.resize = int(math.floor(img_size / crop_pct))
        self.mean = torch.tensor(mean).view(3, 1, 1) * 255
        self.inv_std = 1.0 / (torch.tensor(std).view(3, 1, 1) * 255)

    def __call__(self, img: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if min(img.shape[-2:]) != self.resize:
            img = TF.resize(img, [self.resize], interpolation=InterpolationMode.BICUBIC, antialias=True)
        img = TF.center_crop(img, [self.img_size, self.img_size])
        return _normalize_into(img, out, self.mean, self.inv_std)


class PILPipeline:
    """Decoded uint8 tensor -> PIL -> timm PIL augmentations -> fast to-tensor + normalize -> tensor transforms.

    timm's final stage (ToTensor, Normalize) costs ~150us per 32px image; one fused uint8->float normalize does the
    same arithmetic in ~15us. timm's tensor ops after it (random erasing) are kept as they are.
    """

    def __init__(self, pil_tf, mean, std, tensor_tf=()):
        self.pil_tf, self.tensor_tf = pil_tf, list(tensor_tf)
        self.mean = torch.tensor(mean).view(3, 1, 1) * 255
        self.inv_std = 1.0 / (torch.tensor(std).view(3, 1, 1) * 255)

    def __call__(self, img: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        pil = self.pil_tf(to_pil(img))
        x = _normalize_into(torch.from_numpy(np.asarray(pil.convert("RGB"))).permute(2, 0, 1), out, self.mean,
                            self.inv_std)
        for t in self.tensor_tf:
            y = t(x)  # timm's RandomErasing works in place and returns its input
            if y is not x:
                x.copy_(y)
        return x


def _normalize_into(img: torch.Tensor, out: torch.Tensor | None, mean: torch.Tensor, inv_std: torch.Tensor):
    """uint8 [3,H,W] -> normalized float32, written straight into `out` (the batch slot) when given: no temporary
    float images, whose page-faulting allocations cost more than the arithmetic at 224px."""
    if out is None:
        out = torch.empty(img.shape, dtype=torch.float32)
    out.copy_(img)
    return out.sub_(mean).mul_(inv_std)


def _split_final(final) -> list:
    """timm's final Compose minus its ToTensor/Normalize (done by PILPipeline): the remaining tensor ops."""
    return [t for t in final.transforms if type(t).__name__ not in ("MaybeToTensor", "ToTensor", "Normalize")]


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
        return PILPipeline(T.Compose([primary, secondary]), mean, std, _split_final(final))
    if recipe == "3aug":
        # DeiT-III 3-Augment: simple random crop (resize, reflect-padded crop) + flip, then one of
        # grayscale/solarize/gaussian blur (timm's '3a' policy), colour jitter 0.3, normalize (+ erasing if asked).
        _, secondary, final = create_transform(
            img_size, is_training=True, auto_augment="3a", color_jitter=0.3, re_prob=cfg.reprob, re_mode="pixel",
            interpolation="bicubic", mean=mean, std=std, separate=True)
        import torchvision.transforms as T
        primary = T.Compose([Resize(img_size, interpolation=InterpolationMode.BICUBIC),
                             RandomCrop(img_size, padding=4, padding_mode="reflect"), RandomHorizontalFlip()])
        return PILPipeline(T.Compose([primary, secondary]), mean, std, _split_final(final))
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
