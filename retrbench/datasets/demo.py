"""``demo``: a small instance-retrieval benchmark built at first use from photos shipped in packages.

A new user with no data and no internet can run ``retrbench run --model efficientnet_lite0
--dataset demo``. The first call builds the dataset under ``<data_root>/demo-v1/`` in a few
seconds from public-domain, CC0 and CC BY photos that ship inside scikit-image, scikit-learn and
matplotlib (read from the installed packages, never copied into this repository; :data:`SOURCES`
lists each file with its licence and credit, and the manifest repeats them). Later calls reuse it.

Composition (fixed):

* **14 instances** (:data:`INSTANCES`), each a *region* of a photo (the part its views are cut
  from) and an *object box* inside it: astronaut, coffee cup, rocket, pagoda, dahlia, Grace
  Hopper, and four look-alike pairs cut from one photo each, sharing no pixel: the left and right
  halves of the cat's face, the optic disc and macula halves of the retina, the top and bottom of
  the immunohistochemistry slide, the west and east halves of the Hubble deep field. The pairs
  (and the two flag-backed portraits) make an ImageNet descriptor confuse instances, as
  neighbouring buildings do in Oxford.
* **Database, 197 images**: 11 views of each instance (4 mild, 6 strong, 1 beside the object;
  154 in all) and 43 distractors (:data:`DISTRACTORS`): views of 9 other photos (greyscale ones
  kept grey or tinted, all stored as RGB) and of 4 parts of instance photos that lie outside every
  instance region (the shuttle model beside the astronaut, the launch towers beside the rocket,
  the lake beside the pagoda). 384-512 pixels on the longer side, JPEG quality 35-90, about
  4 MB. Names are neutral (``demo_000`` ...) in a seeded shuffled order.
* **28 queries**, two per instance: two more mild views (``query_<instance>_<1|2>``, not in the
  database) that show all of the object, each with its box ``(x0, y0, x1, y1)`` in query-image
  pixels (the bounding box of the object box mapped into the query, clipped to the image).
  Queries are cropped to their box before description (revisited protocol).

Views. Each view is a perspective warp of the instance region: a rotated, scaled, shifted and / or
keystoned quadrilateral of the photo mapped onto the output image (shrunk, then moved towards the
centre until it lies inside the region, so no view shows anything outside it), followed by
photometric changes (brightness, contrast, saturation, sometimes greyscale, blur, noise, JPEG
quality). Mild recipes: near-full view, loose crop around the object, off-centre crop, strong
colour change. Strong recipes: rotation by 40-80 degrees, by 90 / 180 / 270, keystone (a side
shortened by 25-35%), zoom into 45-60% of the object's width, an occluder (a patch of another
photo) over 55-70% of the object, the photo shrunk to 22-32% of the width of another photo.
Beside: a crop centred away from the object.

Labels (``gnd_demo.pkl``) are **measured** on each view's geometry, never taken from the recipe,
and photometric changes never change them. A 32 x 32 grid over the object box is mapped into
the view, and a 32 x 32 grid over the view back into the photo, giving

* ``visible``: fraction of the object inside the view and not under an occluder;
* ``cover``: fraction of the view that shows the (unoccluded) object;
* ``angle``: rotation of the least-squares similarity fitted to the 4 mapped box corners;
  ``rot`` = its difference to the query's, folded to 0-180 degrees;
* ``tilt``: RMS residual of that fit / mapped box size (0 for a similarity, > 0.1 for a
  strong perspective);

and, for a query, a database view of the query's own instance is

* **junk** if ``visible < 0.15`` (the view barely shows the instance);
* **hard** if ``visible < 0.5``, ``rot > 30``, ``tilt > 0.1`` or ``cover < 0.1`` (heavy crop
  or occlusion, strong rotation, strong perspective, or a small object in a larger scene);
* **easy** otherwise.

Everything else (other instances, distractors) is a negative. As built, every query has 3-4 easy,
6-7 hard and 1 junk image. The measurements of every image are in ``views.json``, so the labels
can be checked (the tests recompute them).

Files, in the structure of revisitop's ``gnd_roxford5k.pkl`` so the same loading path is used::

    <data_root>/demo-v1/jpg/<name>.jpg      database images and queries
    <data_root>/demo-v1/gnd_demo.pkl        {"imlist", "qimlist", "gnd": [{"easy", "hard", "junk", "bbx"}]}
    <data_root>/demo-v1/views.json          per image: source, recipe, JPEG quality, measurements
    <data_root>/demo-v1/manifest.json       version, seed, Pillow / numpy versions, sources, sha256 per file

Deterministic: one generator per image seeded from its name, fixed JPEG settings, no metadata;
two builds with the same Pillow / numpy are byte-identical. The build writes a temporary
folder beside the target and moves it into place; a folder whose files do not match its
manifest is rebuilt, a valid one is reused.

Measured (EfficientNet-Lite0 ImageNet weights, L2-normalised descriptors, inner product, queries
cropped; mAP Easy / Medium / Hard in %): images at their stored size, GeM (p=3) 89.9 / 80.1 / 62.3,
MAC 89.9 / 80.8 / 63.2; resized to a 1024-pixel longer side, GeM 81.7 / 71.6 / 53.2, MAC
83.7 / 72.1 / 53.4; random Gaussian descriptors (mean of 20 draws) 3.0 / 6.1 / 4.3.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import logging
import os
import pickle
import shutil
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from ..types import Query, RetrievalDataset
from .base import DATASETS, DatasetInfo, default_data_root
from .groundtruth import load_gnd_pickle

__all__ = [
    "SOURCES",
    "INSTANCES",
    "DISTRACTORS",
    "VERSION",
    "Source",
    "Instance",
    "build_demo",
    "load_demo",
    "is_valid",
    "source_path",
]

log = logging.getLogger(__name__)

VERSION = 1
DIRNAME = f"demo-v{VERSION}"
GND_FILE = "gnd_demo.pkl"
SEED = 20240611

# Label thresholds (see the module docstring).
JUNK_VISIBLE = 0.15
HARD_VISIBLE = 0.5
HARD_ROTATION = 30.0
HARD_TILT = 0.1
HARD_COVER = 0.1

_MAX_SIDE = 640  # instance regions / distractor photos are reduced to this longer side first
_GRID = 32  # object-box sampling grid for the visibility measurement
_STRENGTH = 0.85  # photometric strength of ordinary views (the "colour" recipe uses 1.0)


# ----------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Source:
    """A photo shipped inside an installed package.

    Attributes:
        key: short name used below.
        package: importable package holding the file.
        path: file path inside the package folder.
        licence: licence or status, as the package documents it.
        credit: author / origin, as the package documents it.
        sha256: the file as shipped in the versions this dataset was designed with (a different
            file is used anyway, with a warning, and recorded in the manifest).
    """

    key: str
    package: str
    path: str
    licence: str
    credit: str
    sha256: str


_SK = "skimage data docstring (skimage/data/_fetchers.py)"

# fmt: off
SOURCES: tuple[Source, ...] = (
    # key, package, path inside the package, licence, credit, sha256 of the file as designed with
    # -- instances
    Source("astronaut", "skimage", "data/astronaut.png", "public domain (no known copyright restrictions)", f"NASA, Eileen Collins; {_SK}", "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5"),
    Source("chelsea", "skimage", "data/chelsea.png", "CC0", f"Stefan van der Walt; {_SK}", "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb"),
    Source("coffee", "skimage", "data/coffee.png", "CC0", f"Rachel Michetti, courtesy of Pikolo Espresso Bar; {_SK}", "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7"),
    Source("rocket", "skimage", "data/rocket.jpg", "public domain", f"SpaceX, DSCOVR launch on Falcon 9; {_SK}", "c2dd0de7c538df8d111e479619b129464d0269d0ae5fd18ca91d33a7fdfea95c"),
    Source("china", "sklearn", "datasets/images/china.jpg", "CC BY 2.0", "danielbuechele (flickr.com/photos/danielbuechele/6061409035); sklearn/datasets/images/README.txt", "8378025ad2519d649d02e32bd98990db4ab572357d9f09841c2fbfbb4fefad29"),
    Source("flower", "sklearn", "datasets/images/flower.jpg", "CC BY 2.0", "vultilion (flickr.com/photos/vultilion/6056698931); sklearn/datasets/images/README.txt", "a77f6ec41e353afdf8bdff2ea981b2955535d8d83294f8cfa49cf4e423dd5638"),
    Source("grace_hopper", "matplotlib", "mpl-data/sample_data/grace_hopper.jpg", "public domain (official U.S. Navy photograph, work of the U.S. federal government; matplotlib ships no note)", "U.S. Navy, Commodore Grace M. Hopper (Naval History and Heritage Command NH 96919-KN)", "a8ca6d734765703b09728ab47fe59f473d93ae3967fc24c7c0288c3c7adb7130"),
    Source("retina", "skimage", "data/retina.jpg", "CC0", f"Mikael Haggstrom, Wikimedia Commons; {_SK}", "38a07f36f27f095e818aea7b96d34202c05176d30253c66733f2e00379e9e0e6"),
    Source("ihc", "skimage", "data/ihc.png", "no known copyright restrictions", f"Center for Microscopy and Molecular Imaging (CMMI); {_SK}", "f8dd1aa387ddd1f49d8ad13b50921b237df8e9b262606d258770687b0ef93cef"),
    Source("hubble", "skimage", "data/hubble_deep_field.jpg", "public domain", f"NASA, HubbleSite 2012-37; {_SK}", "3a19c5dd8a927a9334bb1229a6d63711b1c0c767fb27e2286e7c84a3e2c2f5f4"),
    # -- distractors
    Source("camera", "skimage", "data/camera.png", "CC0", f"Lav Varshney; {_SK}", "b0793d2adda0fa6ae899c03989482bff9a42d3d5690fc7e3648f2795d730c23a"),
    Source("coins", "skimage", "data/coins.png", "no known copyright restrictions", f"Brooklyn Museum Collection; {_SK}", "f8d773fc9cfa6f4d8e5942dc34d0a0788fcaed2a4fefbbed0aef5398d7ef4cba"),
    Source("clock", "skimage", "data/clock_motion.png", "public domain", f"Stefan van der Walt; {_SK}", "f029226b28b642e80113d86622e9b215ee067a0966feaf5e60604a1e05733955"),
    Source("brick", "skimage", "data/brick.png", "CC0", f"CC0Textures Bricks25; {_SK}", "7966caf324f6ba843118d98f7a07746d22f6a343430add0233eca5f6eaaa8fcf"),
    Source("grass", "skimage", "data/grass.png", "CC0", f"linolafett, DeviantArt; {_SK}", "b6b6022426b38936c43a4ac09635cd78af074e90f42ffa8227ac8b7452d39f89"),
    Source("gravel", "skimage", "data/gravel.png", "CC0", f"CC0Textures Gravel04; {_SK}", "c48615b451bf1e606fbd72c0aa9f8cc0f068ab7111ef7d93bb9b0f2586440c12"),
    Source("text", "skimage", "data/text.png", "public domain", f"Wikipedia File:Corner.png; {_SK}", "bd84aa3a6e3c9887850d45d606c96b2e59433fbef50338570b63c319e668e6d1"),
    Source("horse", "skimage", "data/horse.png", "CC0", f"Andreas Preuss (marauder), openclipart; {_SK}", "c7fb60789fe394c485f842291ea3b21e50d140f39d6dcb5fb9917cc178225455"),
    Source("cell", "skimage", "data/cell.png", "CC0", f"Paul Muller et al., qpformat; {_SK}", "8d23a7fb81f7cc877cd09f330357fc7f595651306e84e17252f6e0a1b3f61515"),
)
# fmt: on
# Left out on purpose: motorcycle_left/right (Middlebury stereo, no licence note in the package),
# moon, page, logo, color, phantom (no licence note, or not photos).


@dataclass(frozen=True)
class Instance:
    """An object to retrieve: a region of a source photo and the object box inside it.

    Attributes:
        name: instance name (used in query names).
        source: key into :data:`SOURCES`.
        region: ``(x0, y0, x1, y1)`` part of the photo the views are cut from (original pixels).
        box: ``(x0, y0, x1, y1)`` the object, inside ``region`` (original pixels).
    """

    name: str
    source: str
    region: tuple[int, int, int, int]
    box: tuple[int, int, int, int]


INSTANCES: tuple[Instance, ...] = (
    Instance("astronaut", "astronaut", (0, 0, 360, 512), (120, 10, 350, 420)),
    Instance("cat_left", "chelsea", (0, 0, 225, 300), (20, 40, 215, 260)),
    Instance("cat_right", "chelsea", (226, 0, 451, 300), (236, 40, 431, 290)),
    Instance("coffee", "coffee", (0, 0, 600, 400), (80, 20, 480, 390)),
    Instance("rocket", "rocket", (150, 0, 500, 427), (170, 120, 480, 427)),
    Instance("pagoda", "china", (0, 0, 400, 427), (60, 25, 370, 427)),
    Instance("dahlia", "flower", (0, 0, 640, 427), (165, 80, 450, 360)),
    Instance("hopper", "grace_hopper", (0, 0, 512, 600), (150, 20, 375, 340)),
    Instance("retina_disc", "retina", (0, 0, 705, 1411), (40, 400, 660, 1000)),
    Instance("retina_macula", "retina", (706, 0, 1411, 1411), (740, 400, 1360, 1000)),
    Instance("ihc_top", "ihc", (0, 0, 512, 256), (30, 20, 480, 236)),
    Instance("ihc_bottom", "ihc", (0, 256, 512, 512), (30, 276, 480, 492)),
    Instance("hubble_west", "hubble", (0, 0, 500, 872), (60, 200, 440, 620)),
    Instance("hubble_east", "hubble", (500, 0, 1000, 872), (560, 250, 960, 650)),
)

# Distractors: (source, region of the photo or None for all of it, number of database views).
# Regions of instance photos are disjoint from every instance region (no pixel in common).
DISTRACTORS: tuple[tuple[str, tuple[int, int, int, int] | None, int], ...] = (
    ("astronaut", (372, 0, 512, 512), 3),
    ("rocket", (0, 0, 140, 427), 3),
    ("rocket", (510, 0, 640, 427), 3),
    ("china", (410, 0, 640, 427), 4),
    ("camera", None, 5),
    ("coins", None, 4),
    ("clock", None, 3),
    ("brick", None, 3),
    ("grass", None, 3),
    ("gravel", None, 3),
    ("text", None, 3),
    ("horse", None, 3),
    ("cell", None, 3),
)


def source_path(src: Source) -> Path:
    """Where ``src`` lies in the installed package (found without importing the package)."""
    spec = importlib.util.find_spec(src.package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"demo dataset: package {src.package!r} is not installed (needed for {src.path})")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / src.path
        if p.is_file():
            return p
    raise FileNotFoundError(f"demo dataset: {src.path} not found in the installed {src.package!r} package")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------- geometry


def _homography(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """3x3 ``H`` with ``dst ~ H @ src`` from 4 point pairs (``(4, 2)`` each)."""
    a = np.zeros((8, 8))
    b = np.zeros(8)
    for i, ((x, y), (u, v)) in enumerate(zip(src, dst, strict=True)):
        a[2 * i] = [x, y, 1, 0, 0, 0, -u * x, -u * y]
        a[2 * i + 1] = [0, 0, 0, x, y, 1, -v * x, -v * y]
        b[2 * i], b[2 * i + 1] = u, v
    return np.append(np.linalg.solve(a, b), 1.0).reshape(3, 3)


def _apply(h: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Map ``(n, 2)`` points through ``h``."""
    p = np.c_[pts, np.ones(len(pts))] @ h.T
    return p[:, :2] / p[:, 2:3]


