"""Image decoding for every stage: how one file (and an optional query box) becomes a network input.

Three resize modes (``ImageSpec.resize``):

* ``longer``: the longer side becomes ``size`` (up or down, LANCZOS); a query is cropped to its
  box first and the crop resized (``query_resize="crop"``), or the whole image is resized and
  the box cropped afterwards (``"full"``, the query at the database's scale).
* ``cirtorch``: exactly cirtorch's ``ImagesFromList`` + ``imresize`` (Radenovic et al.; also
  InsCLR's ``images_from_list.py``): decode to RGB; a query is cropped with Pillow's ``crop`` on
  the box as given (Pillow rounds the corners; parts outside the image are black); then Pillow's
  ``thumbnail((s, s), LANCZOS)`` with ``s = size`` for a database image and ``s = size *
  max(crop) / max(full image)`` for a query, so the query keeps the database's scale and
  ``thumbnail`` never enlarges. The call is Pillow's own (its ``reducing_gap`` included), so the
  pixels are those the reference code gets with the same Pillow; :func:`target_size` computes
  the same size from the header with a copy of Pillow's rule (checked against it by a test and
  at every decode).
* ``fixed``: every image, and every query crop, resized to ``fixed = (height, width)`` (LANCZOS,
  aspect not kept), as the ICMR 2021 paper does.

Decoding rules (:func:`decode_rgb`; every image becomes 8-bit RGB):

* **8-bit modes** (``1``, ``L``, ``P``, ``PA``, ``LA``, ``RGB``, ``RGBA``, ``CMYK``, ``YCbCr``, ...)
  go through Pillow's ``convert("RGB")``: palettes are expanded; alpha is dropped, not composited
  (a transparent pixel keeps the colour stored under it); CMYK uses Pillow's plain formula
  (no ICC colour management).
* **16-bit samples** become ``round(v / 257)``, computed as ``(v + 128) // 257`` (no ties: 257 is
  odd), so 65535 -> 255 and a picture stored as ``257 * k`` gives back exactly its 8-bit ``k``.
  This covers grayscale ``I;16`` / ``I;16B`` / ``I;16L``, ``I`` (Pillow's mode for 16-bit PGM and
  TIFF data; values outside [0, 65535] are clipped) and 16-bit PNGs of every colour type.
  Pillow has no 16-bit colour mode: it decodes 16-bit RGB, RGBA and grey+alpha PNGs to 8 bits by
  keeping each sample's high byte (``v // 256``, up to one grey level off the rule), so such a PNG
  is decoded a second time with the little-endian unpacker, which yields the low bytes, and the
  rule is applied to the full value. (``convert("RGB")`` on ``I;16`` clips every value above 255
  to white.)
* **Float** ``F``: the 8-bit scale Pillow uses for it (``L`` -> ``F`` keeps 0-255, and
  ``convert("L")`` clips to it): values are clipped to [0, 255] and rounded to nearest; NaN -> 0.
  A float image holding [0, 1] data therefore decodes nearly black.

EXIF orientation (``ImageSpec.exif``): off by default (the benchmark datasets are read as the
reference code reads them). When on, the orientation is read from the file header (the EXIF
block, else XMP ``tiff:Orientation``, as Pillow's ``getexif``; the pixels are not decoded) and
applied as ``ImageOps.exif_transpose`` does, before any crop or resize; orientations 5-8 swap
width and height. Query boxes are in pixels of the image as stored when ``exif`` is False, of the
upright image when True. A missing, out-of-range or unreadable tag means "as stored"; a PNG's
``eXIf`` chunk counts only when it precedes the pixel data (a later one is found only by decoding
the whole file, which :func:`target_size` must not do).

Pixel limit (``ImageSpec.max_pixels``): an image with more than ``max_pixels`` pixels (width x
height as stored) is refused with a one-line ``ValueError``, by :func:`target_size` from the
header alone and by :func:`load_image` before decoding. It replaces Pillow's own
``DecompressionBombWarning`` / ``DecompressionBombError``, which are off while this module decodes
(Pillow's global ``Image.MAX_IMAGE_PIXELS`` is restored afterwards). 0 or None: no limit.

Errors: every failure is an ``OSError`` (``FileNotFoundError`` for a missing file) or a
``ValueError`` (pixel limit, empty query box) whose message is one line starting with the file
path. Decoding runs in DataLoader worker processes: the exceptions pickle as they are.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, UnidentifiedImageError

__all__ = ["DEFAULT_MAX_PIXELS", "RESIZE_MODES", "ImageSpec", "decode_rgb", "image_size", "load_image", "target_size", "thumbnail_size"]

RESIZE_MODES = ("longer", "cirtorch", "fixed")

log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 178_956_970
"""Default ``ImageSpec.max_pixels``: 2 x 89,478,485, the size at which Pillow raises
``DecompressionBombError`` by default, so every image that decoded before the limit existed still
decodes (Pillow only warned between 89.5 and 179 megapixels). Such an image costs about 0.5 GB as
8-bit RGB (1 GB while a 16-bit PNG is decoded), per decoding worker."""

_ORIENTATION = ExifTags.Base.Orientation  # EXIF tag 274
# EXIF orientation -> the transposition that makes the image upright (as ImageOps.exif_transpose)
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = frozenset({5, 6, 7, 8})

# Rawmodes of the 16-bit PNGs Pillow reduces to their high bytes -> the rawmode that reads the low
# bytes from the same data with the same pixel stride (so the PNG row filters still apply):
# a little-endian unpacker takes the second byte of each big-endian sample; grey+alpha (32 bits a
# pixel) read as plain RGBA gives the bytes (grey hi, grey lo, alpha hi, alpha lo).
_PNG16_LOW_BYTES = {"RGB;16B": "RGB;16L", "RGBA;16B": "RGBA;16L", "LA;16B": "RGBA"}


@dataclass(frozen=True)
class ImageSpec:
    """How one image is turned into a network input.

    Attributes:
        path: image file.
        bbox: ``(x0, y0, x1, y1)`` crop in original pixels (of the upright image when ``exif``),
            or None.
        size: longer side after resizing.
        query_resize: ``crop`` (crop then resize the crop) or ``full`` (resize then crop).
        exif: apply the EXIF orientation before cropping and resizing (module docstring).
        max_pixels: refuse images with more pixels than this (decompression bombs); 0 or None:
            no limit. Default :data:`DEFAULT_MAX_PIXELS`.
        resize: ``longer``, ``cirtorch`` or ``fixed`` (module docstring).
        fixed: ``(height, width)`` of every input in ``fixed`` mode.
    """

    path: Path
    bbox: tuple[float, float, float, float] | None
    size: int
    query_resize: str = "crop"
    exif: bool = False
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    resize: str = "longer"
    fixed: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.max_pixels is not None and self.max_pixels < 0:
            raise ValueError(f"max_pixels must be >= 0 (0 or None: no limit), got {self.max_pixels}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {self.resize!r}")
        if (self.resize == "fixed") != (self.fixed is not None):
            raise ValueError("resize='fixed' needs fixed=(height, width), and only it takes one")


# ------------------------------------------------------------------------------ pixel limit

_limit_lock = threading.Lock()
_limit_depth = 0
_limit_saved: int | None = None


@contextlib.contextmanager
def _pillow_limit_off() -> Iterator[None]:
    """Pillow's decompression-bomb check off inside (this module checks ``max_pixels`` itself);
    ``Image.MAX_IMAGE_PIXELS`` is restored when the last nested or concurrent user leaves."""
    global _limit_depth, _limit_saved
    with _limit_lock:
        if _limit_depth == 0:
            _limit_saved = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
        _limit_depth += 1
    try:
        yield
    finally:
        with _limit_lock:
            _limit_depth -= 1
            if _limit_depth == 0:
                Image.MAX_IMAGE_PIXELS = _limit_saved


def _check_pixels(path: Path, w: int, h: int, max_pixels: int | None) -> None:
    if max_pixels and w * h > max_pixels:
        raise ValueError(
            f"{path}: {w}x{h} = {w * h:,} pixels is over the limit of {max_pixels:,} pixels "
            "(a guard against decompression bombs); raise it with --max-pixels N, "
            "or max_pixels=N in Python (0 or None: no limit)"
        )


# ---------------------------------------------------------------------------------- decoding


def _error(path: Path, action: str, e: BaseException) -> OSError:
    """A one-line error starting with ``path`` for a failure of Pillow (or the file system)."""
    if isinstance(e, FileNotFoundError):
        return FileNotFoundError(f"{path}: image not found")
    if isinstance(e, UnidentifiedImageError):
        return OSError(f"{path}: not an image (unknown format, or the file is damaged or truncated)")
    reason = " ".join(str(e).split()) or type(e).__name__
    return OSError(f"{path}: cannot {action} image ({reason})")


def _open(path: Path) -> Image.Image:
    """Open ``path`` (header only); call inside :func:`_pillow_limit_off`."""
    try:
        return Image.open(path)
    except Exception as e:  # noqa: BLE001 - Pillow raises many kinds; all become one line
        raise _error(path, "read", e) from e


def _orientation(im: Image.Image) -> int:
    """EXIF orientation 1-8 from the header, without decoding the pixels; 1 when absent or unreadable."""
    try:
        # the base-class method: PngImageFile.getexif decodes the whole image to look past the pixels
        value = Image.Image.getexif(im).get(_ORIENTATION, 1)
    except Exception as e:  # noqa: BLE001 - a damaged EXIF block means "as stored", not a failed run
        log.debug("%s: unreadable EXIF block ignored (%s)", getattr(im, "filename", "?"), e)
        return 1
    return value if isinstance(value, int) and value in _UPRIGHT else 1


def _round257(v: np.ndarray) -> np.ndarray:
    """16-bit samples -> uint8 ``round(v / 257)``."""
    return ((v.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _png16(im: Image.Image, path: Path) -> np.ndarray | None:
    """``(H, W, 3)`` or ``(H, W)`` uint16 samples of a 16-bit RGB / RGBA / grey+alpha PNG (alpha
    dropped), or None for any other image. Must be called before ``im`` is loaded."""
    tile = getattr(im, "tile", None)
    if im.format != "PNG" or not tile or len(tile) != 1 or tile[0][3] not in _PNG16_LOW_BYTES:
        return None
    raw = tile[0][3]
    with Image.open(path) as again:
        t = again.tile[0]
        if len(again.tile) != 1 or t[3] != raw:  # the file changed under us: keep Pillow's high bytes
            return None
        low_mode = _PNG16_LOW_BYTES[raw]
        again.tile = [t._replace(args=low_mode) if hasattr(t, "_replace") else (*t[:3], low_mode)]
        second = np.asarray(again)  # (H, W, 3 or 4) uint8
    if raw == "LA;16B":
        return (second[..., 0].astype(np.uint16) << 8) | second[..., 1]
    high = np.asarray(im)[..., :3]
    return (high.astype(np.uint16) << 8) | second[..., :3]


def _to_rgb(im: Image.Image, path: Path) -> Image.Image:
    """8-bit RGB copy of ``im`` by the module's decoding rules."""
    wide = _png16(im, path)
    if wide is not None:
        out = Image.fromarray(_round257(wide))
    elif im.mode == "I" or im.mode.startswith("I;16"):
        v = np.asarray(im)  # (H, W) uint16 or int32
        out = Image.fromarray(_round257(np.clip(v, 0, 65535) if im.mode == "I" else v))
    elif im.mode == "F":
        v = np.nan_to_num(np.asarray(im, dtype=np.float32), nan=0.0)  # (H, W); +-inf clip below
        out = Image.fromarray(np.rint(np.clip(v, 0.0, 255.0)).astype(np.uint8))
    else:
        out = im
    return out.convert("RGB")


