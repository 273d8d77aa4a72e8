"""The database's kNN lists: exact (every kernel) against numpy, approximate against exact with
their recall reported, and the disk cache (hits, resumption)."""

import numpy as np
import pytest

import retrbench.rerank._exact as exact_kernels
import retrbench.rerank.graphs as graphs
from retrbench.rerank import EXACT_KNN_MAX_N, RankState, build_reranker, database_knn, knn_graph, rerank
from retrbench.rerank.graphs import resolve_knn
from retrbench.utils.linalg import InnerProductScores
from retrbench.utils.linalg import exact_search as search

from .references import l2


def test_resolve_knn():
    assert resolve_knn("auto", EXACT_KNN_MAX_N) == "exact"
    assert resolve_knn("auto", EXACT_KNN_MAX_N + 1) == "ivf"
    assert resolve_knn("exact", 10**9) == "exact" and resolve_knn("approx", 10) == "ivf"
    assert resolve_knn("HNSW", 10) == "hnsw"
    with pytest.raises(ValueError, match="knn must be"):
        resolve_knn("magic", 10)


def reference_lists(x, k):
    """Stable-sort reference: similarities in float64, ties by index."""
    s = x.astype(np.float64) @ x.T.astype(np.float64)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, axis=1), order


@pytest.mark.parametrize("n,k", [(72, 5), (72, 72), (300, 280)])  # 280 > 256: the faiss kernel
def test_exact_knn_matches_numpy(rng, n, k):
    x = l2(rng.standard_normal((n, 12))).astype(np.float32)
    sims, ids = database_knn(x, k, knn="exact")
    assert sims.shape == ids.shape == (n, k) and sims.dtype == np.float32 and ids.dtype == np.int64
    ref_s, ref_i = reference_lists(x, k)
    np.testing.assert_array_equal(ids, ref_i)  # tie-free data: one right answer
    np.testing.assert_allclose(sims, ref_s, atol=1e-5)
    assert not sims.flags.writeable and not ids.flags.writeable


@pytest.mark.parametrize("native", [True, False, "blocked"])
def test_exact_graph_bf16_screen_is_exact(rng, monkeypatch, native):
    """The bfloat16 screen (or plain float32 blocks) gives the float32 lists, near-ties and
    duplicates included (rows the screen cannot decide are recomputed)."""
    exact_kernels._native_bf16.cache_clear()
    monkeypatch.setattr(exact_kernels, "_native_bf16", lambda: native is True)
    if native == "blocked":  # float32 blocks and running top-k lists (large databases)
        monkeypatch.setattr(exact_kernels, "_SCREEN_MAX_N", 0)
    centres = rng.standard_normal((30, 64))
    x = np.repeat(centres, 100, axis=0) + 0.05 * rng.standard_normal((3000, 64))
    x[1500:1600] = x[1400:1500]  # exact duplicates: ties broken by index
    x = l2(x).astype(np.float32)
    sims, ids = exact_kernels._exact_graph(x, 6)
    ref_s, ref_i = reference_lists(x, 6)
    np.testing.assert_allclose(sims, ref_s, atol=2e-6)
    same = (ids == ref_i).all(axis=1)
    # where float32 and float64 order two neighbours differently they are within rounding
    for r in np.flatnonzero(~same):
        np.testing.assert_allclose(np.sort(x[ids[r]] @ x[r]), np.sort(ref_s[r]), atol=2e-6)
    assert same.mean() > 0.95
    dup = np.arange(1400, 1500)
    assert np.all(ids[dup, 0] == dup) and np.all(ids[dup, 1] == dup + 100)  # itself, then its copy


def test_a_cached_longer_list_is_sliced(rng, monkeypatch):
    x = l2(rng.standard_normal((50, 8))).astype(np.float32)
    calls = []
    real = graphs._exact_graph

    def counting(a, k):
        calls.append(k)
        return real(a, k)

    monkeypatch.setattr(graphs, "_exact_graph", counting)
    s20, i20 = database_knn(x, 20)
    s5, i5 = database_knn(x, 5)
    assert calls == [20]
    np.testing.assert_array_equal(i5, i20[:, :5])
    assert np.shares_memory(s5, s20)
    database_knn(x, 30)
    assert calls == [20, 30]
    assert database_knn(x, 500)[1].shape == (50, 50)  # capped to N
    assert calls == [20, 30, 50]
    assert knn_graph(x, 5).info["cached"] == "memory"


