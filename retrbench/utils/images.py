"""Image decoding for every stage: how one file (and an optional query box) becomes a network input.

Images are resized so that the longer side is ``size`` (up or down, LANCZOS), optionally
cropped to a query box first (``crop``) or after resizing the whole image (``full``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = ["ImageSpec", "load_image", "target_size"]


@dataclass(frozen=True)
class ImageSpec:
    """How one image is turned into a network input.

    Attributes:
        path: image file.
        bbox: ``(x0, y0, x1, y1)`` crop in original pixels, or None.
        size: longer side after resizing.
        query_resize: ``crop`` (crop then resize the crop) or ``full`` (resize then crop).
    """

    path: Path
    bbox: tuple[float, float, float, float] | None
    size: int
    query_resize: str = "crop"


def _scaled(w: int, h: int, size: int) -> tuple[int, int]:
    s = size / max(w, h)
    return max(1, round(w * s)), max(1, round(h * s))


def _box(bbox: tuple[float, float, float, float], w: int, h: int, path: Path) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = (round(float(v)) for v in bbox)
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"{path}: query box {tuple(bbox)} is empty inside the {w}x{h} image")
    return x0, y0, x1, y1


def target_size(spec: ImageSpec) -> tuple[int, int]:
    """``(width, height)`` of the network input for ``spec``, read from the file header only."""
    try:
        with Image.open(spec.path) as im:
            w, h = im.size
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {spec.path}") from None
    except OSError as e:
        raise OSError(f"{spec.path}: cannot read image ({e})") from e
    if spec.bbox is None:
        return _scaled(w, h, spec.size)
    x0, y0, x1, y1 = _box(spec.bbox, w, h, spec.path)
    if spec.query_resize == "crop":
        return _scaled(x1 - x0, y1 - y0, spec.size)
    s = spec.size / max(w, h)
    return max(1, round(x1 * s) - round(x0 * s)), max(1, round(y1 * s) - round(y0 * s))


def load_image(spec: ImageSpec) -> torch.Tensor:
    """Decode, crop and resize one image; ``(3, H, W)`` uint8 RGB tensor."""
    try:
        with Image.open(spec.path) as im:
            img = im.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {spec.path}") from None
    except OSError as e:
        raise OSError(f"{spec.path}: cannot decode image ({e})") from e
    w, h = img.size
    if spec.bbox is not None and spec.query_resize == "crop":
        img = img.crop(_box(spec.bbox, w, h, spec.path))
        img = img.resize(_scaled(*img.size, spec.size), Image.Resampling.LANCZOS)
    elif spec.bbox is not None:
        x0, y0, x1, y1 = _box(spec.bbox, w, h, spec.path)
        img = img.resize(_scaled(w, h, spec.size), Image.Resampling.LANCZOS)
        s = spec.size / max(w, h)
        img = img.crop((round(x0 * s), round(y0 * s), round(x1 * s), round(y1 * s)))
    else:
        img = img.resize(_scaled(w, h, spec.size), Image.Resampling.LANCZOS)
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)
