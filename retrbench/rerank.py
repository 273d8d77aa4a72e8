"""Reranking after global search: every reranker maps a :class:`RankState` to a new one.

The spec grammar is ``none``, or ``+``-joined steps with optional parameters, e.g.
``aqe``, ``aqe:k=10,alpha=3``, ``dba:k=2+aqe:k=2``. Steps run in the order written; the
paper's combinations are written database augmentation first, then query expansion, then
diffusion (``dba+aqe+dfs``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .registry import Registry
from .search import search
from .types import SearchResult

__all__ = ["RankState", "RERANKERS", "parse_spec", "build_reranker", "rerank"]


@dataclass(frozen=True, eq=False)
class RankState:
    """What rerankers consume and produce.

    Attributes:
        queries: ``(Q, D)`` L2-normalised query descriptors.
        database: ``(N, D)`` L2-normalised database descriptors.
        result: current ranking of the database for each query, ``(Q, K)``, best first.
    """

    queries: np.ndarray
    database: np.ndarray
    result: SearchResult


Reranker = Callable[[RankState], RankState]

# Factories take the step's parameters as keyword arguments and return a ``Reranker``.
RERANKERS: Registry[Reranker] = Registry("reranker")


def _parse_value(text: str) -> float | int | str:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_spec(spec: str) -> list[tuple[str, dict[str, float | int | str]]]:
    """``"dba:k=2+aqe:k=10,alpha=3"`` -> ``[("dba", {"k": 2}), ("aqe", {"k": 10, "alpha": 3})]``."""
    spec = spec.strip().lower()
    if spec in ("", "none", "g"):
        return []
    steps = []
    for part in spec.split("+"):
        name, _, params = part.strip().partition(":")
        kwargs: dict[str, float | int | str] = {}
        for item in filter(None, (p.strip() for p in params.split(","))):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise ValueError(f"rerank spec {spec!r}: expected key=value, got {item!r}")
            kwargs[key.strip()] = _parse_value(value.strip())
        steps.append((name.strip(), kwargs))
    return steps


def build_reranker(spec: str) -> Reranker:
    """One callable running every step of ``spec`` in order."""
    steps: list[Reranker] = []
    for name, kwargs in parse_spec(spec):
        try:
            steps.append(RERANKERS.create(name, **kwargs))
        except TypeError as e:
            raise ValueError(f"rerank step {name!r}: bad parameters {kwargs} ({e})") from e

    def run(state: RankState) -> RankState:
        for step in steps:
            state = step(state)
        return state

    return run


def rerank(spec: str, queries: np.ndarray, database: np.ndarray, result: SearchResult) -> SearchResult:
    """Apply ``spec`` to a global-search ``result`` and return the new ranking."""
    return build_reranker(spec)(RankState(queries, database, result)).result


def _l2(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@RERANKERS.register("aqe", aliases=("alpha-qe", "aqe-alpha", "qe"))
def make_aqe(k: int = 2, alpha: float = 0.0) -> Reranker:
    """Average query expansion (Chum et al. 2007); alpha > 0 gives alpha-QE (Radenovic et al. 2018).

    Each query is replaced by the L2-normalised sum of itself (weight 1) and its top-``k``
    database vectors weighted by ``similarity ** alpha`` (weight 1 each when alpha = 0), then
    searched again.
    """
    if k < 1:
        raise ValueError(f"aqe: k must be >= 1, got {k}")

    def step(s: RankState) -> RankState:
        top = s.result.indices[:, :k]  # (Q, k)
        sims = s.result.scores[:, :k]
        w = np.maximum(sims, 0.0) ** alpha if alpha else np.ones_like(sims)
        w = np.where(top >= 0, w, 0.0).astype(np.float32)
        q = s.queries + np.einsum("qk,qkd->qd", w, s.database[np.maximum(top, 0)])
        q = _l2(q).astype(np.float32)
        return RankState(q, s.database, search(q, s.database, k=s.result.k))

    return step


@RERANKERS.register("dba")
def make_dba(k: int = 2, alpha: float = 0.0) -> Reranker:
    """Database-side augmentation (Arandjelovic and Zisserman 2012; Gordo et al. 2017).

    Each database vector is replaced by the L2-normalised sum of itself and its top-``k``
    database neighbours (itself excluded), weighted by ``similarity ** alpha`` (1 when
    alpha = 0); queries are then searched again against the augmented database.
    """
    if k < 1:
        raise ValueError(f"dba: k must be >= 1, got {k}")

    def step(s: RankState) -> RankState:
        db = s.database
        nn = search(db, db, k=min(k + 1, db.shape[0]))
        idx, sims = nn.indices, nn.scores
        # drop each vector itself from its neighbour list (it is usually, but not always, first)
        self_mask = idx == np.arange(db.shape[0])[:, None]
        keep = np.argsort(self_mask, axis=1, kind="stable")[:, :k]
        idx = np.take_along_axis(idx, keep, axis=1)
        sims = np.take_along_axis(sims, keep, axis=1)
        w = np.maximum(sims, 0.0) ** alpha if alpha else np.ones_like(sims)
        aug = _l2(db + np.einsum("nk,nkd->nd", w.astype(np.float32), db[idx])).astype(np.float32)
        return RankState(s.queries, aug, search(s.queries, aug, k=s.result.k))

    return step
