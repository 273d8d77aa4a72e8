"""Row-vector linear algebra shared by every stage: L2 normalisation (numpy and torch) and the
exact inner-product k-NN kernel.

The k-NN runs faiss's brute-force inner-product kernel (``faiss.knn`` with
``METRIC_INNER_PRODUCT``, the routine ``IndexFlatIP.search`` runs) without building an index,
so the database is not copied into faiss (at 1M x 2048 float32 that copy would be another
8 GiB). faiss's GPU kernel (``faiss.knn_gpu``) is used when faiss was built with GPU support
and sees a GPU, and ``k <= 2048`` (the GPU kernels' limit); otherwise the CPU one. faiss is
imported on first use.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import numpy as np

from ..types import SearchResult, as_rows

__all__ = ["exact_knn", "exact_search", "l2_normalize", "l2n"]


log = logging.getLogger(__name__)

_GPU_MAX_K = 2048


@functools.lru_cache(maxsize=1)
def _gpu_resources() -> Any | None:
    """Shared faiss GPU resources, or None when faiss has no usable GPU."""
    import faiss

    try:
        if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
            return None
        return faiss.StandardGpuResources()
    except Exception as exc:  # a CUDA driver problem must not stop CPU search
        log.warning("faiss GPU unavailable (%s); searching on CPU", exc)
        return None


def _knn(q: np.ndarray, db: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """faiss exact inner-product top-``k``: ``(Q, D), (N, D) -> (Q, k) scores, (Q, k) indices``."""
    import faiss

    res = _gpu_resources() if k <= _GPU_MAX_K else None
    if res is not None:
        try:
            return faiss.knn_gpu(res, q, db, k, metric=faiss.METRIC_INNER_PRODUCT)
        except Exception as exc:
            log.warning("faiss GPU search failed (%s); searching on CPU", exc)
    return faiss.knn(q, db, k, metric=faiss.METRIC_INNER_PRODUCT)


def _break_ties(scores: np.ndarray, indices: np.ndarray) -> None:
    """In place: order equal scores by increasing database index (as a stable argsort would).

    ``(Q, k)`` arrays, already sorted by score; only rows that contain a tie are re-sorted.
    """
    rows = np.flatnonzero((np.diff(scores, axis=1) == 0).any(axis=1))
    if rows.size == 0:
        return
    s, i = scores[rows], indices[rows]
    order = np.lexsort((i, -s), axis=-1)  # by score descending, then index ascending
    scores[rows] = np.take_along_axis(s, order, axis=1)
    indices[rows] = np.take_along_axis(i, order, axis=1)


def exact_search(queries: np.ndarray, database: np.ndarray, k: int | None = None) -> SearchResult:
    """Exact top-``k`` database rows by inner product for each query, best first.

    Args:
        queries: ``(Q, D)`` descriptors.
        database: ``(N, D)`` descriptors.
        k: neighbours per query; None ranks the whole database (``k = N``); capped to ``N``.

    Returns:
        :class:`SearchResult` with ``(Q, min(k, N))`` scores and database indices. Equal
        scores are ordered by increasing database index (which of several items tied at the
        ``k``-th place is kept is not specified).
    """
    q = as_rows(queries, "queries")
    db = as_rows(database, "database")
    if q.shape[1] != db.shape[1]:
        raise ValueError(f"search: queries {q.shape} and database {db.shape} have different dimensions")
    n = db.shape[0]
    if k is not None and (isinstance(k, bool) or int(k) != k or k < 1):
        raise ValueError(f"search: k must be a positive integer or None, got {k!r}")
    kk = n if k is None else min(int(k), n)
    if kk == 0 or q.shape[0] == 0:
        return SearchResult(np.empty((q.shape[0], kk), np.float32), np.empty((q.shape[0], kk), np.int64))
    scores, indices = _knn(q, db, kk)
    _break_ties(scores, indices)
    return SearchResult(scores, indices)


def exact_knn(x: np.ndarray, k: int) -> SearchResult:
    """Top-``k`` neighbours of every row of ``x`` among the rows of ``x`` (itself included).

    ``(N, D) -> SearchResult (N, min(k, N))``; usually each row's first neighbour is itself.
    """
    return exact_search(x, x, k)


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows of ``x`` divided by their L2 norm (``max(norm, eps)``; zero rows stay zero).

    ``(N, D) -> (N, D)``, float32 / float64 kept (other floating types become float32); a new
    array, ``x`` is not modified.
    """
    arr = np.asarray(x)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"l2_normalize: expected a 2-D floating (N, D) array, got {arr.dtype} {arr.shape}")
    if arr.dtype not in (np.float32, np.float64):
        arr = arr.astype(np.float32)
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    return arr / np.maximum(norms, eps).astype(arr.dtype)


def l2n(x: Any, eps: float = 1e-6, dim: int = 1) -> Any:
    """cirtorch's ``l2n`` on a torch tensor: ``x / (||x||_2 + eps)`` along ``dim``."""
    import torch

    return x / (torch.linalg.vector_norm(x, dim=dim, keepdim=True) + eps)
