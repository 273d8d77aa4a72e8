"""Extraction stage: images -> backbone feature maps -> pooled ``(N, C)`` descriptors, cached.

:mod:`.core` plans the batches and runs the network (multi-scale, mixed precision, workers);
:mod:`.store` is the resumable, memory-mapped on-disk store of one descriptor set.
"""

from .core import DTYPES, ImageSpec, describe, extract, load_image, plan_batches, resolve_device, target_size
from .store import CACHE_FORMAT, CacheWarning, FeatureCache

__all__ = [
    "CACHE_FORMAT",
    "CacheWarning",
    "DTYPES",
    "FeatureCache",
    "ImageSpec",
    "describe",
    "extract",
    "load_image",
    "plan_batches",
    "resolve_device",
    "target_size",
]
