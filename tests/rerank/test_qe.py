"""AQE / alpha-QE and DBA against loop references, and their known effect on built cases."""

import numpy as np
import pytest

from retrbench.rerank import RankState, build_reranker, rerank
from retrbench.rerank.qe import _weights
from retrbench.utils.linalg import exact_search as search

from .references import aqe_reference, assert_ranks_by, clustered, dba_reference, l2


@pytest.mark.parametrize("k,alpha", [(1, 0), (3, 0), (5, 3.0)])
def test_aqe_matches_loop_reference(rng, k, alpha):
    q, db = clustered(rng)
    out = build_reranker(f"aqe:k={k},alpha={alpha}")(RankState(q, db, search(q, db)))
    ref_q = aqe_reference(q, db, k, alpha)
    np.testing.assert_allclose(out.queries, ref_q, atol=1e-5)
    assert_ranks_by(out.result.indices, ref_q @ db.T)
    assert out.database is db  # the database is left alone


@pytest.mark.parametrize("k,alpha", [(1, 0), (4, 0), (3, 3.0)])
def test_dba_matches_loop_reference(rng, k, alpha):
    q, db = clustered(rng)
    out = build_reranker(f"dba:k={k},alpha={alpha}")(RankState(q, db, search(q, db)))
    ref_db = dba_reference(db, k, alpha)
    np.testing.assert_allclose(out.database, ref_db, atol=1e-5)
    np.testing.assert_array_equal(out.queries, q)  # the queries are left alone
    # k=1 makes mutual nearest neighbours identical vectors: compare up to ties
    assert_ranks_by(out.result.indices, q @ ref_db.T)


def test_aliases_build_the_same_expansion(rng):
    q, db = clustered(rng)
    g = search(q, db)
    ref = rerank("aqe:k=3,alpha=3", q, db, g)
    for alias in ("qe", "alpha-qe", "aqe-alpha"):
        np.testing.assert_array_equal(rerank(f"{alias}:k=3,alpha=3", q, db, g).indices, ref.indices)


def test_weights():
    sims = np.array([[0.5, -0.2, 1.0]], np.float32)
    np.testing.assert_array_equal(_weights(sims, 0), [[1, 1, 1]])
    np.testing.assert_allclose(_weights(sims, 3.0), [[0.125, 0.0, 1.0]])
    assert _weights(sims, 3.0).dtype == np.float32


@pytest.mark.parametrize("spec", ["aqe:k=0", "aqe:alpha=-1", "dba:k=0", "dba:alpha=-0.5"])
def test_bad_values_are_refused(spec):
    with pytest.raises(ValueError, match=spec.split(":")[0] + ": " + ("k" if "k=" in spec else "alpha")):
        build_reranker(spec)


def test_query_expansion_recovers_a_missed_positive():
    # The query sees positive A directly; positive B is close to A but not to the query, and
    # global search ranks the distractor D above B. AQE with k=1 moves the query to A, so B wins.
    A = l2(np.array([1.0, 0.0, 0.0]))
    B = l2(np.array([0.8, 0.0, 0.6]))
    D = l2(np.array([0.55, 0.835, 0.0]))
    q = l2(np.array([[0.9, 0.3, -0.2]])).astype(np.float32)
    db = np.stack([A, B, D]).astype(np.float32)
    g = search(q, db)
    assert list(g.indices[0]) == [0, 2, 1]  # B is last under global search
    assert list(rerank("aqe:k=1", q, db, g).indices[0]) == [0, 1, 2]


def test_database_augmentation_recovers_a_missed_positive():
    # Positives A and B are each other's nearest neighbours; the distractor D is the query's
    # best match but its own neighbour is E, far from the query. DBA with k=1 averages B with
    # A and D with E, so B rises above D.
    db = l2(np.array([[1.0, 0, 0], [0.8, 0, 0.6], [0.3, 0.954, 0], [-0.5, 0.85, 0.1]])).astype(np.float32)
    q = l2(np.array([[0.7, 0.55, -0.2]])).astype(np.float32)
    g = search(q, db)
    assert list(g.indices[0]) == [2, 0, 1, 3]
    after = list(rerank("dba:k=1", q, db, g).indices[0])
    assert after.index(1) < after.index(2) and after.index(0) < after.index(2)