def decode_rgb(path: str | Path, *, exif: bool = False, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode one image file to an 8-bit RGB Pillow image, by the rules of the module docstring.

    Args:
        path: image file.
        exif: apply the EXIF orientation (the result is upright).
        max_pixels: refuse images with more pixels than this; 0 or None: no limit.

    Raises:
        FileNotFoundError / OSError: missing, unreadable, truncated or not an image.
        ValueError: over ``max_pixels``.
    """
    path = Path(path)
    with _pillow_limit_off():
        with _open(path) as im:
            _check_pixels(path, *im.size, max_pixels)
            orientation = _orientation(im) if exif else 1
            try:
                img = _to_rgb(im, path)
            except Exception as e:  # noqa: BLE001 - truncated data, bad chunks, out of memory, ...
                raise _error(path, "decode", e) from e
        if orientation in _UPRIGHT:
            img = img.transpose(_UPRIGHT[orientation])
    return img


# ------------------------------------------------------------------------------- geometry


def _scaled(w: int, h: int, size: int) -> tuple[int, int]:
    s = size / max(w, h)
    return max(1, round(w * s)), max(1, round(h * s))


def _box(bbox: tuple[float, float, float, float], w: int, h: int, path: Path) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = (round(float(v)) for v in bbox)
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"{path}: query box {tuple(bbox)} is empty inside the {w}x{h} image")
    return x0, y0, x1, y1


def _upright_size(spec: ImageSpec) -> tuple[int, int]:
    """``(width, height)`` of the decoded image (after the EXIF transpose when ``spec.exif``), from the header."""
    path = Path(spec.path)
    with _pillow_limit_off():
        with _open(path) as im:
            w, h = im.size
            _check_pixels(path, w, h, spec.max_pixels)
            orientation = _orientation(im) if spec.exif else 1
    return (h, w) if orientation in _SWAPS_AXES else (w, h)


def image_size(path: str | Path, *, exif: bool = False, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """``(width, height)`` of an image as decoded (upright when ``exif``), from its header only;
    the pixel limit applies as in :func:`load_image` (None: no limit)."""
    return _upright_size(ImageSpec(Path(path), None, 16, exif=exif, max_pixels=max_pixels))


def thumbnail_size(w: int, h: int, size: float) -> tuple[int, int]:
    """The size Pillow's ``Image.thumbnail((size, size))`` gives a ``w x h`` image: never larger,
    aspect kept with Pillow's rounding (a copy of its rule, so that sizes are known from headers)."""
    x = y = math.floor(size)
    if x >= w and y >= h:
        return w, h
    aspect = w / h

    def round_aspect(number: float, key) -> int:  # noqa: ANN001
        return max(min(math.floor(number), math.ceil(number), key=key), 1)

    if x / y >= aspect:
        x = round_aspect(y * aspect, key=lambda n: abs(aspect - n / y))
    else:
        y = round_aspect(x / aspect, key=lambda n: 0 if n == 0 else abs(aspect - x / n))
    return x, y


def _pillow_box(bbox: tuple[float, float, float, float], path: Path) -> tuple[int, int, int, int]:
    """The box Pillow's ``crop`` uses for float corners (``round`` each); not clipped."""
    x0, y0, x1, y1 = (int(round(float(v))) for v in bbox)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"{path}: query box {tuple(bbox)} is empty")
    return x0, y0, x1, y1