def clustered_db(rng, n=2000, d=24):
    centres = rng.standard_normal((n // 50, d))
    return l2(np.repeat(centres, 50, axis=0) + 0.5 * rng.standard_normal((n, d))).astype(np.float32)


def brute_recall(x, ids, rows, k):
    s = x[rows].astype(np.float64) @ x.T.astype(np.float64)
    exact = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.mean([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(ids[rows], exact, strict=True)])


@pytest.mark.parametrize("kind,param", [("ivf", {"nprobe": 4}), ("hnsw", {"efsearch": 32})])
def test_approximate_graph_reports_its_recall(rng, monkeypatch, kind, param):
    x = clustered_db(rng)
    monkeypatch.setattr(graphs, "RECALL_SAMPLE", 500)
    g = knn_graph(x, 10, knn=kind, **param)
    info = g.info
    assert info["kind"] == kind and info["exact"] is False and info["k"] == 10 and info["cached"] == ""
    if kind == "ivf":
        assert info["index"].startswith("IVF") and info["index"].endswith(",Flat")
        assert info["params"] == {"nprobe": 4} and info["train_size"] > 0
    else:
        assert info["index"] == "HNSW32" and info["params"] == {"efSearch": 32}
    # the reported recall is the brute-force count on the same seeded sample
    rows = np.sort(np.random.default_rng(1).choice(2000, size=500, replace=False))
    assert info["recall_sample"] == 500
    assert info["recall"] == pytest.approx(brute_recall(x, g.ids, rows, 10), abs=1e-12)
    assert info["recall_by_k"]["10"] == info["recall"] and "1" in info["recall_by_k"]
    assert 0.8 < info["recall"] <= 1.0
    assert np.all(g.ids[:, 0] == np.arange(2000))  # itself first
    assert np.all(np.diff(g.sims, axis=1) <= 0)
    np.testing.assert_allclose(g.sims, np.einsum("nd,nkd->nk", x, x[g.ids]), atol=1e-5)


def test_diffusion_on_the_approximate_graph_ranks_much_like_on_the_exact_one(rng):
    x = clustered_db(rng)
    q = x[::200] + 0.01
    g = search(q, x, k=50)
    a = rerank("dfs:knn=approx,k=20", q, x, g).indices
    e = rerank("dfs:knn=exact,k=20", q, x, g).indices
    overlap = np.mean([len(set(u) & set(v)) / 50 for u, v in zip(a.tolist(), e.tolist(), strict=True)])
    assert overlap > 0.9


@pytest.mark.parametrize(
    "spec", ["dba:k=3,knn=approx+aqe", "aqe+dfs:k=20,knn=ivf", "aqe+dfs-offline:k=20,knn=hnsw,trunc=100"]
)
def test_rerank_reports_carry_the_graph_approximation(rng, spec):
    x = clustered_db(rng)
    q = x[::400] + 0.01
    state = build_reranker(spec)(RankState(q, x, search(q, x, k=100), scores=InnerProductScores(q, x)))
    steps = spec.split("+")
    assert [r.step for r in state.reports] == steps
    (graph_step,) = [r for r in state.reports if r.step != "aqe"]
    (aqe,) = [r for r in state.reports if r.step == "aqe"]
    assert aqe.approximate is False and graph_step.approximate is True and state.approximate
    graph = graph_step.to_dict()["graph"]
    assert graph["kind"] in ("ivf", "hnsw") and 0 < graph["recall"] <= 1 and graph["recall_sample"] > 0
    exact_spec = spec.replace("approx", "exact").replace("ivf", "exact").replace("hnsw", "exact")
    exact = build_reranker(exact_spec)(RankState(q, x, search(q, x, k=100)))
    assert not exact.approximate
    assert [r.to_dict()["graph"]["kind"] for r in exact.reports if r.step != "aqe"] == ["exact"]


def test_approximate_search_on_a_tiny_database_is_exact(rng):
    x = l2(rng.standard_normal((256, 8))).astype(np.float32)
    g = knn_graph(x, 10, knn="approx")  # n <= 4 * max(k, 64): nothing to gain
    assert g.info["kind"] == "exact" and g.info["exact"]
    np.testing.assert_array_equal(g.ids, database_knn(x, 10, knn="exact")[1])


def test_disk_cache_hit_and_resume(rng, monkeypatch, tmp_path):
    x = clustered_db(rng)
    monkeypatch.setattr(graphs, "_CHUNK_ROWS", 500)
    first = knn_graph(x, 8, knn="ivf", disk=True, cache_dir=tmp_path)
    files = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert len(files) == 1 and files[0].endswith("-k8.npz")  # parts and trained index removed
    graphs.CACHE.clear()
    hit = knn_graph(x, 5, knn="ivf", disk=True, cache_dir=tmp_path)  # a longer cached list serves k=5
    assert hit.info["cached"] == "disk" and hit.info["k"] == 5
    np.testing.assert_array_equal(hit.ids, first.ids[:, :5])
    assert hit.info["recall"] == first.info["recall_by_k"]["5"]

    # a build killed after two chunks leaves them (and the trained index); the next one reuses them
    graphs.CACHE.clear()
    saved = []
    real_save = graphs._DiskGraph.save

    def dying(path, **arrays):
        if ".part" in path.name and len(saved) == 2:
            raise KeyboardInterrupt
        saved.append(path)
        real_save(path, **arrays)

    monkeypatch.setattr(graphs._DiskGraph, "save", staticmethod(dying))
    with pytest.raises(KeyboardInterrupt):
        knn_graph(x, 12, knn="ivf", disk=True, cache_dir=tmp_path)
    parts = sorted(tmp_path.rglob("*-k12.part*.npz"))
    assert len(parts) == 2 and list(tmp_path.rglob("*-k12.trained.faiss"))
    marked = graphs._DiskGraph.load(parts[1])
    real_save(parts[1], sims=marked["sims"], ids=np.full_like(marked["ids"], 7))  # tell reused rows apart
    monkeypatch.setattr(graphs._DiskGraph, "save", staticmethod(real_save))
    resumed = knn_graph(x, 12, knn="ivf", disk=True, cache_dir=tmp_path)
    assert np.all(resumed.ids[500:1000] == 7)  # the second chunk was read back, not searched
    assert not list(tmp_path.rglob("*.part*")) and not list(tmp_path.rglob("*.trained.faiss"))
    graphs.CACHE.clear()
    fresh = knn_graph(x, 12, knn="ivf", disk=False)  # the same build, uninterrupted, in memory
    np.testing.assert_array_equal(resumed.ids[:500], fresh.ids[:500])
    np.testing.assert_array_equal(resumed.ids[1000:], fresh.ids[1000:])
