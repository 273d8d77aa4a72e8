"""Time the vectorised revisited evaluation against a per-query loop reference.

Evaluates Easy + Medium + Hard (mAP and mP@1,5,10) for 70 queries x 4993 database images
(the real ``gnd_roxford5k.pkl`` from ``../shared/data`` when present, else a seeded synthetic
ground truth of the same size) with ``retrbench.evaluation.evaluate`` and with a
straightforward port of the revisitop per-query loop written below, checks that every number
is identical, and prints the times and the speed ratio.

    python benchmarks/bench_evaluation.py [--repeats 20] [--seed 0] [--gnd PATH] [--synthetic]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from retrbench.datasets.groundtruth import load_gnd_pickle
from retrbench.evaluation import evaluate

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RETRBENCH_SHARED_DATA", ROOT.parent / "shared" / "data"))
KAPPAS = (1, 5, 10)


# --------------------------------------------------------------------------- loop reference
# One query at a time, following revisitop's python/evaluate.py (rows instead of columns).


def ref_ap(pos: np.ndarray, nres: int) -> float:
    ap = 0.0
    step = 1.0 / nres
    for j in range(len(pos)):
        r = pos[j]
        p0 = 1.0 if r == 0 else float(j) / r
        p1 = float(j + 1) / (r + 1)
        ap += (p0 + p1) * step / 2.0
    return ap


def ref_compute_map(ranks: np.ndarray, gnd: Sequence[dict], kappas: Sequence[int]) -> tuple[float, np.ndarray, np.ndarray]:
    """``(mAP, aps, mpr)`` with ``ranks`` ``(Q, N)``: the reference loop, query by query."""
    nq = len(gnd)
    total, pr, nempty = 0.0, np.zeros(len(kappas)), 0
    aps = np.zeros(nq)
    for i in range(nq):
        qgnd = gnd[i]["ok"]
        if len(qgnd) == 0:
            aps[i] = np.nan
            nempty += 1
            continue
        pos = np.flatnonzero(np.isin(ranks[i], qgnd))
        junk = np.flatnonzero(np.isin(ranks[i], gnd[i]["junk"]))
        k = ij = 0
        for ip in range(len(pos)):  # move positives up by the junk ranked above them
            while ij < len(junk) and pos[ip] > junk[ij]:
                k += 1
                ij += 1
            pos[ip] -= k
        ap = ref_ap(pos, len(qgnd))
        total += ap
        aps[i] = ap
        pos = pos + 1
        prs = np.zeros(len(kappas))
        for j, kappa in enumerate(kappas):
            kq = min(max(pos), kappa)
            prs[j] = (pos <= kq).sum() / kq
        pr = pr + prs
    return total / (nq - nempty), aps, pr / (nq - nempty)


def ref_revisited(ranks: np.ndarray, gnd: Sequence[dict], kappas: Sequence[int]) -> list[tuple[str, str, float]]:
    """Easy / Medium / Hard metrics (percent) from the raw ground truth, as revisitop's example does."""
    out = []
    for split, ok, junk in (("easy", ("easy",), ("junk", "hard")), ("medium", ("easy", "hard"), ("junk",)), ("hard", ("hard",), ("junk", "easy"))):
        g = [{"ok": np.concatenate([np.asarray(q[k], dtype=np.int64) for k in ok]), "junk": np.concatenate([np.asarray(q[k], dtype=np.int64) for k in junk])} for q in gnd]
        m, _, mpr = ref_compute_map(ranks, g, kappas)
        out.append((split, "mAP", 100.0 * m))
        out += [(split, f"mP@{k}", 100.0 * v) for k, v in zip(kappas, mpr, strict=True)]
    return out


# --------------------------------------------------------------------------- data


def synthetic_gnd(n_db: int, n_q: int, rng: np.random.Generator) -> list[dict]:
    """Random easy / hard / junk lists of roxford5k-like sizes (disjoint, some queries without easy)."""
    gnd = []
    for q in range(n_q):
        sizes = rng.integers(1, 120, size=3)
        ids = rng.choice(n_db, size=int(sizes.sum()), replace=False)
        easy, hard, junk = np.split(ids, np.cumsum(sizes)[:2])
        gnd.append({"easy": [] if q % 35 == 0 else easy.tolist(), "hard": hard.tolist(), "junk": junk.tolist(), "bbx": [0.0, 0.0, 1.0, 1.0]})
    return gnd


def make_ranks(gnd: Sequence[dict], n_db: int, rng: np.random.Generator) -> np.ndarray:
    """``(Q, N)`` full rankings from noisy scores where relevant images score higher on average."""
    scores = rng.standard_normal((len(gnd), n_db))
    for q, g in enumerate(gnd):
        scores[q, g["easy"]] += 2.0
        scores[q, g["hard"]] += 1.0
    return np.argsort(-scores, axis=1)


def best_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gnd", type=Path, default=SHARED / "revisitop" / "gnd_roxford5k.pkl", help="revisited gnd pickle")
    ap.add_argument("--synthetic", action="store_true", help="use a seeded synthetic ground truth even if the file exists")
    ap.add_argument("--repeats", type=int, default=20, help="timing repeats (the best is reported)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    if args.gnd.exists() and not args.synthetic:
        data = load_gnd_pickle(args.gnd)
        gnd, n_db, source = data["gnd"], len(data["imlist"]), str(args.gnd)
    else:
        n_db = 4993
        gnd, source = synthetic_gnd(n_db, 70, rng), f"synthetic (seed {args.seed})"
    ranks = make_ranks(gnd, n_db, rng)

    ours = evaluate(ranks, gnd, "revisited", KAPPAS)
    ref = ref_revisited(ranks, gnd, KAPPAS)
    got = [(m.split, m.name, m.value) for m in ours]
    if got != ref:
        diff = [(a, b) for a, b in zip(got, ref, strict=True) if a != b]
        raise AssertionError(f"vectorised and loop results differ: {diff}")

    t_vec = best_time(lambda: evaluate(ranks, gnd, "revisited", KAPPAS), args.repeats)
    t_ref = best_time(lambda: ref_revisited(ranks, gnd, KAPPAS), max(1, args.repeats // 4))

    print(f"ground truth: {source}; ranks {ranks.shape[0]} queries x {ranks.shape[1]}; Easy+Medium+Hard, mP@{KAPPAS}")
    print(f"{'method':<28}{'best time (ms)':>16}")
    print(f"{'per-query loop (reference)':<28}{1e3 * t_ref:>16.2f}")
    print(f"{'evaluate (vectorised)':<28}{1e3 * t_vec:>16.2f}")
    print(f"speed ratio: {t_ref / t_vec:.1f}x; all {len(ref)} numbers identical")
    print(f"{'split':<8}{'metric':<8}{'value':>10}")
    for split, name, value in got:
        print(f"{split:<8}{name:<8}{value:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
