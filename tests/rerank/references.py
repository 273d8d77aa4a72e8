"""Seeded test data and slow, obviously-correct references for the rerankers.

References loop over queries or database items, build dense matrices and solve the diffusion
systems directly (``np.linalg.solve``) or item by item with scipy's ``cg``; the data are small.
"""

import numpy as np
import scipy.sparse.linalg as spla

PAPER_VARIANTS = ("none", "aqe", "dfs", "dba", "aqe+dfs", "dba+aqe", "dba+dfs", "dba+aqe+dfs")


def l2(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def clustered(rng, n_clusters=6, per=12, dim=16, noise=0.6):
    """``(queries, database)``: one query per cluster, ``per`` database vectors per cluster."""
    centres = rng.standard_normal((n_clusters, dim))
    db = np.concatenate([c + noise * rng.standard_normal((per, dim)) for c in centres])
    q = centres + noise * rng.standard_normal((n_clusters, dim))
    return l2(q).astype(np.float32), l2(db).astype(np.float32)


def assert_ranks_by(indices, scores, atol=1e-5):
    """Each row of ``indices`` lists the top of the row of ``scores`` in non-increasing order
    (ties in any order): the ranking a correct sort of ``scores`` can produce."""
    k = indices.shape[1]
    for row, s in zip(indices, scores, strict=True):
        assert len(set(row.tolist())) == k
        got = s[row]
        assert np.all(np.diff(got) <= atol), got
        np.testing.assert_allclose(got, -np.sort(-s)[:k], atol=atol)


def aqe_reference(q, db, k, alpha):
    out = []
    for qi in q:
        order = np.argsort(-(db @ qi))[:k]
        new = qi.astype(np.float64).copy()
        for j in order:
            w = max(float(db[j] @ qi), 0.0) ** alpha if alpha else 1.0
            new += w * db[j]
        out.append(new / np.linalg.norm(new))
    return np.array(out, dtype=np.float32)


def dba_reference(db, k, alpha):
    out = []
    for i, x in enumerate(db):
        sims = db @ x
        sims[i] = -np.inf  # exclude itself
        order = np.argsort(-sims)[:k]
        new = x.astype(np.float64).copy()
        for j in order:
            w = max(float(db[j] @ x), 0.0) ** alpha if alpha else 1.0
            new += w * db[j]
        out.append(new / np.linalg.norm(new))
    return np.array(out, dtype=np.float32)


def dense_graph(db, k, gamma):
    """S = D^-1/2 W D^-1/2 of the mutual kNN graph, with dense matrices and loops."""
    n = len(db)
    sims = db.astype(np.float64) @ db.T.astype(np.float64)
    linked = np.zeros((n, n), bool)
    for i in range(n):
        linked[i, np.argsort(-sims[i])[:k]] = True  # itself included, as Iscen et al.'s code
    w = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i != j and linked[i, j] and linked[j, i]:
                w[i, j] = max(sims[i, j], 0.0) ** gamma
    d = w.sum(axis=1)
    dinv = np.array([x**-0.5 if x > 0 else 0.0 for x in d])
    return dinv[:, None] * w * dinv[None, :]


def seeds_reference(q, db, kq, gamma):
    """y: (N, Q), the query's kq nearest database vectors with similarity ** gamma."""
    y = np.zeros((len(db), len(q)))
    for j, qi in enumerate(q):
        sims = db.astype(np.float64) @ qi.astype(np.float64)
        for i in np.argsort(-sims)[:kq]:
            y[i, j] = max(sims[i], 0.0) ** gamma
    return y


def fallback_ranking(f, previous, k):
    """Positive f largest first, then the rest of ``previous`` in its order."""
    out = []
    for fq, pq in zip(f, previous, strict=True):
        first = [j for j in np.argsort(-fq, kind="stable") if fq[j] > 0]
        rest = [j for j in pq if fq[j] <= 0]
        out.append((first + rest)[:k])
    return np.array(out)


def dfs_reference(q, db, k, kq, alpha, gamma):
    """Exact diffusion scores (Q, N): one direct dense solve per query."""
    s = dense_graph(db, k, gamma)
    y = seeds_reference(q, db, kq, gamma)
    a = np.eye(len(db)) - alpha * s
    return np.array([np.linalg.solve(a, y[:, j]) for j in range(len(q))])


def offline_reference(db, k, gamma, alpha, trunc, tol, maxiter):
    """Yang et al.'s offline matrix, item by item as fyang93/diffusion computes it."""
    n = len(db)
    lap = np.eye(n) - alpha * dense_graph(db, k, gamma)
    sims = db.astype(np.float64) @ db.T.astype(np.float64)
    f = np.zeros((n, n))
    for i in range(n):
        ids = np.argsort(-sims[i])[:trunc]
        assert ids[0] == i
        e0 = np.zeros(trunc)
        e0[0] = 1.0
        f[i, ids] = spla.cg(lap[np.ix_(ids, ids)], e0, rtol=tol, maxiter=maxiter)[0]
    return f


def check_diffusion(out, f_ref, previous, rtol=1e-4):
    """``out`` ranks by ``f_ref`` (positive part, up to ties) and then follows ``previous``."""
    k = out.k
    for qi in range(len(f_ref)):
        f = f_ref[qi]
        n_pos = min(int((f > 0).sum()), k)
        row = out.indices[qi]
        scale = f.max()
        assert_ranks_by(row[None, :n_pos], f[None], atol=rtol * scale)
        np.testing.assert_allclose(out.scores[qi, :n_pos], f[row[:n_pos]], rtol=rtol, atol=rtol * scale)
        rest = [j for j in previous[qi] if f[j] <= 0][: k - n_pos]
        assert row[n_pos:].tolist() == rest
        assert np.all(out.scores[qi, n_pos:] == 0)
