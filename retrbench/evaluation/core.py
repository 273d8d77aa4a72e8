"""Retrieval metrics: mAP and mP@k as the revisited Oxford / Paris protocol computes them.

The numbers match the reference evaluation of Radenović et al. (``compute_ap`` /
``compute_map`` in ``revisitop/python/evaluate.py``) to the last bit on full rankings:

* **AP** follows the trapezoidal rule over the precision-recall curve. Junk images are removed
  from the ranking first (every positive moves up by the number of junk images ranked above
  it); the ``j``-th positive (0-based) found at junk-free position ``r`` (0-based) adds
  ``(p0 + p1) / (2 * n_pos)`` with ``p0 = 1 if r == 0 else j / r`` and ``p1 = (j + 1) / (r + 1)``.
  AP is always divided by the number of positives in the ground truth, retrieved or not.
* **P@k** (as the reference computes it) is ``#{positives at 1-based position <= kq} / kq``
  with ``kq = min(last positive position, k)``: a query whose positives all lie within the
  top ``k`` is not penalised for ``k`` exceeding their number.
* **Queries without positives** (e.g. two rOxford queries have no *easy* image) get ``nan``
  and are left out of the means, as in the reference; a mean over no query is ``nan``.

Conventions of this module (differences from the reference are marked *):

* ``ranks`` is ``(Q, K)``, one row per query, best first (*the reference uses ``(N, Q)``
  columns). ``K`` may be smaller than the database (*partial top-K lists*): positives that are
  not listed are not retrieved; they add nothing to AP, and P@k uses ``kq = k`` for a query
  with unlisted positives (their position is unknown but beyond the list), which equals the
  full-ranking value whenever ``k`` is at most the number of non-junk entries listed.
* ``-1`` marks "nothing" (faiss padding) and is skipped like junk (*).
* A database id listed twice in a ground-truth list counts once (* the reference would count
  it twice in the AP normaliser; the public files have no such duplicates).
* A row of ``ranks`` must list each database id at most once: :func:`check_ranks` (run by
  :func:`compute_map` and :func:`~retrbench.evaluation.evaluate`) rejects a repeated id, an id
  below ``-1`` and, given the database size, an id beyond the database, naming the row (*the
  reference counts a repeated positive again, which can push AP above 1).

Public API: :func:`average_precision`, :func:`check_ranks`, :func:`compute_map`, :func:`evaluate`,
:func:`gnd_from_pickle` and the :data:`PROTOCOLS` registry (``revisited``, ``classic``,
``ukbench``, ``map``) whose factories are ``(ranks, gnd, kappas) -> list[Metric]``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from ..types import Metric
from .checks import _as_ranks, _database_size, _range_text, check_ranks

__all__ = ["Gnd", "MapResult", "average_precision", "check_gnd_range", "compute_map"]

Gnd = Sequence[Mapping[str, Any]]
ProtocolFn = Callable[[np.ndarray, Gnd, Sequence[int]], "list[Metric]"]

# Above this many table cells (Q x largest id), membership is found by binary search on sorted
# (query, id) keys instead of a dense (Q, max_id) lookup table (64 MiB of uint8).
_DENSE_LIMIT = 1 << 26
_NOTHING = np.uint8(128)  # code bit of the -1 "nothing" entries, always skipped like junk


class MapResult(NamedTuple):
    """Result of :func:`compute_map` (a tuple: ``mAP, aps, mpr, prs = compute_map(...)``).

    Attributes:
        map: mean AP over queries with at least one positive, a fraction in [0, 1].
        aps: ``(Q,)`` float64 AP per query, ``nan`` for queries without positives.
        mpr: ``(len(kappas),)`` mean precision at each kappa over the same queries.
        prs: ``(Q, len(kappas))`` precision at each kappa per query, ``nan`` rows as ``aps``.
    """

    map: float
    aps: np.ndarray
    mpr: np.ndarray
    prs: np.ndarray

# --------------------------------------------------------------------------- single query


def average_precision(positions: np.ndarray, n_positives: int) -> float:
    """AP of one query from the junk-free positions of its retrieved positives.

    Args:
        positions: ``(P,)`` sorted 0-based positions of the retrieved positives in the ranking
            after junk removal (``P <= n_positives``; unretrieved positives are simply absent).
        n_positives: number of positives in the ground truth (the recall denominator).

    Returns:
        AP in [0, 1] by the trapezoidal rule of the reference ``compute_ap``; ``nan`` when
        ``n_positives`` is 0.
    """
    if n_positives <= 0:
        return float("nan")
    r = np.asarray(positions, dtype=np.int64).ravel()
    if r.size == 0:
        return 0.0
    terms = _trapezoids(np.arange(r.size, dtype=np.int64), r) * (1.0 / n_positives) / 2.0
    return float(np.cumsum(terms)[-1])  # running sum in rank order, as the reference adds


def _trapezoids(j: np.ndarray, r: np.ndarray) -> np.ndarray:
    """``p0 + p1`` for the ``j``-th positive (0-based) at junk-free 0-based position ``r``."""
    jf = j.astype(np.float64)
    rf = r.astype(np.float64)
    p0 = np.ones_like(rf)
    np.divide(jf, rf, out=p0, where=r > 0)
    return p0 + (jf + 1.0) / (rf + 1.0)


# --------------------------------------------------------------------------- ground truth


def _index_array(value: Any, where: str) -> np.ndarray:  # slow path, also names the bad entry
    """``value`` (list / array of database ids) as a 1-D int64 array, or ValueError naming ``where``."""
    arr = np.asarray(value)
    if arr.size == 0:
        return np.empty(0, dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError(f"{where}: expected a 1-D list of database indices, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.all(np.mod(arr, 1) == 0):
            arr = arr.astype(np.int64)
        else:
            raise ValueError(f"{where}: expected integer database indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.min() < 0:
        raise ValueError(f"{where}: database indices must be >= 0, got {int(arr.min())}")
    return arr


@dataclass(frozen=True)
class _Sets:
    """One ground-truth list of every query, flattened: ``ids[off[q]:off[q] + lengths[q]]`` is query ``q``'s."""

    ids: np.ndarray  # (sum(lengths),) int64 database indices
    lengths: np.ndarray  # (Q,) int64

    def split(self) -> list[np.ndarray]:
        return np.split(self.ids, np.cumsum(self.lengths)[:-1]) if self.lengths.size else []


