"""Row-vector linear algebra shared by every stage: L2 normalisation (numpy and torch), the
exact inner-product k-NN kernel, and scores over a whole database computed block by block.

Exact k-NN (:func:`exact_search`) on the CPU: blocked matrix products (numpy's BLAS) and a
partial sort (``np.argpartition``, then a sort of the ``k`` kept), the database read block by
block (a memory map is never copied whole). faiss's flat kernel keeps a heap of ``k`` per
query, ``N log k`` with large constants: ranking 50 queries x 5000 x 512 fully took 0.25 s
with ``k = N`` heaps and 0.02 s this way; at 70 x 1M x 128 and ``k = 1000`` the two are
close. Every inner product of the package goes through one routine (:func:`inner_products`:
fixed database blocks of 8192 rows, never a matrix-vector product), so the same pair gets the
same float32 bits in a search, a kNN list and an exact evaluation, and rankings agree to the
last tie. When faiss sees a GPU (``faiss.knn_gpu``, ``k <= 2048``) searches run there
instead; their scores may then differ from the CPU ones in the last bit.

Ties are ordered by increasing database index.

:class:`DatabaseScores` describe "a score for every database item of every query" without
holding the ``(Q, N)`` matrix: :class:`InnerProductScores` (``queries @ database.T``, computed
block by block), :class:`DenseScores` (a matrix already computed, e.g. diffusion scores) and
:class:`FallbackScores` (diffusion's rule: items with a positive score first, the others in
the order of another ranking). Their :meth:`~DatabaseScores.keys` give each item a unique
integer, larger = ranked first, so that the exact rank of any item is a count of larger
keys: what exact evaluation without a full sort needs (:mod:`retrbench.evaluation.scores`).
faiss is imported on first use.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..types import SearchResult, as_rows

__all__ = [
    "DatabaseScores",
    "DenseScores",
    "FallbackScores",
    "InnerProductScores",
    "exact_knn",
    "exact_search",
    "inner_products",
    "l2_normalize",
    "l2n",
    "from_orderable_uint32",
    "order_keys",
    "orderable_uint32",
    "recall_at_k",
    "single_threaded_blas",
]


log = logging.getLogger(__name__)

_GPU_MAX_K = 2048
_ROWS_BYTES = 1 << 28  # exact_search scores (rows, N) float32 chunks of at most 256 MiB
_BLOCK_BYTES = 1 << 25  # DatabaseScores blocks: (Q, B) float32 of about 32 MiB
_TORCH_TOPK_MIN = 1 << 22  # scores per block above which torch.topk selects the top k
_GEMM_ROWS = 8192  # database rows per matrix product, blocks aligned on multiples of it (same bits everywhere)


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


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """numpy's BLAS on one thread inside the block (threadpoolctl, a scikit-learn dependency;
    nothing happens without it). The block products here are small (at most 8192 database
    rows): on this kind of shared 2-core machine OpenBLAS's two threads took 28 ms for a
    50 x 5000 x 512 product that one thread does in 4.5 ms, and 18 ms against 2.5 ms for
    70 x 8192 x 128; callers that want both cores run blocks in parallel instead."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        yield
        return
    with threadpool_limits(1, user_api="blas"):
        yield


def _knn_gpu(q: np.ndarray, db: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray] | None:
    """faiss's exact inner-product top-``k`` on a GPU, or None without one."""
    import faiss

    res = _gpu_resources() if k <= _GPU_MAX_K else None
    if res is None:
        return None
    try:
        return faiss.knn_gpu(res, q, as_rows(db, "database"), k, metric=faiss.METRIC_INNER_PRODUCT)
    except Exception as exc:
        log.warning("faiss GPU search failed (%s); searching on CPU", exc)
        return None


