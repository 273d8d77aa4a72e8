"""Evaluation protocols: the :data:`PROTOCOLS` registry, :func:`evaluate` and per-query AP.

Each protocol is ``(ranks (Q, K), gnd, kappas) -> list[Metric]`` built on the vectorised
labelling of :mod:`retrbench.evaluation.core`: ``revisited`` (Easy / Medium / Hard), ``classic``
(Oxford / Paris), ``ukbench`` (N-S), ``map`` (generic, with R@k) and ``gldv2`` (mAP@100).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..registry import EntryInfo, Registry
from ..types import Metric, SearchResult
from .checks import _as_ranks, check_ranks
from .core import (
    Gnd,
    MapResult,
    _ap,
    _check_kappas,
    _count_within,
    _gnd_sets,
    _hits,
    _label,
    _Labels,
    _mean,
    _result,
    _Sets,
    check_gnd_range,
)

__all__ = ["PROTOCOLS", "ProtocolInfo", "evaluate", "gnd_from_pickle", "gldv2_protocol", "map_at_k", "per_query_ap", "precision_at_k"]

ProtocolFn = Callable[[np.ndarray, Gnd, Sequence[int]], "list[Metric]"]



@dataclass(frozen=True)
class ProtocolInfo(EntryInfo):
    """Metadata of a registered protocol (``help`` is the one-line description).

    Attributes:
        keys: ground-truth keys every query must have (``bbx`` and other keys are ignored).
        splits: the ``Metric.split`` values the protocol reports.
    """

    keys: tuple[str, ...] = ()
    splits: tuple[str, ...] = ()


PROTOCOLS: Registry[ProtocolFn] = Registry("protocol", ProtocolInfo)



# --------------------------------------------------------------------------- protocols on labels
#
# Every protocol but gldv2 reads a ranking only through its labels (which entries hold which
# ground-truth set, at which position): the functions below compute the metrics from a
# ``_Labels``, whether it comes from a (Q, K) ranking (``_label``) or from the exact positions
# of the labelled items in the full ranking (``retrbench.evaluation.scores``).

_REVISITED_SPLITS = (("easy", 0b001, 0b100 | 0b010), ("medium", 0b001 | 0b010, 0b100), ("hard", 0b010, 0b100 | 0b001))


def _revisited_sets(gnd: Gnd) -> list[_Sets]:
    sets = _gnd_sets(gnd, ("easy", "hard", "junk"), protocol="revisited")
    return [sets["easy"], sets["hard"], sets["junk"]]


def _ok_junk_sets(name: str, junk_required: bool) -> Callable[[Gnd], list[_Sets]]:
    def sets(gnd: Gnd) -> list[_Sets]:
        if junk_required:
            found = _gnd_sets(gnd, ("ok", "junk"), protocol=name)
        else:
            found = _gnd_sets(gnd, ("ok",), ("junk",))
        return [found["ok"], found["junk"]]

    return sets


def _revisited_metrics(lab: _Labels, kappas: Sequence[int]) -> list[Metric]:
    out: list[Metric] = []
    for split, pos_bits, junk_bits in _REVISITED_SPLITS:
        out += _percent_metrics(split, _result(_hits(lab, pos_bits, junk_bits), kappas), kappas)
    return out


def _classic_metrics(lab: _Labels, kappas: Sequence[int]) -> list[Metric]:
    return _percent_metrics("all", _result(_hits(lab, 0b01, 0b10), kappas), kappas)


def _ukbench_metrics(lab: _Labels, kappas: Sequence[int]) -> list[Metric]:
    h = _hits(lab, 0b01, 0b10)
    ns = _mean(_count_within(h, 4), h.valid)
    return [Metric("all", "N-S", float(ns)), Metric("all", "mAP", 100.0 * _mean(_ap(h), h.valid))]


def _map_metrics(lab: _Labels, kappas: Sequence[int]) -> list[Metric]:
    h = _hits(lab, 0b01, 0b10)
    out = _percent_metrics("all", _result(h, kappas), kappas)
    first = np.full(h.n_pos.size, np.inf)
    found = h.n_found > 0
    first[found] = h.pos[h.start()[found]]
    for k in kappas:
        out.append(Metric("all", f"R@{k}", 100.0 * _mean((first < k).astype(np.float64), h.valid)))
    return out


def _revisited_ap(lab: _Labels) -> dict[str, np.ndarray]:
    return {name: _ap(_hits(lab, pos, junk)) for name, pos, junk in _REVISITED_SPLITS}


def _all_ap(lab: _Labels) -> dict[str, np.ndarray]:
    return {"all": _ap(_hits(lab, 0b01, 0b10))}


@dataclass(frozen=True)
class LabelledProtocol:
    """A protocol computed from labels: the ground-truth sets it labels (bit ``i`` = set ``i``),
    its metrics and its per-query AP."""

    sets: Callable[[Gnd], list[_Sets]]
    metrics: Callable[[_Labels, Sequence[int]], list[Metric]]
    query_ap: Callable[[_Labels], dict[str, np.ndarray]]


LABELLED: dict[str, LabelledProtocol] = {
    "revisited": LabelledProtocol(_revisited_sets, _revisited_metrics, _revisited_ap),
    "classic": LabelledProtocol(_ok_junk_sets("classic", False), _classic_metrics, _all_ap),
    "ukbench": LabelledProtocol(_ok_junk_sets("ukbench", True), _ukbench_metrics, _all_ap),
    "map": LabelledProtocol(_ok_junk_sets("map", True), _map_metrics, _all_ap),
}


def _from_ranks(name: str, ranks: np.ndarray, gnd: Gnd, kappas: Sequence[int]) -> list[Metric]:
    arr = _as_ranks(ranks, len(gnd))
    kappas = _check_kappas(kappas)
    spec = LABELLED[name]
    return spec.metrics(_label(arr, spec.sets(gnd)), kappas)


# --------------------------------------------------------------------------- protocols


def _percent_metrics(split: str, res: MapResult, kappas: Sequence[int]) -> list[Metric]:
    out = [Metric(split, "mAP", 100.0 * res.map)]
    out += [Metric(split, f"mP@{k}", 100.0 * float(v)) for k, v in zip(kappas, res.mpr, strict=True)]
    return out


@PROTOCOLS.register(
    "revisited",
    aliases=("revisitop",),
    info=ProtocolInfo(keys=("easy", "hard", "junk"), splits=("easy", "medium", "hard"), help="revisited Oxford/Paris: Easy, Medium, Hard"),
)
def revisited_protocol(ranks: np.ndarray, gnd: Gnd, kappas: Sequence[int] = (1, 5, 10)) -> list[Metric]:
    """Revisited Oxford / Paris (Radenović et al. 2018): mAP and mP@k per Easy / Medium / Hard split.

    Easy: positives ``easy``, junk ``junk + hard``; Medium: positives ``easy + hard``, junk
    ``junk``; Hard: positives ``hard``, junk ``junk + easy``. Values in percent.
    """
    return _from_ranks("revisited", ranks, gnd, kappas)


@PROTOCOLS.register(
    "classic",
    info=ProtocolInfo(keys=("ok", "junk"), splits=("all",), help="original Oxford5k / Paris6k: positives good+ok, junk ignored"),
)
def classic_protocol(ranks: np.ndarray, gnd: Gnd, kappas: Sequence[int] = (1, 5, 10)) -> list[Metric]:
    """Original Oxford5k / Paris6k protocol: positives ``ok`` (good + ok), ``junk`` removed; mAP and mP@k in percent."""
    return _from_ranks("classic", ranks, gnd, kappas)


@PROTOCOLS.register(
    "ukbench",
    info=ProtocolInfo(keys=("ok", "junk"), splits=("all",), help="UKBench: N-S score (relevant images in the top 4, 0-4) and mAP"),
)
def ukbench_protocol(ranks: np.ndarray, gnd: Gnd, kappas: Sequence[int] = (1, 5, 10)) -> list[Metric]:
    """UKBench (Nistér & Stewénius 2006): ``N-S`` = mean number of ``ok`` in the top 4 (0-4), and mAP in percent.

    The query image itself is normally in the database and in its own ``ok`` list. Junk is
    removed before taking the top 4; ``kappas`` is accepted for a uniform signature and unused.
    """
    return _from_ranks("ukbench", ranks, gnd, kappas)


@PROTOCOLS.register(
    "map",
    info=ProtocolInfo(keys=("ok", "junk"), splits=("all",), help="generic: mAP, mP@k and recall@k"),
)
def map_protocol(ranks: np.ndarray, gnd: Gnd, kappas: Sequence[int] = (1, 5, 10)) -> list[Metric]:
    """Generic: mAP, mP@k and ``R@k`` (percent of queries with a positive in the junk-free top k)."""
    return _from_ranks("map", ranks, gnd, kappas)


def gnd_from_pickle(
    data: Mapping[str, Any] | Gnd, protocol: str = "revisited", n_database: int | None = None
) -> list[dict[str, np.ndarray]]:
    """Ground truth as ``evaluate`` takes it, from a loaded ``gnd_*.pkl``.

    Args:
        data: the dict returned by :func:`retrbench.datasets.groundtruth.load_gnd_pickle`
            (its ``gnd`` list is used), or that list itself.
        protocol: a :data:`PROTOCOLS` name; selects the keys kept (``easy``/``hard``/``junk``
            for ``revisited``, ``ok``/``junk`` otherwise). ``bbx`` and other keys are dropped.
        n_database: the number of database images; default ``len(data["imlist"])`` when
            ``data`` is the dict. Every id must be below it.

    Returns:
        Q dicts mapping each key to a 1-D int64 array of database indices.

    Raises:
        ValueError: a query lacks a key of the protocol, or an id is not a database index
            (naming the query, key and value, e.g. ``gnd[3]['junk'] has database id 5000 but
            the database has 4993 images (ids 0..4992)``).
    """
    if isinstance(data, Mapping):
        entries = data["gnd"]
        if n_database is None and "imlist" in data:
            n_database = len(data["imlist"])
    else:
        entries = data
    keys = PROTOCOLS.get(protocol).info.keys
    sets = _gnd_sets(entries, keys, protocol=protocol)
    check_gnd_range(entries, keys, n_database)
    per_key = {k: sets[k].split() for k in keys}
    return [{k: per_key[k][q] for k in keys} for q in range(len(entries))]


def evaluate(
    ranks: np.ndarray | SearchResult,
    gnd: Gnd,
    protocol: str = "revisited",
    kappas: Sequence[int] = (1, 5, 10),
    n_database: int | None = None,
) -> list[Metric]:
    """Evaluate rankings under a protocol of :data:`PROTOCOLS`.

    Args:
        ranks: ``(Q, K)`` integer database indices, one row per query, best first (or a
            :class:`~retrbench.types.SearchResult`, whose ``indices`` are used); ``-1`` = nothing.
            Each id at most once per row (:func:`~retrbench.evaluation.check_ranks`).
        gnd: ``Q`` per-query mappings with the protocol's keys (``easy``/``hard``/``junk`` for
            ``revisited``, ``ok``/``junk`` otherwise) as lists or integer arrays; other keys
            such as ``bbx`` are ignored, so a raw ``gnd_*.pkl`` ``gnd`` list works as is.
        protocol: ``revisited``, ``classic``, ``ukbench``, ``map`` or ``gldv2``.
        kappas: the ``k`` of mP@k (and R@k).
        n_database: the number of database images (``len(imlist)``); when given, every id in
            ``ranks`` and ``gnd`` must be below it. Repeated and negative ids are always refused.

    Returns:
        The protocol's metrics (percentages except UKBench's N-S), e.g. for ``revisited``
        ``Metric("easy", "mAP", ...)``, ``Metric("easy", "mP@1", ...)``, ... for each split.

    Raises:
        ValueError: ranks not 2-D integer with one row per query, an id listed twice in a row,
            below -1 or (with ``n_database``) beyond the database, naming the row and value; a
            query lacking a key the protocol needs, non-integer or negative ground-truth ids, or
            ids beyond the database (naming query, key and value); non-positive kappas.
        KeyError: unknown protocol (naming the closest known ones).
    """
    entry = PROTOCOLS.get(protocol)
    if isinstance(gnd, Mapping):
        raise ValueError("gnd: expected a sequence of per-query dicts; for a loaded gnd_*.pkl pass data['gnd'] or use gnd_from_pickle")
    arr = _as_ranks(ranks, len(gnd))
    kappas = _check_kappas(kappas)
    check_ranks(arr, n_database)
    check_gnd_range(gnd, entry.info.keys, n_database)
    return entry.factory(arr, gnd, kappas)  # the factory checks gnd, naming the protocol


def per_query_ap(
    ranks: np.ndarray | SearchResult, gnd: Gnd, protocol: str = "revisited", n_database: int | None = None
) -> dict[str, np.ndarray]:
    """Average precision of every query, per split, as fractions in [0, 1].

    ``revisited`` gives ``easy`` / ``medium`` / ``hard``; ``classic``, ``map`` and ``ukbench``
    give ``all``; queries without positives in a split are ``nan`` (left out of the means).
    Other protocols (``gldv2``'s mAP@100) return an empty dict. ``ranks`` and ``n_database``
    are checked as by :func:`evaluate`.

    Returns:
        split -> ``(Q,)`` float64 array, in ground-truth query order.
    """
    entry = PROTOCOLS.get(protocol)
    arr = _as_ranks(ranks, len(gnd))
    check_ranks(arr, n_database)
    check_gnd_range(gnd, entry.info.keys, n_database)
    if entry.name not in LABELLED:
        return {}
    spec = LABELLED[entry.name]
    return spec.query_ap(_label(arr, spec.sets(gnd)))


# GLDv2 retrieval challenge metric (Weyand et al. 2020; Kaggle / DELF definition)


def _relevance(ranks: np.ndarray, gnd: Sequence[Mapping[str, Any]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(Q, k)`` bool relevance of the first ``k`` junk-free results, and ``(Q,)`` positives per query."""
    arr = np.asarray(ranks)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"ranks: expected a 2-D (Q, K) integer array, got shape {arr.shape}, dtype {arr.dtype}")
    if arr.shape[0] != len(gnd):
        raise ValueError(f"ranks: {arr.shape[0]} rows for {len(gnd)} ground-truth queries (one row per query)")
    if k < 1:
        raise ValueError(f"k must be a positive integer, got {k}")
    rel = np.zeros((arr.shape[0], k), dtype=bool)
    n_pos = np.zeros(arr.shape[0], dtype=np.int64)
    for q, g in enumerate(gnd):
        if "ok" not in g:
            raise ValueError(f"gnd[{q}] lacks key 'ok' (has {sorted(map(str, g))})")
        ok = np.unique(np.asarray(g["ok"], dtype=np.int64).reshape(-1))
        junk = np.asarray(g.get("junk", ()), dtype=np.int64).reshape(-1)
        n_pos[q] = ok.size
        row = arr[q]
        row = row[(row != -1) & ~np.isin(row, junk)][:k]
        _, first = np.unique(row, return_index=True)
        once = np.zeros(row.size, dtype=bool)
        once[first] = True  # a repeated id takes a position but is relevant only once
        rel[q, : row.size] = np.isin(row, ok) & once
    return rel, n_pos


