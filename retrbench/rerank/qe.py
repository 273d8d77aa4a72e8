"""Query expansion (``aqe``) and database-side augmentation (``dba``).

``aqe`` (aliases ``qe``, ``alpha-qe``, ``aqe-alpha``): average query expansion, Chum et al.,
"Total Recall", ICCV 2007: the query is replaced by the L2-normalised sum of itself and its
top-``k`` database vectors, then searched again. ``alpha > 0`` gives alpha-QE (Radenovic,
Tolias and Chum, TPAMI 2018), each neighbour weighted by ``max(similarity, 0) ** alpha``; that
paper uses ``alpha=3``. Defaults ``k=2, alpha=0``: plain averaging over a short list, as QE is
commonly run on global CNN descriptors; the query keeps weight 1. The papers tune ``k`` per
dataset, so give ``k`` (and ``alpha``) explicitly to reproduce a particular table.

``dba``: database-side augmentation (Arandjelovic and Zisserman, CVPR 2012; used with CNN
descriptors by Gordo et al., IJCV 2017): each database vector is replaced by the
L2-normalised sum of itself and its top-``k`` database neighbours (itself excluded), each
weighted by ``max(similarity, 0) ** alpha`` (1 when ``alpha=0``), and the queries are
searched again. Defaults ``k=2, alpha=0``, as for ``aqe``; deep-image-retrieval's
``expand_descriptors`` computes the same thing. The neighbour lists come from
:func:`~retrbench.rerank.graphs.database_knn` (parameters ``knn`` and ``nprobe``); the
augmented database is cached.
"""

from __future__ import annotations

import numpy as np

from ..utils.linalg import InnerProductScores, exact_search, l2_normalize
from .base import RERANKERS, RankState, Reranker, RerankerInfo, RerankReport
from .cache import CACHE, freeze
from .graphs import KNN_METHODS, KnnGraph, knn_graph

__all__ = ["make_aqe", "make_dba"]


def _weights(sims: np.ndarray, alpha: float) -> np.ndarray:
    """``max(sims, 0) ** alpha`` (1 everywhere when ``alpha`` is 0), float32, shaped like ``sims``."""
    return (np.maximum(sims, 0.0) ** alpha if alpha else np.ones_like(sims)).astype(np.float32)


@RERANKERS.register(
    "aqe",
    aliases=("alpha-qe", "aqe-alpha", "qe"),
    info=RerankerInfo(
        "query",
        "Chum et al. ICCV 2007; alpha-QE: Radenovic et al. TPAMI 2018",
        label="AQE",
        order=0,
        help="average query expansion (Chum 2007); k=2, alpha=0 (alpha>0: alpha-QE)",
    ),
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
        w = np.where(top >= 0, _weights(sims, alpha), 0.0).astype(np.float32)  # (Q, k)
        q = l2_normalize(s.queries + np.einsum("qk,qkd->qd", w, neigh)).astype(np.float32)  # (Q, D)
        res = exact_search(q, s.database, k=s.result.k)
        return RankState(q, s.database, res, scores=InnerProductScores(q, s.database))

    return step


def _augment_database(
    db: np.ndarray, k: int, alpha: float, knn: str, nprobe: int | None
) -> tuple[np.ndarray, KnnGraph]:
    """DBA of ``db`` ``(N, D)`` with its top-``k`` neighbours (itself excluded), and the graph
    used; cached, read-only ``(N, D)``."""
    params = (k, float(alpha), knn, nprobe)
    hit = CACHE.get(db, "dba", params)
    if hit is not None:
        return hit
    n = db.shape[0]
    graph = knn_graph(db, min(k + 1, n), knn, nprobe)  # (N, k + 1)
    sims, idx = graph.sims, graph.ids
    # drop each vector itself from its neighbour list (it is usually, but not always, first)
    self_mask = idx == np.arange(n)[:, None]
    keep = np.argsort(self_mask, axis=1, kind="stable")[:, :k]
    idx = np.take_along_axis(idx, keep, axis=1)  # (N, k)
    sims = np.take_along_axis(sims, keep, axis=1)
    w = np.where(idx >= 0, _weights(sims, alpha), 0.0).astype(np.float32)  # (N, k)
    aug = np.empty_like(db)
    for lo in range(0, n, 16384):  # row chunks bound the temporaries; k gathers, not one (N, k, D)
        hi = min(lo + 16384, n)
        block = db[lo:hi].copy()
        for j in range(idx.shape[1]):
            block += w[lo:hi, j : j + 1] * db[np.maximum(idx[lo:hi, j], 0)]
        aug[lo:hi] = l2_normalize(block)
    freeze(aug)
    return CACHE.put(db, "dba", params, (aug, graph))


@RERANKERS.register(
    "dba",
    info=RerankerInfo(
        "database",
        "Arandjelovic and Zisserman CVPR 2012; Gordo et al. IJCV 2017",
        label="DBA",
        order=2,
        help="database-side augmentation (Arandjelovic 2012); k=2, alpha=0, knn=auto, nprobe=8",
    ),
)
def make_dba(k: int = 2, alpha: float = 0.0, knn: str = "auto", nprobe: int = 8) -> Reranker:
    """Database-side augmentation (Arandjelovic and Zisserman 2012; Gordo et al. 2017).

    Each database vector is replaced by the L2-normalised sum of itself and its top-``k``
    database neighbours (itself excluded), weighted by ``max(similarity, 0) ** alpha`` (1
    when alpha = 0); queries are then searched again against the augmented database.
    ``knn`` (``exact``, ``ivf`` / ``approx``, ``hnsw`` or ``auto``) and ``nprobe`` choose the
    neighbour search (:mod:`.graphs`); the step's report carries the graph's info.
    """
    if k < 1:
        raise ValueError(f"dba: k must be >= 1, got {k}")
    if alpha < 0:
        raise ValueError(f"dba: alpha must be >= 0, got {alpha}")
    knn = str(knn).lower()
    if knn not in KNN_METHODS:
        raise ValueError(f"dba: knn must be one of {', '.join(KNN_METHODS)}, got {knn!r}")

    def step(s: RankState) -> RankState:
        aug, graph = _augment_database(s.database, k, alpha, knn, nprobe)
        res = exact_search(s.queries, aug, k=s.result.k)
        report = RerankReport(approximate=not graph.info["exact"], details={"graph": dict(graph.info)})
        return RankState(s.queries, aug, res, scores=InnerProductScores(s.queries, aug), reports=(report,))

    return step
