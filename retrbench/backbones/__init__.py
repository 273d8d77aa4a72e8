"""Backbones: registry entries that build a network returning its last-convolution feature map."""

from . import baseline, efficientnet  # noqa: F401  (registers entries)
from .base import BACKBONES, Backbone, BackboneInfo, local_weights

__all__ = ["BACKBONES", "Backbone", "BackboneInfo", "local_weights"]
