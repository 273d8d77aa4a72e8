"""Shared by the training tests: a tiny seeded network, a folder of instance views, a small config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from retrbench.backbones import Backbone, BackboneInfo
from retrbench.train.config import InsCLRConfig

CFG = InsCLRConfig(
    model="tiny", dataset="synthetic", image_size=32, stages=(3, 3), lr=(1e-3, 5e-4), candidates_k=6, tuple_k=2,
    tuples_per_batch=3, selection_threshold=0.5, mining_min_sim=0.5, workers=0, checkpoint_every=2, batch_size_extract=8,
)  # fmt: skip
"""Two stages of three steps, a checkpoint every two steps: 9 images per step out of 20."""


class Tiny(nn.Module):
    """Two strided convolutions and a BatchNorm: ``(B, 3, H, W) -> (B, 16, H/4, W/4)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 2, 1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, 2, 1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


def tiny() -> Backbone:
    """A :class:`Tiny` with the same initial weights at every call."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Backbone(Tiny(), BackboneInfo(16, 4, (0.5,) * 3, (0.5,) * 3), "tiny", "tiny-init")


def write_views(root: Path) -> tuple[list[Path], np.ndarray]:
    """4 'instances' (blocky colour patterns) x 5 noisy views as 48x40 PNGs; returns (paths, instance labels)."""
    rng = np.random.default_rng(0)
    paths, labels = [], []
    for c in range(4):
        base = np.asarray(Image.fromarray(rng.integers(0, 255, (6, 6, 3)).astype(np.uint8)).resize((48, 40), Image.Resampling.NEAREST))
        for v in range(5):
            view = np.clip(base.astype(int) + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
            paths.append(root / f"c{c}_v{v}.png")
            Image.fromarray(view).save(paths[-1])
            labels.append(c)
    return paths, np.array(labels)


def load(path: Path) -> dict:
    """A ``.pth`` file written by training (tensors only)."""
    return torch.load(path, map_location="cpu", weights_only=True)
