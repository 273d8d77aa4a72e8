"""Online (Iscen et al.) and offline (Yang et al.) diffusion against dense direct solves and
scipy's cg run query by query / item by item."""

import dataclasses
import inspect

import numpy as np
import pytest
import scipy.sparse.linalg as spla

import retrbench.rerank.diffusion as dfs_mod
from retrbench.rerank import DiffusionParams, diffusion_graph, offline_diffusion, rerank
from retrbench.utils.linalg import exact_search as search

from .references import (
    check_diffusion,
    clustered,
    dense_graph,
    dfs_reference,
    fallback_ranking,
    l2,
    offline_reference,
    seeds_reference,
)

# --------------------------------------------------------------------------- parameters


def test_params_defaults_are_the_factories_defaults():
    fields = {f.name: f.default for f in dataclasses.fields(DiffusionParams)}
    for factory in (dfs_mod.make_dfs, dfs_mod.make_dfs_offline):
        defaults = {n: p.default for n, p in inspect.signature(factory).parameters.items() if n != "mode"}
        assert defaults == fields, factory.__name__


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"k": 1}, "k >= 2"),
        ({"kq": 0}, "kq >= 1"),
        ({"alpha": 1.0}, "alpha"),
        ({"alpha": 0.0}, "alpha"),
        ({"maxiter": 0}, "maxiter"),
        ({"tol": -1.0}, "tol"),
        ({"trunc": 0}, "trunc"),
        ({"knn": "magic"}, "knn"),
    ],
)
def test_params_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiffusionParams(**kwargs)


def test_params_are_frozen_and_normalise_knn():
    p = DiffusionParams(knn="EXACT")
    assert p.knn == "exact"
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.k = 3


# --------------------------------------------------------------------------- online


@pytest.mark.parametrize("k,gamma", [(5, 3.0), (10, 1.0), (72, 3.0)])
def test_diffusion_graph_matches_dense_reference(rng, k, gamma):
    _, db = clustered(rng)
    s = diffusion_graph(db, k=k, gamma=gamma)
    ref = dense_graph(db, k, gamma)
    assert s.shape == (72, 72) and s.dtype == np.float32
    np.testing.assert_allclose(s.toarray(), ref, atol=1e-6)
    assert (s != s.T).nnz == 0  # exactly symmetric
    assert diffusion_graph(db, k=k, gamma=gamma) is s  # cached


@pytest.mark.parametrize("k,kq,alpha,gamma", [(5, 3, 0.99, 3.0), (10, 10, 0.9, 1.0), (8, 1, 0.5, 3.0)])
def test_dfs_matches_direct_solve(rng, k, kq, alpha, gamma):
    q, db = clustered(rng)
    g = search(q, db)
    out = rerank(f"dfs:k={k},kq={kq},alpha={alpha},gamma={gamma},maxiter=500,tol=0", q, db, g)
    f_ref = dfs_reference(q, db, k, kq, alpha, gamma)
    check_diffusion(out, f_ref, g.indices)


def test_dfs_defaults_match_per_query_scipy_cg(rng):
    # The defaults (20 CG iterations, tol 1e-6) stop before convergence at alpha = 0.99: the
    # batched CG must take the same iterations as scipy's cg run query by query.
    # a long random walk, whose graph needs many more than 20 CG iterations, and a separate
    # blob of 6 vectors, on which CG converges after a few: the queries stop at different times
    walk = np.cumsum(0.15 * rng.standard_normal((160, 16)), axis=0) + 3.0
    blob = -3.0 * np.ones(16) + 0.3 * rng.standard_normal((6, 16))
    db = l2(np.concatenate([walk, blob])).astype(np.float32)
    q = l2(np.concatenate([walk[::40] + 0.05 * rng.standard_normal((4, 16)), blob[:1] + 0.01])).astype(np.float32)
    g = search(q, db)
    out = rerank("dfs:k=10,kq=5", q, db, g)
    s = dense_graph(db, 10, 3.0)
    y = seeds_reference(q, db, 5, 3.0)
    a = np.eye(len(db)) - 0.99 * s
    f_ref, counts = [], []
    for j in range(len(q)):
        steps = []
        f_ref.append(spla.cg(a, y[:, j], rtol=1e-6, maxiter=20, callback=steps.append)[0])
        counts.append(len(steps))
    f_ref, counts = np.array(f_ref), np.array(counts)
    assert counts[-1] < 20 and np.all(counts[:-1] == 20)  # the blob query converged early
    exact = np.array([np.linalg.solve(a, y[:, j]) for j in range(len(q))])
    assert not np.allclose(f_ref[:-1], exact[:-1], rtol=1e-3)  # the others did not
    check_diffusion(out, np.maximum(f_ref, 0), g.indices, rtol=2e-4)


