"""The database cache: LRU, identity plus content keys, dead arrays dropped; and its effect
across the paper's variants."""

import gc

import numpy as np

import retrbench.rerank.graphs as graphs
from retrbench.rerank import RankState, build_reranker, clear_cache, rerank
from retrbench.rerank.cache import CACHE, ArrayCache, freeze
from retrbench.utils.linalg import exact_search as search

from .references import PAPER_VARIANTS, clustered


def test_values_are_keyed_by_array_identity_kind_and_params():
    cache = ArrayCache(maxsize=4)
    a = np.ones((10, 3), np.float32)
    cache.put(a, "knn", (1,), "v1")
    assert cache.get(a, "knn", (1,)) == "v1"
    assert cache.get(a, "knn", (2,)) is None
    assert cache.get(a, "dba", (1,)) is None
    assert cache.get(a.copy(), "knn", (1,)) is None  # same values, another array
    a[::2] = 5  # an in-place change the sampled rows see
    assert cache.get(a, "knn", (1,)) is None


def test_least_recently_used_entries_go_first():
    cache = ArrayCache(maxsize=2)
    a = np.zeros((4, 2), np.float32)
    cache.put(a, "x", (1,), 1)
    cache.put(a, "x", (2,), 2)
    assert cache.get(a, "x", (1,)) == 1  # now the most recent
    cache.put(a, "x", (3,), 3)
    assert len(cache) == 2
    assert cache.get(a, "x", (2,)) is None
    assert cache.get(a, "x", (1,)) == 1 and cache.get(a, "x", (3,)) == 3


def test_find_returns_the_most_recent_accepted_entry():
    cache = ArrayCache()
    a = np.zeros((4, 2), np.float32)
    cache.put(a, "knn", (10,), "ten")
    cache.put(a, "knn", (20,), "twenty")
    assert cache.find(a, "knn", lambda p: p[0] >= 5) == ((20,), "twenty")
    assert cache.find(a, "knn", lambda p: p[0] < 15) == ((10,), "ten")
    assert cache.find(a, "knn", lambda p: p[0] > 50) is None
    assert cache.find(a, "dba", lambda p: True) is None


def test_entries_of_collected_arrays_are_dropped():
    cache = ArrayCache()
    a = np.zeros((4, 2), np.float32)
    cache.put(a, "x", (), "dead soon")
    del a
    gc.collect()
    b = np.zeros((4, 2), np.float32)
    cache.put(b, "x", (), "alive")
    assert len(cache) == 1 and cache.get(b, "x", ()) == "alive"


def test_clear_cache_and_freeze():
    a = np.zeros((4, 2), np.float32)
    CACHE.put(a, "x", (), 1)
    assert len(CACHE) == 1
    clear_cache()
    assert len(CACHE) == 0
    freeze(a)
    assert not a.flags.writeable


def test_database_computations_are_cached_across_variants(rng, monkeypatch):
    q, db = clustered(rng)
    g = search(q, db)
    calls = []
    real = graphs._exact_graph

    def counting(x, k):
        calls.append((x.shape[0], k))
        return real(x, k)

    monkeypatch.setattr(graphs, "_exact_graph", counting)
    first = {spec: rerank(spec, q, db, g) for spec in PAPER_VARIANTS}
    # one kNN list of the database (k=50, sliced for DBA's k+1=3) and one of the augmented one
    assert calls == [(72, 50), (72, 50)]
    again = {spec: rerank(spec, q, db, g) for spec in PAPER_VARIANTS}
    assert len(calls) == 2
    for spec in PAPER_VARIANTS:
        np.testing.assert_array_equal(first[spec].indices, again[spec].indices)
    # the same values in a new array are not the cached array: recomputed, same answer
    copy = db.copy()
    np.testing.assert_array_equal(rerank("dfs", q, copy, g).indices, first["dfs"].indices)
    assert len(calls) == 3
    aug = build_reranker("dba")(RankState(q, db, g)).database
    assert aug is build_reranker("dba")(RankState(q, db, g)).database
    assert not aug.flags.writeable
