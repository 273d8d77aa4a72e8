"""Exact evaluation of the full ranking from scores, without sorting the database.

A method that gives every database item a score (search: ``queries @ database.T``; AQE and
DBA: the same with new queries or a new database; diffusion: its scores, then the incoming
ranking) defines a full ranking per query: larger score first, equal scores by increasing
database index (as :func:`~retrbench.utils.linalg.exact_search`). The metrics of the revisited,
classic, UKBench and generic protocols depend on that ranking only through the positions of
the ground-truth items (positives and junk), and the 0-based position of item ``j`` is the
number of items ranked before it::

    position(j) = #{i : s_i > s_j} + #{i < j : s_i = s_j}

So :func:`exact_evaluation` makes two passes over the database in blocks (a matrix product
per block for inner products): the first reads the ranking keys of the labelled items (only
in the blocks that hold one), the second counts, per query, how many keys lie above each of
them (``np.searchsorted`` of the block's keys among the sorted labelled keys, then a
histogram). Positions then go through the protocols' own label-level code
(:data:`~retrbench.evaluation.protocols.LABELLED`), so the numbers are those of
:func:`~retrbench.evaluation.evaluate` on the full ranking, bit for bit. Memory: one block of
scores (about 32 MiB) plus its keys, whatever ``N``.

``gldv2`` (mAP@100) is defined on the top 100: it is evaluated on the exact top 100
(:meth:`~retrbench.utils.linalg.DatabaseScores.top_k`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..types import Metric
from ..utils.linalg import DatabaseScores, InnerProductScores, single_threaded_blas
from .core import Gnd, _check_kappas, _Labels, _Sets, _sorted_distinct, check_gnd_range
from .protocols import LABELLED, PROTOCOLS, evaluate, per_query_ap

__all__ = ["ExactEvaluation", "evaluate_scores", "exact_evaluation", "full_ranking_positions"]


@dataclass(frozen=True)
class ExactEvaluation:
    """What :func:`exact_evaluation` computes.

    Attributes:
        metrics: the protocol's metrics on the full ranking (as :func:`~retrbench.evaluation.evaluate`).
        query_ap: per split, ``(Q,)`` AP of each query (as :func:`~retrbench.evaluation.per_query_ap`).
        ranking_length: the length of the ranking evaluated: ``N`` (the full ranking), or 100
            for ``gldv2``.
    """

    metrics: list[Metric]
    query_ap: dict[str, np.ndarray] = field(default_factory=dict)
    ranking_length: int = 0


def _labelled_items(sets: Sequence[_Sets], nq: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(rows, ids, codes)`` of every distinct (query, database id) in some set, sorted by
    query then id; ``codes`` has bit ``i`` set when the id is in ``sets[i]`` for that query."""
    keys, bits = [], []
    for bit, s in enumerate(sets):
        keys.append(np.repeat(np.arange(nq, dtype=np.int64) * width, s.lengths) + s.ids)
        bits.append(np.full(s.ids.size, 1 << bit, np.uint8))
    allk = np.concatenate([np.empty(0, np.int64), *keys])
    allb = np.concatenate([np.empty(0, np.uint8), *bits])
    uniq, inverse = np.unique(allk, return_inverse=True)
    codes = np.zeros(uniq.size, np.uint8)
    np.bitwise_or.at(codes, inverse, allb)
    return uniq // width, uniq % width, codes


def full_ranking_positions(
    scores: DatabaseScores, rows: np.ndarray, ids: np.ndarray, *, progress: bool = False
) -> np.ndarray:
    """0-based positions of database items ``ids`` in the full rankings of queries ``rows``.

    Args:
        scores: the scores defining the ranking (larger first, ties by increasing index).
        rows: ``(P,)`` query of each item, non-decreasing.
        ids: ``(P,)`` database ids, distinct within a query.
        progress: a tqdm bar over the database blocks (on a terminal).

    Returns:
        ``(P,)`` int64 positions, as a stable sort of the scores would place the items.
    """
    n = scores.n_database
    rows = np.asarray(rows, dtype=np.int64)
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= n):
        raise ValueError(f"full_ranking_positions: ids must be database indices below {n}")
    with single_threaded_blas():  # small block products: one BLAS thread is faster (see linalg)
        return _positions(scores, rows, ids, progress)


