"""The dataset registry and the metadata every dataset entry carries."""

from __future__ import annotations

from dataclasses import dataclass

from ..registry import EntryInfo, Registry
from ..types import RetrievalDataset

__all__ = ["DATASETS", "DatasetInfo"]


@dataclass(frozen=True)
class DatasetInfo(EntryInfo):
    """Metadata carried on a dataset registry entry (plus ``label``, ``order``, ``help``).

    Attributes:
        protocol: evaluation protocol name, a key of ``retrbench.evaluation.PROTOCOLS``
            (``revisited``, ``classic``, ``ukbench``, ``map``, ``gldv2``); the dataset only
            names it, the evaluation stage owns the metric.
        layout: where the files are expected, relative to the data root (``<data_root>`` may
            appear in it, to be replaced by the actual root).
        image_size: longer image side used when neither the user nor the run gives one; None
            falls back to the backbone's default (1024 for most, as the literature uses).
    """

    protocol: str
    layout: str
    image_size: int | None = None


# Entries: factories ``(data_root: str | Path | None = None, **options) -> RetrievalDataset``.
# Resolvers: ``folder:PATH`` (see :mod:`retrbench.datasets.folder`).
DATASETS: Registry[RetrievalDataset] = Registry("dataset", info_type=DatasetInfo)