def _corners(box: Sequence[float]) -> np.ndarray:
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
class _Geom:
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
    """``_GRID x _GRID`` cell centres of ``rect``, ``(n, 2)``."""
    x0, y0, x1, y1 = rect
    t = (np.arange(_GRID) + 0.5) / _GRID
    gx, gy = np.meshgrid(x0 + t * (x1 - x0), y0 + t * (y1 - y0))
    return np.c_[gx.ravel(), gy.ravel()]


def _seen(g: _Geom, p_out: np.ndarray) -> np.ndarray:
    """Which output points show the photo (inside ``shown``, under no occluder)."""
    ok = _inside(p_out, g.shown)
    for rect in g.occluders:
        ok &= ~_inside(p_out, rect)
    return ok


def _measure(g: _Geom, box: Sequence[float]) -> dict[str, float]:
    """Visible fraction, cover, similarity angle / scale and tilt of the object box in a view."""
    src_to_out = np.linalg.inv(g.out_to_src)
    visible = float(_seen(g, _apply(src_to_out, _grid(box))).mean())
    out_pts = _grid((0.0, 0.0, float(g.size[0]), float(g.size[1])))
    cover = float((_seen(g, out_pts) & _inside(_apply(g.out_to_src, out_pts), box)).mean())
    corners = _apply(src_to_out, _corners(box))
    angle, scale, resid = _similarity(_corners(box), corners)
    x0, y0, x1, y1 = box
    return {
        "visible": visible,
        "cover": cover,
        "angle": angle,
        "scale": scale,
        "tilt": float(resid / (scale * np.sqrt((x1 - x0) * (y1 - y0)))),
    }


