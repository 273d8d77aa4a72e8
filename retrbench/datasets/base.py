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
        image_size: image size used when the run gives none; None: the common default
            (``retrbench.datasets.DEFAULT_IMAGE_SIZE``, 1024 as the literature uses). It never
            depends on the model: every model gets the same resolution on the same dataset.
        resize: the resize mode used when the run gives none (``longer``, ``cirtorch``; see
            :mod:`retrbench.utils.images`): ``cirtorch`` for the Oxford / Paris family, whose
            published numbers come from cirtorch's and revisitop's code.
    """

    protocol: str
    layout: str
    image_size: int | None = None
    resize: str = "longer"


# Entries: factories ``(data_root: str | Path | None = None, **options) -> RetrievalDataset``.
# Resolvers: ``folder:PATH`` (see :mod:`retrbench.datasets.folder`).
DATASETS: Registry[RetrievalDataset] = Registry("dataset", info_type=DatasetInfo)
