"""The dataset registry and where data lives on disk."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..registry import Registry
from ..types import RetrievalDataset

__all__ = ["DATASETS", "DatasetInfo", "default_data_root", "default_cache_root"]


@dataclass(frozen=True)
class DatasetInfo:
    """Metadata carried on a dataset registry entry.

    Attributes:
        protocol: evaluation protocol name (``revisited``, ``classic``, ``ukbench``, ``map``).
        layout: where the files are expected, relative to the data root.
        description: one line for ``retrbench datasets``.
        image_size: longer image side used when neither the user nor the run gives one; None
            falls back to the backbone's default (1024 for most, as the literature uses).
    """

    protocol: str
    layout: str
    description: str
    image_size: int | None = None


# Factories take ``data_root: Path`` (plus keyword options) and return a RetrievalDataset.
DATASETS: Registry[RetrievalDataset] = Registry("dataset")


def default_data_root() -> Path:
    """``$RETRBENCH_DATA`` if set, else ``~/.cache/retrbench/data``."""
    env = os.environ.get("RETRBENCH_DATA")
    return Path(env).expanduser() if env else default_cache_root() / "data"


def default_cache_root() -> Path:
    """``$RETRBENCH_CACHE`` if set, else ``$XDG_CACHE_HOME/retrbench`` (``~/.cache/retrbench``)."""
    env = os.environ.get("RETRBENCH_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "retrbench"
