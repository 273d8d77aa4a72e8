"""Chance-level baseline: descriptors that carry no visual information."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from .base import BACKBONES, Backbone, BackboneInfo, finish

__all__ = ["RandomFeatures"]

def _two_cells(side: int) -> int:
    """The map is always 2x2, whatever the input size."""
    return 2


_INFO = BackboneInfo(
    label="Random",
    order=90,
    help="chance-level baseline: pseudo-random descriptors seeded by the pixels (no weights)",
    channels=512,
    stride=1,
    mean=(0.0, 0.0, 0.0),
    std=(1.0, 1.0, 1.0),
    default_size=256,
    weights_source="none: pseudo-random descriptors (chance level)",
    licence="n/a",
    card="random.md",
    feature_size=_two_cells,
)


class RandomFeatures(nn.Module):
    """Maps each image to a fixed pseudo-random ``(channels, 2, 2)`` map seeded by its pixels.

    The same input always gives the same map; any change of the pixels (another view, another
    crop) gives an unrelated one, so retrieval with these descriptors measures chance level.
    """

    def __init__(self, channels: int = 512) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, C, 2, 2)
        maps = []
        for img in x:
            digest = hashlib.sha256(img.detach().cpu().contiguous().numpy().tobytes()).digest()
            g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
            maps.append(torch.rand(self.channels, 2, 2, generator=g))
        return torch.stack(maps).to(x.device)


@BACKBONES.register("random", aliases=("chance",), info=_INFO)
def build_random(weights: str | Path | None = None, pretrained: bool = True) -> Backbone:
    """Chance-level baseline: pseudo-random descriptors (no weights)."""
    if weights is not None:
        raise ValueError("the 'random' baseline takes no weights")
    return finish(RandomFeatures(_INFO.channels), _INFO, "random", "random-descriptors")
