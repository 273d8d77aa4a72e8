"""Search stage: nearest neighbours of the queries in the database by inner product.

On L2-normalised descriptors the inner product is the cosine similarity.

* :func:`search` (``index="flat"``, the default everywhere): exact; the kernel lives in
  :mod:`retrbench.utils.linalg`, shared with the rerankers' k-NN graphs.
* :func:`search_index`: the same with a faiss index built from an ``index_factory`` string
  (``IVF4096,Flat``, ``IVF65536,PQ64``, ``HNSW32``, ...), trained on a seeded sample of the
  database, searched with the given ``nprobe`` / ``efSearch``. It returns the ranking *and* an
  info dict that says everything approximate about it (index string, parameters as set,
  training sample size, and the recall@k of the approximate ranking against exact search,
  measured on the queries or a sample of them), so that result rows can carry it.

Training sample (``train_size`` None): ``min(N, max(65536, 64 * nlist))`` vectors for an
index with ``nlist`` inverted lists (faiss's k-means warns below 39 points per centroid and
subsamples above 256; 65536 covers the 256-centroid codebooks of PQ / SQ training), none for
an index that needs no training (``HNSW32``, ``Flat``). faiss is imported on first use.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

import numpy as np

from .types import SearchResult, as_rows
from .utils.linalg import exact_knn as knn
from .utils.linalg import exact_search as search
from .utils.linalg import recall_at_k

__all__ = ["FLAT", "check_index", "default_train_size", "knn", "search", "search_index"]

log = logging.getLogger(__name__)

FLAT = "flat"  # exact search (also accepted: "exact", "Flat", "IDMap,Flat")
_EXACT_NAMES = {"flat", "exact", "idmap,flat"}
_RECALL_AT = (1, 10, 100)  # recall@k reported for these k (<= the ranking length) and the length
_ADD_ROWS = 1 << 16  # vectors added to an index per call (bounds the float32 copies of a memory map)
_CHECK_DIM = 1536  # dimension used to check an index string when the data's is not known yet


def _is_flat(index: str | None) -> bool:
    return index is None or str(index).strip().lower() in _EXACT_NAMES


def _nlist(index: str) -> int:
    """Number of inverted lists in a factory string (``IVF4096`` -> 4096, ``IMI2x10`` -> 2**20), else 0."""
    m = re.search(r"IVF(\d+)", index)
    if m:
        return int(m.group(1))
    m = re.search(r"IMI(\d+)x(\d+)", index)
    return 2 ** (int(m.group(1)) * int(m.group(2))) if m else 0


def default_train_size(index: str, n: int) -> int:
    """Training sample size used when none is given: ``min(n, max(65536, 64 * nlist))``."""
    return min(n, max(1 << 16, 64 * _nlist(index)))


def _factory(index: str, dim: int) -> Any:
    import faiss

    try:
        return faiss.index_factory(dim, index, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1][-200:]
        raise ValueError(
            f"index {index!r}: faiss cannot build it for {dim}-d inner-product search ({reason})"
        ) from None


def check_index(index: str | None, dim: int | None = None) -> str:
    """``"flat"`` or the factory string, after checking that faiss can build it (for ``dim``
    dimensions when given); ``ValueError`` naming the string otherwise. Cheap: nothing is trained."""
    if _is_flat(index):
        return FLAT
    text = str(index).strip()
    _factory(text, int(dim) if dim else _CHECK_DIM)
    return text


def _set_params(idx: Any, nprobe: int | None, efsearch: int | None, index: str) -> dict[str, int]:
    """Set ``nprobe`` / ``efSearch`` through faiss's ParameterSpace; return the values in effect."""
    import faiss

    ps = faiss.ParameterSpace()
    for name, value in (("nprobe", nprobe), ("efSearch", efsearch)):
        if value is None:
            continue
        if isinstance(value, bool) or int(value) != value or value < 1:
            raise ValueError(f"index {index!r}: {name} must be a positive integer, got {value!r}")
        try:
            ps.set_index_parameter(idx, name, int(value))
        except RuntimeError:
            raise ValueError(f"index {index!r} has no parameter {name}") from None
    params: dict[str, int] = {}
    try:
        params["nprobe"] = int(faiss.extract_index_ivf(idx).nprobe)
    except RuntimeError:
        pass
    top = faiss.downcast_index(idx)
    if hasattr(top, "hnsw"):
        params["efSearch"] = int(top.hnsw.efSearch)
    elif efsearch is not None:
        params["efSearch"] = int(efsearch)
    return params


