"""Exact full-ranking evaluation from scores, against a full-sort reference, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from retrbench.evaluation import PROTOCOLS, evaluate, evaluate_scores, exact_evaluation, full_ranking_positions
from retrbench.evaluation import scores as scores_mod
from retrbench.utils.linalg import DenseScores, FallbackScores, InnerProductScores, exact_search

KAPPAS = (1, 5, 10, 100)


def values(metrics):
    return [(m.split, m.name) for m in metrics], np.array([m.value for m in metrics])


def random_gnd(rng, nq, n):
    """Per query: easy / hard / junk / ok lists of random sizes (some empty), disjoint within a query."""
    gnd = []
    for q in range(nq):
        perm = rng.permutation(n)
        e, h, j = rng.integers(0, 25), rng.integers(0, 15), rng.integers(0, 30)
        gnd.append(
            {
                "easy": perm[:e] if q else perm[:0],  # query 0: no easy image (nan in the easy split)
                "hard": perm[25 : 25 + h],
                "junk": perm[40 : 40 + j],
                "ok": perm[: rng.integers(1, 40)],
            }
        )
    return gnd


def integer_problem(rng, nq=8, n=2500, d=4):
    """Small integer descriptors: products are exact in float32 and ties are everywhere."""
    q = rng.integers(-2, 3, (nq, d)).astype(np.float32)
    db = rng.integers(-2, 3, (n, d)).astype(np.float32)
    full = np.argsort(-(q.astype(np.float64) @ db.T.astype(np.float64)), axis=1, kind="stable")
    return q, db, full


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS.list()))
def test_equals_full_sort_reference_with_ties(rng, protocol, monkeypatch):
    monkeypatch.setattr("retrbench.utils.linalg._BLOCK_BYTES", 4096)  # many blocks: labelled items in several
    q, db, full = integer_problem(rng)
    gnd = random_gnd(rng, len(q), len(db))
    ref_names, ref = values(evaluate(full, gnd, protocol, KAPPAS))
    names, got = values(evaluate_scores(q, db, gnd, protocol, KAPPAS))
    assert names == ref_names
    assert np.array_equal(got, ref, equal_nan=True)  # bit for bit
    exact = exact_evaluation(InnerProductScores(q, db), gnd, protocol, KAPPAS)
    assert exact.ranking_length == (100 if protocol == "gldv2" else len(db))
    from retrbench.evaluation import per_query_ap

    want = per_query_ap(full, gnd, protocol)
    assert exact.query_ap.keys() == want.keys()
    for split in want:
        assert np.array_equal(exact.query_ap[split], want[split], equal_nan=True)


def test_equals_evaluate_of_exact_search_on_float_data(rng, tmp_path):
    nq, n, d = 12, 3000, 32
    q = rng.standard_normal((nq, d)).astype(np.float32)
    db = rng.standard_normal((n, d)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    path = tmp_path / "db.npy"
    np.save(path, db)
    mm = np.load(path, mmap_mode="r")  # read block by block from a memory map
    gnd = random_gnd(rng, nq, n)
    ranking = exact_search(q, db).indices
    for protocol in ("revisited", "classic", "map"):
        ref_names, ref = values(evaluate(ranking, gnd, protocol, KAPPAS))
        names, got = values(evaluate_scores(q, mm, gnd, protocol, KAPPAS))
        assert names == ref_names and np.array_equal(got, ref, equal_nan=True)


def test_positions_are_those_of_a_stable_sort(rng, monkeypatch):
    monkeypatch.setattr("retrbench.utils.linalg._BLOCK_BYTES", 2048)
    q, db, full = integer_problem(rng, nq=5, n=700)
    where = np.argsort(full, axis=1)  # where[q, id] = position of id
    rows = np.repeat(np.arange(5), 40)
    ids = np.concatenate([rng.choice(700, 40, replace=False) for _ in range(5)])
    pos = full_ranking_positions(InnerProductScores(q, db), rows, ids)
    np.testing.assert_array_equal(pos, where[rows, ids])
    with pytest.raises(ValueError, match="database indices"):
        full_ranking_positions(InnerProductScores(q, db), np.array([0]), np.array([700]))


def test_dense_and_fallback_scores_rank_like_their_definition(rng):
    """FallbackScores: positive primary scores first (ties by index), the rest by the fallback."""
    nq, n = 4, 300
    primary = np.where(rng.random((nq, n)) < 0.3, rng.integers(1, 4, (nq, n)), 0).astype(np.float32)
    primary[0, :5] = -0.0  # signed zeros are zeros
    fallback = rng.integers(-3, 3, (nq, n)).astype(np.float32)
    sc = FallbackScores(DenseScores(primary), DenseScores(fallback))
    assert sc.tiers == 1
    ref = []
    for p, f in zip(primary, fallback, strict=True):
        first = np.flatnonzero(p > 0)
        first = first[np.argsort(-p[first], kind="stable")]
        rest = np.flatnonzero(~(p > 0))
        rest = rest[np.argsort(-f[rest], kind="stable")]
        ref.append(np.concatenate([first, rest]))
    ref = np.array(ref)
    top = sc.top_k(n)
    np.testing.assert_array_equal(top.indices, ref)
    np.testing.assert_array_equal(top.scores, np.take_along_axis(np.where(primary > 0, primary, 0), ref, axis=1))
    np.testing.assert_array_equal(sc.top_k(7).indices, ref[:, :7])
    rows = np.repeat(np.arange(nq), n)
    ids = np.tile(np.arange(n), nq)
    pos = full_ranking_positions(sc, rows, ids).reshape(nq, n)
    np.testing.assert_array_equal(pos, np.argsort(ref, axis=1))


def test_checks(rng):
    q, db, _ = integer_problem(rng, nq=3, n=50)
    gnd = random_gnd(rng, 3, 50)
    with pytest.raises(ValueError, match="3 queries but the ground truth has 2"):
        exact_evaluation(InnerProductScores(q, db), gnd[:2])
    bad = [dict(g) for g in gnd]
    bad[1]["junk"] = np.array([50])
    with pytest.raises(ValueError, match=r"gnd\[1\]\['junk'\] has database id 50"):
        evaluate_scores(q, db, bad, "revisited")
    with pytest.raises(ValueError, match="kappas"):
        evaluate_scores(q, db, gnd, "revisited", (0,))
    with pytest.raises(KeyError):
        evaluate_scores(q, db, gnd, "nope")
    with pytest.raises(ValueError, match="do not match"):
        InnerProductScores(q, db[:, :2])


def test_no_database_sort(rng, monkeypatch):
    """The exact path never sorts a (Q, N) matrix: np.argsort only sees the labelled items."""
    q, db, full = integer_problem(rng, nq=3, n=4000)
    gnd = random_gnd(rng, 3, 4000)
    seen = []
    real = np.argsort

    def spy(a, *args, **kwargs):
        seen.append(np.size(a))
        return real(a, *args, **kwargs)

    monkeypatch.setattr(scores_mod.np, "argsort", spy)
    evaluate_scores(q, db, gnd, "revisited")
    assert max(seen) < 4000
