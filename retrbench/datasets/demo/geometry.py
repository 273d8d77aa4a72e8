"""Where an instance lands in a view, and the revisited labels measured from it.

A view is a projective map from output pixels to photo pixels (:class:`Geom`), built by
:func:`view_geom` from a rotated, scaled, shifted and / or keystoned quadrilateral of the
instance region. :func:`measure` samples a ``GRID x GRID`` grid over the object box mapped into
the view and one over the view mapped back into the photo; :func:`label` turns the
measurements of a database view and of a query into ``easy`` / ``hard`` / ``junk`` (rules in
:mod:`retrbench.datasets.demo`). Points are ``(n, 2)`` arrays of ``(x, y)`` pixels; boxes and
rectangles are ``(x0, y0, x1, y1)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "GRID",
    "HARD_COVER",
    "HARD_ROTATION",
    "HARD_TILT",
    "HARD_VISIBLE",
    "JUNK_VISIBLE",
    "Geom",
    "box_corners",
    "box_in_view",
    "homography",
    "label",
    "map_points",
    "measure",
    "out_size",
    "view_geom",
]

# Label thresholds (see the docstring of retrbench.datasets.demo).
JUNK_VISIBLE = 0.15
HARD_VISIBLE = 0.5
HARD_ROTATION = 30.0
HARD_TILT = 0.1
HARD_COVER = 0.1

GRID = 32  # object-box sampling grid for the visibility measurement


def homography(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """3x3 ``H`` with ``dst ~ H @ src`` from 4 point pairs (``(4, 2)`` each)."""
    a = np.zeros((8, 8))
    b = np.zeros(8)
    for i, ((x, y), (u, v)) in enumerate(zip(src, dst, strict=True)):
        a[2 * i] = [x, y, 1, 0, 0, 0, -u * x, -u * y]
        a[2 * i + 1] = [0, 0, 0, x, y, 1, -v * x, -v * y]
        b[2 * i], b[2 * i + 1] = u, v
    return np.append(np.linalg.solve(a, b), 1.0).reshape(3, 3)


def map_points(h: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Map ``(n, 2)`` points through the 3x3 homography ``h``; ``(n, 2)``."""
    p = np.c_[pts, np.ones(len(pts))] @ h.T
    return p[:, :2] / p[:, 2:3]


def box_corners(box: Sequence[float]) -> np.ndarray:
    """``(4, 2)`` corners of ``(x0, y0, x1, y1)``, clockwise from the top left."""
    x0, y0, x1, y1 = box
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def _similarity(src: np.ndarray, dst: np.ndarray) -> tuple[float, float, float]:
    """Fit ``dst ~ a * src + b`` (complex a, b); ``(angle degrees, scale |a|, RMS residual)``."""
    zs = src[:, 0] + 1j * src[:, 1]
    zd = dst[:, 0] + 1j * dst[:, 1]
    zs0, zd0 = zs - zs.mean(), zd - zd.mean()
    a = np.vdot(zs0, zd0) / np.vdot(zs0, zs0)
    resid = zd0 - a * zs0
    return float(np.degrees(np.angle(a))), float(abs(a)), float(np.sqrt(np.mean(np.abs(resid) ** 2)))


def _fit_quad(quad: np.ndarray, region: Sequence[float]) -> np.ndarray:
    """Shrink ``quad`` about its centre (then move it to the region centre) until it lies in ``region``."""
    x0, y0, x1, y1 = region
    rc = np.array([(x0 + x1) / 2, (y0 + y1) / 2])
    c = quad.mean(axis=0)
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        cc = c + t * (rc - c)
        d = quad - c
        s = 1.0
        for k, (lo, hi) in enumerate(((x0, x1), (y0, y1))):
            if not lo <= cc[k] <= hi:
                s = 0.0
                break
            pos, neg = d[:, k] > 1e-9, d[:, k] < -1e-9
            if pos.any():
                s = min(s, float(np.min((hi - cc[k]) / d[pos, k])))
            if neg.any():
                s = min(s, float(np.min((lo - cc[k]) / d[neg, k])))
        if s >= 0.6 or t == 1.0:
            return cc + max(s, 0.05) * d
    raise AssertionError("unreachable")


@dataclass
class Geom:
    """Where an instance appears in a view.

    ``out_to_src`` maps output pixels to source-photo pixels inside ``shown`` (the whole output
    unless the photo was pasted into a scene); ``occluders`` are output rectangles hiding it.
    """

    out_to_src: np.ndarray
    size: tuple[int, int]
    shown: tuple[float, float, float, float]
    occluders: list[tuple[float, float, float, float]] = field(default_factory=list)


def _inside(p: np.ndarray, rect: Sequence[float]) -> np.ndarray:
    x0, y0, x1, y1 = rect
    return (p[:, 0] >= x0) & (p[:, 0] < x1) & (p[:, 1] >= y0) & (p[:, 1] < y1)