def _label(view: dict[str, float], query: dict[str, float]) -> str:
    """``easy`` / ``hard`` / ``junk`` for a view of the query's instance (rules in the module docstring)."""
    if view["visible"] < JUNK_VISIBLE:
        return "junk"
    rot = abs((view["angle"] - query["angle"] + 180.0) % 360.0 - 180.0)
    hard = (
        view["visible"] < HARD_VISIBLE or rot > HARD_ROTATION or view["tilt"] > HARD_TILT or view["cover"] < HARD_COVER
    )
    return "hard" if hard else "easy"


# ----------------------------------------------------------------------------- rendering


@dataclass
class _Photo:
    image: Image.Image  # RGB, reduced so the region's longer side is at most _MAX_SIDE
    region: tuple[float, float, float, float]  # in reduced pixels
    box: tuple[float, float, float, float]  # in reduced pixels


def _read(src: Source, mismatched: list[str]) -> Image.Image:
    path = source_path(src)
    data = path.read_bytes()
    if _sha256(data) != src.sha256:
        log.warning("demo dataset: %s differs from the file this dataset was designed with; using it anyway", path)
        mismatched.append(src.key)
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        if im.mode in ("RGBA", "LA", "P"):
            rgba = im.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return im.convert("RGB")


def _reduce(img: Image.Image, region: Sequence[float], box: Sequence[float]) -> _Photo:
    rw, rh = region[2] - region[0], region[3] - region[1]
    s = min(1.0, _MAX_SIDE / max(rw, rh))
    if s < 1.0:
        img = img.resize((round(img.width * s), round(img.height * s)), Image.Resampling.LANCZOS)
    return _Photo(img, tuple(v * s for v in region), tuple(v * s for v in box))  # type: ignore[arg-type]


