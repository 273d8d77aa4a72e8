"""Reranking after global search: every reranker maps a :class:`RankState` to a new one.

Spec grammar
------------
``none`` (or ``g``, or an empty string) keeps the global-search ranking. Otherwise a spec is
``+``-joined steps, each a registered name with optional ``key=value`` parameters after a
colon::

    aqe                      average query expansion, defaults below
    aqe:k=10,alpha=3         alpha-QE
    dba:k=2                  database-side augmentation
    dfs:k=50,kq=10,alpha=0.99,gamma=3
    dfs-offline:trunc=1000   (same as dfs:mode=offline)
    dba+aqe+dfs              the paper's G+DBA+AQE+DFS
    g+dba+aqe                ``g`` steps (global search, Table 1's "G") are ignored

Names and values are case-insensitive; values parse as int, then float, else string.

Order of combined steps
-----------------------
Steps run **in the order written**; the parser never reorders them. Each step sees the
state left by the previous one, so ``dba+aqe`` expands the queries with the augmented
database and ``aqe+dfs`` starts the diffusion from the expanded queries. The paper's
combinations (Table 1) are written in the canonical order, database augmentation of the
database vectors first, then query expansion, then diffusion: ``dba``, ``aqe``, ``dfs``,
``aqe+dfs``, ``dba+aqe``, ``dba+dfs``, ``dba+aqe+dfs``. A spec whose built-in steps are out
of that order (``aqe+dba``) still runs as written, and a warning is logged, because it is a
different method.

Methods and defaults
--------------------
``aqe`` (aliases ``qe``, ``alpha-qe``): average query expansion, Chum et al., "Total
Recall", ICCV 2007: the query is replaced by the L2-normalised sum of itself and its top-``k``
database vectors, then searched again. ``alpha > 0`` gives alpha-QE (Radenovic, Tolias and
Chum, TPAMI 2018), each neighbour weighted by ``max(similarity, 0) ** alpha``; that paper
uses ``alpha=3``. Defaults ``k=2, alpha=0``: plain averaging over a short list, as QE is
commonly run on global CNN descriptors; the query keeps weight 1. The papers tune ``k`` per
dataset, so give ``k`` (and ``alpha``) explicitly to reproduce a particular table.

``dba``: database-side augmentation (Arandjelovic and Zisserman, CVPR 2012; used with CNN
descriptors by Gordo et al., IJCV 2017): each database vector is replaced by the
L2-normalised sum of itself and its top-``k`` database neighbours (itself excluded), each
weighted by ``max(similarity, 0) ** alpha`` (1 when ``alpha=0``), and the queries are
searched again. Defaults ``k=2, alpha=0``, as for ``aqe``; deep-image-retrieval's
``expand_descriptors`` computes the same thing.

``dfs`` (alias ``diffusion``): query-time diffusion, Iscen, Tolias, Avrithis, Furon and Chum,
"Efficient Diffusion on Region Manifolds", CVPR 2017. Defaults are those of the authors'
code for global descriptors (``run_test.m``): ``k=50`` neighbours per database vector in
the graph (the vector itself counted, as in their code), ``kq=10`` query neighbours,
``alpha=0.99``, ``gamma=3``, conjugate gradient with ``maxiter=20`` and ``tol=1e-6``
(relative residual). The method:

1. the kNN graph of the database (``k`` nearest by inner product, see ``knn`` below);
   only mutual neighbours are kept, negative similarities are set to 0, similarities are
   raised to ``gamma`` and the diagonal is zeroed: ``W`` (N x N, sparse, symmetric);
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

Neighbour search for the graphs (``dba`` and ``dfs`` parameter ``knn``): ``exact``
(blocked matrix products and ``torch.topk`` for ``k <= 256``, faster than faiss's heaps here;
:func:`retrbench.search.knn`, faiss flat inner product, above), ``approx`` (the inverted-file
scheme of :func:`database_knn`, for large databases), or ``auto`` (default): exact up to
``EXACT_KNN_MAX_N`` (20,000) database vectors, approximate above. An exact kNN graph costs
``N^2 D`` multiply-adds (2 to 6 minutes for 100k x 512 on two cores); the approximate one
about ``nprobe / sqrt(N)`` of that (2.5% at 100k), with recall@50 of 0.99 and more on
clustered data (the benchmark prints it). Queries are always searched exactly.

Caching
-------
Everything computed from the database alone (kNN lists, the DBA-augmented database, the
diffusion graph, the rows of the offline diffusion matrix) is kept in a small LRU cache (12
entries) keyed by the identity of the database array plus a fingerprint of its contents
(shape, dtype, buffer address, a hash of 64 sampled rows), so a sweep over the eight
variants, or over many query sets, computes each once: ``dba+dfs`` reuses the augmented
database of ``dba``, and the diffusion graph of the original database serves ``dfs`` and
``aqe+dfs``. An entry is dropped once its database array is garbage-collected. Arrays the
cache hands out are read-only. The cache does not notice a database modified in place
outside the sampled rows: call :func:`clear_cache` after doing that.

Writing a reranker
------------------
A reranker is a callable ``RankState -> RankState``; register a factory that takes the spec
parameters as keyword arguments and returns one::

    from retrbench.rerank import RERANKERS, RankState, RerankerInfo
    from retrbench.search import search

    @RERANKERS.register("flip", info=RerankerInfo(stage="query"))
    def make_flip(sign: float = -1.0):
        def step(s: RankState) -> RankState:
            q = sign * s.queries
            return RankState(q, s.database, search(q, s.database, k=s.result.k))
        return step

    rerank("flip:sign=-1+dfs", queries, database, result)

Unknown parameters fail when the spec is built, not when it runs.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import reverse_cuthill_mckee

from .registry import Registry
from .search import knn as exact_knn
from .search import search
from .types import SearchResult, as_rows

__all__ = [
    "RankState",
    "Reranker",
    "RerankerInfo",
    "RERANKERS",
    "EXACT_KNN_MAX_N",
    "parse_spec",
    "build_reranker",
    "rerank",
    "database_knn",
    "diffusion_graph",
    "offline_diffusion",
    "clear_cache",
]

log = logging.getLogger(__name__)

# ``knn=auto`` builds exact kNN graphs up to this many database vectors, approximate ones above.
EXACT_KNN_MAX_N = 20000


@dataclass(frozen=True, eq=False)
class RankState:
    """What rerankers consume and produce.

    Attributes:
        queries: ``(Q, D)`` float32 L2-normalised query descriptors.
        database: ``(N, D)`` float32 L2-normalised database descriptors.
        result: current ranking of the database for each query, ``(Q, K)``, best first.
    """

    queries: np.ndarray
    database: np.ndarray
    result: SearchResult

    def __post_init__(self) -> None:
        q = as_rows(self.queries, "queries")
        db = as_rows(self.database, "database")
        if q.shape[1] != db.shape[1]:
            raise ValueError(f"RankState: queries {q.shape} and database {db.shape} have different dimensions")
        if self.result.indices.shape[0] != q.shape[0]:
            raise ValueError(f"RankState: {self.result.indices.shape[0]} result rows for {q.shape[0]} queries")
        object.__setattr__(self, "queries", q)
        object.__setattr__(self, "database", db)


Reranker = Callable[[RankState], RankState]


@dataclass(frozen=True)
class RerankerInfo:
    """Metadata carried on a reranker's registry entry.

    Attributes:
        stage: ``"database"`` (changes the database vectors), ``"query"`` (changes the
            queries), ``"ranking"`` (reorders the result), or ``""`` when it does not
            matter; used only to warn about specs written out of the canonical order.
        reference: where the method and its defaults come from.
    """

    stage: str = ""
    reference: str = ""


# Factories take the step's parameters as keyword arguments and return a ``Reranker``.
RERANKERS: Registry[Reranker] = Registry("reranker")

_STAGE_ORDER = {"database": 0, "query": 1, "ranking": 2}


# --------------------------------------------------------------------------- spec grammar


def _parse_value(text: str) -> float | int | str:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_spec(spec: str) -> list[tuple[str, dict[str, float | int | str]]]:
    """``"dba:k=2+aqe:k=10,alpha=3"`` -> ``[("dba", {"k": 2}), ("aqe", {"k": 10, "alpha": 3})]``.

    ``none``, ``g`` and ``""`` give ``[]``; ``g`` steps (global search) are dropped.
    """
    spec = spec.strip().lower()
    if spec in ("", "none", "g"):
        return []
    steps = []
    for part in spec.split("+"):
        name, _, params = part.strip().partition(":")
        name = name.strip()
        if not name:
            raise ValueError(f"rerank spec {spec!r}: empty step")
        kwargs: dict[str, float | int | str] = {}
        for item in filter(None, (p.strip() for p in params.split(","))):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise ValueError(f"rerank spec {spec!r}: expected key=value, got {item!r}")
            kwargs[key.strip()] = _parse_value(value.strip())
        if name == "g":
            if kwargs:
                raise ValueError(f"rerank spec {spec!r}: 'g' (global search) takes no parameters")
            continue
        steps.append((name, kwargs))
    return steps


def build_reranker(spec: str) -> Reranker:
    """One callable running every step of ``spec`` in the order written."""
    steps: list[Reranker] = []
    stages: list[tuple[str, str]] = []
    for name, kwargs in parse_spec(spec):
        entry = RERANKERS.get(name)
        try:
            steps.append(entry.factory(**kwargs))
        except TypeError as e:
            raise ValueError(f"rerank step {name!r}: bad parameters {kwargs} ({e})") from e
        stage = getattr(entry.info, "stage", "")
        if stage in _STAGE_ORDER:
            stages.append((entry.name, stage))
    for (a, sa), (b, sb) in zip(stages, stages[1:], strict=False):
        if _STAGE_ORDER[sb] < _STAGE_ORDER[sa]:
            log.warning(
                "rerank spec %r runs %s (%s side) after %s (%s side); the canonical order is "
                "database augmentation, then query expansion, then diffusion",
                spec,
                b,
                sb,
                a,
                sa,
            )

    def run(state: RankState) -> RankState:
        for step in steps:
            state = step(state)
        return state

    return run


def rerank(spec: str, queries: np.ndarray, database: np.ndarray, result: SearchResult) -> SearchResult:
    """Apply ``spec`` to a global-search ``result`` (``(Q, K)``) and return the new ranking."""
    return build_reranker(spec)(RankState(queries, database, result)).result


# --------------------------------------------------------------------------- cache


def _fingerprint(a: np.ndarray) -> tuple[Hashable, ...]:
    """Cheap content fingerprint: shape, dtype, buffer address and a hash of sampled rows."""
    step = max(1, a.shape[0] // 64) if a.ndim else 1
    sample = np.ascontiguousarray(a[::step] if a.ndim else a)
    digest = hashlib.blake2b(sample.tobytes(), digest_size=16).hexdigest()
    return (a.shape, a.dtype.str, a.__array_interface__["data"][0], digest)


class _ArrayCache:
    """Small thread-safe LRU of values derived from arrays.

    Keys are ``(id(array), fingerprint, kind, params)``; each entry holds a weak reference to
    its source array and is discarded once that array is gone, so a recycled ``id`` never hits.
    """

    def __init__(self, maxsize: int = 8) -> None:
        self.maxsize = maxsize
        self._items: OrderedDict[tuple, tuple[weakref.ref, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def _prefix(self, arr: np.ndarray, kind: str) -> tuple:
        return (id(arr), _fingerprint(arr), kind)

    def get(self, arr: np.ndarray, kind: str, params: tuple) -> Any | None:
        key = (*self._prefix(arr, kind), params)
        with self._lock:
            hit = self._items.get(key)
            if hit is None or hit[0]() is not arr:
                return None
            self._items.move_to_end(key)
            return hit[1]

    def find(self, arr: np.ndarray, kind: str, accept: Callable[[tuple], bool]) -> tuple[tuple, Any] | None:
        """The most recent entry for ``arr`` and ``kind`` whose params ``accept`` returns True for."""
        prefix = self._prefix(arr, kind)
        with self._lock:
            for key in reversed(self._items):
                ref, value = self._items[key]
                if key[:3] == prefix and ref() is arr and accept(key[3]):
                    self._items.move_to_end(key)
                    return key[3], value
        return None

    def put(self, arr: np.ndarray, kind: str, params: tuple, value: Any) -> Any:
        key = (*self._prefix(arr, kind), params)
        with self._lock:
            for k in [k for k, (ref, _) in self._items.items() if ref() is None]:
                del self._items[k]
            self._items[key] = (weakref.ref(arr), value)
            self._items.move_to_end(key)
            while len(self._items) > self.maxsize:
                self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


_CACHE = _ArrayCache(maxsize=12)


def clear_cache() -> None:
    """Forget every cached kNN list, augmented database, diffusion graph and offline matrix."""
    _CACHE.clear()


def _frozen(*arrays: np.ndarray) -> None:
    for a in arrays:
        a.setflags(write=False)


# --------------------------------------------------------------------------- neighbours


def _resolve_knn(method: str, n: int) -> str:
    if method == "auto":
        return "exact" if n <= EXACT_KNN_MAX_N else "approx"
    if method not in ("exact", "approx"):
        raise ValueError(f"knn must be 'exact', 'approx' or 'auto', got {method!r}")
    return method


def _top_k_rows(sims: np.ndarray, cols: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` of each row of ``sims`` ``(m, c)``, best first; ``cols`` maps columns to ids."""
    c = sims.shape[1]
    kk = min(k, c)
    part = np.argpartition(sims, c - kk, axis=1)[:, c - kk :] if kk < c else np.broadcast_to(np.arange(c), sims.shape)
    ps = np.take_along_axis(sims, part, axis=1)
    order = np.argsort(-ps, axis=1, kind="stable")
    return np.take_along_axis(ps, order, axis=1), cols[np.take_along_axis(part, order, axis=1)]


