"""Image synthesis for the demo dataset: reduced photos, perspective warps, photometric changes.

A view is drawn in one pass of one seeded generator (``rng``): the geometry
(:func:`~retrbench.datasets.demo.geometry.view_geom`), the warp, any occluder or background, then
the photometric changes (brightness, contrast, saturation, sometimes greyscale, blur, noise).
The order of the draws is part of the dataset: reordering them changes every image.

Recipes (:data:`RECIPES`, 11 database views per instance). Mild: near-full view, loose crop
around the object, off-centre crop, strong colour change. Strong: rotation by 40-80 degrees, by
90 / 180 / 270, keystone (a side shortened by 25-35%), zoom into 45-60% of the object's width, an
occluder (a patch of another photo) over 55-70% of the object, the photo shrunk to 22-32% of
the width of another photo. Beside: a crop centred away from the object.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from .catalogue import Instance
from .geometry import Geom, box_corners, box_in_view, measure, out_size, view_geom

__all__ = [
    "MAX_SIDE",
    "RECIPES",
    "STRENGTH",
    "Photo",
    "distractor_view",
    "encode_jpeg",
    "instance_view",
    "is_grey",
    "patch",
    "photometric",
    "query_view",
    "reduce_photo",
    "warp",
]

MAX_SIDE = 640  # instance regions / distractor photos are reduced to this longer side first
STRENGTH = 0.85  # photometric strength of ordinary views (the "colour" recipe uses 1.0)


@dataclass
class Photo:
    """A source photo reduced for drawing, with the instance region and object box in its pixels."""

    image: Image.Image  # RGB, reduced so the region's longer side is at most MAX_SIDE
    region: tuple[float, float, float, float]  # in reduced pixels
    box: tuple[float, float, float, float]  # in reduced pixels


def reduce_photo(img: Image.Image, region: Sequence[float], box: Sequence[float]) -> Photo:
    """``img`` shrunk (LANCZOS) so ``region``'s longer side is at most :data:`MAX_SIDE`; region and box scaled with it."""
    rw, rh = region[2] - region[0], region[3] - region[1]
    s = min(1.0, MAX_SIDE / max(rw, rh))
    if s < 1.0:
        img = img.resize((round(img.width * s), round(img.height * s)), Image.Resampling.LANCZOS)
    return Photo(img, tuple(v * s for v in region), tuple(v * s for v in box))  # type: ignore[arg-type]


def warp(photo: Photo, g: Geom) -> Image.Image:
    """The view ``g`` of ``photo``: a bilinear perspective warp to ``g.size``."""
    m = g.out_to_src / g.out_to_src[2, 2]
    return photo.image.transform(
        g.size, Image.Transform.PERSPECTIVE, tuple(m.ravel()[:8]), resample=Image.Resampling.BILINEAR
    )


def photometric(img: Image.Image, rng: np.random.Generator, strength: float, grey: bool = False) -> Image.Image:
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


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    """Baseline JPEG bytes with fixed settings and no metadata (deterministic for a given Pillow)."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(quality), optimize=False, progressive=False, subsampling=2)
    return buf.getvalue()


def patch(photo: Image.Image, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A random crop of ``photo`` resized to ``size``."""
    w, h = size
    s = min(photo.width / w, photo.height / h) * float(rng.uniform(0.4, 1.0))
    cw, ch = max(8, int(w * s)), max(8, int(h * s))
    x = int(rng.integers(0, photo.width - cw + 1))
    y = int(rng.integers(0, photo.height - ch + 1))
    return photo.crop((x, y, x + cw, y + ch)).resize((w, h), Image.Resampling.BILINEAR)


# Database views per instance: 4 mild ones, 6 strong ones, 1 beside the object (see instance_view).
RECIPES: tuple[str, ...] = (
    "full", "loose", "offcentre", "colour",
    "rotate", "rotate_right", "tilt", "zoom", "occlude", "small",
    "beside",
)  # fmt: skip