def _rng(*key: object) -> np.random.Generator:
    return np.random.default_rng([SEED, zlib.crc32("/".join(map(str, key)).encode())])


def _out_size(w: float, h: float, rng: np.random.Generator, lo: int = 384, hi: int = 512) -> tuple[int, int]:
    side = int(rng.integers(lo, hi + 1))
    if w >= h:
        return side, max(64, round(side * h / w))
    return max(64, round(side * w / h)), side


def _view_geom(
    photo: _Photo,
    rng: np.random.Generator,
    *,
    centre: Sequence[float],
    size: Sequence[float],
    angle: float,
    tilt: float,
    keystone: float = 0.0,
    out: tuple[int, int] | None = None,
) -> _Geom:
    """A warped quad of ``photo.region``: ``size`` (w, h) source pixels centred on ``centre``.

    ``angle`` rotates it (degrees), ``tilt`` moves each corner at random by up to that fraction of
    the size, ``keystone`` pulls the two corners of one random side together by that fraction
    (a perspective view of a plane).
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
    quad = _fit_quad(np.asarray(centre, dtype=np.float64) + d @ rot.T, photo.region)
    if out is None:
        out = _out_size(w, h, rng)
    ow, oh = out
    h_out = _homography(_corners((0, 0, ow, oh)), quad)
    return _Geom(h_out, (ow, oh), (0.0, 0.0, float(ow), float(oh)))


def _render(photo: _Photo, g: _Geom) -> Image.Image:
    m = g.out_to_src / g.out_to_src[2, 2]
    return photo.image.transform(
        g.size, Image.Transform.PERSPECTIVE, tuple(m.ravel()[:8]), resample=Image.Resampling.BILINEAR
    )


def _photometric(img: Image.Image, rng: np.random.Generator, strength: float, grey: bool = False) -> Image.Image:
    """Brightness / contrast / saturation / blur / noise, ``strength`` in [0, 1]."""

    def f(span: float) -> float:
        return float(1.0 + rng.uniform(-span, span) * strength)

    img = ImageEnhance.Brightness(img).enhance(f(0.35))
    img = ImageEnhance.Contrast(img).enhance(f(0.35))
    img = ImageEnhance.Color(img).enhance(0.0 if grey else f(0.5))
    radius = float(rng.uniform(0.0, 2.0) * strength)
    if radius > 0.3:
        img = img.filter(ImageFilter.GaussianBlur(radius))
    sigma = float(rng.uniform(0.0, 8.0) * strength)
    if sigma > 1.0:
        arr = np.asarray(img, dtype=np.float32) + rng.normal(0.0, sigma, size=(img.height, img.width, 1))
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    return img


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(quality), optimize=False, progressive=False, subsampling=2)
    return buf.getvalue()


def _patch(photo: Image.Image, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A random crop of ``photo`` resized to ``size``."""
    w, h = size
    s = min(photo.width / w, photo.height / h) * float(rng.uniform(0.4, 1.0))
    cw, ch = max(8, int(w * s)), max(8, int(h * s))
    x = int(rng.integers(0, photo.width - cw + 1))
    y = int(rng.integers(0, photo.height - ch + 1))
    return photo.crop((x, y, x + cw, y + ch)).resize((w, h), Image.Resampling.BILINEAR)


