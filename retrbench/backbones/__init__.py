"""Backbones: networks that return their last-convolution feature map, built by one registry.

``BACKBONES.create(name, weights=None, pretrained=True)`` builds a registry entry
(``BACKBONES.list()``: ``resnet50``, ``simclr2x``, ``amdim``, ``gem_ap_r101`` ...) or a resolved
name (``timm:NAME``, ``hf-hub:ORG/REPO``, ``hub:REPO:ENTRY``); a weights file given as the
model is refused with a message saying to pass it as ``weights``.

Adding a backbone: one module that registers its factory with a :class:`BackboneInfo`
(``label``, ``order``, ``help``, channels, stride, normalisation, weights source) and one
import line below; ``tests/backbones/test_registry.py`` then builds and runs it.
"""

from . import (  # noqa: F401
    amdim,
    baseline,
    cirtorch,
    clip,
    dino,
    dinov2,
    efficientnet,
    external,
    gem_ap,
    insclr,
    moco,
    mocov3,
    openclip,
    resnet,
    simclr,
)
from .base import BACKBONES, Backbone, BackboneInfo, local_weights
from .native import NativeBackbone
from .vit import TokenBackbone

__all__ = ["BACKBONES", "Backbone", "BackboneInfo", "NativeBackbone", "TokenBackbone", "local_weights"]
