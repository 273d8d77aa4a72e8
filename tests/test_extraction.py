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


KW = dict(mean=(0, 0, 0), std=(1, 1, 1), device="cpu", workers=0)


def test_cache_hit_skips_network_and_is_memory_mapped(images, tmp_path):
    specs = [ImageSpec(p, None, 24) for p in images]
    cache = FeatureCache(tmp_path / "cache", "k", {"what": "test"})
    first = extract(Counting(), spoc, specs, cache=cache, **KW)
    assert cache.complete and not (cache.dir / "progress.log").exists()
    net = Counting()
    again = extract(net, spoc, specs, cache=FeatureCache(tmp_path / "cache", "k", {}), **KW)
    assert net.images == 0 and isinstance(again, np.memmap) and not again.flags.writeable
    np.testing.assert_array_equal(first, again)


def test_interrupted_extraction_resumes_bitwise(images, tmp_path):
    specs = [ImageSpec(p, None, 24) for p in images]
    kw = dict(KW, batch_size=1, flush_seconds=0.0)  # flush after every batch
    cache = FeatureCache(tmp_path / "cache", "k", {})
    with pytest.raises(KeyboardInterrupt):
        extract(Counting(fail_after=4), spoc, specs, cache=cache, **kw)  # 4 batches finished
    assert cache.done_batches() == {0, 1, 2, 3} and not cache.complete
    net = Counting()
    resumed = extract(net, spoc, specs, cache=cache, **kw)
    assert net.images == len(specs) - 4
    np.testing.assert_array_equal(resumed, extract(Counting(), spoc, specs, **kw))


def test_resume_keeps_the_first_runs_batch_plan(images, tmp_path):
    specs = [ImageSpec(p, None, 24) for p in images]
    cache = FeatureCache(tmp_path / "cache", "k", {})
    with pytest.raises(KeyboardInterrupt):
        extract(Counting(fail_after=1), spoc, specs, cache=cache, **dict(KW, batch_size=4, flush_seconds=0.0))
    net = Counting()
    extract(net, spoc, specs, cache=cache, **dict(KW, batch_size=1))  # another batch size asked
    assert net.batches == 3  # the remaining batches of the batch-4 plan: sizes (30,40), (64,16), (50,50)


def test_changed_image_is_extracted_again(images, tmp_path):
    import os

    specs = [ImageSpec(p, None, 24) for p in images]
    cache = FeatureCache(tmp_path / "cache", "k", {})
    first = np.array(extract(Counting(), spoc, specs, cache=cache, **dict(KW, batch_size=1)))
    Image.new("RGB", (40, 30), (255, 0, 0)).save(images[2])  # edited in place, same name and size
    st = os.stat(images[2])
    os.utime(images[2], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    net = Counting()
    again = extract(net, spoc, specs, cache=cache, **dict(KW, batch_size=1))
    assert net.images == 1
    assert np.allclose(again[2], [1.0, 0.0, 0.0]) and not np.allclose(first[2], again[2])
    np.testing.assert_array_equal(np.delete(first, 2, axis=0), np.delete(np.asarray(again), 2, axis=0))


def test_corrupt_cache_is_recomputed(images, tmp_path):
    specs = [ImageSpec(p, None, 24) for p in images]
    cache = FeatureCache(tmp_path / "c", "k", {})
    extract(Counting(), spoc, specs, cache=cache, **KW)
    cache.path.write_bytes(b"not a numpy file")
    net = Counting()
    out = extract(net, spoc, specs, cache=cache, **KW)
    assert net.images == len(specs) and out.shape == (len(specs), 3)


class NaNAfter(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        if x.shape[-1] == 24 and x.shape[-2] == 18:  # the 40 x 30 images
            y[:, 0] = float("nan")
        return y


def test_non_finite_descriptors_are_an_error_and_never_cached(images, tmp_path):
    specs = [ImageSpec(p, None, 24) for p in images]
    cache = FeatureCache(tmp_path / "c", "k", {})
    with pytest.raises(ValueError, match=r"non-finite descriptors \(NaN or inf\) for 4 of 4 images.*im0.png"):
        extract(NaNAfter(), spoc, specs, cache=cache, desc="nan_model on demo database", **KW)
    assert not cache.complete and cache.load() is None


def test_decoding_errors_in_workers_are_raised_as_one_clean_error(images):
    images[3].write_bytes(b"not an image")
    specs = [ImageSpec(p, None, 24) for p in images]
    with pytest.raises(OSError) as e:
        extract(Counting(), spoc, [specs[0], specs[3]], **dict(KW, workers=1))
    assert "im3.png" in str(e.value) and "Traceback" not in str(e.value) and "DataLoader worker" not in str(e.value)


def test_read_only_cache_continues_without_caching(images, tmp_path):
    import os

    from retrbench.extraction import CacheWarning

    if os.geteuid() == 0:
        ro = tmp_path / "file-not-folder"
        ro.write_text("x")  # root ignores permissions: a file where the folder should be
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
    specs = [ImageSpec(p, None, 24) for p in images]
    with pytest.warns(CacheWarning, match="extracting without caching"):
        out = extract(Counting(), spoc, specs, cache=FeatureCache(ro, "k", {}), **KW)
    np.testing.assert_array_equal(out, extract(Counting(), spoc, specs, **KW))