def _flatten(values: list[Any], key: str) -> _Sets:
    """Concatenate the per-query lists of ``key``; on bad input re-check query by query to name it."""
    try:
        lengths = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
        total = int(lengths.sum())
        ids = np.asarray(np.concatenate(values)) if total else np.empty(0, dtype=np.int64)
        ok = ids.ndim == 1 and ids.size == total
        if ok and not np.issubdtype(ids.dtype, np.integer):  # empty lists make float arrays
            ok = np.issubdtype(ids.dtype, np.floating) and bool(np.all(np.mod(ids, 1) == 0))
        ok = ok and (total == 0 or int(ids.min()) >= 0)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        arrays = [_index_array(v, f"gnd[{q}][{key!r}]") for q, v in enumerate(values)]
        return _Sets(np.concatenate([np.empty(0, np.int64), *arrays]), np.array([a.size for a in arrays], dtype=np.int64))
    return _Sets(ids.astype(np.int64, copy=False), lengths)


def _gnd_sets(gnd: Gnd, keys: Sequence[str], optional: Sequence[str] = (), protocol: str = "") -> dict[str, _Sets]:
    """Per key, the flattened lists of ``gnd``; a missing required key raises naming key and query."""
    for q, entry in enumerate(gnd):
        if not isinstance(entry, Mapping):
            raise ValueError(f"gnd[{q}]: expected a dict of index lists, got {type(entry).__name__}")
        for k in keys:
            if k not in entry:
                need = f" required by protocol {protocol!r}" if protocol else ""
                raise ValueError(f"gnd[{q}] lacks key {k!r}{need} (has {sorted(map(str, entry))})")
    out = {k: _flatten([entry[k] for entry in gnd], k) for k in keys}
    for k in optional:
        out[k] = _flatten([() if entry.get(k) is None else entry[k] for entry in gnd], k)
    return out


# --------------------------------------------------------------------------- vectorised core


