"""Per-sample transforms hand over uint8; BatchPrep normalizes and random-erases on the batch's device, seeded."""
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dsincubate.data.transforms import BatchPrep, build_transform

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CFG = SimpleNamespace(auto_augment="rand-m9-mstd0.5-inc1", color_jitter=0.4, reprob=0.25)


def _img(seed, h=40, w=52):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (3, h, w), dtype=np.uint8))


@pytest.mark.parametrize("recipe", ["none", "deit", "3aug"])
def test_transforms_write_uint8_into_the_batch_slot(recipe):
    tf = build_transform(recipe, CFG, img_size=16, train=True, mean=MEAN, std=STD)
    slot = torch.zeros(3, 16, 16, dtype=torch.uint8)
    out = tf(_img(0), slot)
    assert out.dtype == torch.uint8 and out.data_ptr() == slot.data_ptr()
    assert tf(_img(0)).shape == (3, 16, 16)
    assert (tf.batch_prep.erasing is not None) == (recipe != "none")  # reprob 0.25 asks for it in both PIL recipes


def test_batch_prep_matches_float64_normalization():
    x = torch.stack([_img(i, 16, 16) for i in range(5)])
    got = BatchPrep(MEAN, STD)(x)
    want = (x.double() / 255 - torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1)) / \
        torch.tensor(STD, dtype=torch.float64).view(1, 3, 1, 1)
    assert got.dtype == torch.float32 and got.shape == x.shape
    assert torch.allclose(got.double(), want, atol=1e-5, rtol=1e-6)


def test_random_erasing_is_seeded_by_key_and_leaves_caller_rng_alone():
    tf = build_transform("deit", SimpleNamespace(**(vars(CFG) | {"reprob": 1.0})), img_size=24, train=True,
                         mean=MEAN, std=STD)
    x = torch.stack([_img(i, 24, 24) for i in range(8)])
    plain = BatchPrep(MEAN, STD)(x)
    random.seed(5), torch.manual_seed(5)
    before = (random.random(), torch.rand(1))
    random.seed(5), torch.manual_seed(5)
    a = tf.batch_prep(x, "cpu", [1, 2, 3, 0])
    assert (random.random(), torch.rand(1)) == before  # the training loop's own randomness is untouched
    b = tf.batch_prep(x, "cpu", [1, 2, 3, 0])
    c = tf.batch_prep(x, "cpu", [1, 2, 3, 1])
    assert torch.equal(a, b) and not torch.equal(a, c)
    changed = (a != plain).flatten(1).any(1)
    assert changed.all()  # probability 1: every image has an erased box
    assert ((a == plain).flatten(1).float().mean(1) > 0.5).all()  # ... covering at most a third of it
