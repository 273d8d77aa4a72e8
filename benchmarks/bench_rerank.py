"""Time the rerankers (the eight variants of the paper's Table 1) and compare with references.

Two parts, both on seeded clustered descriptors (clusters of about 50 vectors spread along a
low-rank manifold, grouped around shared super-centres, plus isotropic noise; queries drawn
the same way):

1. **Scale.** For every ``--sizes`` x ``--dims`` database, each variant runs alone in a fresh
   subprocess (cold: nothing cached; its time and the process's peak resident memory, which
   includes the data), then the whole eight-variant sweep runs in one more subprocess (the
   database graphs are computed once and shared through the cache).
2. **Speed target.** DBA ``k=5`` then AQE ``k=5`` on 50 queries x 5000 x 512, ranked (the
   whole database, per query), against deep-image-retrieval's own way: its
   ``expand_descriptors`` (``dirtorch/test_dir.py``, ported faithfully below: one matrix
   product, ``np.argpartition``, a loop over vectors) for the database, then for the queries,
   then a numpy ranking of ``queries @ database.T``. Ours includes the global search it starts
   from, with cold caches. The augmented vectors and rankings are compared.
3. **References.** At ``--ref-size`` x ``--ref-dim`` (default 3000 x 128, 20 queries) the same
   work is done by straightforward implementations written below, in this process, and the
   speed ratios and agreements are reported:

   - DBA and AQE: a port of deep-image-retrieval's ``expand_descriptors`` (a loop over
     vectors); the augmented vectors must match;
   - ``dfs``: a port of Iscen et al.'s code (the mutual kNN graph built by a loop over
     vertices, scipy's ``cg`` run query by query); top-100 rankings compared;
   - ``dfs-offline``: a port of fyang93/diffusion (affinity loop, one scipy ``cg`` per
     database vector on its truncated Laplacian in a thread pool, a linear combination per
     query); top-100 rankings compared. ``dfs`` is compared with it too: the performance
     target is stated against this code.

    python benchmarks/bench_rerank.py                              # 5k and 100k, D = 512 and 2048
    python benchmarks/bench_rerank.py --sizes 5000 --dims 512      # quick
    python benchmarks/bench_rerank.py --sizes 100000 --dims 512 --variants dfs --no-reference
    python benchmarks/bench_rerank.py --sizes --no-reference --target-only     # the speed target alone

Peak memory is ``ru_maxrss`` of each subprocess (Linux: KiB), printed with its increase over
the high-water mark after importing retrbench (about 1 GiB: torch's libraries) and making
the data. Timings exclude generating the data; each variant's time includes the global
search (``k = N``) it starts from. The machine is shared and noisy: compare ratios taken in
one run, and rerun when the load is high.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch  # noqa: F401  (the rerankers import torch on first use; import it before any timing)

from retrbench.rerank import RankState, build_reranker, clear_cache, knn_graph, rerank
from retrbench.search import search

VARIANTS = ("none", "aqe", "dfs", "dba", "aqe+dfs", "dba+aqe", "dba+dfs", "dba+aqe+dfs")


# --------------------------------------------------------------------------- data


def make_data(n: int, d: int, nq: int, seed: int = 0, per: int = 50, rank: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """``(queries (nq, d), database (n, d))`` float32, L2-normalised, clustered."""
    rng = np.random.default_rng(seed)
    n_clusters = max(1, n // per)
    n_super = max(1, n_clusters // 20)
    supers = rng.standard_normal((n_super, d)).astype(np.float32)
    centres = supers[rng.integers(0, n_super, n_clusters)] + 0.8 * rng.standard_normal(
        (n_clusters, d), dtype=np.float32
    )
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    basis = rng.standard_normal((n_clusters, rank, d), dtype=np.float32) / np.sqrt(d)

    def draw(m: int) -> np.ndarray:
        out = np.empty((m, d), np.float32)
        for lo in range(0, m, 8192):
            hi = min(lo + 8192, m)
            lab = rng.integers(0, n_clusters, hi - lo)
            coef = rng.standard_normal((hi - lo, rank), dtype=np.float32)
            x = centres[lab] + 0.7 * np.einsum("nr,nrd->nd", coef, basis[lab])
            x += 0.35 / np.sqrt(d) * rng.standard_normal((hi - lo, d), dtype=np.float32)
            out[lo:hi] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out

    db = draw(n)
    return draw(nq), db


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --------------------------------------------------------------------------- references


def ref_expand_descriptors(descs: np.ndarray, db: np.ndarray | None = None, alpha: float = 0, k: int = 0) -> np.ndarray:
    """deep-image-retrieval's ``expand_descriptors`` (``dirtorch/test_dir.py``; DBA when ``db`` is
    None, else AQE), line for line on numpy inputs (its ``matmul`` is ``np.dot(A, B.T)``)."""
    assert k >= 0 and alpha >= 0, "k and alpha must be non-negative"
    if k == 0:
        return descs
    n = descs.shape[0]
    db_descs = db if db is not None else descs
    sim = np.dot(descs, db_descs.T)
    if db is None:
        sim[np.diag_indices(n)] = 0
    idx = np.argpartition(sim, int(-k), axis=1)[:, int(-k) :]
    out = np.zeros_like(descs)
    for i in range(n):
        new_q = np.vstack([db_descs[j, :] * sim[i, j] ** alpha for j in idx[i]])
        new_q = np.vstack([descs[i], new_q])
        new_q = np.mean(new_q, axis=0)
        out[i] = new_q / np.linalg.norm(new_q)
    return out


def _flat_knn(x: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    return index.search(queries, k)


def ref_iscen(
    queries: np.ndarray,
    db: np.ndarray,
    k: int = 50,
    kq: int = 10,
    alpha: float = 0.99,
    gamma: float = 3,
    it: int = 20,
    tol: float = 1e-6,
) -> np.ndarray:
    """Iscen et al.'s global-descriptor pipeline (run_test.m, knngraph.m, ymake.m, dfs.m) in Python.

    Returns ``(Q, N)`` rankings by the diffusion score.
    """
    n = db.shape[0]
    s_, knn_ = _flat_knn(db, db, k)  # (N, k), itself included
    s_ = s_**gamma
    s_[s_ < 0] = 0
    rows, cols, vals = [], [], []
    for i in range(n):  # knngraph.m: keep j in knn(i) when i is in knn(j)
        mem = (knn_[knn_[i]] == i).any(axis=1)
        rows.extend([i] * int(mem.sum()))
        cols.extend(knn_[i, mem].tolist())
        vals.extend(s_[i, mem].tolist())
    a = sp.csr_matrix((vals, (rows, cols)), shape=(n, n))
    a.setdiag(0)
    a.eliminate_zeros()
    d = np.asarray(a.sum(axis=1)).ravel() ** -0.5
    s = sp.diags(d) @ a @ sp.diags(d)
    lap = sp.eye(n) - alpha * s
    ranks = []
    for qv in queries:  # ymake.m + dfs.m
        sims, ids = _flat_knn(db, qv[None], kq)
        y = np.zeros(n)
        y[ids[0]] = np.maximum(sims[0] ** gamma, 0)
        f, _ = spla.cg(lap, y, rtol=tol, maxiter=it)
        ranks.append(np.argsort(-f, kind="stable"))
    return np.array(ranks)


def ref_fyang(
    queries: np.ndarray,
    db: np.ndarray,
    trunc: int = 1000,
    kd: int = 50,
    kq: int = 10,
    gamma: float = 3,
    alpha: float = 0.99,
) -> np.ndarray:
    """fyang93/diffusion (``Diffusion.get_offline_results`` and ``rank.search``) in Python.

    Returns ``(Q, trunc)`` rankings, as the original.
    """
    n = db.shape[0]
    sims, ids = _flat_knn(db, db, trunc)
    trunc_ids = ids
    s, i_ = sims[:, :kd].copy(), ids[:, :kd]
    s[s < 0] = 0  # get_affinity
    s = s**gamma
    vec_ids, mut_ids, mut_sims = [], [], []
    for i in range(n):
        ismutual = np.isin(i_[i_[i]], i).any(axis=1)
        if ismutual.any():
            vec_ids.append(i * np.ones(ismutual.sum()))
            mut_ids.append(i_[i, ismutual])
            mut_sims.append(s[i, ismutual])
    vec_ids, mut_ids, mut_sims = map(np.concatenate, [vec_ids, mut_ids, mut_sims])
    aff = sp.csc_matrix((mut_sims, (vec_ids, mut_ids)), shape=(n, n), dtype=np.float32)
    aff.setdiag(0)
    degrees = aff @ np.ones(n) + 1e-12  # get_laplacian
    mat = sp.dia_matrix((degrees**-0.5, [0]), shape=(n, n), dtype=np.float32)
    stochastic = mat @ aff @ mat
    lap_alpha = sp.dia_matrix((np.ones(n), [0]), shape=(n, n), dtype=np.float32) - alpha * stochastic
    trunc_init = np.zeros(trunc)
    trunc_init[0] = 1

    def offline_row(i: int) -> tuple[np.ndarray, np.ndarray]:
        rid = trunc_ids[i]
        trunc_lap = lap_alpha[rid][:, rid]
        scores, _ = spla.cg(trunc_lap, trunc_init, rtol=1e-6, maxiter=20)
        ranks = np.argsort(-scores)
        return scores[ranks], rid[ranks]

    with ThreadPoolExecutor(os.cpu_count()) as pool:  # joblib Parallel(n_jobs=-1, prefer='threads')
        results = list(pool.map(offline_row, range(n)))
    all_scores, all_ranks = map(np.concatenate, zip(*results, strict=True))
    offline = sp.csr_matrix((all_scores, (np.repeat(np.arange(n), trunc), all_ranks)), shape=(n, n), dtype=np.float32)
    qs, qi = _flat_knn(db, queries, kq)
    qs = qs**gamma
    out = np.empty((len(queries), trunc), np.int64)
    for i in range(len(queries)):
        scores = qs[i] @ offline[qi[i]]
        parts = np.argpartition(-scores, trunc)[:trunc] if trunc < n else np.arange(n)
        out[i] = parts[np.argsort(-scores[parts])]
    return out


# --------------------------------------------------------------------------- helpers


def timed(fn: Callable[[], object], repeats: int = 1) -> tuple[float, object]:
    """Best wall time of ``repeats`` calls (the rerank cache cleared before each) and the last value."""
    best, value = np.inf, None
    for _ in range(repeats):
        clear_cache()
        t0 = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - t0)
    return best, value


def agreement(a: np.ndarray, b: np.ndarray, top: int = 100) -> tuple[float, float]:
    """(mean top-``top`` set overlap, fraction of queries with identical top-``top`` lists)."""
    a, b = a[:, :top], b[:, :top]
    overlap = np.mean([len(set(x) & set(y)) / top for x, y in zip(a.tolist(), b.tolist(), strict=True)])
    return float(overlap), float(np.mean(np.all(a == b, axis=1)))


# --------------------------------------------------------------------------- child: one database


def child(n: int, d: int, nq: int, seed: int, specs: Sequence[str], sweep: bool) -> dict:
    q, db = make_data(n, d, nq, seed)
    rss_data = peak_rss_mib()
    out: dict = {
        "n": n,
        "d": d,
        "queries": nq,
        "rss_after_data_mib": rss_data,
        "times_s": {},
        "load_before": os.getloadavg()[0],
    }
    t0 = time.perf_counter()
    g = search(q, db)
    out["search_s"] = time.perf_counter() - t0
    if sweep:
        clear_cache()
        t0 = time.perf_counter()
        for spec in specs:
            t1 = time.perf_counter()
            rerank(spec, q, db, search(q, db))
            out["times_s"][spec] = time.perf_counter() - t1
        out["sweep_s"] = time.perf_counter() - t0
    else:
        for spec in specs:
            clear_cache()
            t1 = time.perf_counter()
            rerank(spec, q, db, search(q, db))
            out["times_s"][spec] = time.perf_counter() - t1
    if n > 20000 and any("dfs" in s for s in specs):  # how close the approximate graph is
        out["approx_knn_recall50"] = float(knn_graph(db, 50, "approx").info["recall"])
    del g
    out["peak_rss_mib"] = peak_rss_mib()
    out["load_after"] = os.getloadavg()[0]
    return out


def run_child(n: int, d: int, nq: int, seed: int, specs: Sequence[str], sweep: bool) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--_child",
        json.dumps({"n": n, "d": d, "nq": nq, "seed": seed, "specs": list(specs), "sweep": sweep}),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"child {n}x{d} {specs} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- reference comparisons


def reference_comparison(n: int, d: int, nq: int, seed: int, repeats: int, trunc: int) -> list[str]:
    """Each side of a pair (reference, ours) runs ``repeats`` times in a row; the best time counts.

    Not interleaved: right after numpy's or faiss's thread pools have worked, torch's (and the
    other way round) run up to 3x slower for a while on two cores, whichever side comes second.
    """
    q, db = make_data(n, d, nq, seed)
    g = search(q, db)
    lines = [f"references at {n} x {d}, {nq} queries (best of {repeats}; ours cold, cache cleared)"]

    def pair(ref: Callable[[], object], ours: Callable[[], object]) -> tuple[float, object, float, object]:
        t_ref, v_ref = timed(ref, repeats)
        t_ours, v_ours = timed(ours, repeats)
        return t_ref, v_ref, t_ours, v_ours

    def row(name: str, t_ref: float, t_ours: float, extra: str) -> None:
        lines.append(f"  {name:<38} ref {t_ref:8.3f} s   ours {t_ours:8.4f} s   x{t_ref / t_ours:7.1f}   {extra}")

    def ref_dba() -> tuple[np.ndarray, np.ndarray]:  # augment, then rank (deep-image-retrieval scores all)
        aug = ref_expand_descriptors(db, k=2, alpha=0)
        return aug, np.argsort(-(q @ aug.T), axis=1, kind="stable")

    def ref_aqe() -> tuple[np.ndarray, np.ndarray]:
        qe = ref_expand_descriptors(q, db, k=10, alpha=3)
        return qe, np.argsort(-(qe @ db.T), axis=1, kind="stable")

    t_ref, (ref_db, _), t_ours, st = pair(ref_dba, lambda: build_reranker("dba:k=2")(RankState(q, db, g)))
    row("dba k=2 + ranking", t_ref, t_ours, f"max |diff| {float(np.abs(st.database - ref_db).max()):.1e}")
    t_ref, (ref_q, _), t_ours, st = pair(ref_aqe, lambda: build_reranker("aqe:k=10,alpha=3")(RankState(q, db, g)))
    row("alpha-qe k=10 alpha=3 + ranking", t_ref, t_ours, f"max |diff| {float(np.abs(st.queries - ref_q).max()):.1e}")

    t_ref, ranks_iscen, t_ours, res = pair(lambda: ref_iscen(q, db), lambda: rerank("dfs", q, db, g))
    ov, same = agreement(res.indices, ranks_iscen)
    row("dfs vs Iscen et al. (loop, cg per query)", t_ref, t_ours, f"top-100 overlap {ov:.4f}, identical {same:.2f}")
    t_fy, ranks_fy, t_off, res_off = pair(
        lambda: ref_fyang(q, db, trunc=trunc), lambda: rerank(f"dfs-offline:trunc={trunc}", q, db, g)
    )
    ov, same = agreement(res_off.indices, ranks_fy)
    row(f"dfs-offline vs fyang93 (trunc {trunc})", t_fy, t_off, f"top-100 overlap {ov:.4f}, identical {same:.2f}")
    ov, same = agreement(res.indices, ranks_fy)
    row("dfs vs fyang93 offline", t_fy, t_ours, f"top-100 overlap {ov:.4f}, identical {same:.2f}")
    return lines


# --------------------------------------------------------------------------- speed target


def ref_dba_aqe_ranked(q: np.ndarray, db: np.ndarray, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """deep-image-retrieval's DBA then AQE (``eval_model`` with ``adba`` and ``aqe``), ranked by numpy."""
    aug = ref_expand_descriptors(db, k=k, alpha=0)
    qe = ref_expand_descriptors(q, db=aug, k=k, alpha=0)
    return aug, np.argsort(-np.dot(qe, aug.T), axis=1)


