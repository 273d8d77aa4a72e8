"""Image decoding (retrbench.utils.images) on real files written here: bit depths, colour modes,
EXIF orientation, the pixel limit and the error messages."""

from __future__ import annotations

import pickle
import re
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from retrbench.utils.images import DEFAULT_MAX_PIXELS, ImageSpec, decode_rgb, load_image, target_size

# ----------------------------------------------------------------------- a raw PNG encoder


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(w: int, h: int, depth: int, colour_type: int, scanlines: bytes, interlace: int = 0) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, depth, colour_type, 0, 0, interlace)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(scanlines)) + _chunk(b"IEND", b"")
    )


def _scanlines(a: np.ndarray) -> bytes:
    """Filtered PNG scanlines of uint16 samples ``(H, W, C)``, big-endian; row ``y`` uses filter
    ``y % 5`` (none, sub, up, average, Paeth) so that every filter's pixel stride is exercised."""
    h, _, c = a.shape
    bpp = 2 * c
    raw = np.ascontiguousarray(a.astype(">u2")).reshape(h, -1).view(np.uint8).astype(np.int32)  # (H, row bytes)
    up = np.vstack([np.zeros_like(raw[:1]), raw[:-1]])
    left = np.pad(raw, ((0, 0), (bpp, 0)))[:, :-bpp]
    upleft = np.pad(up, ((0, 0), (bpp, 0)))[:, :-bpp]
    p = left + up - upleft
    pa, pb, pc = np.abs(p - left), np.abs(p - up), np.abs(p - upleft)
    paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upleft))
    predictions = [np.zeros_like(raw), left, up, (left + up) // 2, paeth]
    out = b""
    for y in range(h):
        f = y % 5
        out += bytes([f]) + ((raw[y] - predictions[f][y]) % 256).astype(np.uint8).tobytes()
    return out


_ADAM7 = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]


def write_png16(path: Path, a: np.ndarray, interlace: bool = False) -> Path:
    """A 16-bit PNG of ``a``: ``(H, W)`` grey, ``(H, W, 2)`` grey+alpha, ``(H, W, 3)`` RGB, ``(H, W, 4)`` RGBA."""
    a = a[..., None] if a.ndim == 2 else a
    h, w, c = a.shape
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    if interlace:
        data = b"".join(_scanlines(a[y0::dy, x0::dx]) for x0, y0, dx, dy in _ADAM7 if a[y0::dy, x0::dx].size)
    else:
        data = _scanlines(a)
    path.write_bytes(_png(w, h, 16, colour_type, data, int(interlace)))
    return path


def rule(v: np.ndarray) -> np.ndarray:
    """The documented 16 -> 8 bit rule, round(v / 257), by floating point."""
    return np.round(v.astype(np.float64) / 257).astype(np.uint8)


def pixels(path: Path, **kw) -> np.ndarray:
    """``(H, W, 3)`` uint8 decoded at the stored size (no resampling)."""
    with Image.open(path) as im:
        size = max(im.size)
    return load_image(ImageSpec(path, None, size, **kw)).permute(1, 2, 0).numpy()


