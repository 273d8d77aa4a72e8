"""retrbench.datasets.demo.geometry: homographies, measurements and labels on hand-built views."""

from __future__ import annotations

import numpy as np
import pytest

from retrbench.datasets.demo import geometry as geo


def _identity(size: tuple[int, int] = (100, 80)) -> geo.Geom:
    return geo.Geom(np.eye(3), size, (0.0, 0.0, float(size[0]), float(size[1])))


def _rotation(deg: float) -> np.ndarray:
    a = np.radians(deg)
    return np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])


def test_homography_maps_the_four_points(rng: np.random.Generator) -> None:
    src = geo.box_corners((0, 0, 40, 30))
    dst = src * 1.7 + rng.uniform(-5, 5, size=(4, 2)) + 12.0
    h = geo.homography(src, dst)
    assert h[2, 2] == 1.0
    np.testing.assert_allclose(geo.map_points(h, src), dst, atol=1e-9)
    assert geo.box_corners((1, 2, 3, 4)).tolist() == [[1, 2], [3, 2], [3, 4], [1, 4]]


def test_measure_identity_view() -> None:
    m = geo.measure(_identity(), (10, 10, 50, 50))
    # cover: 32 x 32 cell centres of the 100 x 80 view; x = (k + 0.5) * 3.125 in [10, 50) for
    # k = 3..15 (13 columns), y = (k + 0.5) * 2.5 in [10, 50) for k = 4..19 (16 rows)
    assert m["visible"] == 1.0 and m["cover"] == pytest.approx(13 * 16 / 1024)
    assert m["angle"] == pytest.approx(0.0, abs=1e-9) and m["scale"] == pytest.approx(1.0)
    assert m["tilt"] == pytest.approx(0.0, abs=1e-12)


def test_measure_rotation_scale_and_occluder() -> None:
    # output -> photo: rotate by 30 degrees and scale by 2, so the photo appears rotated by -30 and halved
    out_to_src = _rotation(30.0) @ np.diag([2.0, 2.0, 1.0])
    g = geo.Geom(out_to_src, (1000, 1000), (-1e9, -1e9, 1e9, 1e9))
    m = geo.measure(g, (100, 100, 300, 200))
    assert m["angle"] == pytest.approx(-30.0) and m["scale"] == pytest.approx(0.5)
    assert m["visible"] == 1.0 and m["tilt"] == pytest.approx(0.0, abs=1e-9)
    # an occluder hiding the left half of the object box in an identity view
    g = _identity((200, 200))
    g.occluders.append((0.0, 0.0, 60.0, 200.0))
    assert geo.measure(g, (20, 20, 100, 100))["visible"] == pytest.approx(0.5)


def test_tilt_grows_with_perspective() -> None:
    box = (0.0, 0.0, 100.0, 100.0)
    square = geo.box_corners(box)
    keystone = square + np.array([[20, 0], [-20, 0], [0, 0], [0, 0]])  # top side shortened by 40%
    g = geo.Geom(geo.homography(square, keystone), (100, 100), (0.0, 0.0, 100.0, 100.0))
    # the view maps output -> photo, so the photo's box appears as the inverse keystone
    assert geo.measure(g, box)["tilt"] > geo.HARD_TILT


@pytest.mark.parametrize(
    ("visible", "angle", "tilt", "cover", "query_angle", "want"),
    [
        (0.1, 0.0, 0.0, 0.9, 0.0, "junk"),
        (0.9, 0.0, 0.0, 0.9, 0.0, "easy"),
        (0.4, 0.0, 0.0, 0.9, 0.0, "hard"),  # heavy crop / occlusion
        (0.9, 45.0, 0.0, 0.9, 0.0, "hard"),  # rotated
        (0.9, -170.0, 0.0, 0.9, 170.0, "easy"),  # 20 degrees from the query, across +-180
        (0.9, 0.0, 0.2, 0.9, 0.0, "hard"),  # perspective
        (0.9, 0.0, 0.0, 0.05, 0.0, "hard"),  # small in a larger scene
    ],
)
def test_label_rules(visible: float, angle: float, tilt: float, cover: float, query_angle: float, want: str) -> None:
    view = {"visible": visible, "angle": angle, "tilt": tilt, "cover": cover}
    query = {"visible": 1.0, "angle": query_angle, "tilt": 0.0, "cover": 0.5}
    assert geo.label(view, query) == want


def test_box_in_view_is_clipped() -> None:
    assert geo.box_in_view(_identity(), (10, 20, 30, 40)) == (10.0, 20.0, 30.0, 40.0)
    assert geo.box_in_view(_identity(), (-10, 20, 130, 90)) == (0.0, 20.0, 100.0, 80.0)


def test_view_geom_stays_inside_the_region(rng: np.random.Generator) -> None:
    region = (50.0, 40.0, 450.0, 340.0)
    for angle in (0.0, 35.0, 90.0):
        g = geo.view_geom(region, rng, centre=(100, 100), size=(300, 200), angle=angle, tilt=0.05, keystone=0.3)
        assert 384 <= max(g.size) <= 512 and min(g.size) >= 64
        seen = geo.map_points(g.out_to_src, geo.box_corners((0, 0, *g.size)))
        assert (seen >= np.array(region[:2]) - 1e-6).all() and (seen <= np.array(region[2:]) + 1e-6).all()
    assert geo.view_geom(region, rng, centre=(250, 190), size=(10, 10), angle=0, tilt=0, out=(7, 9)).size == (7, 9)
