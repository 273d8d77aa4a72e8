"""Diffusion on the database's kNN graph: online (``dfs``) and offline (``dfs-offline``).

``dfs`` (alias ``diffusion``): query-time diffusion, Iscen, Tolias, Avrithis, Furon and Chum,
"Efficient Diffusion on Region Manifolds", CVPR 2017. Defaults are those of the authors'
code for global descriptors (``run_test.m``): ``k=50`` neighbours per database vector in
the graph (the vector itself counted, as in their code), ``kq=10`` query neighbours,
``alpha=0.99``, ``gamma=3``, conjugate gradient with ``maxiter=20`` and ``tol=1e-6``
(relative residual). The method:

1. the kNN graph of the database (``k`` nearest by inner product, :mod:`.graphs`); only
   mutual neighbours are kept, negative similarities are set to 0, similarities are raised
   to ``gamma`` and the diagonal is zeroed: ``W`` (N x N, sparse, symmetric);
2. ``S = D^-1/2 W D^-1/2`` with ``D = diag(W 1)`` (isolated vertices get 0);
3. for each query, ``y`` holds ``max(s, 0) ** gamma`` at its ``kq`` nearest database
   vectors and 0 elsewhere;
4. ``(I - alpha S) f = y`` is solved by conjugate gradient, all queries at once (a batched
   CG in float32 with float64 reductions, scipy's stopping rule applied per query; the
   graph's vertices are put in reverse Cuthill-McKee order first, for memory locality);
5. the database is ranked by ``f`` (largest first, ties by database index); vectors the
   diffusion gives no positive score follow in their order in the incoming ranking, so the
   result keeps the incoming length ``K``. The output scores are ``f`` (0 for the
   appended vectors).

``dfs-offline`` (or ``dfs:mode=offline``): the decoupled form of Yang, Hinami, Matsui, Ly and
Satoh, "Efficient Image Retrieval via Decoupling Diffusion into Online and Offline
Processing", AAAI 2019, as in the authors' code (fyang93/diffusion): offline, for every
database vector ``i``, the system ``(I - alpha S)[R_i, R_i] x = e_i`` is solved by CG (20
iterations, tol 1e-6) on its truncated neighbourhood ``R_i`` (its ``trunc`` nearest
database vectors by exact search, itself first), giving a sparse ``N x N`` matrix ``F``
with ``trunc`` entries per row; online, a query scores the database by
``sum_j max(s_j, 0) ** gamma F[j]`` over its ``kq`` nearest database vectors, and the
ranking continues as for ``dfs``. Defaults as their ``rank.py``: ``k=50``, ``kq=10``,
``alpha=0.99``, ``gamma=3``, ``trunc=1000``. Rows of ``F`` are independent, so they are
computed when a query first needs them and memoised in the cache: the offline cost is paid
only for database vectors that some query reaches (:func:`offline_diffusion` computes
every row). Their code switches to an approximate (IVF-PQ) search for ``R_i`` above 100k
vectors; here ``R_i`` is always exact, since only the needed rows are searched.

Both take their settings as one :class:`DiffusionParams`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import reverse_cuthill_mckee

from ..types import as_rows
from ..utils.linalg import DenseScores, FallbackScores, exact_search
from ._solve import _cg, _query_seeds, _rank_by
from .base import RERANKERS, RankState, Reranker, RerankerInfo, RerankReport, progress_bar
from .cache import CACHE, freeze
from .graphs import KNN_METHODS, knn_graph, resolve_knn

__all__ = ["DiffusionParams", "diffusion_graph", "make_dfs", "make_dfs_offline", "offline_diffusion"]


@dataclass(frozen=True)
class DiffusionParams:
    """Settings of both diffusions, checked on construction (``ValueError`` naming the parameter).

    Attributes:
        k: graph neighbours per database vector (itself counted), >= 2.
        kq: database neighbours of each query that seed the diffusion, >= 1.
        alpha: diffusion weight in ``(I - alpha S) f = y``, in (0, 1).
        gamma: similarity exponent for graph weights and seeds.
        maxiter: conjugate-gradient iterations (>= 1).
        tol: conjugate-gradient relative residual (>= 0).
        trunc: truncated neighbourhood size per database vector (offline only), >= 1.
        knn: graph neighbour search, ``exact``, ``ivf`` (alias ``approx``), ``hnsw`` or ``auto``
            (:mod:`.graphs`; the step's report says which was used, with its recall).
        nprobe: inverted lists per vector for ``ivf``.
    """

    k: int = 50
    kq: int = 10
    alpha: float = 0.99
    gamma: float = 3.0
    maxiter: int = 20
    tol: float = 1e-6
    trunc: int = 1000
    knn: str = "auto"
    nprobe: int = 8

    def __post_init__(self) -> None:
        if self.k < 2 or self.kq < 1:
            raise ValueError(f"dfs: need k >= 2 and kq >= 1, got k={self.k}, kq={self.kq}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"dfs: alpha must be in (0, 1), got {self.alpha}")
        if self.maxiter < 1 or self.tol < 0 or self.trunc < 1:
            raise ValueError(
                f"dfs: need maxiter >= 1, tol >= 0, trunc >= 1, got {self.maxiter}, {self.tol}, {self.trunc}"
            )
        object.__setattr__(self, "knn", str(self.knn).lower())
        if self.knn not in KNN_METHODS:
            raise ValueError(f"dfs: knn must be one of {', '.join(KNN_METHODS)}, got {self.knn!r}")


def diffusion_graph(
    database: np.ndarray, k: int = 50, gamma: float = 3.0, knn: str = "auto", nprobe: int | None = 8
) -> sp.csr_matrix:
    """``S = D^-1/2 W D^-1/2`` of the database's mutual kNN graph (Iscen et al. 2017), cached.

    ``W[i, j] = max(s_ij, 0) ** gamma`` when ``i`` and ``j`` are among each other's ``k``
    nearest database vectors (each vector counted among its own, as in the authors' code),
    0 otherwise and on the diagonal; ``D = diag(W 1)``. The kNN lists come from
    :func:`~retrbench.rerank.graphs.knn_graph` (``knn``, ``nprobe``).

    Returns:
        ``(N, N)`` symmetric float32 CSR matrix (never dense).
    """
    return _graph(as_rows(database, "database"), int(k), float(gamma), knn, nprobe)[0]


def _graph(db: np.ndarray, k: int, gamma: float, knn: str, nprobe: int | None) -> tuple[sp.csr_matrix, dict]:
    """:func:`diffusion_graph` and the info of the kNN lists it was built from."""
    params = (int(k), float(gamma), resolve_knn(knn, db.shape[0]), nprobe)
    hit = CACHE.get(db, "graph", params)
    if hit is not None:
        return hit
    n = db.shape[0]
    knn_lists = knn_graph(db, k, knn, nprobe)
    sims, ids = knn_lists.sims, knn_lists.ids  # (N, k)
    itype = np.int32 if n < 2**31 else np.int64
    rows = np.repeat(np.arange(n, dtype=itype), ids.shape[1])
    cols = ids.ravel().astype(itype)
    ok = (cols >= 0) & (cols != rows)
    vals = np.maximum(sims.ravel()[ok], 0.0) ** np.float32(gamma)
    directed = sp.csr_matrix((vals.astype(np.float32), (rows[ok], cols[ok])), shape=(n, n))
    del rows, cols, ok, vals
    # mutual edges: present in both directions, so the elementwise minimum with the transpose
    # keeps exactly them (s_ij and s_ji may differ in the last bit; the minimum is symmetric)
    w = directed.minimum(directed.T).tocsr()
    del directed
    w.eliminate_zeros()
    deg = np.asarray(w.sum(axis=1), dtype=np.float64).ravel()  # (N,)
    dinv = np.zeros(n)
    dinv[deg > 0] = deg[deg > 0] ** -0.5
    row_of = np.repeat(np.arange(n, dtype=itype), np.diff(w.indptr))
    s = sp.csr_matrix(
        ((w.data * (dinv[row_of] * dinv[w.indices])).astype(np.float32), w.indices, w.indptr), shape=(n, n)
    )
    s.sort_indices()
    freeze(s.data, s.indices, s.indptr)
    return CACHE.put(db, "graph", params, (s, dict(knn_lists.info)))


# --------------------------------------------------------------------------- online (Iscen et al.)


def _ordered_graph(db: np.ndarray, p: DiffusionParams) -> tuple[sp.csr_matrix, np.ndarray, dict]:
    """``(S[perm][:, perm], perm)``: the diffusion graph in reverse Cuthill-McKee order, cached.

    Neighbours then sit in nearby rows, so ``S @ X`` reads ``X`` almost sequentially: about 6x
    faster than in database order for 100k vectors and 70 queries.
    """
    params = (int(p.k), float(p.gamma), resolve_knn(p.knn, db.shape[0]), p.nprobe)
    hit = CACHE.get(db, "graph-rcm", params)
    if hit is not None:
        return hit
    graph, info = _graph(db, p.k, p.gamma, p.knn, p.nprobe)
    perm = reverse_cuthill_mckee(graph, symmetric_mode=True).astype(np.int64)
    ordered = graph[perm][:, perm].tocsr()
    ordered.sort_indices()
    freeze(ordered.data, ordered.indices, ordered.indptr, perm)
    return CACHE.put(db, "graph-rcm", params, (ordered, perm, info))


def _report(graph_info: dict, **details: Any) -> RerankReport:
    return RerankReport(approximate=not graph_info.get("exact", True), details={"graph": dict(graph_info), **details})


def _scored_state(s: RankState, scores: np.ndarray, report: RerankReport) -> RankState:
    """The state ranked by diffusion ``scores`` ``(Q, N)``, with the full-ranking scores when the
    incoming state has them (diffusion scores first, then the incoming order)."""
    full = FallbackScores(DenseScores(scores), s.scores) if s.scores is not None else None
    return RankState(s.queries, s.database, _rank_by(scores, s.result), scores=full, reports=(report,))


def _online_diffusion(s: RankState, p: DiffusionParams) -> RankState:
    """Solve ``(I - alpha S) f = y`` for every query at once and rank by ``f``."""
    db = s.database
    n = db.shape[0]
    graph, perm, info = _ordered_graph(db, p)
    where = np.empty(n, np.int64)
    where[perm] = np.arange(n)  # database index -> row of the ordered graph
    ids, w = _query_seeds(s.queries, db, p.kq, p.gamma)  # (Q, kq)
    nq = ids.shape[0]
    y = np.zeros((n, nq), np.float32)
    np.add.at(y, (where[ids], np.broadcast_to(np.arange(nq)[:, None], ids.shape)), w)
    a32 = np.float32(p.alpha)

    def matvec(x: np.ndarray) -> np.ndarray:
        return x - a32 * (graph @ x)

    stats: dict = {}
    with progress_bar(total=p.maxiter, desc=f"diffusion (CG, {nq} queries)", unit="it") as bar:
        f = _cg(matvec, y, axis=0, rtol=p.tol, maxiter=p.maxiter, stats=stats, bar=bar)  # (N, Q), ordered rows
    scores = np.ascontiguousarray(f[where].T)
    del f, y
    return _scored_state(s, scores, _report(info, cg=dict(stats, maxiter=p.maxiter, tol=p.tol)))


# --------------------------------------------------------------------------- offline (Yang et al.)


class _OfflineRows:
    """Rows of Yang et al.'s offline matrix computed so far: row -> (column ids, values)."""

    def __init__(self) -> None:
        self.ids: dict[int, np.ndarray] = {}
        self.vals: dict[int, np.ndarray] = {}
        self.lock = threading.Lock()


def _truncation_lists(db: np.ndarray, rows: np.ndarray, t: int) -> np.ndarray:
    """``(len(rows), t)`` exact nearest database vectors of each row's vector, the row itself first."""
    ids = exact_search(db[rows], db, k=t).indices
    for j in np.flatnonzero(ids[:, 0] != rows):  # duplicates of a vector can come before it
        rest = ids[j][ids[j] != rows[j]]
        ids[j] = np.concatenate([[rows[j]], rest[: t - 1]])
    return ids


def _truncated_solve(s: sp.csr_matrix, r: np.ndarray, pos: np.ndarray, p: DiffusionParams) -> np.ndarray:
    """CG on ``(I - alpha S)[R_b, R_b] x = e_0`` for every row ``R_b`` of ``r`` ``(B, T)`` at once.

    ``pos[b, j]`` is the position of database vector ``j`` in ``R_b``, or -1. The systems form
    one block-diagonal sparse matrix of ``B * T`` rows. Returns ``(B, T)``.
    """
    b, t = r.shape
    n = s.shape[0]
    sub = s[r.ravel()]  # (B*T, N): the rows of every truncated system
    itype = np.int32 if b * n < 2**31 else np.int64
    ends = sub.indptr[np.arange(0, b * t + 1, t)]  # each system's span of stored entries
    blk = np.repeat(np.arange(b, dtype=itype), np.diff(ends))
    loc = pos.ravel()[blk * itype(n) + sub.indices.astype(itype, copy=False)]
    keep = loc >= 0
    cols = blk[keep] * itype(t) + loc[keep]
    kept = np.concatenate([[0], np.cumsum(keep)])
    m = sp.csr_matrix((sub.data[keep], cols, kept[sub.indptr]), shape=(b * t, b * t))
    rhs = np.zeros((b, t), np.float32)
    rhs[:, 0] = 1.0
    a32 = np.float32(p.alpha)

    def matvec(x: np.ndarray) -> np.ndarray:
        return x - a32 * (m @ x.ravel()).reshape(b, t)

    return _cg(matvec, rhs, axis=1, rtol=p.tol, maxiter=p.maxiter)


def _offline_rows(db: np.ndarray, rows: np.ndarray, p: DiffusionParams) -> sp.csr_matrix:
    """Rows ``rows`` (unique) of the offline matrix as a ``(len(rows), N)`` CSR matrix.

    Rows are computed on first use and memoised in the cache, so the offline stage costs only
    the rows that queries reach; computing every row is :func:`offline_diffusion`.
    """
    n = db.shape[0]
    t = min(int(p.trunc), n)
    method = resolve_knn(p.knn, n)
    params = (int(p.k), float(p.gamma), float(p.alpha), t, float(p.tol), int(p.maxiter), method, p.nprobe)
    store = CACHE.get(db, "offline", params)
    if store is None:
        store = CACHE.put(db, "offline", params, _OfflineRows())
    with store.lock:
        missing = np.array([r for r in rows.tolist() if r not in store.ids], dtype=np.int64)
        if missing.size:
            graph = _graph(db, p.k, p.gamma, p.knn, p.nprobe)[0]
            batch = max(1, min(missing.size, (1 << 16) // t))
            pos = np.full((batch, n), -1, dtype=np.int32)
            local = np.arange(t, dtype=np.int32)
            bar = progress_bar(total=int(missing.size), desc=f"offline diffusion rows (trunc {t})", unit="row")
            for lo in range(0, missing.size, 4096):  # chunks bound the (rows, trunc) neighbour lists
                chunk = missing[lo : lo + 4096]
                ids = _truncation_lists(db, chunk, t)
                for blo in range(0, chunk.size, batch):
                    r = ids[blo : blo + batch]
                    bi = np.arange(r.shape[0])[:, None]
                    pos[bi, r] = local
                    vals = _truncated_solve(graph, r, pos, p)
                    pos[bi, r] = -1
                    for j, row in enumerate(chunk[blo : blo + batch].tolist()):
                        store.ids[row] = r[j].astype(np.int32)
                        store.vals[row] = vals[j]
                    bar.update(r.shape[0])
            bar.close()
        m = rows.size
        indices = np.concatenate([store.ids[r] for r in rows.tolist()]) if m else np.empty(0, np.int32)
        data = np.concatenate([store.vals[r] for r in rows.tolist()]) if m else np.empty(0, np.float32)
    return sp.csr_matrix((data, indices, np.arange(0, m * t + 1, t, dtype=np.int64)), shape=(m, n))


def offline_diffusion(database: np.ndarray, params: DiffusionParams | None = None) -> sp.csr_matrix:
    """The whole offline diffusion matrix of Yang et al. (AAAI 2019), memoised row by row.

    Row ``i`` holds the CG solution of ``(I - alpha S)[R_i, R_i] x = e_i`` on the truncated
    neighbourhood ``R_i`` (the ``trunc`` nearest database vectors of ``i``, exact search,
    ``i`` first) of the diffusion graph ``S`` (:func:`diffusion_graph`), at the columns ``R_i``.

    Args:
        database: ``(N, D)`` L2-normalised descriptors.
        params: graph, truncation and CG settings (``kq`` is not used); defaults when None.

    Returns:
        ``(N, N)`` float32 CSR matrix with ``min(trunc, N)`` stored entries per row.
    """
    db = as_rows(database, "database")
    return _offline_rows(db, np.arange(db.shape[0]), params or DiffusionParams())


def _offline_search(s: RankState, p: DiffusionParams) -> RankState:
    """Score the database by ``sum_j w_j F[j]`` over each query's seeds and rank."""
    db = s.database
    ids, w = _query_seeds(s.queries, db, p.kq, p.gamma)  # (Q, kq)
    rows, inverse = np.unique(ids, return_inverse=True)
    f = _offline_rows(db, rows, p)  # (rows, N)
    nq, kk = ids.shape
    seeds = sp.csr_matrix((w.ravel(), inverse.ravel(), np.arange(0, nq * kk + 1, kk)), shape=(nq, rows.size))
    scores = (seeds @ f).toarray().astype(np.float32, copy=False)  # (Q, N): sum_j w_j F[j]
    info = _graph(db, p.k, p.gamma, p.knn, p.nprobe)[1]
    report = _report(info, truncation="exact", offline_rows=int(rows.size), trunc=int(min(p.trunc, db.shape[0])))
    return _scored_state(s, scores, report)


# --------------------------------------------------------------------------- entries


@RERANKERS.register(
    "dfs",
    aliases=("diffusion",),
    info=RerankerInfo(
        "ranking",
        "Iscen et al. CVPR 2017 (online); Yang et al. AAAI 2019 (mode=offline)",
        label="DFS",
        order=1,
        help="diffusion on the mutual kNN graph (Iscen 2017); k=50, kq=10, alpha=0.99, gamma=3, maxiter=20, "
        "tol=1e-6, knn=auto, nprobe=8, mode=online (offline: as dfs-offline, with trunc=1000)",
    ),
)
def make_dfs(
    k: int = 50,
    kq: int = 10,
    alpha: float = 0.99,
    gamma: float = 3.0,
    maxiter: int = 20,
    tol: float = 1e-6,
    mode: str = "online",
    trunc: int = 1000,
    knn: str = "auto",
    nprobe: int = 8,
) -> Reranker:
    """Diffusion on the database's mutual kNN graph (Iscen et al. 2017); ``mode=offline``: Yang et al. 2019.

    ``mode`` is ``online`` (query-time CG on the whole graph) or ``offline`` (precomputed
    truncated diffusion per database vector, then a linear combination per query); the other
    parameters are those of :class:`DiffusionParams`.
    """
    p = DiffusionParams(
        k=k, kq=kq, alpha=alpha, gamma=gamma, maxiter=maxiter, tol=tol, trunc=trunc, knn=knn, nprobe=nprobe
    )
    mode = str(mode).lower()
    if mode not in ("online", "offline"):
        raise ValueError(f"dfs: mode must be 'online' or 'offline', got {mode!r}")
    run = _offline_search if mode == "offline" else _online_diffusion

    def step(s: RankState) -> RankState:
        return run(s, p)

    return step


@RERANKERS.register(
    "dfs-offline",
    aliases=("diffusion-offline",),
    info=RerankerInfo(
        "ranking",
        "Yang et al. AAAI 2019; fyang93/diffusion",
        label="DFS (offline)",
        order=3,
        help="offline truncated diffusion (Yang 2019); k=50, kq=10, alpha=0.99, gamma=3, trunc=1000, maxiter=20, "
        "tol=1e-6, knn=auto, nprobe=8",
    ),
)
def make_dfs_offline(
    k: int = 50,
    kq: int = 10,
    alpha: float = 0.99,
    gamma: float = 3.0,
    maxiter: int = 20,
    tol: float = 1e-6,
    trunc: int = 1000,
    knn: str = "auto",
    nprobe: int = 8,
) -> Reranker:
    """Offline (decoupled, truncated) diffusion of Yang et al. 2019: ``dfs`` with ``mode=offline``."""
    return make_dfs(
        k=k,
        kq=kq,
        alpha=alpha,
        gamma=gamma,
        maxiter=maxiter,
        tol=tol,
        mode="offline",
        trunc=trunc,
        knn=knn,
        nprobe=nprobe,
    )