@dataclass(frozen=True)
class _Labels:
    """Ranking entries that belong to some ground-truth set.

    ``lin`` are the sorted flat indices into the ``(Q, K)`` ranking of entries in at least one
    set, ``code`` their bit sets (bit ``i`` = set ``i``, plus ``_NOTHING`` for -1 entries),
    ``keys`` per set the sorted distinct ``q * width + id + 1`` keys.
    """

    lin: np.ndarray
    code: np.ndarray
    keys: tuple[np.ndarray, ...]
    width: int
    shape: tuple[int, int]

    def n_distinct(self, bits: int) -> np.ndarray:
        """``(Q,)`` number of distinct ids in the union of the sets selected by ``bits``."""
        parts = [k for i, k in enumerate(self.keys) if bits >> i & 1]
        keys = parts[0] if len(parts) == 1 else _sorted_distinct(np.concatenate(parts))
        return np.bincount(keys // self.width, minlength=self.shape[0])


def _sorted_distinct(x: np.ndarray) -> np.ndarray:
    """Sorted distinct values of ``x`` (a stable sort merges pre-sorted runs in linear time; ``np.unique`` hashes)."""
    x = np.sort(x, kind="stable")
    keep = np.empty(x.size, dtype=bool)
    keep[:1] = True
    np.not_equal(x[1:], x[:-1], out=keep[1:])
    return x[keep]


def _label(ranks: np.ndarray, sets: Sequence[_Sets]) -> _Labels:
    """Mark every entry of ``ranks`` ``(Q, K)`` with the sets (bit ``i`` = ``sets[i]``) holding it."""
    nq, k = ranks.shape
    top = max([int(ranks.max()) if ranks.size else -1] + [int(s.ids.max()) for s in sets if s.ids.size])
    width = top + 2  # key of (query q, id i) is q * width + i + 1; column 0 is id -1
    base = np.arange(nq, dtype=np.int64) * width
    keys = tuple(_sorted_distinct(np.repeat(base, s.lengths) + s.ids + 1) for s in sets)
    idx = ranks.astype(np.int64)  # (Q, K) keys of the ranking entries
    idx += 1
    idx += base[:, None]
    if nq * width <= _DENSE_LIMIT:  # dense (Q, width) lookup table
        table = np.zeros(nq * width, dtype=np.uint8)
        for bit, kk in enumerate(keys):
            table[kk] |= np.uint8(1 << bit)
        table[::width] = _NOTHING
        codes = table[idx]
    else:  # binary search in the sorted keys
        codes = np.zeros(idx.shape, dtype=np.uint8)
        for bit, kk in enumerate(keys):
            if kk.size:
                at = np.minimum(np.searchsorted(kk, idx), kk.size - 1)
                codes[kk[at] == idx] |= np.uint8(1 << bit)
        codes[ranks == -1] |= _NOTHING
    lin = np.flatnonzero(codes != 0)  # much faster than on uint8
    return _Labels(lin, codes.reshape(-1)[lin], keys, width, (nq, k))


@dataclass(frozen=True)
class _Hits:
    """Retrieved positives of all queries, row-major: query ``rows``, junk-free 0-based ``pos``."""

    rows: np.ndarray  # (P,) query of each retrieved positive, non-decreasing
    pos: np.ndarray  # (P,) junk-free 0-based position in its query's ranking
    n_found: np.ndarray  # (Q,) retrieved positives per query
    n_pos: np.ndarray  # (Q,) positives in the ground truth per query

    @property
    def valid(self) -> np.ndarray:
        """``(Q,)`` queries with at least one positive (the others are left out of means)."""
        return self.n_pos > 0

    def start(self) -> np.ndarray:
        return np.cumsum(self.n_found) - self.n_found


def _hits(lab: _Labels, pos_bits: int, junk_bits: int) -> _Hits:
    """Positions of the positives (``pos_bits`` sets) after removing junk (``junk_bits`` sets)."""
    nq, k = lab.shape
    pos_lin = lab.lin[(lab.code & pos_bits) != 0]
    junk_lin = lab.lin[(lab.code & (junk_bits | int(_NOTHING))) != 0]
    rows = pos_lin // k if k else pos_lin
    # junk entries strictly before each positive, in the same row
    junk_before = np.searchsorted(junk_lin, pos_lin) - np.searchsorted(junk_lin, rows * k)
    pos = pos_lin - rows * k - junk_before
    return _Hits(rows, pos, np.bincount(rows, minlength=nq), lab.n_distinct(pos_bits))


def _ap(h: _Hits) -> np.ndarray:
    """``(Q,)`` AP per query (``nan`` without positives)."""
    nq = h.n_pos.size
    step = np.zeros(nq)
    np.divide(1.0, h.n_pos, out=step, where=h.valid)
    j = np.arange(h.rows.size, dtype=np.int64) - h.start()[h.rows]
    # bincount adds in order, like the reference's running sum: identical bits
    aps = np.bincount(h.rows, weights=_trapezoids(j, h.pos) * step[h.rows] / 2.0, minlength=nq).astype(np.float64)
    aps[~h.valid] = np.nan
    return aps


def _precision_at(h: _Hits, kappas: Sequence[int]) -> np.ndarray:
    """``(Q, len(kappas))`` reference P@k (``kq = min(last positive, k)``), ``nan`` rows without positives."""
    nq = h.n_pos.size
    last = np.full(nq, np.inf)
    found = h.n_found > 0
    last[found] = h.pos[(h.start() + h.n_found - 1)[found]] + 1.0
    last[h.n_found < h.n_pos] = np.inf  # unlisted positives lie beyond the list
    prs = np.empty((nq, len(kappas)))
    one_based = h.pos + 1
    for i, kappa in enumerate(kappas):
        kq = np.minimum(last, float(kappa))
        prs[:, i] = np.bincount(h.rows, weights=one_based <= kq[h.rows], minlength=nq) / kq
    prs[~h.valid] = np.nan
    return prs


def _count_within(h: _Hits, n: int) -> np.ndarray:
    """``(Q,)`` retrieved positives at junk-free 1-based position <= ``n``."""
    return np.bincount(h.rows, weights=h.pos < n, minlength=h.n_pos.size)


def _mean(values: np.ndarray, valid: np.ndarray) -> np.ndarray | float:
    """Mean over the ``valid`` rows, summed in query order like the reference (``nan`` if none)."""
    v = values[valid]
    if v.shape[0] == 0:
        return np.full(values.shape[1:], np.nan) if values.ndim > 1 else float("nan")
    total = np.cumsum(v, axis=0)[-1] / v.shape[0]
    return total if values.ndim > 1 else float(total)


def _check_kappas(kappas: Sequence[int]) -> tuple[int, ...]:
    out = tuple(int(k) for k in kappas)
    if any(k < 1 for k in out) or any(int(k) != k for k in kappas):
        raise ValueError(f"kappas must be positive integers, got {tuple(kappas)}")
    return out


def check_gnd_range(gnd: Gnd, keys: Sequence[str], n_database: int | None, *, source: str = "gnd") -> None:
    """Check that every id under ``keys`` of every query is a database index below ``n_database``.

    Keys absent from a query are skipped (the protocols report them); ``n_database=None``
    checks nothing. Raises ``ValueError`` naming the query, key and value: ``gnd[2]['junk'] has
    database id 5000 but the database has 4993 images (ids 0..4992)`` (``source`` replaces
    ``gnd``, e.g. with a file name).
    """
    n = _database_size(n_database)
    if n is None:
        return
    sets = _gnd_sets(gnd, (), optional=tuple(keys))
    for key in keys:
        ids = sets[key].ids
        if ids.size and int(ids.max()) >= n:
            at = int(np.argmax(ids >= n))
            q = int(np.searchsorted(np.cumsum(sets[key].lengths), at, side="right"))
            raise ValueError(f"{source}[{q}][{key!r}] has database id {int(ids[at])} but {_range_text(n)}")


def _result(h: _Hits, kappas: Sequence[int]) -> MapResult:
    aps = _ap(h)
    prs = _precision_at(h, kappas)
    return MapResult(_mean(aps, h.valid), aps, _mean(prs, h.valid), prs)


def compute_map(
    ranks: np.ndarray, gnd: Gnd, kappas: Sequence[int] = (1, 5, 10), n_database: int | None = None
) -> MapResult:
    """mAP and mean precision at ``kappas``, vectorised over all queries.

    Args:
        ranks: ``(Q, K)`` integer database indices, one row per query, best first; ``K`` may
            be less than the database size; ``-1`` entries are skipped. Checked by
            :func:`check_ranks` (no id twice in a row; below ``n_database`` when given).
        gnd: ``Q`` mappings with ``ok`` (positives) and optionally ``junk`` (ignored images),
            lists or 1-D integer arrays.
        kappas: the ``k`` of P@k.
        n_database: the number of database images; ids in ``ranks`` and ``gnd`` must be below it.

    Returns:
        ``MapResult(map, aps (Q,), mpr (len(kappas),), prs (Q, len(kappas)))``, fractions in
        [0, 1]; queries with no ``ok`` are ``nan`` in ``aps`` / ``prs`` and left out of the means.
    """
    arr = _as_ranks(ranks, len(gnd))
    check_ranks(arr, n_database)
    if n_database is not None:
        check_gnd_range(gnd, ("ok", "junk"), n_database)
    return _compute_map(arr, gnd, kappas)


def _compute_map(arr: np.ndarray, gnd: Gnd, kappas: Sequence[int]) -> MapResult:
    """:func:`compute_map` of a checked ``(Q, K)`` ranking."""
    kappas = _check_kappas(kappas)
    sets = _gnd_sets(gnd, ("ok",), ("junk",))
    lab = _label(arr, [sets["ok"], sets["junk"]])
    return _result(_hits(lab, 0b01, 0b10), kappas)