# Database views per instance: 4 mild ones, 6 strong ones, 1 beside the object (see _instance_view).
_RECIPES: tuple[str, ...] = (
    "full", "loose", "offcentre", "colour",
    "rotate", "rotate_right", "tilt", "zoom", "occlude", "small",
    "beside",
)  # fmt: skip


def _instance_view(
    inst: Instance, photo: _Photo, recipe: str, rng: np.random.Generator, distractors: list[Image.Image]
) -> tuple[Image.Image, _Geom]:
    rx0, ry0, rx1, ry1 = photo.region
    bx0, by0, bx1, by1 = photo.box
    rw, rh = rx1 - rx0, ry1 - ry0
    bw, bh = bx1 - bx0, by1 - by0
    bc = ((bx0 + bx1) / 2, (by0 + by1) / 2)
    rcen = ((rx0 + rx1) / 2, (ry0 + ry1) / 2)
    u = rng.uniform
    strength = _STRENGTH
    grey = False
    if recipe == "full":
        g = _view_geom(photo, rng, centre=rcen, size=(rw * u(0.9, 1.0), rh * u(0.9, 1.0)), angle=u(-4, 4), tilt=0.01)
    elif recipe == "loose":
        s = u(1.15, 1.4)
        g = _view_geom(photo, rng, centre=bc, size=(bw * s, bh * s), angle=u(-6, 6), tilt=0.02)
    elif recipe == "offcentre":
        c = (bc[0] + u(-0.2, 0.2) * bw, bc[1] + u(-0.2, 0.2) * bh)
        g = _view_geom(photo, rng, centre=c, size=(rw * 0.75, rh * 0.75), angle=u(-8, 8), tilt=0.02)
    elif recipe == "colour":
        g = _view_geom(photo, rng, centre=rcen, size=(rw * u(0.8, 0.95), rh * u(0.8, 0.95)), angle=u(-5, 5), tilt=0.02)
        strength, grey = 1.0, bool(rng.random() < 0.5)
    elif recipe == "rotate":
        ang = float(rng.choice([-1.0, 1.0]) * u(40, 80))
        g = _view_geom(photo, rng, centre=bc, size=(rw * 0.9, rh * 0.9), angle=ang, tilt=0.05)
    elif recipe == "rotate_right":
        ang = float(rng.choice([90.0, 180.0, 270.0]) + u(-5, 5))
        size = (rh * 0.9, rw * 0.9) if round(ang / 90) % 2 else (rw * 0.9, rh * 0.9)
        g = _view_geom(photo, rng, centre=bc, size=size, angle=ang, tilt=0.02)
    elif recipe == "tilt":
        g = _view_geom(
            photo, rng, centre=bc, size=(rw * 0.85, rh * 0.85), angle=u(-10, 10), tilt=0.04, keystone=u(0.25, 0.35)
        )
    elif recipe == "zoom":
        c = (bx0 + u(0.25, 0.75) * bw, by0 + u(0.25, 0.75) * bh)
        s = u(0.45, 0.6)
        g = _view_geom(photo, rng, centre=c, size=(bw * s, bh * s), angle=u(-8, 8), tilt=0.03)
    elif recipe == "occlude":
        g = _view_geom(photo, rng, centre=rcen, size=(rw * 0.9, rh * 0.9), angle=u(-6, 6), tilt=0.02)
    elif recipe == "small":
        bg = distractors[int(rng.integers(len(distractors)))]
        ow, oh = _out_size(4, 3, rng, 448, 512)
        back = _patch(bg, (ow, oh), rng)
        s = u(0.22, 0.32)
        pw, ph = (round(ow * s), round(ow * s * rh / rw)) if rw >= rh else (round(oh * s * rw / rh), round(oh * s))
        sub = _view_geom(photo, rng, centre=rcen, size=(rw, rh), angle=u(-5, 5), tilt=0.02, out=(pw, ph))
        px, py = int(rng.integers(0, ow - pw + 1)), int(rng.integers(0, oh - ph + 1))
        back.paste(_render(photo, sub), (px, py))
        shift = np.array([[1.0, 0.0, -px], [0.0, 1.0, -py], [0.0, 0.0, 1.0]])
        g = _Geom(sub.out_to_src @ shift, (ow, oh), (float(px), float(py), float(px + pw), float(py + ph)))
        img = _photometric(back, rng, 0.5)
        return img, g
    elif recipe == "beside":
        # A crop centred away from the object: pick the region corner farthest from the box.
        cands = _corners((rx0, ry0, rx1, ry1))
        far = cands[int(np.argmax(np.hypot(cands[:, 0] - bc[0], cands[:, 1] - bc[1])))]
        s = u(0.3, 0.4)
        c = (far[0] + (rcen[0] - far[0]) * 0.35, far[1] + (rcen[1] - far[1]) * 0.35)
        g = _view_geom(photo, rng, centre=c, size=(rw * s, rh * s), angle=u(-6, 6), tilt=0.02)
    else:
        raise ValueError(recipe)
    img = _render(photo, g)
    if recipe == "occlude":
        m = _apply(np.linalg.inv(g.out_to_src), _corners(photo.box))
        ox0, oy0 = np.clip(m.min(axis=0), 0, None)
        ox1, oy1 = np.minimum(m.max(axis=0), g.size)
        frac = u(0.55, 0.7)
        side = int(rng.integers(4))
        if side == 0:
            rect = (ox0 - 4, oy0 - 4, ox0 + frac * (ox1 - ox0), oy1 + 4)
        elif side == 1:
            rect = (ox1 - frac * (ox1 - ox0), oy0 - 4, ox1 + 4, oy1 + 4)
        elif side == 2:
            rect = (ox0 - 4, oy0 - 4, ox1 + 4, oy0 + frac * (oy1 - oy0))
        else:
            rect = (ox0 - 4, oy1 - frac * (oy1 - oy0), ox1 + 4, oy1 + 4)
        rect = tuple(float(np.clip(v, 0, g.size[i % 2])) for i, v in enumerate(rect))
        r = tuple(round(v) for v in rect)
        occ = _patch(distractors[int(rng.integers(len(distractors)))], (max(1, r[2] - r[0]), max(1, r[3] - r[1])), rng)
        img.paste(occ, (r[0], r[1]))
        g.occluders.append(tuple(float(v) for v in r))  # type: ignore[arg-type]
    img = _photometric(img, rng, strength, grey)
    return img, g


