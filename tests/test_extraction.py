"""Extraction: resize / crop rules, size-bucketed batching, cache and resume."""

import numpy as np
import pytest
import torch
from PIL import Image

from retrbench.extraction import FeatureCache, ImageSpec, extract, load_image, target_size


def spoc(x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C)
    return x.mean(dim=(2, 3))


class Counting(torch.nn.Module):
    """Identity network that counts images and can fail after a number of batches."""

    def __init__(self, fail_after: int | None = None) -> None:
        super().__init__()
        self.images = 0
        self.batches = 0
        self.fail_after = fail_after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fail_after is not None and self.batches >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.batches += 1
        self.images += x.shape[0]
        return x


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate([(40, 30), (30, 40), (40, 30), (64, 16), (40, 30), (50, 50), (40, 30)]):
        p = tmp_path / f"im{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def test_resize_longer_side_both_ways(images):
    assert target_size(ImageSpec(images[0], None, 20)) == (20, 15)
    assert target_size(ImageSpec(images[1], None, 80)) == (60, 80)
    x = load_image(ImageSpec(images[3], None, 32))
    assert x.shape == (3, 8, 32) and x.dtype == torch.uint8


def test_query_crop_rules(images):
    box = (10, 5, 30, 25)  # 20 x 20 box in a 40 x 30 image
    crop = ImageSpec(images[0], box, 10, "crop")  # crop, then longer side of the crop -> 10
    assert target_size(crop) == (10, 10) == tuple(load_image(crop).shape[2:0:-1])
    full = ImageSpec(images[0], box, 20, "full")  # full image -> 20 x 15, box scaled by 0.5
    assert target_size(full) == (10, 10) == tuple(load_image(full).shape[2:0:-1])
    # the crop-mode pixels are the box of the original image when no resizing happens
    same = load_image(ImageSpec(images[0], box, 20, "crop")).permute(1, 2, 0).numpy()
    orig = np.asarray(Image.open(images[0]).convert("RGB"))[5:25, 10:30]
    np.testing.assert_array_equal(same, orig)
    with pytest.raises(ValueError, match="empty"):
        target_size(ImageSpec(images[0], (50, 50, 60, 60), 20))


def test_missing_image_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.jpg"):
        target_size(ImageSpec(tmp_path / "nothing.jpg", None, 20))


def test_batching_does_not_change_descriptors(images):
    specs = [ImageSpec(p, None, 24) for p in images]
    kw = dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), device="cpu", workers=0)
    one = extract(Counting(), spoc, specs, batch_size=1, **kw)
    net = Counting()
    many = extract(net, spoc, specs, batch_size=4, **kw)
    np.testing.assert_allclose(one, many, rtol=0, atol=1e-6)
    # four images share the 24 x 18 size: one batch of 4 plus one per other size
    assert net.batches == 4
    # oracle: mean of normalised pixels of each resized image
    for i, s in enumerate(specs):
        x = load_image(s).float() / 255
        np.testing.assert_allclose(many[i], ((x - 0.5) / 0.25).mean(dim=(1, 2)).numpy(), atol=1e-5)


def test_cache_hit_skips_network(images, tmp_path):
    specs = [ImageSpec(p, None, 24) for p in images]
    kw = dict(mean=(0, 0, 0), std=(1, 1, 1), device="cpu", workers=0, chunk_size=3)
    cache = FeatureCache(tmp_path / "cache", "k", {"what": "test"})
    first = extract(Counting(), spoc, specs, cache=cache, **kw)
    assert cache.path.exists() and not cache.partial.exists()
    net = Counting()
    again = extract(net, spoc, specs, cache=FeatureCache(tmp_path / "cache", "k", {}), **kw)
    assert net.images == 0
    np.testing.assert_array_equal(first, again)


def test_interrupted_extraction_resumes(images, tmp_path):
    specs = [ImageSpec(p, None, 24) for p in images]
    kw = dict(mean=(0, 0, 0), std=(1, 1, 1), device="cpu", workers=0, chunk_size=3, batch_size=1)
    cache = FeatureCache(tmp_path / "cache", "k", {})
    with pytest.raises(KeyboardInterrupt):
        extract(Counting(fail_after=4), spoc, specs, cache=cache, **kw)  # chunk 0 (3 images) finished
    assert cache.chunk_path(0).exists() and not cache.path.exists()
    net = Counting()
    resumed = extract(net, spoc, specs, cache=cache, **kw)
    assert net.images == len(specs) - 3
    np.testing.assert_allclose(resumed, extract(Counting(), spoc, specs, **kw), atol=1e-6)


def test_corrupt_cache_is_recomputed(images, tmp_path):
    specs = [ImageSpec(p, None, 24) for p in images]
    cache = FeatureCache(tmp_path / "c", "k", {})
    cache.dir.mkdir()
    cache.path.write_bytes(b"not a numpy file")
    net = Counting()
    out = extract(net, spoc, specs, cache=cache, mean=(0, 0, 0), std=(1, 1, 1), device="cpu", workers=0)
    assert net.images == len(specs) and out.shape == (len(specs), 3)
