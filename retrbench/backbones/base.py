"""The backbone registry: every model gives an unpooled feature map (last convolution, or patch tokens).

:data:`BACKBONES` builds registry entries (``resnet50``, ``amdim``, ...) and, through the
resolvers of :mod:`retrbench.backbones.external`, ``timm:NAME``, ``hf-hub:ORG/REPO`` and
``hub:REPO:ENTRY``: ``BACKBONES.create(name, weights=..., pretrained=...)`` is the one builder.
Each entry carries a :class:`BackboneInfo` (display label, table order, help line, feature-map
geometry, input normalisation, where the weights come from), and so does each built
:class:`Backbone` (``backbone.info``).

Also here, for the entry modules: :func:`seeded` / :func:`new_network` (the same random
network every time, or uninitialised memory to be loaded) and :func:`finish` (eval mode,
gradients off).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from ..registry import EntryInfo, Registry
from ..utils.paths import weights_cache_dir

__all__ = [
    "BACKBONES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INPUT_ANY",
    "INPUT_RESIZE_TO_PATCHES",
    "Backbone",
    "BackboneInfo",
    "finish",
    "local_weights",
    "new_network",
    "refuse_weights_with_random",
    "seeded",
]

T = TypeVar("T")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

INPUT_ANY = "any"
"""``BackboneInfo.input_rule`` of networks that take every input size as it is (convolutional)."""
INPUT_RESIZE_TO_PATCHES = "resize-to-patch-multiple"
"""``BackboneInfo.input_rule`` of token models: the normalised batch is resized bilinearly so that each
side is the nearest multiple of the patch size (at least one patch); see :mod:`retrbench.backbones.vit`."""


@dataclass(frozen=True)
class BackboneInfo(EntryInfo):
    """Metadata carried on a backbone registry entry (and on every built model).

    Besides :class:`~retrbench.registry.EntryInfo`'s ``label`` (the paper's display name),
    ``order`` (the paper's row order) and ``help`` (one CLI line):

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
        feature_size: cells of the feature map along an input side of ``n`` pixels, for maps
            that are not ``ceil(n / stride)`` (unpadded convolutions, fixed-size maps); see
            :meth:`map_side`.
        patch_size: side of the square patches of a token model (vision transformer), whose
            map is one cell per patch; None for convolutional networks.
        input_rule: how an input of any size is fitted to the network, recorded with results:
            :data:`INPUT_ANY` (taken as it is) or :data:`INPUT_RESIZE_TO_PATCHES` (each side
            resized to the nearest multiple of ``patch_size``, bilinearly, inside the backbone).
        native_descriptor: what ``backbone.native(x)`` returns (``--pooling native``), e.g.
            "class token after the final LayerNorm"; empty when not described here.
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
    feature_size: Callable[[int], int] | None = field(default=None, compare=False, repr=False)
    patch_size: int | None = None
    input_rule: str = INPUT_ANY
    native_descriptor: str = ""

    def map_side(self, n: int) -> int:
        """Cells of the feature map along an input side of ``n`` pixels (``ceil(n / stride)`` by default)."""
        return self.feature_size(n) if self.feature_size is not None else math.ceil(n / self.stride)


class Backbone(nn.Module):
    """A network wrapped to return its feature map.

    ``forward(x)`` takes a normalised ``(B, 3, H, W)`` batch and returns ``(B, C, H', W')``
    with ``H' = info.map_side(H)`` (about ``H / stride``). ``weights_id`` is the sha256 of the
    weights file (or ``"random-init"``) and keys the feature cache; ``info.label`` is the name
    written in result tables.
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


# Entry factories: ``factory(weights: str | Path | None = None, pretrained: bool = True) -> Backbone``;
# resolvers: ``factory(rest_of_the_name, weights=None, pretrained=True) -> Backbone``.
BACKBONES: Registry[Backbone] = Registry("backbone", info_type=BackboneInfo)


def local_weights(name: str) -> Path | None:
    """Where the weights of entry ``name`` are on this machine without downloading, or None.

    Looks at the entry's own finder (weights shipped in a package) and the weights cache.
    """
    info: BackboneInfo = BACKBONES.get(name).info
    if info.find_local is not None:
        found = info.find_local()
        if found is not None:
            return found
    if info.weights_file:
        cached = weights_cache_dir() / info.weights_file
        if cached.is_file():
            return cached
    return None


# --------------------------------------------------------------------------------------------
# Building


def seeded(make: Callable[[], T]) -> T:
    """``make()`` with torch's CPU generator seeded to 0 (restored afterwards): the same random network every time."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return make()


def new_network(make: Callable[[], nn.Module], *, pretrained: bool) -> nn.Module:
    """Build a network: seeded random init (``pretrained=False``), or uninitialised CPU memory to be loaded.

    With ``pretrained=True`` the module is built on the ``meta`` device and given empty CPU
    storage (no random init: SimCLR 4x has 375M parameters); the caller then overwrites every
    parameter and buffer (``weights.load_into`` guarantees it).
    """
    if not pretrained:
        return seeded(make)
    with torch.device("meta"):
        net = make()
    return net.to_empty(device="cpu")


def refuse_weights_with_random(weights: Any) -> None:
    """``ValueError`` when ``weights`` is given together with ``pretrained=False``."""
    if weights is not None:
        raise ValueError("weights= was given together with pretrained=False; pass one or the other")


def finish(
    net: nn.Module, info: BackboneInfo, name: str, weights_id: str, cls: type[Backbone] = Backbone, **kw: Any
) -> Backbone:
    """Wrap ``net`` as an eval-mode backbone (``cls``, given ``**kw``) with gradients off."""
    net.requires_grad_(False)
    return cls(net, info, name, weights_id, **kw).eval()