def search_index(
    queries: np.ndarray,
    database: np.ndarray,
    k: int,
    index: str | None = FLAT,
    *,
    nprobe: int | None = None,
    efsearch: int | None = None,
    train_size: int | None = None,
    seed: int = 0,
    recall_queries: int | None = 1000,
    progress: bool = False,
) -> tuple[SearchResult, dict[str, Any]]:
    """Top-``k`` database rows per query with an exact or a faiss index, and what it approximated.

    Args:
        queries: ``(Q, D)`` descriptors.
        database: ``(N, D)`` descriptors (a memory map is read in chunks while adding).
        k: neighbours per query (capped to ``N``).
        index: ``"flat"`` (exact, :func:`search`) or a faiss ``index_factory`` string built for
            inner product, e.g. ``"IVF4096,Flat"``, ``"IVF65536,PQ64"``, ``"HNSW32"``.
        nprobe: inverted lists visited per query (IVF indexes; faiss's default 1 when None).
        efsearch: HNSW search depth (faiss's default 16 when None).
        train_size: vectors sampled (seeded, without replacement) to train the index; default
            :func:`default_train_size`.
        seed: seed of the training sample and of faiss's k-means.
        recall_queries: queries (a seeded sample when there are more) searched exactly to
            measure recall; None uses every query.
        progress: a progress bar while adding vectors (on a terminal).

    Returns:
        ``(result, info)``. ``result`` as :func:`search` (``-1`` / ``-inf`` where the index
        returned fewer than ``k``; equal scores by increasing index). ``info`` (JSON-able):
        ``index`` (``"flat"`` or the string), ``exact`` (bool), ``k``, ``params`` (the
        ``nprobe`` / ``efSearch`` in effect), ``train_size``, ``recall`` (``{"1": ..., "10":
        ..., "100": ..., "<k>": ...}``: mean ``|approx top-j & exact top-j| / j`` over the
        ``recall_queries`` measured, for ``j`` up to ``k``; 1.0 everywhere for ``flat``),
        ``recall_queries``, and the seconds of ``train_s``, ``add_s``, ``search_s``, ``recall_s``.
    """
    q = as_rows(queries, "queries")
    n, dim = int(np.shape(database)[0]), int(np.shape(database)[1])
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"search: k must be a positive integer, got {k!r}")
    kk = min(int(k), n)
    if _is_flat(index):
        t0 = time.perf_counter()
        res = search(q, database, kk)
        info = {"index": FLAT, "exact": True, "k": kk, "params": {}, "train_size": 0, "recall": {}, "recall_queries": 0}
        info.update(train_s=0.0, add_s=0.0, search_s=time.perf_counter() - t0, recall_s=0.0)
        return res, info
    text = str(index).strip()
    if q.shape[1] != dim:
        raise ValueError(f"search: queries {q.shape} and database {(n, dim)} have different dimensions")
    idx = _factory(text, dim)
    info: dict[str, Any] = {"index": text, "exact": False, "k": kk}
    t0 = time.perf_counter()
    n_train = 0
    if not idx.is_trained:
        n_train = default_train_size(text, n) if train_size is None else min(int(train_size), n)
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(n, size=n_train, replace=False)) if n_train < n else np.arange(n)
        xt = np.ascontiguousarray(database[sample], dtype=np.float32)
        _seed_clustering(idx, seed)
        try:
            idx.train(xt)
        except RuntimeError as exc:
            reason = str(exc).strip().splitlines()[-1][-160:]
            raise ValueError(
                f"index {text!r}: training on {n_train} vectors failed ({reason}); give a larger train_size"
            ) from None
        del xt
    info["train_size"] = n_train
    info["train_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    from tqdm.auto import tqdm

    with tqdm(total=n, desc=f"adding to {text}", unit="vec", disable=None if progress else True) as bar:
        for lo in range(0, n, _ADD_ROWS):
            hi = min(lo + _ADD_ROWS, n)
            idx.add(np.ascontiguousarray(database[lo:hi], dtype=np.float32))
            bar.update(hi - lo)
    info["add_s"] = time.perf_counter() - t0
    info["params"] = _set_params(idx, nprobe, efsearch, text)
    t0 = time.perf_counter()
    scores, ids = idx.search(q, kk)
    scores = np.where(ids >= 0, scores, -np.inf).astype(np.float32)
    _order_ties(scores, ids)
    info["search_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    m = q.shape[0] if recall_queries is None else min(int(recall_queries), q.shape[0])
    rows = (
        np.sort(np.random.default_rng(seed).choice(q.shape[0], size=m, replace=False))
        if m < q.shape[0]
        else np.arange(m)
    )
    exact = search(q[rows], database, kk).indices
    ats = sorted({j for j in _RECALL_AT if j <= kk} | {kk})
    info["recall"] = {str(j): recall_at_k(ids[rows], exact, j) for j in ats}
    info["recall_queries"] = int(m)
    info["recall_s"] = time.perf_counter() - t0
    return SearchResult(scores, ids), info


def _seed_clustering(idx: Any, seed: int) -> None:
    """Seed the k-means of an IVF index's coarse quantizer (faiss's default seed is fixed too)."""
    import faiss

    try:
        faiss.extract_index_ivf(idx).cp.seed = int(seed) + 1234
    except RuntimeError:
        pass


def _order_ties(scores: np.ndarray, ids: np.ndarray) -> None:
    """In place: equal scores by increasing index, ``-1`` padding last (rows already sorted by score)."""
    rows = np.flatnonzero((scores[:, 1:] == scores[:, :-1]).any(axis=1))
    if rows.size == 0:
        return
    s, i = scores[rows], ids[rows]
    order = np.lexsort((np.where(i >= 0, i, np.iinfo(np.int64).max), -s), axis=-1)
    scores[rows] = np.take_along_axis(s, order, axis=1)
    ids[rows] = np.take_along_axis(i, order, axis=1)
