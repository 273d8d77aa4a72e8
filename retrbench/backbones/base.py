"""The backbone registry: every model gives its unpooled last-convolution feature map."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..registry import Registry

__all__ = ["BACKBONES", "BackboneInfo", "Backbone", "local_weights"]


@dataclass(frozen=True)
class BackboneInfo:
    """Metadata carried on a backbone registry entry (and on every built model).

    Attributes:
        channels: channels ``C`` of the feature map.
        stride: total stride of the feature map relative to the input.
        mean, std: per-channel input normalisation applied to [0, 1] RGB inputs.
        default_size: longer image side used when the user gives none.
        weights_source: human-readable origin of the weights.
        weights_file: file name of the published checkpoint.
        url: where the published checkpoint is downloaded from (None: not downloadable).
        sha256: published checksum of that file (None: unknown).
        licence: licence of the weights.
        card: path of the model card, relative to the repository's ``models/``.
        find_local: returns a local copy of the weights shipped outside the cache (e.g. inside
            an installed package), or None.
    """

    channels: int
    stride: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    default_size: int = 1024
    weights_source: str = ""
    weights_file: str | None = None
    url: str | None = None
    sha256: str | None = None
    licence: str = ""
    card: str = ""
    find_local: Callable[[], Path | None] | None = field(default=None, compare=False, repr=False)


class Backbone(nn.Module):
    """A network wrapped to return its feature map.

    ``forward(x)`` takes a normalised ``(B, 3, H, W)`` batch and returns ``(B, C, H', W')``
    with ``H' ~ H / stride``. ``weights_id`` is the sha256 of the weights file (or
    ``"random-init"``) and keys the feature cache.
    """

    def __init__(self, net: nn.Module, info: BackboneInfo, name: str, weights_id: str) -> None:
        super().__init__()
        self.net = net
        self.info = info
        self.name = name
        self.weights_id = weights_id

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self.net, "forward_features"):
            return self.net.forward_features(x)
        return self.net(x)


# Factories: ``factory(weights: str | Path | None = None, pretrained: bool = True) -> Backbone``.
BACKBONES: Registry[Backbone] = Registry("backbone")


def local_weights(name: str) -> Path | None:
    """Where the weights of entry ``name`` are on this machine without downloading, or None.

    Looks at the entry's own finder (weights shipped in a package) and the weights cache.
    """
    from .weights import default_cache_dir

    info: BackboneInfo = BACKBONES.get(name).info
    if info.find_local is not None:
        found = info.find_local()
        if found is not None:
            return found
    if info.weights_file:
        cached = default_cache_dir() / info.weights_file
        if cached.is_file():
            return cached
    return None
