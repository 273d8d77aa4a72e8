"""Datasets: registry entries (and the ``folder:PATH`` resolver) that build a
:class:`~retrbench.types.RetrievalDataset`.

One builder: ``DATASETS.create(name, data_root=..., **options)`` for a registry name or
``folder:PATH``; :func:`load_dataset` is the same with the CLI's ``allow_missing`` flag and a
clear error for options the dataset does not take. A dataset only names its evaluation
protocol (``info.protocol``); :mod:`retrbench.evaluation` owns the metrics.

Adding a dataset: one module here that registers a factory
``(data_root=None, **options) -> RetrievalDataset`` with a :class:`DatasetInfo` (protocol,
layout, label, order, help), plus its import line below.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..types import RetrievalDataset

# Importing the modules registers their datasets (and the folder: resolver).
from . import coil20, demo, distractors, folder, gldv2, instre, oxford, ukbench  # noqa: F401
from .base import DATASETS, DatasetInfo
from .groundtruth import UnsafePickleError, load_gnd_pickle, safe_load_pickle

__all__ = [
    "DATASETS",
    "DEFAULT_IMAGE_SIZE",
    "DatasetInfo",
    "UnsafePickleError",
    "dataset_label",
    "default_image_size",
    "default_resize",
    "load_dataset",
    "load_gnd_pickle",
    "safe_load_pickle",
]


def load_dataset(
    name: str,
    data_root: str | Path | None = None,
    allow_missing: bool = False,
    **options: Any,
) -> RetrievalDataset:
    """Build the registered dataset ``name`` (or ``folder:PATH``) from ``data_root``.

    ``options`` are passed to the dataset's factory (e.g. ``max_distractors=1000``);
    ``allow_missing=True`` is passed only when set, so datasets without the option still load.

    Raises:
        KeyError: unknown name (with the closest known names).
        ValueError: an option the dataset does not take (naming the dataset and the options).
    """
    if allow_missing:
        options["allow_missing"] = True
    if data_root is not None:
        options["data_root"] = Path(data_root)
    try:
        return DATASETS.create(name, **options)
    except TypeError as e:
        if "unexpected keyword" in str(e):
            shown = DATASETS.get(name).name if name in DATASETS else name
            raise ValueError(f"dataset {shown!r} does not take the option(s) {sorted(options)}: {e}") from None
        raise


DEFAULT_IMAGE_SIZE = 1024  # the image size of the revisitop / cirtorch protocol, for every model


def default_image_size(name: str) -> int:
    """The image size a dataset asks for when the run gives none: its ``info.image_size``, else
    :data:`DEFAULT_IMAGE_SIZE` (also for ``folder:PATH``). Never the model's: a table that mixes
    registry, ``timm:`` and ``hub:`` models compares them at one resolution."""
    if DATASETS.find_resolver(name) is not None:
        return DEFAULT_IMAGE_SIZE
    return DATASETS.get(name).info.image_size or DEFAULT_IMAGE_SIZE


def default_resize(name: str) -> str:
    """The resize mode a dataset asks for when the run gives none (``info.resize``; ``longer``
    for ``folder:PATH``)."""
    if DATASETS.find_resolver(name) is not None:
        return "longer"
    return DATASETS.get(name).info.resize


def dataset_label(name: str) -> str:
    """Display name in tables: the entry's ``label`` (``roxford5k`` -> ``rOxford 5k``), the
    folder's name for ``folder:PATH``, else ``name`` as given."""
    res = DATASETS.find_resolver(name)
    if res is not None and res.prefix == "folder:":
        return Path(res.rest(name)).name or name
    return DATASETS.label(name)