_TOPK_MAX_K = 256  # up to this k, torch's product + topk beat faiss's heaps (1.5-2x at k = 3 and 50)


def _gemm_topk_knn(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` rows of ``x`` for every row (itself included): blocked ``x @ x.T`` + ``torch.topk``.

    Both steps run in torch, so one thread pool does the work (numpy's BLAS threads followed by
    torch's were up to 4x slower on a busy machine); one reused 16 MiB buffer holds the
    similarities, since faulting in fresh pages costs as much as the product.
    """
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
        out = torch.mm(t[lo:hi], t.T, out=buf[: hi - lo])
        v, i = torch.topk(out, k, dim=1)
        sims[lo:hi], ids[lo:hi] = v.numpy(), i.numpy()
    return sims, ids


def _approx_knn(x: np.ndarray, k: int, nprobe: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Approximate top-``k`` neighbours of every row of ``x`` among the rows of ``x``.

    Inverted-file scheme batched for BLAS: spherical k-means with ``round(sqrt(N))``
    centroids, each vector assigned to its nearest centroid; the vectors of one centroid are
    compared (one matrix product) with the vectors of the ``nprobe`` centroids most often
    among their members' ``nprobe`` nearest centroids (their own first). Cost about
    ``nprobe / sqrt(N)`` of the exact graph.
    """
    n, d = x.shape
    nlist = max(1, int(round(np.sqrt(n))))
    nprobe = max(1, min(nprobe, nlist))
    km = faiss.Kmeans(d, nlist, niter=10, spherical=True, seed=seed, max_points_per_centroid=64, verbose=False)
    km.train(x)
    cent = km.centroids
    _, probes = faiss.knn(x, cent, nprobe, metric=faiss.METRIC_INNER_PRODUCT)
    assign = probes[:, 0]
    order = np.argsort(assign, kind="stable")
    counts = np.bincount(assign, minlength=nlist)
    starts = np.concatenate([[0], np.cumsum(counts)])
    csim = cent @ cent.T
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
        sims = x[members] @ x[cand].T
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
    method = _resolve_knn(knn, n)
    if method == "approx" and n <= 4 * max(k, 64):
        method = "exact"  # nothing to gain on tiny databases
    tag = (method, nprobe if method == "approx" else 0)
    hit = _CACHE.find(db, "knn", lambda p: p[0] == tag and p[1] >= k)
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
    _frozen(sims, ids)
    _CACHE.put(db, "knn", (tag, k), (sims, ids))
    return sims, ids


# --------------------------------------------------------------------------- AQE and DBA


def _l2(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _weights(sims: np.ndarray, alpha: float) -> np.ndarray:
    return (np.maximum(sims, 0.0) ** alpha if alpha else np.ones_like(sims)).astype(np.float32)


@RERANKERS.register(
    "aqe",
    aliases=("alpha-qe", "aqe-alpha", "qe"),
    info=RerankerInfo("query", "Chum et al. ICCV 2007; alpha-QE: Radenovic et al. TPAMI 2018"),
)
def make_aqe(k: int = 2, alpha: float = 0.0) -> Reranker:
    """Average query expansion (Chum et al. 2007); alpha > 0 gives alpha-QE (Radenovic et al. 2018).

    Each query is replaced by the L2-normalised sum of itself (weight 1) and its top-``k``
    vectors in the current ranking, weighted by ``max(similarity, 0) ** alpha`` (1 each when
    alpha = 0), then searched again.
    """
    if k < 1:
        raise ValueError(f"aqe: k must be >= 1, got {k}")
    if alpha < 0:
        raise ValueError(f"aqe: alpha must be >= 0, got {alpha}")

    def step(s: RankState) -> RankState:
        top = s.result.indices[:, :k]  # (Q, k)
        neigh = s.database[np.maximum(top, 0)]  # (Q, k, D)
        sims = np.einsum("qd,qkd->qk", s.queries, neigh)  # similarities, whatever the scores hold
        w = np.where(top >= 0, _weights(sims, alpha), 0.0).astype(np.float32)
        q = _l2(s.queries + np.einsum("qk,qkd->qd", w, neigh)).astype(np.float32)
        return RankState(q, s.database, search(q, s.database, k=s.result.k))

    return step


def _augment_database(db: np.ndarray, k: int, alpha: float, knn: str, nprobe: int) -> np.ndarray:
    """DBA of ``db`` ``(N, D)`` with its top-``k`` neighbours (itself excluded); cached, read-only."""
    params = (k, float(alpha), knn, nprobe)
    hit = _CACHE.get(db, "dba", params)
    if hit is not None:
        return hit
    n = db.shape[0]
    sims, idx = database_knn(db, min(k + 1, n), knn, nprobe)
    # drop each vector itself from its neighbour list (it is usually, but not always, first)
    self_mask = idx == np.arange(n)[:, None]
    keep = np.argsort(self_mask, axis=1, kind="stable")[:, :k]
    idx = np.take_along_axis(idx, keep, axis=1)
    sims = np.take_along_axis(sims, keep, axis=1)
    w = np.where(idx >= 0, _weights(sims, alpha), 0.0).astype(np.float32)
    aug = np.empty_like(db)
    for lo in range(0, n, 16384):  # row chunks bound the temporaries; k gathers, not one (N, k, D)
        hi = min(lo + 16384, n)
        block = db[lo:hi].copy()
        for j in range(idx.shape[1]):
            block += w[lo:hi, j : j + 1] * db[np.maximum(idx[lo:hi, j], 0)]
        aug[lo:hi] = block / np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)
    _frozen(aug)
    return _CACHE.put(db, "dba", params, aug)


@RERANKERS.register(
    "dba",
    info=RerankerInfo("database", "Arandjelovic and Zisserman CVPR 2012; Gordo et al. IJCV 2017"),
)
def make_dba(k: int = 2, alpha: float = 0.0, knn: str = "auto", nprobe: int = 8) -> Reranker:
    """Database-side augmentation (Arandjelovic and Zisserman 2012; Gordo et al. 2017).

    Each database vector is replaced by the L2-normalised sum of itself and its top-``k``
    database neighbours (itself excluded), weighted by ``max(similarity, 0) ** alpha`` (1
    when alpha = 0); queries are then searched again against the augmented database.
    """
    if k < 1:
        raise ValueError(f"dba: k must be >= 1, got {k}")
    if alpha < 0:
        raise ValueError(f"dba: alpha must be >= 0, got {alpha}")
    _resolve_knn(knn, 0)

    def step(s: RankState) -> RankState:
        aug = _augment_database(s.database, k, alpha, knn, nprobe)
        return RankState(s.queries, aug, search(s.queries, aug, k=s.result.k))

    return step


# --------------------------------------------------------------------------- diffusion


def diffusion_graph(
    database: np.ndarray, k: int = 50, gamma: float = 3.0, knn: str = "auto", nprobe: int = 8
) -> sp.csr_matrix:
    """``S = D^-1/2 W D^-1/2`` of the database's mutual kNN graph (Iscen et al. 2017), cached.

    ``W[i, j] = max(s_ij, 0) ** gamma`` when ``i`` and ``j`` are among each other's ``k``
    nearest database vectors (each vector counted among its own, as in the authors' code),
    0 otherwise and on the diagonal; ``D = diag(W 1)``.

    Returns:
        ``(N, N)`` symmetric float32 CSR matrix (never dense).
    """
    db = as_rows(database, "database")
    params = (int(k), float(gamma), _resolve_knn(knn, db.shape[0]), nprobe)
    hit = _CACHE.get(db, "graph", params)
    if hit is not None:
        return hit
    n = db.shape[0]
    sims, ids = database_knn(db, k, knn, nprobe)
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
    deg = np.asarray(w.sum(axis=1), dtype=np.float64).ravel()
    dinv = np.zeros(n)
    dinv[deg > 0] = deg[deg > 0] ** -0.5
    row_of = np.repeat(np.arange(n, dtype=itype), np.diff(w.indptr))
    s = sp.csr_matrix(
        ((w.data * (dinv[row_of] * dinv[w.indices])).astype(np.float32), w.indices, w.indptr), shape=(n, n)
    )
    s.sort_indices()
    _frozen(s.data, s.indices, s.indptr)
    return _CACHE.put(db, "graph", params, s)


def _cg(matvec: Callable[[np.ndarray], np.ndarray], b: np.ndarray, axis: int, rtol: float, maxiter: int) -> np.ndarray:
    """Conjugate gradient on many symmetric positive definite systems at once.

    ``b`` is 2-D; ``axis`` is the axis *within* a system (0: one system per column, 1: one per
    row); ``matvec`` applies the block operator to an array shaped like ``b``. Per system the
    iterations are those of ``scipy.sparse.linalg.cg`` without preconditioner, stopping once
    ``||r|| < rtol * ||b||`` or after ``maxiter`` iterations (the system is then frozen).
    """
    spec = "ij,ij->j" if axis == 0 else "ij,ij->i"

    def dot(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        out = np.einsum(spec, u, v, dtype=np.float64)
        return out[None, :] if axis == 0 else out[:, None]

    x = np.zeros_like(b)
    r = b.copy()
    bnorm = np.sqrt(dot(b, b))
    atol = rtol * bnorm
    p = None
    rho_prev = None
    for _ in range(maxiter):
        rho = dot(r, r)
        # scipy returns x = 0 when b = 0; r = 0 exactly means solved (and would divide by 0)
        active = ~(np.sqrt(rho) < atol) & (bnorm > 0) & (rho > 0)
        if not active.any():
            break
        if p is None:
            p = r.copy()
        else:
            beta = np.divide(rho, rho_prev, out=np.zeros_like(rho), where=active & (rho_prev > 0))
            p *= beta.astype(b.dtype)
            p += r
        q = matvec(p)
        pq = dot(p, q)
        a = np.divide(rho, pq, out=np.zeros_like(rho), where=active & (pq != 0))
        x += a.astype(b.dtype) * p
        r -= a.astype(b.dtype) * q
        rho_prev = rho
    return x


def _query_seeds(queries: np.ndarray, db: np.ndarray, kq: int, gamma: float) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, weights)``, ``(Q, kq)``: each query's ``kq`` nearest database vectors and ``max(s, 0) ** gamma``."""
    res = search(queries, db, k=kq)
    w = np.where(res.indices >= 0, np.maximum(res.scores, 0.0) ** gamma, 0.0).astype(np.float32)
    return np.maximum(res.indices, 0), w


_RANK_CHUNK = 1 << 21  # scores ranked at a time


def _rank_by(scores: np.ndarray, previous: SearchResult) -> SearchResult:
    """Rank by ``scores`` ``(Q, N)`` (positive ones, largest first, ties by index), then the rest
    of ``previous`` in its order; keeps ``previous``'s length ``K``. Queries go in chunks of
    about 2M scores, which bounds the float64 and index temporaries."""
    nq, n = scores.shape
    step = max(1, _RANK_CHUNK // max(n, 1))
    if nq > step:
        parts = [
            _rank_by(
                scores[lo : lo + step], SearchResult(previous.scores[lo : lo + step], previous.indices[lo : lo + step])
            )
            for lo in range(0, nq, step)
        ]
        return SearchResult(np.concatenate([p.scores for p in parts]), np.concatenate([p.indices for p in parts]))
    kk = previous.k
    f = np.maximum(scores, 0.0).astype(np.float64)
    key = np.where(f > 0, f, -np.inf)
    prev = previous.indices
    pos = np.broadcast_to(np.arange(kk, dtype=np.float64), prev.shape)
    rows = np.broadcast_to(np.arange(nq)[:, None], prev.shape)
    valid = prev >= 0
    fill = key[rows[valid], prev[valid]] == -np.inf
    key[rows[valid][fill], prev[valid][fill]] = -1.0 - pos[valid][fill]  # behind every positive score
    if kk < n:
        cand = np.argpartition(-key, kk - 1, axis=1)[:, :kk]
        ck = np.take_along_axis(key, cand, axis=1)
        order = np.lexsort((cand, -ck), axis=1)
        idx = np.take_along_axis(cand, order, axis=1)
    else:  # a stable sort of the whole row breaks ties by index already
        idx = np.argsort(-key, axis=1, kind="stable")
    best = np.take_along_axis(key, idx, axis=1)
    out_s = np.where(best > 0, best, 0.0).astype(np.float32)
    out_i = idx.astype(np.int64)
    empty = best == -np.inf
    out_s[empty] = -np.inf
    out_i[empty] = -1
    return SearchResult(out_s, out_i)


class _OfflineRows:
    """Rows of Yang et al.'s offline matrix computed so far: row -> (column ids, values)."""

    def __init__(self) -> None:
        self.ids: dict[int, np.ndarray] = {}
        self.vals: dict[int, np.ndarray] = {}
        self.lock = threading.Lock()


def _offline_rows(
    db: np.ndarray,
    rows: np.ndarray,
    k: int,
    gamma: float,
    alpha: float,
    trunc: int,
    tol: float,
    maxiter: int,
    knn: str,
    nprobe: int,
) -> sp.csr_matrix:
    """Rows ``rows`` (unique) of the offline matrix as a ``(len(rows), N)`` CSR matrix.

    Rows are computed on first use and memoised in the cache, so the offline stage costs only
    the rows that queries reach; computing every row is :func:`offline_diffusion`.
    """
    n = db.shape[0]
    t = min(int(trunc), n)
    params = (int(k), float(gamma), float(alpha), t, float(tol), int(maxiter), _resolve_knn(knn, n), nprobe)
    store = _CACHE.get(db, "offline", params)
    if store is None:
        store = _CACHE.put(db, "offline", params, _OfflineRows())
    with store.lock:
        missing = np.array([r for r in rows.tolist() if r not in store.ids], dtype=np.int64)
        if missing.size:
            graph = diffusion_graph(db, k, gamma, knn, nprobe)
            batch = max(1, min(missing.size, (1 << 16) // t))
            pos = np.full((batch, n), -1, dtype=np.int32)
            local = np.arange(t, dtype=np.int32)
            for lo in range(0, missing.size, 4096):  # chunks bound the (rows, trunc) neighbour lists
                chunk = missing[lo : lo + 4096]
                ids = _truncation_lists(db, chunk, t)
                for blo in range(0, chunk.size, batch):
                    r = ids[blo : blo + batch]
                    bi = np.arange(r.shape[0])[:, None]
                    pos[bi, r] = local
                    vals = _truncated_solve(graph, r, pos, alpha, tol, maxiter)
                    pos[bi, r] = -1
                    for j, row in enumerate(chunk[blo : blo + batch].tolist()):
                        store.ids[row] = r[j].astype(np.int32)
                        store.vals[row] = vals[j]
        m = rows.size
        indices = np.concatenate([store.ids[r] for r in rows.tolist()]) if m else np.empty(0, np.int32)
        data = np.concatenate([store.vals[r] for r in rows.tolist()]) if m else np.empty(0, np.float32)
    return sp.csr_matrix((data, indices, np.arange(0, m * t + 1, t, dtype=np.int64)), shape=(m, n))


def _truncation_lists(db: np.ndarray, rows: np.ndarray, t: int) -> np.ndarray:
    """``(len(rows), t)`` exact nearest database vectors of each row's vector, the row itself first."""
    ids = search(db[rows], db, k=t).indices
    for j in np.flatnonzero(ids[:, 0] != rows):  # duplicates of a vector can come before it
        rest = ids[j][ids[j] != rows[j]]
        ids[j] = np.concatenate([[rows[j]], rest[: t - 1]])
    return ids


def offline_diffusion(
    database: np.ndarray,
    k: int = 50,
    gamma: float = 3.0,
    alpha: float = 0.99,
    trunc: int = 1000,
    tol: float = 1e-6,
    maxiter: int = 20,
    knn: str = "auto",
    nprobe: int = 8,
) -> sp.csr_matrix:
    """The whole offline diffusion matrix of Yang et al. (AAAI 2019), memoised row by row.

    Row ``i`` holds the CG solution of ``(I - alpha S)[R_i, R_i] x = e_i`` on the truncated
    neighbourhood ``R_i`` (the ``trunc`` nearest database vectors of ``i``, exact search,
    ``i`` first) of the diffusion graph ``S`` (:func:`diffusion_graph`), at the columns ``R_i``.

    Returns:
        ``(N, N)`` float32 CSR matrix with ``min(trunc, N)`` stored entries per row.
    """
    db = as_rows(database, "database")
    return _offline_rows(db, np.arange(db.shape[0]), k, gamma, alpha, trunc, tol, maxiter, knn, nprobe)


def _truncated_solve(
    s: sp.csr_matrix, r: np.ndarray, pos: np.ndarray, alpha: float, tol: float, maxiter: int
) -> np.ndarray:
    """CG on ``(I - alpha S)[R_b, R_b] x = e_0`` for every row ``R_b`` of ``r`` ``(B, T)`` at once.

    ``pos[b, j]`` is the position of database vector ``j`` in ``R_b``, or -1. The systems form
    one block-diagonal sparse matrix of ``B * T`` rows.
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
    a32 = np.float32(alpha)

    def matvec(p: np.ndarray) -> np.ndarray:
        return p - a32 * (m @ p.ravel()).reshape(b, t)

    return _cg(matvec, rhs, axis=1, rtol=tol, maxiter=maxiter)


def _ordered_graph(db: np.ndarray, k: int, gamma: float, knn: str, nprobe: int) -> tuple[sp.csr_matrix, np.ndarray]:
    """``(S[perm][:, perm], perm)``: the diffusion graph in reverse Cuthill-McKee order, cached.

    Neighbours then sit in nearby rows, so ``S @ X`` reads ``X`` almost sequentially: about 6x
    faster than in database order for 100k vectors and 70 queries.
    """
    params = (int(k), float(gamma), _resolve_knn(knn, db.shape[0]), nprobe)
    hit = _CACHE.get(db, "graph-rcm", params)
    if hit is not None:
        return hit
    graph = diffusion_graph(db, k, gamma, knn, nprobe)
    perm = reverse_cuthill_mckee(graph, symmetric_mode=True).astype(np.int64)
    ordered = graph[perm][:, perm].tocsr()
    ordered.sort_indices()
    _frozen(ordered.data, ordered.indices, ordered.indptr, perm)
    return _CACHE.put(db, "graph-rcm", params, (ordered, perm))


def _online_diffusion(
    s: RankState, k: int, kq: int, alpha: float, gamma: float, maxiter: int, tol: float, knn: str, nprobe: int
) -> RankState:
    db = s.database
    n = db.shape[0]
    graph, perm = _ordered_graph(db, k, gamma, knn, nprobe)
    where = np.empty(n, np.int64)
    where[perm] = np.arange(n)  # database index -> row of the ordered graph
    ids, w = _query_seeds(s.queries, db, kq, gamma)
    nq = ids.shape[0]
    y = np.zeros((n, nq), np.float32)
    np.add.at(y, (where[ids], np.broadcast_to(np.arange(nq)[:, None], ids.shape)), w)
    a32 = np.float32(alpha)

    def matvec(p: np.ndarray) -> np.ndarray:
        return p - a32 * (graph @ p)

    f = _cg(matvec, y, axis=0, rtol=tol, maxiter=maxiter)  # (N, Q), ordered rows
    return RankState(s.queries, db, _rank_by(np.ascontiguousarray(f[where].T), s.result))


def _offline_search(
    s: RankState,
    k: int,
    kq: int,
    alpha: float,
    gamma: float,
    maxiter: int,
    tol: float,
    trunc: int,
    knn: str,
    nprobe: int,
) -> RankState:
    db = s.database
    ids, w = _query_seeds(s.queries, db, kq, gamma)
    rows, inverse = np.unique(ids, return_inverse=True)
    f = _offline_rows(db, rows, k, gamma, alpha, trunc, tol, maxiter, knn, nprobe)  # (rows, N)
    nq, kk = ids.shape
    seeds = sp.csr_matrix((w.ravel(), inverse.ravel(), np.arange(0, nq * kk + 1, kk)), shape=(nq, rows.size))
    scores = (seeds @ f).toarray()  # (Q, N): sum_j w_j F[j]
    return RankState(s.queries, db, _rank_by(scores, s.result))


@RERANKERS.register(
    "dfs",
    aliases=("diffusion",),
    info=RerankerInfo("ranking", "Iscen et al. CVPR 2017 (online); Yang et al. AAAI 2019 (mode=offline)"),
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

    Args:
        k: graph neighbours per database vector (itself counted).
        kq: database neighbours of each query that seed the diffusion.
        alpha: diffusion weight in ``(I - alpha S) f = y``, in (0, 1).
        gamma: similarity exponent for graph weights and seeds.
        maxiter, tol: conjugate-gradient iterations and relative residual.
        mode: ``online`` (query-time CG on the whole graph) or ``offline`` (precomputed
            truncated diffusion per database vector, then a linear combination per query).
        trunc: truncated neighbourhood size per database vector (``offline`` only).
        knn: graph neighbour search, ``exact``, ``approx`` or ``auto``.
        nprobe: inverted lists per vector for ``approx``.
    """
    if k < 2 or kq < 1:
        raise ValueError(f"dfs: need k >= 2 and kq >= 1, got k={k}, kq={kq}")
    if not 0 < alpha < 1:
        raise ValueError(f"dfs: alpha must be in (0, 1), got {alpha}")
    if maxiter < 1 or tol < 0 or trunc < 1:
        raise ValueError(f"dfs: need maxiter >= 1, tol >= 0, trunc >= 1, got {maxiter}, {tol}, {trunc}")
    if mode not in ("online", "offline"):
        raise ValueError(f"dfs: mode must be 'online' or 'offline', got {mode!r}")
    _resolve_knn(knn, 0)

    def step(s: RankState) -> RankState:
        if mode == "offline":
            return _offline_search(s, k, kq, alpha, gamma, maxiter, tol, trunc, knn, nprobe)
        return _online_diffusion(s, k, kq, alpha, gamma, maxiter, tol, knn, nprobe)

    return step


@RERANKERS.register(
    "dfs-offline",
    aliases=("diffusion-offline",),
    info=RerankerInfo("ranking", "Yang et al. AAAI 2019; fyang93/diffusion"),
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