def _cirtorch_size(w: int, h: int, spec: ImageSpec) -> tuple[int, int]:
    if spec.bbox is None:
        return thumbnail_size(w, h, spec.size)
    x0, y0, x1, y1 = _pillow_box(spec.bbox, spec.path)
    cw, ch = x1 - x0, y1 - y0
    return thumbnail_size(cw, ch, spec.size * max(cw, ch) / max(w, h))


def target_size(spec: ImageSpec) -> tuple[int, int]:
    """``(width, height)`` of the network input for ``spec``, read from the file header only."""
    w, h = _upright_size(spec)
    if spec.resize == "fixed":
        return spec.fixed[1], spec.fixed[0]  # type: ignore[index]
    if spec.resize == "cirtorch":
        return _cirtorch_size(w, h, spec)
    if spec.bbox is None:
        return _scaled(w, h, spec.size)
    x0, y0, x1, y1 = _box(spec.bbox, w, h, spec.path)
    if spec.query_resize == "crop":
        return _scaled(x1 - x0, y1 - y0, spec.size)
    s = spec.size / max(w, h)
    return max(1, round(x1 * s) - round(x0 * s)), max(1, round(y1 * s) - round(y0 * s))


def load_image(spec: ImageSpec) -> torch.Tensor:
    """Decode (:func:`decode_rgb`), crop and resize one image; ``(3, H, W)`` uint8 RGB tensor of
    size :func:`target_size`."""
    with _pillow_limit_off():  # Image.crop checks the box size against Pillow's limit too
        img = decode_rgb(spec.path, exif=spec.exif, max_pixels=spec.max_pixels)
        w, h = img.size
        if spec.resize == "cirtorch":
            expected = _cirtorch_size(w, h, spec)
            full = max(w, h)
            s = spec.size
            if spec.bbox is not None:
                img = img.crop(tuple(float(v) for v in spec.bbox))
                s = spec.size * max(img.size) / full
            img.thumbnail((s, s), Image.Resampling.LANCZOS)
            if img.size != expected:  # pragma: no cover - only if Pillow changes its rule
                raise RuntimeError(f"{spec.path}: Pillow's thumbnail gave {img.size}, retrbench expected {expected}; please report")
        elif spec.resize == "fixed":
            if spec.bbox is not None:
                img = img.crop(_box(spec.bbox, w, h, spec.path))
            img = img.resize((spec.fixed[1], spec.fixed[0]), Image.Resampling.LANCZOS)  # type: ignore[index]
        elif spec.bbox is not None and spec.query_resize == "crop":
            img = img.crop(_box(spec.bbox, w, h, spec.path))
            img = img.resize(_scaled(*img.size, spec.size), Image.Resampling.LANCZOS)
        elif spec.bbox is not None:
            x0, y0, x1, y1 = _box(spec.bbox, w, h, spec.path)
            img = img.resize(_scaled(w, h, spec.size), Image.Resampling.LANCZOS)
            s = spec.size / max(w, h)
            img = img.crop((round(x0 * s), round(y0 * s), round(x1 * s), round(y1 * s)))
        else:
            img = img.resize(_scaled(w, h, spec.size), Image.Resampling.LANCZOS)
    arr = np.asarray(img, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)