def _query_view(photo: _Photo, k: int, rng: np.random.Generator) -> tuple[Image.Image, _Geom]:
    """Query ``k`` (1 or 2): a mild view showing all of the object, with some context around it."""
    rx0, ry0, rx1, ry1 = photo.region
    bx0, by0, bx1, by1 = photo.box
    bw, bh = bx1 - bx0, by1 - by0
    bc = ((bx0 + bx1) / 2, (by0 + by1) / 2)
    u = rng.uniform
    for attempt in range(20):
        damp = 1.0 - attempt / 20  # fewer changes on each retry
        if k == 1:
            s, angle, tilt, off = u(1.3, 1.6), u(-3, 3) * damp, 0.01, 0.0
        else:
            s, angle, tilt, off = u(1.15, 1.35), u(-10, 10) * damp, 0.03, 0.05
        c = (bc[0] + u(-off, off) * bw, bc[1] + u(-off, off) * bh)
        size = (min(bw * s, (rx1 - rx0) * 0.999), min(bh * s, (ry1 - ry0) * 0.999))
        g = _view_geom(photo, rng, centre=c, size=size, angle=angle, tilt=tilt * damp)
        if _measure(g, photo.box)["visible"] >= 0.99:
            break
    else:  # the whole region, unrotated, always shows the whole box
        g = _view_geom(
            photo, rng, centre=((rx0 + rx1) / 2, (ry0 + ry1) / 2), size=(rx1 - rx0, ry1 - ry0), angle=0.0, tilt=0.0
        )
    return _photometric(_render(photo, g), rng, 0.4), g


def _is_grey(img: Image.Image) -> bool:
    arr = np.asarray(img, dtype=np.int16)
    return bool(np.abs(arr - arr.mean(axis=2, keepdims=True)).max() < 8)


def _distractor_view(photo: _Photo, grey: bool, j: int, rng: np.random.Generator) -> Image.Image:
    rx0, ry0, rx1, ry1 = photo.region
    rw, rh = rx1 - rx0, ry1 - ry0
    c = ((rx0 + rx1) / 2, (ry0 + ry1) / 2)
    u = rng.uniform
    kind = j % 4
    if kind == 0:
        g = _view_geom(photo, rng, centre=c, size=(rw * u(0.85, 1), rh * u(0.85, 1)), angle=u(-4, 4), tilt=0.02)
    elif kind == 1:
        s = u(0.4, 0.6)
        cc = (rx0 + u(0.3, 0.7) * rw, ry0 + u(0.3, 0.7) * rh)
        g = _view_geom(photo, rng, centre=cc, size=(rw * s, rh * s), angle=u(-10, 10), tilt=0.03)
    elif kind == 2:
        ang = float(rng.choice([-1, 1]) * u(20, 60))
        g = _view_geom(photo, rng, centre=c, size=(rw * 0.8, rh * 0.8), angle=ang, tilt=0.05)
    else:
        g = _view_geom(photo, rng, centre=c, size=(rw * 0.8, rh * 0.8), angle=u(-8, 8), tilt=u(0.1, 0.2))
    out = _render(photo, g)
    if grey and rng.random() < 0.6:  # tint a greyscale photo (duotone), as an old print would be
        dark = tuple(int(v) for v in rng.integers(0, 90, size=3))
        light = tuple(int(v) for v in rng.integers(170, 256, size=3))
        out = ImageOps.colorize(out.convert("L"), dark, light).convert("RGB")
    return _photometric(out, rng, _STRENGTH)