@pytest.mark.parametrize("chunk", [1 << 21, 150])  # 150: two queries ranked at a time
def test_dfs_keeps_the_result_length_and_fills_from_the_previous_ranking(rng, monkeypatch, chunk):
    monkeypatch.setattr("retrbench.rerank._solve._RANK_CHUNK", chunk)
    q, db = clustered(rng)
    f_ref = dfs_reference(q, db, 5, 3, 0.99, 3.0)
    assert np.all((f_ref > 0).sum(axis=1) < 72)  # the k=5 graph has several components
    for k in (20, None):
        g = search(q, db, k=k)
        out = rerank("dfs:k=5,kq=3,maxiter=500,tol=0", q, db, g)
        assert out.indices.shape == g.indices.shape
        np.testing.assert_array_equal(out.indices, fallback_ranking(f_ref, g.indices, g.k))


def chain_case():
    """A query at the start of a curved chain of positives, and a tight distractor blob.

    The chain runs 1.5 rad round a circle in the (e0, e1) plane in steps of 0.05 rad, so its
    far end has cosine 0.07 with the query; the blob sits at cosine 0.62 from the query, off
    the plane. Global search ranks the blob above the far half of the chain.
    """
    rng = np.random.default_rng(1)
    theta = np.arange(31) * 0.05
    chain = np.zeros((31, 5))
    chain[:, 0], chain[:, 1] = np.cos(theta), np.sin(theta)
    centre = np.array([np.cos(0.9), 0.0, np.sin(0.9), 0.0, 0.0])
    blob = l2(centre + 0.02 * rng.standard_normal((10, 5)))
    db = l2(np.concatenate([chain, blob])).astype(np.float32)
    q = l2(np.array([[1.0, 0.01, 0.0, 0.0, 0.01]])).astype(np.float32)
    return q, db


# offline: the far end must lie inside the seeds' truncated neighbourhoods, hence trunc = N
@pytest.mark.parametrize(
    "spec", ["dfs:k=5,kq=3", "dfs-offline:k=5,kq=3,trunc=41", "dfs:k=5,kq=3,mode=offline,trunc=41"]
)
def test_diffusion_recovers_the_far_end_of_a_manifold(spec):
    q, db = chain_case()
    g = search(q, db)
    blob = set(range(31, 41))
    before = g.indices[0].tolist()
    assert before.index(30) > max(before.index(b) for b in blob)  # missed by global search
    after = rerank(spec, q, db, g).indices[0].tolist()
    assert set(after[:31]) == set(range(31))  # the whole chain first, its far end included
    assert set(after[31:]) == blob


# --------------------------------------------------------------------------- offline


@pytest.mark.parametrize("trunc,maxiter", [(30, 20), (72, 500)])
def test_offline_diffusion_matches_item_by_item_reference(rng, trunc, maxiter):
    q, db = clustered(rng)
    g = search(q, db)
    f_ref = offline_reference(db, 8, 3.0, 0.99, trunc, 1e-6, maxiter)
    f = offline_diffusion(db, DiffusionParams(k=8, trunc=trunc, maxiter=maxiter))
    assert f.shape == (72, 72) and np.all(np.diff(f.indptr) == trunc)
    np.testing.assert_allclose(f.toarray(), f_ref, rtol=1e-5, atol=1e-5)
    out = rerank(f"dfs-offline:k=8,trunc={trunc},maxiter={maxiter}", q, db, g)
    scores_ref = seeds_reference(q, db, 10, 3.0).T @ f_ref
    check_diffusion(out, np.maximum(scores_ref, 0), g.indices, rtol=2e-4)


def test_offline_rows_are_computed_once_and_only_when_reached(rng, monkeypatch):
    q, db = clustered(rng)
    g = search(q, db)
    solved = []
    real = dfs_mod._truncated_solve

    def counting(s, r, pos, p):
        solved.append(r.shape[0])
        return real(s, r, pos, p)

    monkeypatch.setattr(dfs_mod, "_truncated_solve", counting)
    first = rerank("dfs-offline:kq=3,trunc=20", q[:1], db, search(q[:1], db))
    assert sum(solved) == 3  # the first query's three seeds only
    rerank("dfs-offline:kq=3,trunc=20", q[:1], db, search(q[:1], db))
    assert sum(solved) == 3  # memoised
    full = rerank("dfs-offline:kq=3,trunc=20", q, db, g)
    assert 3 < sum(solved) <= 3 * len(q)
    np.testing.assert_array_equal(full.indices[:1], first.indices)


def test_offline_without_truncation_equals_online(rng):
    # With every item's neighbourhood the whole database and CG run to convergence, the
    # offline rows are the columns of (I - alpha S)^-1, so both forms give the same scores.
    q, db = clustered(rng)
    g = search(q, db)
    on = rerank("dfs:k=8,maxiter=500,tol=0", q, db, g)
    off = rerank("dfs-offline:k=8,trunc=72,maxiter=500,tol=0", q, db, g)
    f_ref = dfs_reference(q, db, 8, 10, 0.99, 3.0)
    check_diffusion(on, f_ref, g.indices)
    check_diffusion(off, f_ref, g.indices)
