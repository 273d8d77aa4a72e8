"""retrbench.datasets.demo.render: reduction, warps, photometric changes and the view recipes."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from retrbench.datasets.demo import geometry as geo
from retrbench.datasets.demo import render
from retrbench.datasets.demo.catalogue import INSTANCES


def _noise_image(rng: np.random.Generator, size: tuple[int, int] = (120, 90)) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


def test_reduce_photo_caps_the_region_side(rng: np.random.Generator) -> None:
    img = _noise_image(rng, (1600, 900))
    p = render.reduce_photo(img, (0, 0, 1280, 900), (100, 100, 300, 300))
    assert p.image.size == (800, 450) and p.region == (0, 0, 640, 450) and p.box == (50, 50, 150, 150)
    small = render.reduce_photo(img, (0, 0, 600, 400), (0, 0, 1, 1))
    assert small.image is img  # already small enough: untouched


def test_warp_identity_returns_the_photo(rng: np.random.Generator) -> None:
    img = _noise_image(rng)
    photo = render.Photo(img, (0.0, 0.0, 120.0, 90.0), (0.0, 0.0, 10.0, 10.0))
    out = render.warp(photo, geo.Geom(np.eye(3), (120, 90), (0.0, 0.0, 120.0, 90.0)))
    assert np.array_equal(np.asarray(out), np.asarray(img))


def test_photometric_strength_zero_is_identity(rng: np.random.Generator) -> None:
    img = _noise_image(rng)
    assert np.array_equal(np.asarray(render.photometric(img, np.random.default_rng(1), 0.0)), np.asarray(img))
    grey = np.asarray(render.photometric(img, np.random.default_rng(1), 0.0, grey=True), dtype=np.int16)
    assert render.is_grey(Image.fromarray(grey.astype(np.uint8)))
    assert not render.is_grey(img)


def test_encode_jpeg_is_deterministic_and_bare(rng: np.random.Generator) -> None:
    img = _noise_image(rng)
    a, b = render.encode_jpeg(img, 50), render.encode_jpeg(img, 50)
    assert a == b and a != render.encode_jpeg(img, 90)
    with Image.open(io.BytesIO(a)) as im:
        assert im.format == "JPEG" and not im.info.get("exif") and not im.info.get("progressive")


@pytest.mark.parametrize("recipe", render.RECIPES)
def test_instance_views_draw_the_same_image_from_the_same_seed(rng: np.random.Generator, recipe: str) -> None:
    inst = INSTANCES[0]
    photo = render.Photo(_noise_image(rng, (400, 300)), (0.0, 0.0, 400.0, 300.0), (100.0, 60.0, 300.0, 240.0))
    backgrounds = [_noise_image(rng, (200, 150))]
    a, ga = render.instance_view(inst, photo, recipe, np.random.default_rng(7), backgrounds)
    b, gb = render.instance_view(inst, photo, recipe, np.random.default_rng(7), backgrounds)
    assert a.size == ga.size and np.array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(ga.out_to_src, gb.out_to_src)
    if recipe != "beside":  # every other recipe shows some of the object
        assert geo.measure(ga, photo.box)["visible"] > 0.0
    with pytest.raises(ValueError):
        render.instance_view(inst, photo, "no-such-recipe", np.random.default_rng(7), backgrounds)


def test_query_views_show_all_of_the_object(rng: np.random.Generator) -> None:
    photo = render.Photo(_noise_image(rng, (400, 300)), (0.0, 0.0, 400.0, 300.0), (100.0, 60.0, 300.0, 240.0))
    for k in (1, 2):
        _, g = render.query_view(photo, k, np.random.default_rng(k))
        assert geo.measure(g, photo.box)["visible"] >= 0.99