def instance_view(
    inst: Instance, photo: Photo, recipe: str, rng: np.random.Generator, distractors: list[Image.Image]
) -> tuple[Image.Image, Geom]:
    """Database view ``recipe`` (one of :data:`RECIPES`) of ``inst``; ``distractors`` supply occluders and backgrounds."""
    rx0, ry0, rx1, ry1 = photo.region
    bx0, by0, bx1, by1 = photo.box
    rw, rh = rx1 - rx0, ry1 - ry0
    bw, bh = bx1 - bx0, by1 - by0
    bc = ((bx0 + bx1) / 2, (by0 + by1) / 2)
    rcen = ((rx0 + rx1) / 2, (ry0 + ry1) / 2)
    u = rng.uniform
    strength = STRENGTH
    grey = False
    if recipe == "full":
        g = view_geom(
            photo.region, rng, centre=rcen, size=(rw * u(0.9, 1.0), rh * u(0.9, 1.0)), angle=u(-4, 4), tilt=0.01
        )
    elif recipe == "loose":
        s = u(1.15, 1.4)
        g = view_geom(photo.region, rng, centre=bc, size=(bw * s, bh * s), angle=u(-6, 6), tilt=0.02)
    elif recipe == "offcentre":
        c = (bc[0] + u(-0.2, 0.2) * bw, bc[1] + u(-0.2, 0.2) * bh)
        g = view_geom(photo.region, rng, centre=c, size=(rw * 0.75, rh * 0.75), angle=u(-8, 8), tilt=0.02)
    elif recipe == "colour":
        g = view_geom(
            photo.region, rng, centre=rcen, size=(rw * u(0.8, 0.95), rh * u(0.8, 0.95)), angle=u(-5, 5), tilt=0.02
        )
        strength, grey = 1.0, bool(rng.random() < 0.5)
    elif recipe == "rotate":
        ang = float(rng.choice([-1.0, 1.0]) * u(40, 80))
        g = view_geom(photo.region, rng, centre=bc, size=(rw * 0.9, rh * 0.9), angle=ang, tilt=0.05)
    elif recipe == "rotate_right":
        ang = float(rng.choice([90.0, 180.0, 270.0]) + u(-5, 5))
        size = (rh * 0.9, rw * 0.9) if round(ang / 90) % 2 else (rw * 0.9, rh * 0.9)
        g = view_geom(photo.region, rng, centre=bc, size=size, angle=ang, tilt=0.02)
    elif recipe == "tilt":
        g = view_geom(
            photo.region,
            rng,
            centre=bc,
            size=(rw * 0.85, rh * 0.85),
            angle=u(-10, 10),
            tilt=0.04,
            keystone=u(0.25, 0.35),
        )
    elif recipe == "zoom":
        c = (bx0 + u(0.25, 0.75) * bw, by0 + u(0.25, 0.75) * bh)
        s = u(0.45, 0.6)
        g = view_geom(photo.region, rng, centre=c, size=(bw * s, bh * s), angle=u(-8, 8), tilt=0.03)
    elif recipe == "occlude":
        g = view_geom(photo.region, rng, centre=rcen, size=(rw * 0.9, rh * 0.9), angle=u(-6, 6), tilt=0.02)
    elif recipe == "small":
        bg = distractors[int(rng.integers(len(distractors)))]
        ow, oh = out_size(4, 3, rng, 448, 512)
        back = patch(bg, (ow, oh), rng)
        s = u(0.22, 0.32)
        pw, ph = (round(ow * s), round(ow * s * rh / rw)) if rw >= rh else (round(oh * s * rw / rh), round(oh * s))
        sub = view_geom(photo.region, rng, centre=rcen, size=(rw, rh), angle=u(-5, 5), tilt=0.02, out=(pw, ph))
        px, py = int(rng.integers(0, ow - pw + 1)), int(rng.integers(0, oh - ph + 1))
        back.paste(warp(photo, sub), (px, py))
        shift = np.array([[1.0, 0.0, -px], [0.0, 1.0, -py], [0.0, 0.0, 1.0]])
        g = Geom(sub.out_to_src @ shift, (ow, oh), (float(px), float(py), float(px + pw), float(py + ph)))
        img = photometric(back, rng, 0.5)
        return img, g
    elif recipe == "beside":
        # A crop centred away from the object: pick the region corner farthest from the box.
        cands = box_corners((rx0, ry0, rx1, ry1))
        far = cands[int(np.argmax(np.hypot(cands[:, 0] - bc[0], cands[:, 1] - bc[1])))]
        s = u(0.3, 0.4)
        c = (far[0] + (rcen[0] - far[0]) * 0.35, far[1] + (rcen[1] - far[1]) * 0.35)
        g = view_geom(photo.region, rng, centre=c, size=(rw * s, rh * s), angle=u(-6, 6), tilt=0.02)
    else:
        raise ValueError(recipe)
    img = warp(photo, g)
    if recipe == "occlude":
        ox0, oy0, ox1, oy1 = box_in_view(g, photo.box)
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
        occ = patch(distractors[int(rng.integers(len(distractors)))], (max(1, r[2] - r[0]), max(1, r[3] - r[1])), rng)
        img.paste(occ, (r[0], r[1]))
        g.occluders.append(tuple(float(v) for v in r))  # type: ignore[arg-type]
    img = photometric(img, rng, strength, grey)
    return img, g