# ----------------------------------------------------------------------------- build


_Item = tuple[str, bytes, dict[str, Any], int, dict[str, float]]  # stem, jpeg, record, instance index, measures


def _make_instance_view(i: int, photo: _Photo, recipe: str, backgrounds: list[Image.Image]) -> _Item:
    inst = INSTANCES[i]
    rng = _rng("view", inst.name, recipe)
    img, g = _instance_view(inst, photo, recipe, rng, backgrounds)
    meas = _rounded(_measure(g, photo.box))
    q = int(rng.integers(35, 91))
    return (
        f"{inst.name}/{recipe}",
        _jpeg(img, q),
        {"instance": inst.name, "recipe": recipe, "quality": q, **meas},
        i,
        meas,
    )


def _make_query(i: int, photo: _Photo, k: int) -> _Item:
    inst = INSTANCES[i]
    rng = _rng("query", inst.name, k)
    img, g = _query_view(photo, k, rng)
    meas = _rounded(_measure(g, photo.box))
    m = _apply(np.linalg.inv(g.out_to_src), _corners(photo.box))
    x0, y0 = np.clip(m.min(axis=0), 0, None)
    x1, y1 = np.minimum(m.max(axis=0), g.size)
    bbx = [round(float(v), 1) for v in (x0, y0, x1, y1)]
    q = int(rng.integers(80, 93))
    rec = {"instance": inst.name, "recipe": f"query{k}", "quality": q, "bbx": bbx, **meas}
    return f"query_{inst.name}_{k}", _jpeg(img, q), rec, i, meas


def _make_distractor(key: str, region: tuple[int, int, int, int], photo: _Photo, grey: bool, j: int) -> _Item:
    rng = _rng("distractor", key, region, j)
    q = int(rng.integers(35, 91))
    data = _jpeg(_distractor_view(photo, grey, j, rng), q)
    rec = {"instance": None, "distractor": key, "region": list(region), "recipe": f"distractor{j % 4}", "quality": q}
    return f"{key}/{region}/{j}", data, rec, -1, {}


def _generate() -> tuple[dict[str, bytes], list[str]]:
    """Every file of the dataset in memory (``{relative path: bytes}``) and the mismatched sources.

    Each image has its own seeded generator (keyed by its name), so changing one recipe does
    not change the others.
    """
    mismatched: list[str] = []
    originals = {src.key: _read(src, mismatched) for src in SOURCES}
    # Whole distractor photos also serve as backgrounds of composited views and as occluders.
    backgrounds = [
        _reduce(originals[k], (0, 0, *originals[k].size), (0, 0, 1, 1)).image for k, r, _ in DISTRACTORS if r is None
    ]

    db_jobs: list[Callable[[], _Item]] = []
    q_jobs: list[Callable[[], _Item]] = []
    for i, inst in enumerate(INSTANCES):
        photo = _reduce(originals[inst.source], inst.region, inst.box)
        db_jobs += [partial(_make_instance_view, i, photo, recipe, backgrounds) for recipe in _RECIPES]
        q_jobs += [partial(_make_query, i, photo, k) for k in (1, 2)]
    for key, region, n in DISTRACTORS:
        img = originals[key]
        region = region or (0, 0, img.width, img.height)
        photo = _reduce(img, region, region)
        db_jobs += [partial(_make_distractor, key, region, photo, _is_grey(img), j) for j in range(n)]
    items = [job() for job in db_jobs]
    queries = [job() for job in q_jobs]

    order = _rng("shuffle").permutation(len(items))
    imlist = [f"demo_{r:03d}" for r in range(len(items))]
    files: dict[str, bytes] = {}
    records: list[dict[str, Any]] = []
    for row, idx in enumerate(order):
        files[f"jpg/{imlist[row]}.jpg"] = items[idx][1]
        records.append({"name": imlist[row], "role": "database", **items[idx][2]})
    gnd: list[dict[str, Any]] = []
    for qname, data, rec, qinst, qmeas in queries:
        files[f"jpg/{qname}.jpg"] = data
        records.append({"name": qname, "role": "query", **rec})
        lists: dict[str, list[int]] = {"easy": [], "hard": [], "junk": []}
        for row, idx in enumerate(order):
            if items[idx][3] == qinst:
                lists[_label(items[idx][4], qmeas)].append(row)
        gnd.append({**lists, "bbx": [float(v) for v in rec["bbx"]]})
    data = {"imlist": imlist, "qimlist": [q[0] for q in queries], "gnd": gnd}
    files[GND_FILE] = pickle.dumps(data, protocol=4)
    files["views.json"] = (json.dumps(records, indent=1, sort_keys=True) + "\n").encode()
    return files, mismatched


