"""Training images: an augmented and an un-augmented view of every batch image.

* augmented: a random resized crop (torchvision's ``RandomResizedCrop`` parameters, drawn from a
  numpy generator) to ``image_size`` squared, BILINEAR, and a random horizontal flip;
* un-augmented: the whole image with its longer side ``image_size`` (what ``retrbench run`` and
  the candidate-set descriptors see: :func:`retrbench.utils.images.load_image`).

The randomness of an item depends only on ``(seed, stage, step, slot)``
(:func:`retrbench.train.tuples.step_rng`), so the views of a step are the same in any worker
process and after a resume.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..utils.images import ImageSpec, decode_rgb, load_image
from .config import InsCLRConfig
from .tuples import step_rng

__all__ = ["TrainViews", "collate", "random_resized_crop"]

# step_rng streams: augmentations of the training steps, and of the memory initialisation
_STEP_STREAM = 2
_MEMORY_INIT_STREAM = 3


def random_resized_crop(w: int, h: int, scale: tuple[float, float], ratio: tuple[float, float], rng: np.random.Generator) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` as torchvision's ``RandomResizedCrop.get_params``, drawn from ``rng``."""
    area = w * h
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_r))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return x0, y0, x0 + cw, y0 + ch
    in_ratio = w / h  # fallback: central crop within the ratio range
    if in_ratio < ratio[0]:
        cw, ch = w, round(w / ratio[0])
    elif in_ratio > ratio[1]:
        cw, ch = round(h * ratio[1]), h
    else:
        cw, ch = w, h
    x0, y0 = (w - cw) // 2, (h - ch) // 2
    return x0, y0, x0 + cw, y0 + ch


class TrainViews(torch.utils.data.Dataset):
    """Item ``(index, stage, step, slot)`` -> augmented ``(3, S, S)`` and un-augmented ``(3, H, W)`` uint8 views, and ``index``.

    Args:
        paths: the training images; ``index`` is a position in it.
        cfg: image size, augmentation parameters and seed.
        exif: apply the images' EXIF orientation (as ``retrbench run`` does for the dataset).
    """

    def __init__(self, paths: Sequence[Path], cfg: InsCLRConfig, *, exif: bool = False) -> None:
        self.paths = list(paths)
        self.cfg = cfg
        self.exif = exif

    def __len__(self) -> int:
        return len(self.paths)

    def augmented(self, i: int, rng: np.random.Generator) -> Tensor:
        """Augmented ``(3, S, S)`` uint8 view of image ``i`` (``S = image_size``), drawn from ``rng``."""
        c, s = self.cfg, self.cfg.image_size
        img = decode_rgb(self.paths[i], exif=self.exif)  # 16-bit, palette, CMYK ... as extraction reads them
        box = random_resized_crop(img.width, img.height, c.aug_scale, c.aug_ratio, rng)
        img = img.resize((s, s), Image.Resampling.BILINEAR, box=box)
        if c.hflip and rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)

    def plain(self, i: int) -> Tensor:
        """Un-augmented ``(3, H, W)`` uint8 view of image ``i``, longer side ``image_size``."""
        return load_image(ImageSpec(self.paths[i], None, self.cfg.image_size, exif=self.exif))

    def memory_view(self, i: int, stage: int) -> Tensor:
        """The augmented view of image ``i`` that fills the memory at the start of ``stage`` (``memory_init=augmented``)."""
        return self.augmented(i, step_rng(self.cfg.seed, _MEMORY_INIT_STREAM, stage, i))

    def __getitem__(self, key: tuple[int, int, int, int]) -> tuple[Tensor, Tensor, int]:
        i, stage, step, slot = key
        rng = step_rng(self.cfg.seed, _STEP_STREAM, stage, step, slot)
        return self.augmented(i, rng), self.plain(i), i


def collate(items: list[tuple[Tensor, Tensor, int]]) -> tuple[Tensor, list[Tensor], Tensor]:
    """Items of :class:`TrainViews` -> ``(B, 3, S, S)`` augmented, ``B`` un-augmented views, ``(B,)`` indices."""
    return torch.stack([a for a, _, _ in items]), [p for _, p, _ in items], torch.tensor([i for _, _, i in items], dtype=torch.long)
