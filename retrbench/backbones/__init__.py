"""Backbones: networks that return a ``(B, C, h, w)`` feature map, built by one registry.

Convolutional networks give their last-convolution map; vision transformers (DINOv2, DINO,
MoCo v3, CLIP, timm / open_clip token models) their patch tokens after the final norm, laid out
on the patch grid, with the class token (or the model's own embedding) as ``native``
(:mod:`retrbench.backbones.vit`). ``BackboneInfo.patch_size`` / ``input_rule`` say which.

``BACKBONES.create(name, weights=None, pretrained=True)`` builds a registry entry
(``BACKBONES.list()``: ``resnet50``, ``simclr2x``, ``amdim``, ``gem_ap_r101``, ``dinov2_vitb14`` ...)
or a resolved name (``timm:NAME``, ``hf-hub:ORG/REPO``, ``hub:REPO:ENTRY``, ``open_clip:ARCH:TAG``);
a weights file given as the model is refused with a message saying to pass it as ``weights``.

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
