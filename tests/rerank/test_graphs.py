"""The database's kNN lists: exact (both kernels) against numpy, approximate against exact."""

import numpy as np
import pytest

import retrbench.rerank.graphs as graphs
from retrbench.rerank import EXACT_KNN_MAX_N, database_knn, rerank
from retrbench.rerank.graphs import _top_k_rows, resolve_knn
from retrbench.utils.linalg import exact_search as search

from .references import assert_ranks_by, l2


def test_resolve_knn():
    assert resolve_knn("auto", EXACT_KNN_MAX_N) == "exact"
    assert resolve_knn("auto", EXACT_KNN_MAX_N + 1) == "approx"
    assert resolve_knn("exact", 10**9) == "exact" and resolve_knn("approx", 10) == "approx"
    with pytest.raises(ValueError, match="knn must be"):
        resolve_knn("magic", 10)


def test_top_k_rows_matches_a_full_sort(rng):
    sims = rng.standard_normal((7, 30)).astype(np.float32)
    cols = rng.permutation(100)[:30]
    for k in (1, 5, 30, 40):
        s, i = _top_k_rows(sims, cols, k)
        kk = min(k, 30)
        order = np.argsort(-sims, axis=1, kind="stable")[:, :kk]
        np.testing.assert_array_equal(s, np.take_along_axis(sims, order, axis=1))
        np.testing.assert_array_equal(i, cols[order])


@pytest.mark.parametrize("n,k", [(72, 5), (72, 72), (300, 280)])  # 280 > 256: the faiss kernel
def test_exact_knn_matches_numpy(rng, n, k):
    x = l2(rng.standard_normal((n, 12))).astype(np.float32)
    sims, ids = database_knn(x, k, knn="exact")
    assert sims.shape == ids.shape == (n, k) and sims.dtype == np.float32 and ids.dtype == np.int64
    ref = x.astype(np.float64) @ x.T.astype(np.float64)
    assert_ranks_by(ids, ref)
    np.testing.assert_allclose(sims, np.take_along_axis(ref, ids, axis=1), atol=1e-5)
    assert not sims.flags.writeable and not ids.flags.writeable


def test_a_cached_longer_list_is_sliced(rng, monkeypatch):
    x = l2(rng.standard_normal((50, 8))).astype(np.float32)
    calls = []
    real = graphs._gemm_topk_knn

    def counting(a, k):
        calls.append(k)
        return real(a, k)

    monkeypatch.setattr(graphs, "_gemm_topk_knn", counting)
    s20, i20 = database_knn(x, 20)
    s5, i5 = database_knn(x, 5)
    assert calls == [20]
    np.testing.assert_array_equal(i5, i20[:, :5])
    assert np.shares_memory(s5, s20)
    database_knn(x, 30)
    assert calls == [20, 30]
    assert database_knn(x, 500)[1].shape == (50, 50)  # capped to N
    assert calls == [20, 30, 50]


@pytest.fixture
def approx_calls(monkeypatch):
    """Sizes of the approximate searches run (the exact kernels are not counted)."""
    calls = []
    real = graphs._approx_knn

    def counting(x, k, nprobe):
        calls.append((x.shape[0], k))
        return real(x, k, nprobe)

    monkeypatch.setattr(graphs, "_approx_knn", counting)
    return calls


def test_approximate_knn_finds_most_neighbours(rng, approx_calls):
    centres = rng.standard_normal((40, 24))
    x = l2(np.repeat(centres, 50, axis=0) + 0.5 * rng.standard_normal((2000, 24))).astype(np.float32)
    sims, ids = database_knn(x, 10, knn="approx")
    exact_sims, exact_ids = database_knn(x, 10, knn="exact")
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids.tolist(), exact_ids.tolist(), strict=True)])
    assert approx_calls == [(2000, 10)]
    assert recall > 0.95
    assert np.all(ids[:, 0] == np.arange(2000))  # itself first
    assert np.all(np.diff(sims, axis=1) <= 0)
    np.testing.assert_allclose(sims, np.einsum("nd,nkd->nk", x, x[ids]), atol=1e-5)
    # diffusion on the approximate graph ranks much like on the exact one
    q = x[::200] + 0.01
    g = search(q, x, k=50)
    a = rerank("dfs:knn=approx,k=20", q, x, g).indices
    e = rerank("dfs:knn=exact,k=20", q, x, g).indices
    overlap = np.mean([len(set(u) & set(v)) / 50 for u, v in zip(a.tolist(), e.tolist(), strict=True)])
    assert overlap > 0.9


def test_approximate_search_on_a_tiny_database_is_exact(rng, approx_calls):
    x = l2(rng.standard_normal((256, 8))).astype(np.float32)
    _, approx = database_knn(x, 10, knn="approx")  # n <= 4 * max(k, 64): nothing to gain
    _, exact = database_knn(x, 10, knn="exact")
    assert approx_calls == []
    np.testing.assert_array_equal(approx, exact)
    y = l2(rng.standard_normal((257, 8))).astype(np.float32)
    database_knn(y, 10, knn="approx")
    assert approx_calls == [(257, 10)]
