"""Reranking after global search: every reranker maps a :class:`RankState` to a new one.

    from retrbench.rerank import rerank
    result = rerank("dba+aqe+dfs", queries, database, global_result)

Modules: :mod:`.base` (the contract, the registry, specs and running them), :mod:`.qe`
(``aqe``, ``dba``), :mod:`.diffusion` (``dfs``, ``dfs-offline``), :mod:`.graphs` (the
database's kNN lists, exact or faiss-approximate, with how they were made), :mod:`.cache`
(what is computed from the database alone is kept). Each step adds a :class:`RerankReport`
(approximations) to the state and, where the method scores every database item, full-ranking
``scores`` for exact evaluation.
A new reranker is one module registering a factory in :data:`RERANKERS`, plus its import
line below (see :mod:`.base`).
"""

from __future__ import annotations

# importing the entry modules registers them
from . import diffusion as diffusion
from . import qe as qe
from .base import (
    RERANKERS,
    RankState,
    Reranker,
    RerankerInfo,
    RerankReport,
    build_reranker,
    clamp_notes,
    pipeline_label,
    pipeline_order,
    rerank,
    rerank_progress,
)
from .cache import clear_cache
from .diffusion import DiffusionParams, diffusion_graph, offline_diffusion
from .graphs import EXACT_KNN_MAX_N, KnnGraph, database_knn, knn_graph

__all__ = [
    "EXACT_KNN_MAX_N",
    "RERANKERS",
    "DiffusionParams",
    "KnnGraph",
    "RankState",
    "RerankReport",
    "Reranker",
    "RerankerInfo",
    "build_reranker",
    "clamp_notes",
    "clear_cache",
    "database_knn",
    "diffusion_graph",
    "knn_graph",
    "offline_diffusion",
    "pipeline_label",
    "pipeline_order",
    "rerank",
    "rerank_progress",
]