def query_view(photo: Photo, k: int, rng: np.random.Generator) -> tuple[Image.Image, Geom]:
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
        g = view_geom(photo.region, rng, centre=c, size=size, angle=angle, tilt=tilt * damp)
        if measure(g, photo.box)["visible"] >= 0.99:
            break
    else:  # the whole region, unrotated, always shows the whole box
        g = view_geom(
            photo.region,
            rng,
            centre=((rx0 + rx1) / 2, (ry0 + ry1) / 2),
            size=(rx1 - rx0, ry1 - ry0),
            angle=0.0,
            tilt=0.0,
        )
    return photometric(warp(photo, g), rng, 0.4), g


def is_grey(img: Image.Image) -> bool:
    """True when no pixel's channels differ from their mean by 8 or more (a greyscale photo stored as RGB)."""
    arr = np.asarray(img, dtype=np.int16)
    return bool(np.abs(arr - arr.mean(axis=2, keepdims=True)).max() < 8)


def distractor_view(photo: Photo, grey: bool, j: int, rng: np.random.Generator) -> Image.Image:
    """Distractor view ``j`` of ``photo`` (kind ``j % 4``: near-full, crop, rotation, tilt); a grey photo may be tinted."""
    rx0, ry0, rx1, ry1 = photo.region
    rw, rh = rx1 - rx0, ry1 - ry0
    c = ((rx0 + rx1) / 2, (ry0 + ry1) / 2)
    u = rng.uniform
    kind = j % 4
    if kind == 0:
        g = view_geom(photo.region, rng, centre=c, size=(rw * u(0.85, 1), rh * u(0.85, 1)), angle=u(-4, 4), tilt=0.02)
    elif kind == 1:
        s = u(0.4, 0.6)
        cc = (rx0 + u(0.3, 0.7) * rw, ry0 + u(0.3, 0.7) * rh)
        g = view_geom(photo.region, rng, centre=cc, size=(rw * s, rh * s), angle=u(-10, 10), tilt=0.03)
    elif kind == 2:
        ang = float(rng.choice([-1, 1]) * u(20, 60))
        g = view_geom(photo.region, rng, centre=c, size=(rw * 0.8, rh * 0.8), angle=ang, tilt=0.05)
    else:
        g = view_geom(photo.region, rng, centre=c, size=(rw * 0.8, rh * 0.8), angle=u(-8, 8), tilt=u(0.1, 0.2))
    out = warp(photo, g)
    if grey and rng.random() < 0.6:  # tint a greyscale photo (duotone), as an old print would be
        dark = tuple(int(v) for v in rng.integers(0, 90, size=3))
        light = tuple(int(v) for v in rng.integers(170, 256, size=3))
        out = ImageOps.colorize(out.convert("L"), dark, light).convert("RGB")
    return photometric(out, rng, STRENGTH)