def _rounded(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()}


def _manifest(files: dict[str, bytes], mismatched: list[str]) -> dict[str, Any]:
    import PIL

    return {
        "name": "demo",
        "version": VERSION,
        "seed": SEED,
        "generator": {"pillow": PIL.__version__, "numpy": np.__version__},
        "sources": {
            s.key: {
                "package": s.package,
                "path": s.path,
                "licence": s.licence,
                "credit": s.credit,
                "sha256_expected": s.sha256,
                "matches": s.key not in mismatched,
            }
            for s in SOURCES
        },
        "files": {k: _sha256(v) for k, v in sorted(files.items())},
    }


def is_valid(ddir: Path) -> bool:
    """True when ``ddir/manifest.json`` is this version's and every listed file matches its sha256."""
    try:
        man = json.loads((ddir / "manifest.json").read_text())
        if man.get("name") != "demo" or man.get("version") != VERSION or not man.get("files"):
            return False
        return all(_sha256((ddir / rel).read_bytes()) == sha for rel, sha in man["files"].items())
    except (OSError, ValueError, AttributeError, TypeError):
        return False


def build_demo(root: str | Path, *, force: bool = False) -> Path:
    """Build the demo dataset under ``root`` (a data root) unless a valid one is there; its folder.

    Returns ``<root>/demo-v1``. With ``force``, rebuild even when the existing folder is valid.
    """
    root = Path(root).expanduser()
    ddir = root / DIRNAME
    if not force and is_valid(ddir):
        return ddir
    log.info("building the demo dataset in %s (first use; a few seconds)", ddir)
    t0 = time.perf_counter()
    files, mismatched = _generate()
    manifest = _manifest(files, mismatched)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DIRNAME}.tmp-", dir=root))
    old: Path | None = None
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        (tmp / "jpg").mkdir()
        for rel, data in files.items():
            (tmp / rel).write_bytes(data)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        if not force and is_valid(ddir):  # another process finished first
            return ddir
        if ddir.exists() or ddir.is_symlink():  # incomplete, corrupt or forced: move it aside first
            old = Path(tempfile.mkdtemp(prefix=f".{DIRNAME}.old-", dir=root))
            os.replace(ddir, old / DIRNAME)
        try:
            os.replace(tmp, ddir)
        except OSError:
            if is_valid(ddir):  # another process finished first
                return ddir
            raise
    finally:
        for leftover in (tmp, old):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)
    log.info("built the demo dataset in %s (%d files, %.1f s)", ddir, len(files), time.perf_counter() - t0)
    return ddir


@DATASETS.register(
    "demo",
    info=DatasetInfo(
        protocol="revisited",
        layout="<data_root>/demo-v1/ (built automatically at first use)",
        description="197 views of 14 objects and distractors from package-shipped photos, 28 queries; no download",
        image_size=512,  # stored images are 384-512 pixels: no 1024-pixel upscaling, 4x cheaper on a CPU
    ),
)
def load_demo(data_root: Path | None = None) -> RetrievalDataset:
    """The built-in demo dataset (built under ``data_root`` at first use, then reused)."""
    ddir = build_demo(Path(data_root) if data_root is not None else default_data_root())
    data = load_gnd_pickle(ddir / GND_FILE)
    man = json.loads((ddir / "manifest.json").read_text())
    gen = man.get("generator", {})
    n = len(data["imlist"])
    gnd = []
    for g in data["gnd"]:
        entry = {}
        for k in ("easy", "hard", "junk"):
            arr = np.asarray(g[k], dtype=np.int64).reshape(-1)
            if arr.size and (arr.min() < 0 or arr.max() >= n):
                raise ValueError(f"{ddir / GND_FILE}: {k} index out of range [0, {n})")
            entry[k] = arr
        gnd.append(entry)
    queries = tuple(
        Query(f"{q}.jpg", tuple(float(v) for v in g["bbx"]))  # type: ignore[arg-type]
        for q, g in zip(data["qimlist"], data["gnd"], strict=True)
    )
    notes = {
        "query_cropping": "queries are cropped to their bbx (revisited protocol); they are not in the database",
        "source": f"demo-v{VERSION}: synthetic views of photos shipped in scikit-image, scikit-learn and matplotlib",
        "build": f"seed {man['seed']}, Pillow {gen.get('pillow')}, numpy {gen.get('numpy')} (JPEG bytes depend on Pillow)",
        "labels": (
            f"junk: visible object < {JUNK_VISIBLE}; hard: visible < {HARD_VISIBLE}, rotation > {HARD_ROTATION} deg, "
            f"tilt > {HARD_TILT} or cover < {HARD_COVER}; else easy"
        ),
        "images": f"{n} database images",
        "queries": f"{len(queries)} queries",
    }
    differ = sorted(k for k, v in man["sources"].items() if not v.get("matches", True))
    if differ:
        notes["sources_differ"] = f"built from package files that differ from the designed ones: {', '.join(differ)}"
    return RetrievalDataset(
        name="demo",
        root=ddir / "jpg",
        images=tuple(f"{name}.jpg" for name in data["imlist"]),
        queries=queries,
        gnd=tuple(gnd),
        protocol="revisited",
        notes=notes,
    )
