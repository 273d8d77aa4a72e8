"""Training views: the random resized crop, augmented and un-augmented views, their determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from retrbench.train.views import TrainViews, collate, random_resized_crop
from retrbench.utils.images import ImageSpec, load_image

from .helpers import CFG


@pytest.fixture
def photo(tmp_path):
    """A 48x40 RGB image with a left-right gradient (so flips are visible)."""
    x = np.linspace(0, 255, 48, dtype=np.float32)[None, :, None].repeat(40, 0).repeat(3, 2)
    x[..., 1] = 80
    p = tmp_path / "p.png"
    Image.fromarray(x.astype(np.uint8)).save(p)
    return p


def test_random_resized_crop_respects_scale_ratio_and_bounds():
    rng = np.random.default_rng(0)
    w, h = 200, 150
    for _ in range(200):
        x0, y0, x1, y1 = random_resized_crop(w, h, (0.3, 0.9), (0.75, 1.333), rng)
        cw, ch = x1 - x0, y1 - y0
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        assert 0.3 - 0.02 <= cw * ch / (w * h) <= 0.9 + 0.02  # rounding to whole pixels
        assert 0.75 - 0.02 <= cw / ch <= 1.333 + 0.02


def test_random_resized_crop_falls_back_to_a_central_crop():
    rng = np.random.default_rng(0)
    # a 100x1 strip cannot hold a square crop of half its area: central crop of ratio 1
    assert random_resized_crop(100, 1, (0.5, 1.0), (1.0, 1.0), rng) == (49, 0, 50, 1)
    assert random_resized_crop(1, 100, (0.5, 1.0), (1.0, 1.0), rng) == (0, 49, 1, 50)


def test_a_full_crop_without_flip_is_the_resized_image(photo):
    cfg = CFG.replace(aug_scale=(1.0, 1.0), aug_ratio=(48 / 40, 48 / 40), hflip=False)
    views = TrainViews([photo], cfg)
    aug, plain, i = views[(0, 0, 0, 0)]
    with Image.open(photo) as im:
        want = np.asarray(im.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR, box=(0, 0, 48, 40)))
    assert aug.dtype == torch.uint8 and aug.shape == (3, 32, 32) and i == 0
    np.testing.assert_array_equal(aug.permute(1, 2, 0).numpy(), want)
    torch.testing.assert_close(plain, load_image(ImageSpec(photo, None, 32)))  # longer side 32


def test_flips_happen_and_are_mirror_images(photo):
    cfg = CFG.replace(aug_scale=(1.0, 1.0), aug_ratio=(48 / 40, 48 / 40))
    views = TrainViews([photo], cfg)
    straight = TrainViews([photo], cfg.replace(hflip=False))[(0, 0, 0, 0)][0]
    flipped = 0
    for slot in range(20):
        aug = views[(0, 0, 0, slot)][0]
        if not torch.equal(aug, straight):
            torch.testing.assert_close(aug, straight.flip(-1))
            flipped += 1
    assert 0 < flipped < 20


def test_views_depend_only_on_seed_stage_step_slot(photo):
    views = TrainViews([photo, photo], CFG)
    a = views[(0, 1, 2, 3)][0]
    assert torch.equal(a, TrainViews([photo, photo], CFG)[(0, 1, 2, 3)][0])
    assert torch.equal(a, views[(1, 1, 2, 3)][0])  # same file, same key: the index does not draw
    others = [views[k][0] for k in [(0, 0, 2, 3), (0, 1, 0, 3), (0, 1, 2, 0)]]
    assert all(not torch.equal(a, o) for o in others)
    assert not torch.equal(a, TrainViews([photo], CFG.replace(seed=1))[(0, 1, 2, 3)][0])
    m = views.memory_view(0, 1)
    assert torch.equal(m, views.memory_view(0, 1)) and not torch.equal(m, views.memory_view(0, 0))


def test_collate_stacks_augmented_views_and_keeps_plain_ones():
    items = [(torch.zeros(3, 4, 4, dtype=torch.uint8), torch.zeros(3, 2, 3, dtype=torch.uint8), 7), (torch.ones(3, 4, 4, dtype=torch.uint8), torch.zeros(3, 3, 2, dtype=torch.uint8), 2)]
    aug, plain, idx = collate(items)
    assert aug.shape == (2, 3, 4, 4) and [p.shape[1:] for p in plain] == [(2, 3), (3, 2)]
    assert idx.dtype == torch.long and idx.tolist() == [7, 2]
    assert math.isclose(float(aug[1].float().mean()), 1.0)