@pytest.fixture
def picture() -> np.ndarray:
    """``(24, 37, 3)`` uint16: smooth ramps plus noise over the full 16-bit range."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:24, 0:37]
    base = np.stack([x * 1771, y * 2849, (x + y) * 1092], axis=-1).astype(np.int64)
    return np.clip(base + rng.integers(-900, 900, base.shape), 0, 65535).astype(np.uint16)


# ----------------------------------------------------------------------------- bit depths


def test_16_bit_rule_on_exact_values(tmp_path):
    v = np.array([[0, 128, 129, 257, 2470, 32896, 65406, 65407, 65535]], dtype=np.uint16)
    p = tmp_path / "values.png"
    Image.fromarray(v).save(p)
    assert Image.open(p).mode == "I;16"
    got = pixels(p)[..., 0]
    np.testing.assert_array_equal(got, [[0, 0, 1, 1, 10, 128, 254, 255, 255]])
    np.testing.assert_array_equal(got, rule(v))
    # an 8-bit picture stored as 16 bits (k * 257) comes back exactly
    k = np.arange(256, dtype=np.uint16).reshape(16, 16)
    Image.fromarray(k * 257).save(p)
    np.testing.assert_array_equal(pixels(p)[..., 0], k)


@pytest.mark.parametrize("kind", ["png", "tiff", "tiff-big-endian", "pgm"])
def test_16_bit_grayscale_matches_its_8_bit_copy(tmp_path, picture, kind):
    v = picture[..., 1]  # (H, W) uint16
    p16, p8 = tmp_path / f"deep.{kind[:4]}", tmp_path / "copy.png"
    if kind == "pgm":  # Pillow reads 16-bit PGM as mode I
        p16.write_bytes(b"P5\n37 24\n65535\n" + v.astype(">u2").tobytes())
    else:
        Image.fromarray(v.astype(">u2") if kind == "tiff-big-endian" else v).save(p16)
    assert Image.open(p16).mode == {"png": "I;16", "tiff": "I;16", "tiff-big-endian": "I;16B", "pgm": "I"}[kind]
    Image.fromarray((v >> 8).astype(np.uint8)).save(p8)  # an 8-bit copy: the high bytes
    got, copy = pixels(p16), pixels(p8)
    assert np.abs(got.astype(int) - copy.astype(int)).max() <= 1
    np.testing.assert_array_equal(got, np.repeat(rule(v)[..., None], 3, axis=-1))
    assert got.std() > 20  # not all white (convert("RGB") clips I;16 to 255)


@pytest.mark.parametrize("interlace", [False, True])
def test_16_bit_rgb_png_matches_its_8_bit_copy(tmp_path, picture, interlace):
    p16 = write_png16(tmp_path / "deep.png", picture, interlace)
    with Image.open(p16) as im:  # what Pillow gives: 8-bit RGB, the high bytes
        assert im.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(im), picture >> 8)
    p8 = tmp_path / "copy.png"
    Image.fromarray(rule(picture)).save(p8)
    got = pixels(p16)
    assert np.abs(got.astype(int) - pixels(p8).astype(int)).max() <= 1
    np.testing.assert_array_equal(got, rule(picture))  # the full 16-bit value, not the high byte


def test_16_bit_png_with_alpha(tmp_path, picture):
    alpha = np.full(picture.shape[:2], 1234, np.uint16)
    rgba = write_png16(tmp_path / "rgba.png", np.dstack([picture, alpha]))
    np.testing.assert_array_equal(pixels(rgba), rule(picture))  # alpha dropped, as convert("RGB")
    grey = picture[..., 0]
    la = write_png16(tmp_path / "la.png", np.dstack([grey, alpha]))
    np.testing.assert_array_equal(pixels(la), np.repeat(rule(grey)[..., None], 3, axis=-1))


def test_float_image_rule(tmp_path):
    f = np.array([[0.4, 0.6, 127.49, 254.7, 300.0, -3.0, np.nan, np.inf]], np.float32)
    p = tmp_path / "float.tif"
    Image.fromarray(f).save(p)
    assert Image.open(p).mode == "F"
    np.testing.assert_array_equal(pixels(p)[..., 0], [[0, 1, 127, 255, 255, 0, 0, 255]])


# ---------------------------------------------------------------------------- colour modes


def test_palette_png(tmp_path):
    idx = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    im = Image.new("P", (3, 2))
    im.putdata(idx.ravel().tolist())
    im.putpalette([255, 0, 0, 0, 128, 0, 10, 20, 250])
    p = tmp_path / "pal.png"
    im.save(p, transparency=1)
    assert Image.open(p).mode == "P"
    palette = np.array([[255, 0, 0], [0, 128, 0], [10, 20, 250]], np.uint8)
    np.testing.assert_array_equal(pixels(p), palette[idx])  # transparency ignored


def test_rgba_alpha_is_dropped_like_pillow_convert(tmp_path):
    a = np.zeros((2, 2, 4), np.uint8)
    a[..., :3] = [[[200, 10, 30], [1, 2, 3]], [[4, 5, 6], [7, 8, 9]]]
    a[0, 0, 3] = 0  # fully transparent: keeps its stored colour
    a[1:, :, 3] = 128
    p = tmp_path / "rgba.png"
    Image.fromarray(a).save(p)
    np.testing.assert_array_equal(pixels(p), a[..., :3])
    la = tmp_path / "la.png"
    Image.fromarray(a[..., [0, 3]]).save(la)
    np.testing.assert_array_equal(pixels(la), np.repeat(a[..., :1], 3, axis=-1))


def test_cmyk_jpeg(tmp_path):
    cmyk = np.zeros((16, 32, 4), np.uint8)
    cmyk[:, :16, 0] = 255  # cyan
    cmyk[:, 16:, 1:3] = 255  # magenta + yellow = red
    p = tmp_path / "cmyk.jpg"
    Image.fromarray(cmyk, "CMYK").save(p, quality=95)
    assert Image.open(p).mode == "CMYK"
    got = pixels(p).astype(int)
    np.testing.assert_array_equal(got, np.asarray(Image.open(p).convert("RGB")))
    assert np.abs(got[4:12, 2:12] - [0, 255, 255]).max() <= 8
    assert np.abs(got[4:12, 20:30] - [255, 0, 0]).max() <= 8


# ---------------------------------------------------------------------------- EXIF


def _quadrants(w: int = 40, h: int = 30) -> np.ndarray:
    """``(h, w, 3)``: four flat colours, one per quadrant (survives JPEG)."""
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2, : w // 2] = (250, 0, 0)
    a[: h // 2, w // 2 :] = (0, 250, 0)
    a[h // 2 :, : w // 2] = (0, 0, 250)
    a[h // 2 :, w // 2 :] = (250, 250, 0)
    return a


def _with_orientation(path: Path, orientation: int, **save) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(_quadrants()).save(path, exif=exif, **save)
    return path


@pytest.mark.parametrize("orientation", [6, 3])
def test_exif_rotated_jpeg(tmp_path, orientation):
    p = _with_orientation(tmp_path / f"o{orientation}.jpg", orientation, quality=95)
    stored = ImageSpec(p, None, 40)
    upright = ImageSpec(p, None, 40, exif=True)
    # default: as stored on disk
    assert target_size(stored) == (40, 30) == tuple(load_image(stored).shape[2:0:-1])
    np.testing.assert_array_equal(load_image(stored).permute(1, 2, 0).numpy(), np.asarray(Image.open(p).convert("RGB")))
    # exif=True: upright, orientation 6 swaps width and height
    size = (30, 40) if orientation == 6 else (40, 30)
    assert target_size(upright) == size == tuple(load_image(upright).shape[2:0:-1])
    expected = np.asarray(ImageOps.exif_transpose(Image.open(p)).convert("RGB"))
    np.testing.assert_array_equal(load_image(upright).permute(1, 2, 0).numpy(), expected)
    # a query box is in upright pixels: the top-left 10 x 10 of the upright image
    crop = ImageSpec(p, (0, 0, 10, 10), 10, exif=True)
    assert target_size(crop) == (10, 10)
    np.testing.assert_array_equal(load_image(crop).permute(1, 2, 0).numpy(), expected[:10, :10])
    top_left = {6: (0, 0, 250), 3: (250, 250, 0)}[orientation]  # the stored bottom-left / bottom-right
    assert np.abs(expected[:10, :10].astype(int) - top_left).max() <= 8


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_as_exif_transpose(tmp_path, orientation):
    p = _with_orientation(tmp_path / "o.png", orientation)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(p)).convert("RGB"))
    spec = ImageSpec(p, None, 40, exif=True)
    got = load_image(spec).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(got, expected)
    assert target_size(spec) == expected.shape[1::-1]


def test_orientation_read_from_the_header_only(tmp_path, monkeypatch):
    jpg = _with_orientation(tmp_path / "o.jpg", 8)
    png = _with_orientation(tmp_path / "o.png", 5)

    def no_decoding(self):
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    assert target_size(ImageSpec(jpg, None, 40, exif=True)) == (30, 40)
    assert target_size(ImageSpec(png, None, 40, exif=True)) == (30, 40)
    assert target_size(ImageSpec(png, (0, 0, 30, 20), 15, exif=True)) == (15, 10)  # box inside the upright 30 x 40


@pytest.mark.filterwarnings("ignore:Corrupt EXIF")
def test_damaged_exif_means_as_stored(tmp_path):
    p = tmp_path / "bad-exif.jpg"
    Image.fromarray(_quadrants()).save(p, exif=b"Exif\x00\x00MM\x00\x2a\xff\xff\xff\xff")
    spec = ImageSpec(p, None, 40, exif=True)
    assert target_size(spec) == (40, 30) == tuple(load_image(spec).shape[2:0:-1])


# ---------------------------------------------------------------------------- pixel limit


def _bomb(path: Path, w: int = 30000, h: int = 30000) -> Path:
    """A tiny PNG whose header declares ``w x h`` 8-bit grey pixels (the data is one short row)."""
    path.write_bytes(_png(w, h, 8, 0, b"\x00" * 64))
    return path


def test_bomb_header_refused_without_decoding(tmp_path, monkeypatch):
    p = _bomb(tmp_path / "bomb.png")
    assert p.stat().st_size < 200
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 12_345_678)  # a user's own setting survives

    def no_decoding(self):
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    for call in (target_size, load_image):
        with pytest.raises(ValueError) as e:
            call(ImageSpec(p, None, 64))
        msg = str(e.value)
        assert msg.startswith(str(p)) and "\n" not in msg
        for part in (
            "30000x30000",
            "900,000,000",
            f"{DEFAULT_MAX_PIXELS:,}",
            "--max-pixels",
            "max_pixels=",
            "0 or None",
        ):
            assert part in msg
        assert Image.MAX_IMAGE_PIXELS == 12_345_678
    with pytest.raises(ValueError, match="30000x30000"):
        target_size(ImageSpec(p, (0, 0, 10, 10), 64, "full"))
    assert Image.MAX_IMAGE_PIXELS == 12_345_678


def test_pixel_limit_can_be_lifted(tmp_path):
    p = _bomb(tmp_path / "bomb.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning either
        assert target_size(ImageSpec(p, None, 64, max_pixels=None)) == (64, 64)
        assert target_size(ImageSpec(p, (0, 0, 3000, 1500), 64, max_pixels=0)) == (64, 32)
        assert target_size(ImageSpec(p, None, 64, max_pixels=30000 * 30000)) == (64, 64)
    with pytest.raises(OSError, match="^" + re.escape(f"{p}: cannot decode image")):  # header fine, pixel data missing
        load_image(ImageSpec(p, None, 64, max_pixels=None))


def test_pixel_limit_on_small_images(tmp_path):
    p = tmp_path / "small.png"
    Image.fromarray(_quadrants()).save(p)  # 40 x 30 = 1200 pixels
    assert load_image(ImageSpec(p, None, 40, max_pixels=1200)).shape == (3, 30, 40)
    for call in (target_size, load_image):
        with pytest.raises(ValueError, match="40x30 = 1,200 pixels is over the limit of 1,199"):
            call(ImageSpec(p, None, 40, max_pixels=1199))
    with pytest.raises(ValueError, match="max_pixels must be >= 0"):
        ImageSpec(p, None, 40, max_pixels=-1)


# ------------------------------------------------------------------------------- errors


def _one_line_from(e: BaseException, path: Path) -> str:
    msg = str(e)
    assert msg.startswith(f"{path}: ") and "\n" not in msg, msg
    again = pickle.loads(pickle.dumps(e))  # raised in DataLoader workers, re-raised in the main process
    assert type(again) is type(e) and str(again) == msg
    return msg


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file(tmp_path, fmt):
    p = tmp_path / f"cut.{fmt.lower()}"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(p, fmt)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    assert target_size(ImageSpec(p, None, 32)) == (32, 32)  # the header is intact
    with pytest.raises(OSError) as e:
        load_image(ImageSpec(p, None, 32))
    assert "truncated" in _one_line_from(e.value, p)
    p.write_bytes(data[:20])  # not even a header
    for call in (target_size, load_image):
        with pytest.raises(OSError) as e:
            call(ImageSpec(p, None, 32))
        _one_line_from(e.value, p)


def test_not_an_image_and_missing_file(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("these are\nnot pixels\n")
    for call in (target_size, load_image):
        with pytest.raises(OSError) as e:
            call(ImageSpec(p, None, 32))
        assert "not an image" in _one_line_from(e.value, p)
        missing = tmp_path / "nothing.jpg"
        with pytest.raises(FileNotFoundError) as e:
            call(ImageSpec(missing, None, 32))
        assert "not found" in _one_line_from(e.value, missing)
        with pytest.raises(OSError) as e:
            call(ImageSpec(tmp_path, None, 32))  # a folder
        _one_line_from(e.value, tmp_path)


def test_empty_box(tmp_path):
    p = tmp_path / "small.png"
    Image.fromarray(_quadrants()).save(p)
    for call in (target_size, load_image):
        with pytest.raises(ValueError) as e:
            call(ImageSpec(p, (50, 50, 60, 60), 20))
        assert "empty" in _one_line_from(e.value, p)


# ------------------------------------------------------------------------------- the spec


def test_spec_keeps_its_positional_fields_and_is_hashable(tmp_path):
    p = tmp_path / "a.png"
    spec = ImageSpec(p, (0, 0, 1, 1), 32, "full")
    assert (spec.path, spec.bbox, spec.size, spec.query_resize) == (p, (0, 0, 1, 1), 32, "full")
    assert spec.exif is False and spec.max_pixels == DEFAULT_MAX_PIXELS == 2 * 89_478_485
    assert ImageSpec(p, None, 32) == ImageSpec(p, None, 32, "crop", False, DEFAULT_MAX_PIXELS)
    assert len({spec, ImageSpec(p, (0, 0, 1, 1), 32, "full"), ImageSpec(p, (0, 0, 1, 1), 32, "full", exif=True)}) == 2
    with pytest.raises(AttributeError):
        spec.exif = True  # type: ignore[misc]


def test_decode_rgb_is_the_decoder_of_load_image(tmp_path, picture):
    p = write_png16(tmp_path / "deep.png", picture)
    img = decode_rgb(p)
    assert img.mode == "RGB" and img.size == (37, 24)
    np.testing.assert_array_equal(np.asarray(img), pixels(p))
