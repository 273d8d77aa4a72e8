"""Backbones: registry entries that build a network returning its last-convolution feature map."""

from . import efficientnet  # noqa: F401  (registers entries)
from .base import BACKBONES, Backbone, BackboneInfo

__all__ = ["BACKBONES", "Backbone", "BackboneInfo"]
