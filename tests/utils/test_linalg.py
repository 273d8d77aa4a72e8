"""The shared kernels: one inner-product routine (same bits whatever the call), exact search
against a stable full sort (ties included), ranking keys and recall."""

from __future__ import annotations

import numpy as np
import pytest

import retrbench.utils.linalg as la
from retrbench.utils.linalg import (
    DenseScores,
    InnerProductScores,
    exact_search,
    inner_products,
    order_keys,
    recall_at_k,
)


def stable_ranking(q: np.ndarray, db: np.ndarray) -> np.ndarray:
    return np.argsort(-(q.astype(np.float64) @ db.T.astype(np.float64)), axis=1, kind="stable")


def test_inner_products_give_the_same_bits_in_every_call(rng):
    q = rng.standard_normal((9, 64)).astype(np.float32)
    db = rng.standard_normal((20000, 64)).astype(np.float32)
    full = inner_products(q, db, 0, 20000)
    np.testing.assert_array_equal(full, np.concatenate([inner_products(q[i : i + 1], db, 0, 20000) for i in range(9)]))
    np.testing.assert_array_equal(full[:, 8192:16384], inner_products(q, db, 8192, 16384))
    out = np.empty((9, 20000), np.float32)
    assert inner_products(q, db, 0, 20000, out=out) is out
    np.testing.assert_array_equal(out, full)
    one = np.empty((1, 20000), np.float32)
    inner_products(q[3:4], db, 0, 20000, out=one)
    np.testing.assert_array_equal(one[0], full[3])
    np.testing.assert_array_equal(InnerProductScores(q, db).block(8192, 20000), full[:, 8192:])


@pytest.mark.parametrize("k", [1, 7, 300, 2999, 3000, None])
@pytest.mark.parametrize("torch_topk", [False, True])
def test_exact_search_is_the_stable_sort_prefix_with_ties(rng, monkeypatch, k, torch_topk):
    if torch_topk:
        monkeypatch.setattr(la, "_TORCH_TOPK_MIN", 0)
    q = rng.integers(-2, 3, (6, 4)).astype(np.float32)  # exact products, ties everywhere
    db = rng.integers(-2, 3, (3000, 4)).astype(np.float32)
    res = exact_search(q, db, k)
    kk = 3000 if k is None else k
    np.testing.assert_array_equal(res.indices, stable_ranking(q, db)[:, :kk])
    np.testing.assert_array_equal(res.scores, np.take_along_axis(q @ db.T, res.indices, axis=1))


def test_exact_search_reads_a_memory_map_in_blocks(rng, tmp_path, monkeypatch):
    monkeypatch.setattr(la, "_ROWS_BYTES", 4 * 20000 * 3)  # three query rows at a time
    q = rng.standard_normal((7, 16)).astype(np.float32)
    db = rng.standard_normal((20000, 16)).astype(np.float32)
    np.save(tmp_path / "db.npy", db.astype(np.float16))  # float16 storage, float32 products
    mm = np.load(tmp_path / "db.npy", mmap_mode="r")
    got = exact_search(q, mm, 50)
    want = exact_search(q, mm.astype(np.float32), 50)
    np.testing.assert_array_equal(got.indices, want.indices)


def test_order_keys_rank_like_a_stable_sort():
    s = np.array([[0.5, -0.0, 0.0, -1.0, 0.5, np.float32(1e-30), -1e-30, 2.0]], np.float32)
    keys = order_keys(s, 0, 4)
    want = np.argsort(-s[0].astype(np.float64), kind="stable")  # -0.0 and 0.0 tie: index order
    np.testing.assert_array_equal(np.argsort(-keys[0].astype(np.float64), kind="stable"), want)
    assert len(set(keys[0].tolist())) == s.size
    assert order_keys(s, 8, 5)[0, 0] < order_keys(s, 0, 5)[0, 0]  # same score, later index: smaller


def test_top_k_of_dense_scores_and_key_width():
    sc = DenseScores(np.array([[3, 1, 3, 2]], np.float32))
    np.testing.assert_array_equal(sc.top_k(3).indices, [[0, 2, 3]])
    assert sc.index_bits() == 2
    big = DenseScores(np.zeros((1, 1), np.float32))
    big.n_database = 1 << 33
    with pytest.raises(ValueError, match="64-bit keys"):
        big.index_bits()


def test_recall_at_k():
    exact = np.array([[1, 2, 3], [4, 5, 6]])
    assert recall_at_k(exact, exact, 3) == 1.0
    assert recall_at_k(np.array([[3, 9, -1], [-1, -1, -1]]), exact, 3) == pytest.approx((1 / 3 + 0) / 2)
    assert recall_at_k(np.array([[2, 1, 7], [6, 0, 0]]), exact, 2) == pytest.approx((2 / 2 + 0 / 2) / 2)