def _grid(rect: Sequence[float]) -> np.ndarray:
    """``GRID x GRID`` cell centres of ``rect``, ``(n, 2)``."""
    x0, y0, x1, y1 = rect
    t = (np.arange(GRID) + 0.5) / GRID
    gx, gy = np.meshgrid(x0 + t * (x1 - x0), y0 + t * (y1 - y0))
    return np.c_[gx.ravel(), gy.ravel()]


def _seen(g: Geom, p_out: np.ndarray) -> np.ndarray:
    """Which output points show the photo (inside ``shown``, under no occluder)."""
    ok = _inside(p_out, g.shown)
    for rect in g.occluders:
        ok &= ~_inside(p_out, rect)
    return ok


def measure(g: Geom, box: Sequence[float]) -> dict[str, float]:
    """Visible fraction, cover, similarity angle / scale and tilt of the object ``box`` (photo pixels) in a view."""
    src_to_out = np.linalg.inv(g.out_to_src)
    visible = float(_seen(g, map_points(src_to_out, _grid(box))).mean())
    out_pts = _grid((0.0, 0.0, float(g.size[0]), float(g.size[1])))
    cover = float((_seen(g, out_pts) & _inside(map_points(g.out_to_src, out_pts), box)).mean())
    corners = map_points(src_to_out, box_corners(box))
    angle, scale, resid = _similarity(box_corners(box), corners)
    x0, y0, x1, y1 = box
    return {
        "visible": visible,
        "cover": cover,
        "angle": angle,
        "scale": scale,
        "tilt": float(resid / (scale * np.sqrt((x1 - x0) * (y1 - y0)))),
    }


def label(view: dict[str, float], query: dict[str, float]) -> str:
    """``easy`` / ``hard`` / ``junk`` for a view of the query's instance, from both :func:`measure` results."""
    if view["visible"] < JUNK_VISIBLE:
        return "junk"
    rot = abs((view["angle"] - query["angle"] + 180.0) % 360.0 - 180.0)
    hard = (
        view["visible"] < HARD_VISIBLE or rot > HARD_ROTATION or view["tilt"] > HARD_TILT or view["cover"] < HARD_COVER
    )
    return "hard" if hard else "easy"


def box_in_view(g: Geom, box: Sequence[float]) -> tuple[float, float, float, float]:
    """Bounding box, in view pixels, of ``box`` (photo pixels) mapped into the view, clipped to the view."""
    m = map_points(np.linalg.inv(g.out_to_src), box_corners(box))
    x0, y0 = np.clip(m.min(axis=0), 0, None)
    x1, y1 = np.minimum(m.max(axis=0), g.size)
    return float(x0), float(y0), float(x1), float(y1)


def out_size(w: float, h: float, rng: np.random.Generator, lo: int = 384, hi: int = 512) -> tuple[int, int]:
    """Output ``(width, height)`` of aspect ``w : h`` with a random longer side in ``[lo, hi]`` (shorter >= 64)."""
    side = int(rng.integers(lo, hi + 1))
    if w >= h:
        return side, max(64, round(side * h / w))
    return max(64, round(side * w / h)), side


def view_geom(
    region: Sequence[float],
    rng: np.random.Generator,
    *,
    centre: Sequence[float],
    size: Sequence[float],
    angle: float,
    tilt: float,
    keystone: float = 0.0,
    out: tuple[int, int] | None = None,
) -> Geom:
    """A warped quad of ``region``: ``size`` (w, h) photo pixels centred on ``centre``.

    ``angle`` rotates it (degrees), ``tilt`` moves each corner at random by up to that fraction of
    the size, ``keystone`` pulls the two corners of one random side together by that fraction
    (a perspective view of a plane). The quad is shrunk (then moved towards the region centre)
    until it lies in ``region``. ``out`` is the output size (default: :func:`out_size`).
    """
    w, h = size
    a = np.radians(angle)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    d = np.array([[-w / 2, -h / 2], [w / 2, -h / 2], [w / 2, h / 2], [-w / 2, h / 2]])
    d = d + tilt * rng.uniform(-1.0, 1.0, size=(4, 2)) * np.array([w, h])
    if keystone:
        e = int(rng.integers(4))  # side e joins corners e and e + 1
        p, q = d[e].copy(), d[(e + 1) % 4].copy()
        d[e], d[(e + 1) % 4] = p + keystone * (q - p), q + keystone * (p - q)
    quad = _fit_quad(np.asarray(centre, dtype=np.float64) + d @ rot.T, region)
    if out is None:
        out = out_size(w, h, rng)
    ow, oh = out
    h_out = homography(box_corners((0, 0, ow, oh)), quad)
    return Geom(h_out, (ow, oh), (0.0, 0.0, float(ow), float(oh)))
