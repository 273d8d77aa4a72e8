"""Backbones: registry entries that build a network returning its last-convolution feature map."""

from . import amdim, baseline, efficientnet, external, finetuned, resnet  # noqa: F401  (registers entries)
from .base import BACKBONES, Backbone, BackboneInfo, local_weights
from .external import create_backbone

__all__ = ["BACKBONES", "Backbone", "BackboneInfo", "create_backbone", "local_weights"]
