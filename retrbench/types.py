"""Small typed values that flow between pipeline stages.

Conventions (as faiss): descriptors are ``(N, D)`` float32 C-contiguous rows; search results
are ``(Q, K)`` arrays, best first, with index ``-1`` (and score ``-inf``) where there is nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["Features", "SearchResult", "Metric", "Query", "RetrievalDataset", "as_rows"]


def as_rows(x: np.ndarray, name: str = "features") -> np.ndarray:
    """Return ``x`` as a float32 C-contiguous ``(N, D)`` array, or raise naming ``name``."""
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D (N, D) array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{name}: expected floating point values, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.float32)


@dataclass(frozen=True, eq=False)
class Features:
    """Descriptors of a list of images.

    Attributes:
        vectors: ``(N, D)`` float32, one row per image, in the order of ``ids``.
        ids: ``N`` image identifiers (paths relative to the dataset root).
    """

    vectors: np.ndarray
    ids: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "vectors", as_rows(self.vectors))
        object.__setattr__(self, "ids", tuple(self.ids))
        if len(self.ids) != self.vectors.shape[0]:
            raise ValueError(f"Features: {len(self.ids)} ids for {self.vectors.shape[0]} vectors")

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    def with_vectors(self, vectors: np.ndarray) -> Features:
        """Same ids, new ``(N, D')`` vectors."""
        return Features(vectors, self.ids)


@dataclass(frozen=True, eq=False)
class SearchResult:
    """Nearest neighbours of ``Q`` queries.

    Attributes:
        scores: ``(Q, K)`` float32 similarities, best first (``-inf`` where nothing).
        indices: ``(Q, K)`` int64 database row indices, best first (``-1`` where nothing).
    """

    scores: np.ndarray
    indices: np.ndarray

    def __post_init__(self) -> None:
        s = np.ascontiguousarray(self.scores, dtype=np.float32)
        i = np.ascontiguousarray(self.indices, dtype=np.int64)
        if s.shape != i.shape or s.ndim != 2:
            raise ValueError(f"SearchResult: scores {s.shape} and indices {i.shape} must be equal (Q, K)")
        object.__setattr__(self, "scores", s)
        object.__setattr__(self, "indices", i)

    @property
    def k(self) -> int:
        return int(self.indices.shape[1])


@dataclass(frozen=True)
class Metric:
    """One evaluated number.

    Attributes:
        split: ``"easy"``, ``"medium"``, ``"hard"`` for the revisited protocol, else ``"all"``.
        name: ``"mAP"``, ``"mP@5"``, ``"N-S"``, ``"mAP@100"``, ``"R@1"``, ...
        value: percentages for mAP / mP@k / recall (0-100, as the literature reports them);
            the N-S score as the mean number of relevant images in the top 4 (0-4).
    """

    split: str
    name: str
    value: float


@dataclass(frozen=True)
class Query:
    """A query image and its region of interest.

    Attributes:
        image: path relative to the dataset root.
        bbox: ``(x0, y0, x1, y1)`` in original-image pixels, or None for the whole image.
    """

    image: str
    bbox: tuple[float, float, float, float] | None = None


@dataclass(frozen=True, eq=False)
class RetrievalDataset:
    """A retrieval benchmark: database images, queries and per-query ground truth.

    Attributes:
        name: registry name (e.g. ``"roxford5k"``).
        root: directory that image paths are relative to.
        images: database image paths, relative to ``root`` (index ``i`` = database row ``i``).
        queries: the queries, in ground-truth order.
        gnd: per query a dict of int64 database-index arrays; keys depend on ``protocol``:
            ``revisited``: ``easy``, ``hard``, ``junk``; ``classic`` / ``map`` / ``ukbench``:
            ``ok``, ``junk``.
        protocol: evaluation protocol name (see ``retrbench.evaluation.PROTOCOLS``).
        notes: every choice that affects the numbers (query cropping, resizing, ...), stored
            with each result row.
        exif_orientation: whether the images' EXIF orientation is applied unless the run says
            otherwise: True for users' photos (``folder:``), False for the benchmarks, which the
            reference code reads as stored.
    """

    name: str
    root: Path
    images: tuple[str, ...]
    queries: tuple[Query, ...]
    gnd: tuple[Mapping[str, np.ndarray], ...]
    protocol: str
    notes: Mapping[str, str] = field(default_factory=dict)
    exif_orientation: bool = False

    def __post_init__(self) -> None:
        if len(self.gnd) != len(self.queries):
            raise ValueError(f"{self.name}: {len(self.gnd)} ground-truth entries for {len(self.queries)} queries")
