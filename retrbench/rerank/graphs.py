"""k-nearest-neighbour graphs of the database, for DBA and diffusion.

Neighbour search (the ``knn`` parameter of ``dba``, ``dfs`` and ``dfs-offline``):

* ``exact``: blocked matrix products and ``torch.topk`` for ``k <= 256`` (faster than faiss's
  heaps here), :func:`retrbench.utils.linalg.exact_knn` (faiss flat inner product) above;
* ``approx``: the inverted-file scheme of :func:`_approx_knn`, for large databases;
* ``auto`` (default): exact up to :data:`EXACT_KNN_MAX_N` (20,000) database vectors,
  approximate above.

An exact kNN graph costs ``N^2 D`` multiply-adds (2 to 6 minutes for 100k x 512 on two
cores); the approximate one about ``nprobe / sqrt(N)`` of that (2.5% at 100k), with recall@50
of 0.99 and more on clustered data (``benchmarks/bench_rerank.py`` prints it). Queries are
always searched exactly. Lists are cached (:mod:`.cache`); torch and faiss are imported on
first use.
"""

from __future__ import annotations

import warnings

import numpy as np

from ..types import as_rows
from ..utils.linalg import exact_knn
from .cache import CACHE, freeze

__all__ = ["EXACT_KNN_MAX_N", "KNN_METHODS", "database_knn", "resolve_knn"]

# ``knn=auto`` builds exact kNN graphs up to this many database vectors, approximate ones above.
EXACT_KNN_MAX_N = 20000
KNN_METHODS = ("exact", "approx", "auto")

_TOPK_MAX_K = 256  # up to this k, torch's product + topk beat faiss's heaps (1.5-2x at k = 3 and 50)


def resolve_knn(method: str, n: int) -> str:
    """``exact`` or ``approx`` for a database of ``n`` vectors; ``ValueError`` for an unknown method."""
    if method == "auto":
        return "exact" if n <= EXACT_KNN_MAX_N else "approx"
    if method not in ("exact", "approx"):
        raise ValueError(f"knn must be 'exact', 'approx' or 'auto', got {method!r}")
    return method


def _top_k_rows(sims: np.ndarray, cols: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` of each row of ``sims`` ``(m, c)``, best first; ``cols`` ``(c,)`` maps columns to ids."""
    c = sims.shape[1]
    kk = min(k, c)
    part = np.argpartition(sims, c - kk, axis=1)[:, c - kk :] if kk < c else np.broadcast_to(np.arange(c), sims.shape)
    ps = np.take_along_axis(sims, part, axis=1)  # (m, kk)
    order = np.argsort(-ps, axis=1, kind="stable")
    return np.take_along_axis(ps, order, axis=1), cols[np.take_along_axis(part, order, axis=1)]


def _gemm_topk_knn(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` rows of ``x`` ``(N, D)`` for every row (itself included): blocked
    ``x @ x.T`` + ``torch.topk``; returns ``(N, k)`` similarities and ids, best first.

    Both steps run in torch, so one thread pool does the work (numpy's BLAS threads followed by
    torch's were up to 4x slower on a busy machine); one reused 16 MiB buffer holds the
    similarities, since faulting in fresh pages costs as much as the product.
    """
    import torch

    n = x.shape[0]
    with warnings.catch_warnings():  # read-only arrays (the cache's) are only read here
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(x)
    block = max(1, min(n, (1 << 22) // n))
    buf = torch.empty((block, n), dtype=torch.float32)
    sims = np.empty((n, k), np.float32)
    ids = np.empty((n, k), np.int64)
    for lo in range(0, n, block):
        hi = min(lo + block, n)
        out = torch.mm(t[lo:hi], t.T, out=buf[: hi - lo])  # (block, N)
        v, i = torch.topk(out, k, dim=1)
        sims[lo:hi], ids[lo:hi] = v.numpy(), i.numpy()
    return sims, ids


def _approx_knn(x: np.ndarray, k: int, nprobe: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Approximate top-``k`` neighbours of every row of ``x`` ``(N, D)`` among the rows of ``x``.

    Inverted-file scheme batched for BLAS: spherical k-means with ``round(sqrt(N))``
    centroids, each vector assigned to its nearest centroid; the vectors of one centroid are
    compared (one matrix product) with the vectors of the ``nprobe`` centroids most often
    among their members' ``nprobe`` nearest centroids (their own first). Cost about
    ``nprobe / sqrt(N)`` of the exact graph. Returns ``(N, k)`` similarities and ids, best first.
    """
    import faiss

    n, d = x.shape
    nlist = max(1, int(round(np.sqrt(n))))
    nprobe = max(1, min(nprobe, nlist))
    km = faiss.Kmeans(d, nlist, niter=10, spherical=True, seed=seed, max_points_per_centroid=64, verbose=False)
    km.train(x)
    cent = km.centroids  # (nlist, D)
    _, probes = faiss.knn(x, cent, nprobe, metric=faiss.METRIC_INNER_PRODUCT)  # (N, nprobe)
    assign = probes[:, 0]
    order = np.argsort(assign, kind="stable")
    counts = np.bincount(assign, minlength=nlist)
    starts = np.concatenate([[0], np.cumsum(counts)])
    csim = cent @ cent.T  # (nlist, nlist)
    out_s = np.empty((n, k), np.float32)
    out_i = np.empty((n, k), np.int64)
    for c in range(nlist):
        members = order[starts[c] : starts[c + 1]]
        if members.size == 0:
            continue
        votes = np.bincount(probes[members].ravel(), minlength=nlist).astype(np.float64)
        votes[c] = np.inf
        rank = np.lexsort((-csim[c], -votes))  # most votes first, then nearest centroid
        need = int(np.searchsorted(np.cumsum(counts[rank]), k)) + 1  # enough lists for k candidates
        lists = np.sort(rank[: max(nprobe, need)])
        cand = np.concatenate([order[starts[g] : starts[g + 1]] for g in lists])
        sims = x[members] @ x[cand].T  # (members, candidates)
        out_s[members], out_i[members] = _top_k_rows(sims, cand, k)
    return out_s, out_i


def database_knn(database: np.ndarray, k: int, knn: str = "auto", nprobe: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` neighbours of each database vector among the database (itself included), cached.

    Args:
        database: ``(N, D)`` float32.
        k: neighbours per vector (capped to ``N``).
        knn: ``exact``, ``approx`` or ``auto`` (exact up to ``EXACT_KNN_MAX_N`` vectors).
        nprobe: inverted lists scanned per vector by the approximate search.

    Returns:
        ``(sims, ids)``, read-only ``(N, k)`` float32 and int64, best first. A cached list
        for a larger ``k`` is sliced rather than recomputed.
    """
    db = as_rows(database, "database")
    n = db.shape[0]
    k = min(int(k), n)
    method = resolve_knn(knn, n)
    if method == "approx" and n <= 4 * max(k, 64):
        method = "exact"  # nothing to gain on tiny databases
    tag = (method, nprobe if method == "approx" else 0)
    hit = CACHE.find(db, "knn", lambda p: p[0] == tag and p[1] >= k)
    if hit is not None:
        sims, ids = hit[1]
        return sims[:, :k], ids[:, :k]
    if method == "exact" and k <= _TOPK_MAX_K:
        sims, ids = _gemm_topk_knn(db, k)
    elif method == "exact":
        res = exact_knn(db, k)
        sims, ids = res.scores, res.indices
    else:
        sims, ids = _approx_knn(db, k, nprobe)
    freeze(sims, ids)
    CACHE.put(db, "knn", (tag, k), (sims, ids))
    return sims, ids