def _positions(scores: DatabaseScores, rows: np.ndarray, ids: np.ndarray, progress: bool) -> np.ndarray:
    nq = scores.n_queries
    ib = scores.index_bits()
    blocks = list(scores.blocks())
    starts = np.array([lo for lo, _ in blocks], dtype=np.int64)
    item_block = np.searchsorted(starts, ids, side="right") - 1  # (P,) block of each item
    item_keys = np.empty(ids.size, np.uint64)
    for b in np.unique(item_block):  # pass 1: the keys of the labelled items
        lo, hi = blocks[b]
        sel = np.flatnonzero(item_block == b)
        item_keys[sel] = scores.keys(lo, hi, ib)[rows[sel], ids[sel] - lo]
    # per query: the labelled keys sorted ascending, and where each item sits among them
    order = np.lexsort((item_keys, rows))
    bounds = np.searchsorted(rows[order], np.arange(nq + 1))
    sorted_keys = item_keys[order]
    hist = np.zeros(ids.size + nq, np.int64)  # per query, m_q + 1 counters, laid end to end
    hist_off = bounds[:-1] + np.arange(nq)
    from tqdm.auto import tqdm

    for b in tqdm(range(len(blocks)), desc="exact evaluation", unit="block", disable=None if progress else True):
        lo, hi = blocks[b]
        keys = scores.keys(lo, hi, ib)  # (Q, B)
        sel = np.flatnonzero(item_block == b)
        keys[rows[sel], ids[sel] - lo] = item_keys[sel]  # the very bits pass 1 read
        for q in range(nq):
            t = sorted_keys[bounds[q] : bounds[q + 1]]
            if t.size == 0:
                continue
            kb = keys[q]
            kb = kb[kb > t[0]]  # keys below every labelled key count for none
            if kb.size:
                m = t.size
                hist[hist_off[q] : hist_off[q] + m + 1] += np.bincount(
                    np.searchsorted(t, kb, side="left"), minlength=m + 1
                )
    # an item at sorted place j (within its query) is preceded by the keys counted in bins > j
    pos_sorted = np.empty(ids.size, np.int64)
    for q in range(nq):
        m = bounds[q + 1] - bounds[q]
        if m == 0:
            continue
        h = hist[hist_off[q] : hist_off[q] + m + 1]
        above = np.cumsum(h[::-1])[::-1]  # above[j] = sum(h[j:])
        pos_sorted[bounds[q] : bounds[q + 1]] = above[1:]
    positions = np.empty(ids.size, np.int64)
    positions[order] = pos_sorted
    return positions


def _labels(sets: Sequence[_Sets], scores: DatabaseScores, progress: bool) -> _Labels:
    """The labels a full ranking would give, from the exact positions of the labelled items."""
    nq, n = scores.n_queries, scores.n_database
    width = n + 1
    rows, ids, codes = _labelled_items(sets, nq, width)
    positions = full_ranking_positions(scores, rows, ids, progress=progress)
    lin = rows * n + positions
    order = np.argsort(lin)
    base = np.arange(nq, dtype=np.int64) * width
    keys = tuple(_sorted_distinct(np.repeat(base, s.lengths) + s.ids + 1) for s in sets)
    return _Labels(lin[order], codes[order], keys, width, (nq, n))


def exact_evaluation(
    scores: DatabaseScores,
    gnd: Gnd,
    protocol: str = "revisited",
    kappas: Sequence[int] = (1, 5, 10),
    *,
    progress: bool = False,
) -> ExactEvaluation:
    """Metrics and per-query AP of the full ranking that ``scores`` define, without ranking it.

    Args:
        scores: a score for every database item of each query
            (:class:`~retrbench.utils.linalg.InnerProductScores` for ``queries @ database.T``);
            the ranking is larger first, equal scores by increasing database index.
        gnd: ``Q`` per-query mappings with the protocol's keys (as :func:`~retrbench.evaluation.evaluate`).
        protocol: a :data:`~retrbench.evaluation.PROTOCOLS` name.
        kappas: the ``k`` of mP@k (and R@k).
        progress: a progress bar over the database blocks (on a terminal).

    Returns:
        :class:`ExactEvaluation`: equal, bit for bit, to ``evaluate`` and ``per_query_ap`` of
        the full ranking (``exact_search(queries, database)`` for inner products).
    """
    entry = PROTOCOLS.get(protocol)
    if isinstance(gnd, Mapping):
        raise ValueError(
            "gnd: expected a sequence of per-query dicts; for a loaded gnd_*.pkl pass data['gnd'] or use gnd_from_pickle"
        )
    if len(gnd) != scores.n_queries:
        raise ValueError(f"scores: {scores.n_queries} queries but the ground truth has {len(gnd)}")
    kappas = _check_kappas(kappas)
    n = scores.n_database
    check_gnd_range(gnd, entry.info.keys, n)
    if entry.name not in LABELLED:  # defined on a top list (gldv2: the top 100)
        k = min(n, 100)
        top = scores.top_k(k).indices
        return ExactEvaluation(
            evaluate(top, gnd, entry.name, kappas, n_database=n), per_query_ap(top, gnd, entry.name, n), k
        )
    spec = LABELLED[entry.name]
    lab = _labels(spec.sets(gnd), scores, progress)
    return ExactEvaluation(spec.metrics(lab, kappas), spec.query_ap(lab), n)


def evaluate_scores(
    queries: np.ndarray,
    database: np.ndarray,
    gnd: Gnd,
    protocol: str = "revisited",
    kappas: Sequence[int] = (1, 5, 10),
    *,
    progress: bool = False,
) -> list[Metric]:
    """Exact full-ranking metrics of inner-product search: ``evaluate(exact_search(queries, database), ...)``
    without the ``(Q, N)`` sort, the database read block by block (a memory map is fine).

    ``queries`` ``(Q, D)`` and ``database`` ``(N, D)`` are the descriptors as searched (whitened,
    L2-normalised). See :func:`exact_evaluation`.
    """
    return exact_evaluation(InnerProductScores(queries, database), gnd, protocol, kappas, progress=progress).metrics