def map_at_k(ranks: np.ndarray, gnd: Sequence[Mapping[str, Any]], k: int = 100) -> float:
    """GLDv2 / Kaggle mean average precision at ``k``, in percent.

    Args:
        ranks: ``(Q, K)`` database indices, best first (``-1`` = nothing); ``K`` may be < ``k``.
        gnd: ``Q`` mappings with ``ok`` (relevant database indices) and optional ``junk``.
        k: cut-off (100 for GLDv2).

    Returns:
        ``100 * mean_q (1 / min(m_q, k)) * sum_{i<=k} P_q(i) rel_q(i)`` over the queries with
        ``m_q >= 1`` relevant images; ``nan`` when there is none.
    """
    rel, n_pos = _relevance(ranks, gnd, k)
    valid = n_pos > 0
    if not valid.any():
        return float("nan")
    hits = np.cumsum(rel, axis=1)
    prec = hits / np.arange(1, k + 1)
    ap = (prec * rel).sum(axis=1)[valid] / np.minimum(n_pos[valid], k)
    return float(100.0 * ap.mean())


def precision_at_k(ranks: np.ndarray, gnd: Sequence[Mapping[str, Any]], kappas: Sequence[int]) -> np.ndarray:
    """``(len(kappas),)`` mean P@k in percent as DELF's ``MeanPrecisions``: relevant in the top k / k."""
    kmax = max(int(k) for k in kappas)
    rel, n_pos = _relevance(ranks, gnd, kmax)
    valid = n_pos > 0
    if not valid.any():
        return np.full(len(kappas), np.nan)
    hits = np.cumsum(rel[valid], axis=1)
    return np.array([100.0 * float(np.mean(hits[:, int(k) - 1] / int(k))) for k in kappas])


@PROTOCOLS.register(
    "gldv2",
    info=ProtocolInfo(keys=("ok", "junk"), splits=("all",), help="GLDv2 retrieval: mAP@100 (Kaggle / DELF) and mP@k"),
)
def gldv2_protocol(
    ranks: np.ndarray, gnd: Sequence[Mapping[str, Any]], kappas: Sequence[int] = (1, 5, 10)
) -> list[Metric]:
    """GLDv2 retrieval: ``mAP@100`` (Kaggle / DELF) and ``mP@k`` (relevant in the top k / k), in percent.

    ``-1`` and junk are removed first. :func:`map_at_k` on its own lets a repeated id take a
    position but count once (as DELF); through :func:`evaluate` a repeated id is an error.
    """
    kappas = tuple(int(k) for k in kappas)
    if any(k < 1 for k in kappas):
        raise ValueError(f"kappas must be positive integers, got {kappas}")
    out = [Metric("all", "mAP@100", map_at_k(ranks, gnd, 100))]
    if kappas:
        out += [
            Metric("all", f"mP@{k}", float(v)) for k, v in zip(kappas, precision_at_k(ranks, gnd, kappas), strict=True)
        ]
    return out
