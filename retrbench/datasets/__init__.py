"""Datasets: registry entries that build a :class:`~retrbench.types.RetrievalDataset`."""

from . import coil20, demo, distractors, gldv2, instre, oxford, ukbench  # noqa: F401  (registers datasets)
from .base import DATASETS, DatasetInfo, default_cache_root, default_data_root
from .groundtruth import UnsafePickleError, load_gnd_pickle, safe_load_pickle

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "default_cache_root",
    "default_data_root",
    "UnsafePickleError",
    "load_gnd_pickle",
    "safe_load_pickle",
]
