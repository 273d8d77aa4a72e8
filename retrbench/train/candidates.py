"""InsCLR step 1, candidate sets: each image's top-``K`` neighbours under the current model.

Before a training stage every image is described with the model (the un-augmented image,
resized so its longer side is the training size, GeM-pooled and L2-normalised: exactly the
descriptor the un-augmented memory bank holds during training), then an exact faiss
inner-product search over the whole collection gives each image its ``K`` nearest other
images, best first. InsCLR assumes an image's positives lie only in its candidate set; the
candidates that are not positives are its hard negatives.

Both halves are cached and resumable: the descriptors through
:class:`retrbench.extraction.FeatureCache` (finished batches are kept, so an interrupted
extraction resumes), the candidate sets as one ``.npz`` written atomically.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..extraction import FeatureCache, extract
from ..pooling import gem
from ..utils.images import ImageSpec
from ..utils.io import atomic_write
from ..utils.linalg import exact_knn, l2_normalize

__all__ = ["CandidateSets", "candidate_sets", "describe", "load_or_compute"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class CandidateSets:
    """The top-``K`` neighbours of every image of a collection (itself excluded), best first.

    Attributes:
        indices: ``(N, K)`` int64 image indices; ``-1`` where fewer than ``K`` others exist.
        scores: ``(N, K)`` float32 similarities (inner products of L2-normalised
            descriptors); ``-inf`` where the index is ``-1``.
    """

    indices: np.ndarray
    scores: np.ndarray

    def __post_init__(self) -> None:
        i = np.ascontiguousarray(self.indices, dtype=np.int64)
        s = np.ascontiguousarray(self.scores, dtype=np.float32)
        if i.ndim != 2 or i.shape != s.shape:
            raise ValueError(f"CandidateSets: indices {i.shape} and scores {s.shape} must be equal (N, K)")
        object.__setattr__(self, "indices", i)
        object.__setattr__(self, "scores", s)

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    @property
    def k(self) -> int:
        """``K``, the candidate-set size."""
        return int(self.indices.shape[1])

    def of(self, i: int) -> np.ndarray:
        """Candidate set of image ``i``: up to ``K`` indices, best first, without the ``-1`` padding."""
        row = self.indices[i]
        return row[row >= 0]

    def save(self, path: str | Path) -> Path:
        """Write ``indices`` and ``scores`` to ``path`` (``.npz``) atomically; returns the path."""
        p = Path(path)
        with atomic_write(p, "wb") as f:
            np.savez(f, indices=self.indices, scores=self.scores)
        return p

    @classmethod
    def load(cls, path: str | Path) -> CandidateSets:
        """Read a file written by :meth:`save`."""
        with np.load(Path(path), allow_pickle=False) as z:
            return cls(z["indices"], z["scores"])


def candidate_sets(descriptors: np.ndarray, k: int) -> CandidateSets:
    """Exact top-``k`` neighbours of every row among the other rows (faiss inner product).

    Args:
        descriptors: ``(N, D)`` L2-normalised descriptors.
        k: candidate-set size ``K``; capped to ``N - 1``.

    Returns:
        :class:`CandidateSets` of shape ``(N, min(k, N - 1))``. An image is never its own
        candidate, even when another image has an identical descriptor (ties are ordered by
        index, so the image itself need not come first).
    """
    if k < 1:
        raise ValueError(f"candidate_sets: k must be >= 1, got {k}")
    n = int(descriptors.shape[0])
    if n < 2:
        raise ValueError(f"candidate_sets: need at least 2 images, got {n}")
    kk = min(int(k), n - 1)
    res = exact_knn(descriptors, kk + 1)  # (N, kk + 1), usually itself first
    idx, sc = res.indices, res.scores
    is_self = idx == np.arange(n)[:, None]
    # drop the image itself where it was found, else the last (k+1-th) neighbour
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), kk)
    keep = np.ones_like(idx, dtype=bool)
    keep[np.arange(n), drop] = False
    return CandidateSets(idx[keep].reshape(n, kk), sc[keep].reshape(n, kk))


def describe(
    net: torch.nn.Module,
    paths: Sequence[str | Path],
    image_size: int,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    gem_p: float = 3.0,
    cache: FeatureCache | None = None,
    device: str | torch.device = "auto",
    batch_size: int = 16,
    workers: int = 2,
    progress: bool = False,
    desc: str = "candidates",
    exif: bool = False,
) -> np.ndarray:
    """L2-normalised GeM descriptors of whole images: ``(N, C)`` float32, row ``i`` for ``paths[i]``.

    ``net`` maps a normalised ``(B, 3, H, W)`` batch to its ``(B, C, h, w)`` feature map; images are
    resized so that their longer side is ``image_size`` (aspect kept, as ``retrbench run`` does).
    With a ``cache``, finished batches are kept and a finished result is reused. ``exif`` applies
    the images' EXIF orientation.
    """
    specs = [ImageSpec(Path(p), None, int(image_size), exif=exif) for p in paths]
    feats = extract(
        net,
        lambda x: gem(x, p=gem_p),
        specs,
        mean=mean,
        std=std,
        device=device,
        batch_size=batch_size,
        workers=workers,
        cache=cache,
        progress=progress,
        desc=desc,
    )
    return l2_normalize(feats)


def load_or_compute(path: str | Path, compute: Callable[[], CandidateSets], n: int | None = None) -> CandidateSets:
    """The candidate sets cached at ``path``, else ``compute()`` saved there atomically.

    A damaged file, or one with another number of rows than ``n`` (when given), is recomputed.
    """
    p = Path(path)
    if p.is_file():
        try:
            found = CandidateSets.load(p)
        except (OSError, ValueError, KeyError) as e:
            log.warning("ignoring unreadable candidate sets %s (%s)", p, e)
        else:
            if n is None or len(found) == n:
                return found
            log.warning("ignoring candidate sets %s: %d rows, expected %d", p, len(found), n)
    cands = compute()
    cands.save(p)
    return cands