def _rows_f32(x: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Rows ``lo:hi`` of ``x`` (an array or a memory map, any float type) as float32."""
    return np.ascontiguousarray(x[lo:hi], dtype=np.float32)


def inner_products(
    queries: np.ndarray, database: np.ndarray, lo: int, hi: int, out: np.ndarray | None = None
) -> np.ndarray:
    """``queries @ database[lo:hi].T`` ``(Q, hi - lo)`` float32, as every stage computes it.

    ``lo`` must be a multiple of 8192 (and ``hi`` too, or ``N``): the product runs on the fixed
    8192-row blocks, and a single query is multiplied as two rows, so that BLAS takes the same
    path (matrix-matrix, same tiles) and a pair gets the same bits whichever call computes it.
    """
    single = queries.shape[0] == 1
    q = np.repeat(queries, 2, axis=0) if single else queries
    res = out if out is not None and not single else np.empty((q.shape[0], hi - lo), np.float32)
    for a in range(lo, hi, _GEMM_ROWS):
        b = min(a + _GEMM_ROWS, hi)
        np.matmul(q, _rows_f32(database, a, b).T, out=res[:, a - lo : b - lo])
    if not single:
        return res
    if out is not None:
        out[...] = res[:1]
        return out
    return res[:1]


def _db_blocks(n: int, width: int) -> Iterator[tuple[int, int]]:
    """``(lo, hi)`` database row blocks, multiples of 8192 rows, so that a ``(width, hi - lo)``
    float32 block is about 32 MiB."""
    step = max(1, _BLOCK_BYTES // (4 * max(width, 1)) // _GEMM_ROWS) * _GEMM_ROWS
    for lo in range(0, n, step):
        yield lo, min(lo + step, n)


def _top_unordered(s: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and values ``(r, k)`` of the ``k`` largest of each row of ``s``, in no order.

    ``torch.topk`` for large blocks (5-10x faster than ``np.argpartition`` on 64 x 1M rows
    here), numpy below 4M scores (no torch import for small searches); ties at the ``k``-th
    value are settled by :func:`_keep_lowest_tied`.
    """
    try:
        if s.size < _TORCH_TOPK_MIN:
            raise ImportError
        import torch
    except ImportError:
        part = np.argpartition(s, s.shape[1] - k, axis=1)[:, s.shape[1] - k :]
        return part, np.take_along_axis(s, part, axis=1)
    v, i = torch.topk(torch.from_numpy(s), k, dim=1, sorted=False)
    return i.numpy(), v.numpy()


def _keep_lowest_tied(s: np.ndarray, part: np.ndarray, ps: np.ndarray) -> None:
    """In place: where several items tie at the ``k``-th score of a row of ``s`` ``(r, N)``, make
    ``part`` / ``ps`` ``(r, k)`` keep the lowest indices among them (the stable sort's prefix)."""
    k = part.shape[1]
    kth = ps.min(axis=1)  # (r,) the k-th largest score
    n_above = (ps > kth[:, None]).sum(axis=1)
    n_tied = (s == kth[:, None]).sum(axis=1)
    for r in np.flatnonzero(n_above + n_tied > k):  # rare on real data: a tie across the boundary
        above = part[r][ps[r] > kth[r]]
        tied = np.flatnonzero(s[r] == kth[r])[: k - above.size]
        part[r] = np.concatenate([above, tied])
        ps[r] = s[r, part[r]]


def _gemm_search(q: np.ndarray, db: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` by blocked matrix products and a partial sort: ``(Q, k)`` scores and indices,
    the prefix of the stable full sort (equal scores by increasing index)."""
    nq, n = q.shape[0], db.shape[0]
    rows = max(1, min(nq, _ROWS_BYTES // (4 * n)))
    out_s = np.empty((nq, k), np.float32)
    out_i = np.empty((nq, k), np.int64)
    scores = np.empty((rows, n), np.float32)
    for qlo in range(0, nq, rows):
        qhi = min(qlo + rows, nq)
        s = scores[: qhi - qlo]
        for lo, hi in _db_blocks(n, qhi - qlo):
            inner_products(q[qlo:qhi], db, lo, hi, out=s[:, lo:hi])
        if k < n:
            part, ps = _top_unordered(s, k)  # (r, k)
            _keep_lowest_tied(s, part, ps)
            order = np.lexsort((part, -ps), axis=-1)  # score descending, then index ascending
            out_i[qlo:qhi] = np.take_along_axis(part, order, axis=1)
            out_s[qlo:qhi] = np.take_along_axis(ps, order, axis=1)
        else:  # the whole row: numpy's (SIMD) quicksort, then ties by index (3x a stable sort here)
            order = np.argsort(-s, axis=1)
            ss = np.take_along_axis(s, order, axis=1)
            _break_ties(ss, order)
            out_i[qlo:qhi] = order
            out_s[qlo:qhi] = ss
    return out_s, out_i


def _break_ties(scores: np.ndarray, indices: np.ndarray) -> None:
    """In place: order equal scores by increasing database index (as a stable argsort would).

    ``(Q, k)`` arrays, already sorted by score; only the runs of equal scores are re-sorted.
    """
    eq = scores[:, 1:] == scores[:, :-1]  # (Q, k - 1): entry j + 1 ties entry j
    if not eq.any():
        return
    in_run = np.zeros(scores.shape, bool)
    in_run[:, 1:] |= eq
    in_run[:, :-1] |= eq
    rr, cc = np.nonzero(in_run)  # row-major: runs are contiguous
    starts = np.ones(rr.size, bool)
    starts[1:] = (rr[1:] != rr[:-1]) | ~eq[rr[1:], np.maximum(cc[1:] - 1, 0)]
    run = np.cumsum(starts)  # run id of every tied entry
    ids = indices[rr, cc]
    indices[rr, cc] = ids[np.lexsort((ids, run))]


def exact_search(queries: np.ndarray, database: np.ndarray, k: int | None = None) -> SearchResult:
    """Exact top-``k`` database rows by inner product for each query, best first.

    Args:
        queries: ``(Q, D)`` descriptors.
        database: ``(N, D)`` descriptors (a memory map is read block by block for large ``k``).
        k: neighbours per query; None ranks the whole database (``k = N``); capped to ``N``.

    Returns:
        :class:`SearchResult` with ``(Q, min(k, N))`` scores and database indices. Equal
        scores are ordered by increasing database index (which of several items tied at the
        ``k``-th place is kept is not specified).
    """
    q = as_rows(queries, "queries")
    db = np.asarray(database)
    if db.ndim != 2 or not np.issubdtype(db.dtype, np.floating):
        db = as_rows(database, "database")  # raises with the usual message
    if q.shape[1] != db.shape[1]:
        raise ValueError(f"search: queries {q.shape} and database {db.shape} have different dimensions")
    n = db.shape[0]
    if k is not None and (isinstance(k, bool) or int(k) != k or k < 1):
        raise ValueError(f"search: k must be a positive integer or None, got {k!r}")
    kk = n if k is None else min(int(k), n)
    if kk == 0 or q.shape[0] == 0:
        return SearchResult(np.empty((q.shape[0], kk), np.float32), np.empty((q.shape[0], kk), np.int64))
    gpu = _knn_gpu(q, db, kk)
    if gpu is not None:
        scores, indices = gpu
        _break_ties(scores, indices)
    else:
        with single_threaded_blas():
            scores, indices = _gemm_search(q, db, kk)
    return SearchResult(scores, indices)


def exact_knn(x: np.ndarray, k: int) -> SearchResult:
    """Top-``k`` neighbours of every row of ``x`` among the rows of ``x`` (itself included).

    ``(N, D) -> SearchResult (N, min(k, N))``; usually each row's first neighbour is itself.
    """
    return exact_search(x, x, k)


def recall_at_k(approx: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Mean over rows of ``|approx[:, :k] & exact[:, :k]| / k`` (``-1`` entries never match).

    ``approx``, ``exact``: ``(Q, >= k)`` integer ids, best first. The usual "k-recall@k" of
    approximate nearest-neighbour search: 1.0 when the approximate top-``k`` sets are exact.
    """
    a = np.asarray(approx, dtype=np.int64)[:, :k]
    e = np.asarray(exact, dtype=np.int64)[:, :k]
    if a.shape[0] == 0 or k < 1:
        return float("nan")
    pad = -2 - np.arange(a.shape[1], dtype=np.int64)  # distinct negatives: padding matches nothing
    a = np.where(a >= 0, a, pad)
    e = np.where(e >= 0, e, pad - a.shape[1])
    both = np.sort(np.concatenate([a, e], axis=1), axis=1)  # ids are distinct within a row
    hits = (both[:, 1:] == both[:, :-1]).sum(axis=1)
    return float(np.mean(hits / k))


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


# --------------------------------------------------------------------------- scores of a database


def order_keys(scores: np.ndarray, lo: int, index_bits: int) -> np.ndarray:
    """Unique ``uint64`` ranking keys of a ``(Q, B)`` float32 block of database items
    ``lo .. lo + B - 1``: larger score -> larger key, equal scores -> the smaller index larger.

    Layout: the score's bits made order-preserving (32 bits; ``-0.0`` as ``+0.0``) above
    ``index_bits`` bits of ``2**index_bits - 1 - index``.
    """
    keys = orderable_uint32(scores).astype(np.uint64) << np.uint64(index_bits)
    inv = np.uint64((1 << index_bits) - 1) - (np.uint64(lo) + np.arange(keys.shape[-1], dtype=np.uint64))
    keys |= inv
    return keys


def orderable_uint32(scores: np.ndarray) -> np.ndarray:
    """float32 values as uint32 in the same order (``-0.0`` as ``+0.0``): the sign bit set for
    non-negative values, every bit flipped for negative ones."""
    s = np.ascontiguousarray(scores, dtype=np.float32) + np.float32(0)  # -0.0 -> +0.0
    u = s.view(np.uint32)
    return u ^ ((u >> np.uint32(31)) * np.uint32(0x7FFFFFFF) | np.uint32(0x80000000))


def from_orderable_uint32(u: np.ndarray) -> np.ndarray:
    """The float32 values of :func:`orderable_uint32` keys."""
    u = np.asarray(u, dtype=np.uint32)
    return (u ^ (((u >> np.uint32(31)) ^ np.uint32(1)) * np.uint32(0x7FFFFFFF) | np.uint32(0x80000000))).view(
        np.float32
    )


class DatabaseScores:
    """A score for every database item of each of ``Q`` queries, computed block by block.

    The scores define a full ranking of the database per query: larger first, equal scores by
    increasing database index (as :func:`exact_search`). Subclasses implement :meth:`block`;
    :meth:`keys` turns a block into unique ranking keys (override it for composite orders).

    Attributes:
        n_queries: ``Q``.
        n_database: ``N``.
        tiers: number of key bits above the score that the order uses (0 for plain scores).
    """

    n_queries: int
    n_database: int
    tiers: int = 0

    def block(self, lo: int, hi: int) -> np.ndarray:
        """``(Q, hi - lo)`` float32 scores of database items ``lo .. hi - 1``."""
        raise NotImplementedError

    def index_bits(self) -> int:
        """Bits of the key that hold the database index."""
        bits = max(1, int(self.n_database - 1).bit_length())
        if bits + 32 + self.tiers > 64:
            raise ValueError(f"ranking keys: {self.n_database} database items need more than 64-bit keys")
        return bits

    def keys(self, lo: int, hi: int, index_bits: int) -> np.ndarray:
        """``(Q, hi - lo)`` uint64 keys: larger = ranked first, unique per query."""
        return order_keys(self.block(lo, hi), lo, index_bits)

    def blocks(self) -> Iterator[tuple[int, int]]:
        """``(lo, hi)`` database blocks of about 32 MiB of float32 scores."""
        return _db_blocks(self.n_database, self.n_queries)

    def top_k(self, k: int) -> SearchResult:
        """The first ``min(k, N)`` items of each query's full ranking, with their scores."""
        ib = self.index_bits()
        kk = min(int(k), self.n_database)
        best_k = np.zeros((self.n_queries, 0), np.uint64)
        best_s = np.zeros((self.n_queries, 0), np.float32)
        with single_threaded_blas():
            for lo, hi in self.blocks():
                keys = np.concatenate([best_k, self.keys(lo, hi, ib)], axis=1)
                scores = np.concatenate([best_s, self.block(lo, hi)], axis=1)
                if keys.shape[1] > kk:
                    part = np.argpartition(keys, keys.shape[1] - kk, axis=1)[:, -kk:]
                    keys, scores = np.take_along_axis(keys, part, axis=1), np.take_along_axis(scores, part, axis=1)
                best_k, best_s = keys, scores
        order = np.argsort(best_k, axis=1)[:, ::-1]
        best_k = np.take_along_axis(best_k, order, axis=1)
        ids = (np.uint64((1 << ib) - 1) - (best_k & np.uint64((1 << ib) - 1))).astype(np.int64)
        return SearchResult(np.take_along_axis(best_s, order, axis=1), ids)


class InnerProductScores(DatabaseScores):
    """``queries @ database.T``, block by block: ``(Q, D)`` and ``(N, D)`` (a memory map is fine;
    any float type, computed in float32)."""

    def __init__(self, queries: np.ndarray, database: np.ndarray) -> None:
        self.queries = as_rows(queries, "queries")
        self.database = database
        if np.ndim(database) != 2 or np.shape(database)[1] != self.queries.shape[1]:
            raise ValueError(f"scores: queries {self.queries.shape} and database {np.shape(database)} do not match")
        self.n_queries, self.n_database = self.queries.shape[0], int(np.shape(database)[0])

    def block(self, lo: int, hi: int) -> np.ndarray:
        return inner_products(self.queries, self.database, lo, hi)


class DenseScores(DatabaseScores):
    """A ``(Q, N)`` score matrix already computed (e.g. diffusion scores)."""

    def __init__(self, scores: np.ndarray) -> None:
        arr = np.asarray(scores)
        if arr.ndim != 2:
            raise ValueError(f"scores: expected a (Q, N) matrix, got shape {arr.shape}")
        self.scores = arr
        self.n_queries, self.n_database = arr.shape

    def block(self, lo: int, hi: int) -> np.ndarray:
        return np.ascontiguousarray(self.scores[:, lo:hi], dtype=np.float32)


class FallbackScores(DatabaseScores):
    """Items whose ``primary`` score is above ``threshold`` first (by that score), then every
    other item in the order of ``fallback``: the ranking diffusion produces (positive
    diffusion scores, then the incoming ranking). :meth:`block` gives the primary score where
    it is above the threshold and 0 elsewhere (the scores the diffusion reports)."""

    def __init__(self, primary: DatabaseScores, fallback: DatabaseScores, threshold: float = 0.0) -> None:
        if (primary.n_queries, primary.n_database) != (fallback.n_queries, fallback.n_database):
            raise ValueError("scores: primary and fallback scores have different shapes")
        self.primary, self.fallback, self.threshold = primary, fallback, np.float32(threshold)
        self.n_queries, self.n_database = primary.n_queries, primary.n_database
        self.tiers = fallback.tiers + 1

    def block(self, lo: int, hi: int) -> np.ndarray:
        p = self.primary.block(lo, hi)
        return np.where(p > self.threshold, p, np.float32(0)).astype(np.float32)

    def keys(self, lo: int, hi: int, index_bits: int) -> np.ndarray:
        p = self.primary.block(lo, hi)
        top = np.uint64(1) << np.uint64(32 + index_bits + self.fallback.tiers)
        return np.where(p > self.threshold, order_keys(p, lo, index_bits) | top, self.fallback.keys(lo, hi, index_bits))
