"""Backbones: registry entries that build a network returning its last-convolution feature map."""

from .base import BACKBONES, Backbone, BackboneInfo

__all__ = ["BACKBONES", "Backbone", "BackboneInfo"]
