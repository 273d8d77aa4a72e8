"""Exact search against a numpy oracle (argsort of X @ Y.T) on seeded, tie-free data."""

from __future__ import annotations

import numpy as np
import pytest

from retrbench.search import knn, search
from retrbench.types import SearchResult


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def oracle(q: np.ndarray, db: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = q.astype(np.float64) @ db.astype(np.float64).T
    order = np.argsort(-s, axis=1, kind="stable")
    return np.take_along_axis(s, order, axis=1), order


def drop_near_ties(q: np.ndarray, db: np.ndarray, gap: float) -> np.ndarray:
    """``db`` without the rows whose score is within ``gap`` of another row's, for some query."""
    while True:
        scores, order = oracle(q, db)
        close = np.diff(scores, axis=1) > -gap  # (Q, N-1): rank r+1 is too close to rank r
        if not close.any():
            return db
        db = np.delete(db, np.unique(order[:, 1:][close]), axis=0)


@pytest.fixture
def data(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    q = unit_rows(rng, 10, 32)
    db = drop_near_ties(q, unit_rows(rng, 200, 32), gap=1e-5)  # float32 scores err ~1e-7
    assert len(db) >= 150
    scores, _ = oracle(q, db)
    assert np.diff(scores, axis=1).max() <= -1e-5  # no ties: the ranking is unique
    return q, db


def test_full_ranking_matches_numpy(data: tuple[np.ndarray, np.ndarray]) -> None:
    q, db = data
    res = search(q, db)
    want_s, want_i = oracle(q, db)
    assert isinstance(res, SearchResult) and res.k == len(db)
    np.testing.assert_array_equal(res.indices, want_i)
    np.testing.assert_allclose(res.scores, want_s, atol=1e-5)


def test_top_k_is_prefix(data: tuple[np.ndarray, np.ndarray]) -> None:
    q, db = data
    res = search(q, db, k=10)
    _, want_i = oracle(q, db)
    assert res.scores.shape == res.indices.shape == (10, 10)
    np.testing.assert_array_equal(res.indices, want_i[:, :10])
    assert np.all(np.diff(res.scores, axis=1) <= 0)  # best first


def test_k_capped_to_database_size(data: tuple[np.ndarray, np.ndarray]) -> None:
    q, db = data
    res = search(q[:3], db[:7], k=100)
    assert res.k == 7
    assert (res.indices >= 0).all()
    np.testing.assert_array_equal(np.sort(res.indices, axis=1), np.tile(np.arange(7), (3, 1)))


def test_float64_and_single_query(data: tuple[np.ndarray, np.ndarray]) -> None:
    q, db = data
    res = search(q[:1].astype(np.float64), db.astype(np.float64), k=3)
    np.testing.assert_array_equal(res.indices, oracle(q[:1], db)[1][:, :3])


def test_empty_inputs(rng: np.random.Generator) -> None:
    res = search(unit_rows(rng, 3, 4), np.zeros((0, 4), np.float32))
    assert res.scores.shape == (3, 0)
    res = search(np.zeros((0, 4), np.float32), unit_rows(rng, 5, 4), k=2)
    assert res.indices.shape == (0, 2)


def test_shape_errors(rng: np.random.Generator) -> None:
    q, db = unit_rows(rng, 2, 8), unit_rows(rng, 5, 6)
    with pytest.raises(ValueError, match=r"queries \(2, 8\) and database \(5, 6\)"):
        search(q, db)
    with pytest.raises(ValueError, match="queries: expected a 2-D"):
        search(np.ones(8, np.float32), unit_rows(rng, 5, 8))
    with pytest.raises(ValueError, match="k must be a positive integer"):
        search(q, unit_rows(rng, 5, 8), k=0)


def test_exact_ties_ordered_by_index(rng: np.random.Generator) -> None:
    base = unit_rows(rng, 6, 8)
    db = base[[0, 1, 2, 1, 3, 0, 4, 5, 1]]  # rows 1, 3, 8 and rows 0, 5 are identical
    q = unit_rows(rng, 4, 8)
    res = search(q, db)
    np.testing.assert_array_equal(res.indices, oracle(q, db)[1])  # stable argsort order
    for row in res.indices:
        pos = {int(j): r for r, j in enumerate(row)}
        assert pos[1] < pos[3] < pos[8] and pos[0] < pos[5]


def test_knn_includes_self(rng: np.random.Generator) -> None:
    x = unit_rows(rng, 40, 16)
    res = knn(x, 5)
    assert res.indices.shape == (40, 5)
    np.testing.assert_array_equal(res.indices[:, 0], np.arange(40))
    np.testing.assert_allclose(res.scores[:, 0], 1.0, atol=1e-5)
    np.testing.assert_array_equal(res.indices, oracle(x, x)[1][:, :5])