def speed_target(repeats: int, n: int = 5000, d: int = 512, nq: int = 50, seed: int = 0) -> list[str]:
    """DBA k=5 + AQE k=5, ranked, against the peer's code, each side ``repeats`` times in a row."""
    q, db = make_data(n, d, nq, seed)

    def ours() -> RankState:
        return build_reranker("dba:k=5+aqe:k=5")(RankState(q, db, search(q, db)))

    ours()  # load the libraries' kernels once (both sides have run numpy before)
    t_ref, (ref_db, ref_rank) = timed(lambda: ref_dba_aqe_ranked(q, db), repeats)
    t_ours, st = timed(ours, repeats)
    diff = float(np.abs(st.database - ref_db).max())
    ov, same = agreement(st.result.indices, ref_rank)
    return [
        f"speed target: DBA k=5 + AQE k=5 on {nq} queries x {n} x {d}, ranked (best of {repeats}; ours cold, cache cleared)",
        f"  deep-image-retrieval expand_descriptors x2 + numpy ranking {t_ref:8.3f} s",
        f"  retrbench search + dba:k=5+aqe:k=5 (full ranking)        {t_ours:8.3f} s   x{t_ref / t_ours:.1f}",
        f"  augmented database max |diff| {diff:.1e}; top-100 overlap {ov:.4f}, identical {same:.2f}",
    ]


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="*", default=[5000, 100000])
    p.add_argument("--dims", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--queries", type=int, default=70)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-sweep", action="store_true", help="skip the whole-sweep subprocess")
    p.add_argument("--no-reference", action="store_true", help="skip the reference comparison")
    p.add_argument("--ref-size", type=int, default=3000)
    p.add_argument("--ref-dim", type=int, default=128)
    p.add_argument("--ref-queries", type=int, default=20)
    p.add_argument("--ref-trunc", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", help="also write every number to this file")
    p.add_argument("--target-only", action="store_true", help="only the speed target comparison")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._child:
        c = json.loads(a._child)
        print(json.dumps(child(c["n"], c["d"], c["nq"], c["seed"], c["specs"], c["sweep"])))
        return 0

    print(
        f"faiss {faiss.__version__}, numpy {np.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    report: dict = {"scale": [], "reference": [], "target": []}
    lines = speed_target(a.repeats)
    report["target"] = lines
    print("\n".join(lines), flush=True)
    if a.target_only:
        return 0
    if not a.no_reference:
        lines = reference_comparison(a.ref_size, a.ref_dim, a.ref_queries, a.seed, a.repeats, a.ref_trunc)
        lines.append(f"  (load average after: {os.getloadavg()[0]:.1f})")
        report["reference"] = lines
        print("\n".join(lines), flush=True)
    for n in a.sizes:
        for d in a.dims:
            print(f"\n{n} x {d}, {a.queries} queries", flush=True)
            for spec in a.variants:
                r = run_child(n, d, a.queries, a.seed, [spec], sweep=False)
                report["scale"].append({"mode": "cold", "spec": spec, **r})
                extra = f"   load {r['load_before']:.1f}-{r['load_after']:.1f}"
                extra += f"   graph kNN recall@50 {r['approx_knn_recall50']:.3f}" if "approx_knn_recall50" in r else ""
                print(
                    f"  {spec:<14} {r['times_s'][spec]:8.2f} s   peak RSS {r['peak_rss_mib']:7.0f} MiB "
                    f"(+{r['peak_rss_mib'] - r['rss_after_data_mib']:.0f} over imports + data){extra}",
                    flush=True,
                )
            if not a.no_sweep:
                r = run_child(n, d, a.queries, a.seed, a.variants, sweep=True)
                report["scale"].append({"mode": "sweep", **r})
                parts = ", ".join(f"{s} {t:.2f}" for s, t in r["times_s"].items())
                print(
                    f"  whole sweep    {r['sweep_s']:8.2f} s   peak RSS {r['peak_rss_mib']:7.0f} MiB "
                    f"(+{r['peak_rss_mib'] - r['rss_after_data_mib']:.0f})   load {r['load_before']:.1f}-{r['load_after']:.1f}   ({parts})",
                    flush=True,
                )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
