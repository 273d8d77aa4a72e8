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


# --------------------------------------------------------------------------- faiss indexes, honestly labelled


from retrbench.search import check_index, default_train_size, search_index  # noqa: E402


@pytest.fixture
def clustered(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    centres = rng.standard_normal((40, 24)).astype(np.float32)
    db = centres[rng.integers(0, 40, 4000)] + 0.4 * rng.standard_normal((4000, 24)).astype(np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    q = db[rng.choice(4000, 25, replace=False)] + 0.05 * rng.standard_normal((25, 24)).astype(np.float32)
    return q, db


def brute_recall(approx: np.ndarray, q: np.ndarray, db: np.ndarray, k: int) -> float:
    """Mean |approx top-k & exact top-k| / k, counted one query at a time."""
    exact = oracle(q, db)[1][:, :k]
    return float(np.mean([len(set(a[:k].tolist()) & set(e.tolist())) / k for a, e in zip(approx, exact, strict=True)]))


def test_flat_index_is_exact_search(clustered: tuple[np.ndarray, np.ndarray]) -> None:
    q, db = clustered
    res, info = search_index(q, db, 50)
    np.testing.assert_array_equal(res.indices, search(q, db, 50).indices)
    assert info["index"] == "flat" and info["exact"] is True and info["k"] == 50 and info["recall"] == {}
    assert search_index(q, db, 50, "Exact")[1]["exact"]


@pytest.mark.parametrize(
    "spec,kw,param",
    [
        ("IVF32,Flat", {"nprobe": 3}, {"nprobe": 3}),
        ("IVF16,SQ4", {"nprobe": 4}, {"nprobe": 4}),
        ("HNSW8", {"efsearch": 20}, {"efSearch": 20}),
    ],
)
def test_approximate_index_reports_its_recall(clustered, spec, kw, param) -> None:
    q, db = clustered
    res, info = search_index(q, db, 100, spec, **kw)
    assert info["index"] == spec and info["exact"] is False and info["params"] == param
    assert info["recall_queries"] == 25
    assert set(info["recall"]) == {"1", "10", "100"}
    for k, value in info["recall"].items():  # the reported recall is the brute-force count
        assert value == pytest.approx(brute_recall(res.indices, q, db, int(k)), abs=1e-12), k
    if spec.startswith("IVF"):
        assert info["train_size"] == default_train_size(spec, 4000) == 4000
    else:
        assert info["train_size"] == 0  # HNSW needs no training
    assert info["recall"]["100"] < 1.0 or spec.startswith("HNSW")  # few lists probed: something missed
    valid = res.indices >= 0  # an index may find fewer than k: -1 / -inf padding, last
    assert np.all(np.isneginf(res.scores[~valid]))
    assert np.all(np.diff(np.where(valid, res.scores, -1e30), axis=1) <= 0)
    assert np.all(np.diff(valid.astype(int), axis=1) <= 0)
    for key in ("train_s", "add_s", "search_s", "recall_s"):
        assert info[key] >= 0


def test_recall_on_a_sample_of_the_queries(clustered) -> None:
    q, db = clustered
    res, info = search_index(q, db, 10, "IVF32,Flat", nprobe=1, recall_queries=7, seed=3)
    assert info["recall_queries"] == 7
    rows = np.sort(np.random.default_rng(3).choice(25, size=7, replace=False))
    assert info["recall"]["10"] == pytest.approx(brute_recall(res.indices[rows], q[rows], db, 10), abs=1e-12)


def test_index_errors(clustered) -> None:
    q, db = clustered
    with pytest.raises(ValueError, match="IVF16,PQ7"):
        search_index(q, db, 10, "IVF16,PQ7")
    with pytest.raises(ValueError, match="has no parameter efSearch"):
        search_index(q, db, 10, "IVF16,Flat", efsearch=5)
    with pytest.raises(ValueError, match="training on 100 vectors failed"):
        search_index(q, db, 10, "IVF512,Flat", train_size=100)
    with pytest.raises(ValueError, match="nprobe must be a positive integer"):
        search_index(q, db, 10, "IVF16,Flat", nprobe=0)
    assert check_index("flat") == "flat" and check_index(None) == "flat"
    assert check_index(" IVF65536,PQ64 ") == "IVF65536,PQ64"
    with pytest.raises(ValueError, match="cannot build"):
        check_index("IVF16,PQ7", 64)
    with pytest.raises(ValueError, match="cannot build"):
        check_index("NotAnIndex")
    assert default_train_size("IVF4096,PQ32", 10**6) == 262144
    assert default_train_size("HNSW32", 10**6) == 65536
