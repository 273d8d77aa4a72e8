"""The diffusions' shared numerics: a batched conjugate gradient (:func:`_cg`), the query
seeds (:func:`_query_seeds`) and the ranking by diffusion scores (:func:`_rank_by`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ..types import SearchResult
from ..utils.linalg import exact_search


def _cg(
    matvec: Callable[[np.ndarray], np.ndarray],
    b: np.ndarray,
    axis: int,
    rtol: float,
    maxiter: int,
    stats: dict | None = None,
    bar: Any = None,
) -> np.ndarray:
    """Conjugate gradient on many symmetric positive definite systems at once.

    ``b`` is 2-D; ``axis`` is the axis *within* a system (0: one system per column, 1: one per
    row); ``matvec`` applies the block operator to an array shaped like ``b``. Per system the
    iterations are those of ``scipy.sparse.linalg.cg`` without preconditioner, stopping once
    ``||r|| < rtol * ||b||`` or after ``maxiter`` iterations (the system is then frozen).
    ``stats`` (when given) receives ``iterations`` and ``unconverged`` (systems stopped by
    ``maxiter``); ``bar`` (a progress bar) is advanced once per iteration.
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
    done = 0
    active = np.zeros(1, bool)
    for _ in range(maxiter):
        rho = dot(r, r)
        # scipy returns x = 0 when b = 0; r = 0 exactly means solved (and would divide by 0)
        active = ~(np.sqrt(rho) < atol) & (bnorm > 0) & (rho > 0)
        if not active.any():
            break
        done += 1
        if bar is not None:
            bar.update(1)
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
    if stats is not None:
        rho = dot(r, r)
        stats["iterations"] = done
        stats["unconverged"] = int((~(np.sqrt(rho) < atol) & (bnorm > 0) & (rho > 0)).sum())
    return x


def _query_seeds(queries: np.ndarray, db: np.ndarray, kq: int, gamma: float) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, weights)``, ``(Q, kq)``: each query's ``kq`` nearest database vectors and ``max(s, 0) ** gamma``."""
    res = exact_search(queries, db, k=kq)
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
    key = np.where(f > 0, f, -np.inf)  # (Q, N)
    prev = previous.indices  # (Q, K)
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
    best = np.take_along_axis(key, idx, axis=1)  # (Q, K)
    out_s = np.where(best > 0, best, 0.0).astype(np.float32)
    out_i = idx.astype(np.int64)
    empty = best == -np.inf
    out_s[empty] = -np.inf
    out_i[empty] = -1
    return SearchResult(out_s, out_i)
