"""Validation of rankings: :func:`check_ranks` (shape, dtype, id range, no id twice in a row).

A ranking that lists a positive twice would have it counted twice (AP above 100 %), and an id
beyond the database means the ranking was made for another database: both are errors naming
the first bad row and value, never silently counted.
"""

from __future__ import annotations

import operator

import numpy as np

from ..types import SearchResult

__all__ = ["check_ranks"]

# check_ranks finds repeated ids by sorting rows (chunks of _SORT_CHUNK entries) when rows are
# short, and for long rows by writing each entry's position into a table indexed by id (an
# entry whose slot holds another position repeats an id). On 2 cores: 70 x 1,000,000 int64
# takes 4.0 s to sort and 0.35 s with the table; the two break even near 512 entries per row
# (10,000 x 512: 0.05 s either way; 100,000 x 100: sort 0.10 s, table 0.23 s). The table is
# used for ids below _STAMP_MAX_WIDTH (256 MiB of int32 at most).
_SORT_MAX_K = 512
_SORT_CHUNK = 1 << 20
_STAMP_MAX_WIDTH = 1 << 26


def _as_array(ranks: np.ndarray | SearchResult) -> np.ndarray:
    """``ranks`` (or a SearchResult's indices) as a 2-D integer array, or ValueError naming shape / dtype."""
    arr = np.asarray(ranks.indices if isinstance(ranks, SearchResult) else ranks)
    if arr.ndim != 2:
        raise ValueError(f"ranks: expected a 2-D (Q, K) array of database indices, one row per query, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"ranks: expected integer database indices, got dtype {arr.dtype}")
    return arr


def _as_ranks(ranks: np.ndarray | SearchResult, n_queries: int | None = None) -> np.ndarray:
    """``ranks`` as a ``(Q, K)`` integer array with one row per query (the values: :func:`check_ranks`)."""
    arr = _as_array(ranks)
    if n_queries is not None and arr.shape[0] != n_queries:
        raise ValueError(
            f"ranks: shape {arr.shape} has {arr.shape[0]} rows but the ground truth has {n_queries} queries "
            "(ranks must be (Q, K), one row per query; transpose a revisitop-style (N, Q) matrix)"
        )
    if arr.size and int(arr.min()) < -1:  # cheap; check_ranks names the row
        _raise_out_of_range(arr, None)
    return arr


def _database_size(n_database: int | None) -> int | None:
    if n_database is None:
        return None
    try:
        n = operator.index(n_database)
    except TypeError:
        raise TypeError(f"n_database: expected an integer number of database images, got {n_database!r}") from None
    if n < 0:
        raise ValueError(f"n_database must be >= 0, got {n}")
    return n


def _range_text(n: int) -> str:
    return "the database is empty" if n == 0 else f"the database has {n} images (ids 0..{n - 1})"


def _raise_out_of_range(arr: np.ndarray, n: int | None) -> None:
    """ValueError naming the first row (and its first entry) with an id < -1 or >= ``n``."""
    bad_rows = arr.min(axis=1) < -1
    if n is not None:
        bad_rows |= arr.max(axis=1) >= n
    q = int(np.argmax(bad_rows))
    row = arr[q]
    bad = row < -1 if n is None else (row < -1) | (row >= n)
    j = int(np.argmax(bad))
    v = int(row[j])
    if v < -1:
        raise ValueError(f"ranks row {q} has id {v} (position {j}): database ids are >= 0, or -1 for nothing")
    raise ValueError(f"ranks row {q} has id {v} (position {j}) but {_range_text(int(n or 0))}")


def _first_repeat_sorted(arr: np.ndarray) -> int:
    """First row of ``arr`` listing an id (other than -1) twice, by sorting row chunks; -1 if none."""
    nq, k = arr.shape
    step = max(1, _SORT_CHUNK // k)
    for start in range(0, nq, step):
        x = np.sort(arr[start : start + step], axis=1)
        rep = x[:, 1:] == x[:, :-1]
        rep &= x[:, 1:] != -1
        rows = np.flatnonzero(rep.any(axis=1))
        if rows.size:
            return start + int(rows[0])
    return -1


def _first_repeat_stamped(arr: np.ndarray, width: int) -> int:
    """First row of ``arr`` (ids in ``[-1, width - 1)``) listing an id twice, by a position table; -1 if none."""
    k = arr.shape[1]
    pos = np.arange(k, dtype=np.int32 if k < 2**31 else np.int64)
    table = np.empty(width, dtype=pos.dtype)  # slot width - 1 takes the -1 entries (negative index)
    for q, row in enumerate(arr):
        table[row] = pos  # of entries with the same id, one position wins the slot
        other = table[row] != pos
        if other.any() and (other & (row != -1)).any():
            return q
    return -1


def _describe_repeat(row: np.ndarray, q: int) -> str:
    order = np.argsort(row, kind="stable")
    s = row[order]
    rep = (s[1:] == s[:-1]) & (s[1:] != -1)
    j = int(order[1:][rep].min())  # the first entry repeating an earlier one
    v = int(row[j])
    where = np.flatnonzero(row == v)
    times = "twice" if where.size == 2 else f"{where.size} times"
    shown = ", ".join(map(str, where[:5])) + (", ..." if where.size > 5 else "")
    return f"ranks row {q} lists database id {v} {times} (positions {shown}); each id may appear once per row"


def check_ranks(ranks: np.ndarray | SearchResult, n_database: int | None = None) -> np.ndarray:
    """Check that ``ranks`` is a ranking: ids in ``[0, n_database)`` or ``-1``, none repeated in a row.

    A repeated id would be counted again as a positive (AP above 100 %), an id beyond the
    database is a ranking made for another database. ``-1`` (nothing, faiss padding) may repeat.

    Args:
        ranks: ``(Q, K)`` integer database indices, one row per query (or a ``SearchResult``).
        n_database: the number of database images; None checks only for repeats and ids < -1.

    Returns:
        ``ranks`` as a ``(Q, K)`` integer array (not copied).

    Raises:
        ValueError: naming the first bad row and value, e.g. ``ranks row 3 lists database id 17
            twice (positions 2, 9)`` or ``ranks row 0 has id 5000 (position 4) but the database
            has 4993 images (ids 0..4992)``; also for a shape or dtype that is not ``(Q, K)`` integer.
    """
    arr = _as_array(ranks)
    n = _database_size(n_database)
    if arr.size == 0:
        return arr
    lo, hi = int(arr.min()), int(arr.max())
    if lo < -1 or (n is not None and hi >= n):
        _raise_out_of_range(arr, n)
    if arr.shape[1] < 2:
        return arr
    width = hi + 2  # ids 0..hi, and one slot for -1
    if arr.shape[1] > _SORT_MAX_K and width <= _STAMP_MAX_WIDTH:
        q = _first_repeat_stamped(arr, width)
    else:
        q = _first_repeat_sorted(arr)
    if q >= 0:
        raise ValueError(_describe_repeat(arr[q], q))
    return arr
