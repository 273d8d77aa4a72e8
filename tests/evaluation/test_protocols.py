"""Tests for retrbench.evaluation: hand-worked rankings, a slow-loop oracle, real ground truth."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_path

from retrbench.datasets.groundtruth import load_gnd_pickle
from retrbench.evaluation import PROTOCOLS, average_precision, compute_map, evaluate, gnd_from_pickle
from retrbench.evaluation import core as ev
from retrbench.types import Metric, SearchResult

# --------------------------------------------------------------------------- helpers


def as_dict(metrics: list[Metric]) -> dict[tuple[str, str], float]:
    return {(m.split, m.name): m.value for m in metrics}


def slow_map(ranks: np.ndarray, gnd: list[dict], kappas: tuple[int, ...]) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """Per-query loop with revisitop's semantics (rows instead of columns).

    Extensions spelled out here: ``-1`` entries are skipped like junk; a query whose positives
    are not all listed (partial top-K) uses ``kq = k`` for P@k.
    """
    nq = len(gnd)
    aps = np.full(nq, np.nan)
    prs = np.full((nq, len(kappas)), np.nan)
    total, pr, n = 0.0, np.zeros(len(kappas)), 0
    for q in range(nq):
        ok = np.asarray(gnd[q]["ok"], dtype=np.int64)
        if len(ok) == 0:
            continue
        junk = np.append(np.asarray(gnd[q].get("junk", []), dtype=np.int64), -1)
        pos = np.flatnonzero(np.isin(ranks[q], ok))
        jpos = np.flatnonzero(np.isin(ranks[q], junk))
        shifted, k, ij = [], 0, 0
        for p in pos:
            while ij < len(jpos) and p > jpos[ij]:
                k += 1
                ij += 1
            shifted.append(int(p) - k)
        ap = 0.0
        for j, r in enumerate(shifted):
            p0 = 1.0 if r == 0 else j / r
            p1 = (j + 1) / (r + 1)
            ap += (p0 + p1) * (1.0 / len(ok)) / 2.0
        aps[q] = ap
        total += ap
        last = shifted[-1] + 1 if len(shifted) == len(ok) else math.inf
        for i, kappa in enumerate(kappas):
            kq = min(last, kappa)
            prs[q, i] = sum(1 for r in shifted if r + 1 <= kq) / kq
        pr = pr + prs[q]
        n += 1
    return (total / n if n else math.nan), aps, (pr / n if n else np.full(len(kappas), np.nan)), prs


def ap_positives_last(n_other: int, n_pos: int) -> float:
    """Closed form: AP when ``n_pos`` positives come right after ``n_other`` negatives (junk removed).

    Positive ``i`` (0-based) sits at 0-based position ``M + i`` (``M = n_other``, ``P = n_pos``):
    ``p0 = i / (M + i)``, ``p1 = (i + 1) / (M + i + 1)``, so with ``i / (M + i) = 1 - M / (M + i)``
    AP = 1/(2P) sum_i [p0 + p1] = 1 - M / (2P) * [(H(M+P-1) - H(M-1)) + (H(M+P) - H(M))].
    """
    m, p = n_other, n_pos
    if m == 0:
        return 1.0

    def h(a: int, b: int) -> float:  # H(b) - H(a)
        return math.fsum(1.0 / x for x in range(a + 1, b + 1))

    return 1.0 - m / (2.0 * p) * (h(m - 1, m + p - 1) + h(m, m + p))


def random_case(rng: np.random.Generator, nq: int = 40, n_db: int = 300, overlap: bool = False) -> tuple[np.ndarray, list[dict]]:
    gnd = []
    for q in range(nq):
        n_ok = 0 if q % 7 == 3 else int(rng.integers(1, 25))
        ids = rng.choice(n_db, size=n_ok + int(rng.integers(0, 12)), replace=False)
        ok, junk = ids[:n_ok], ids[n_ok:]
        if overlap and n_ok and q % 2:
            junk = np.append(junk, ok[:2])  # ids both positive and junk
        gnd.append({"ok": ok, "junk": junk})
    scores = rng.standard_normal((nq, n_db))
    for q, g in enumerate(gnd):
        scores[q, g["ok"]] += 1.5
    return np.argsort(-scores, axis=1), gnd


@pytest.fixture(params=["dense", "search"])
def lookup(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with the dense lookup table and with the binary-search membership path."""
    if request.param == "search":
        monkeypatch.setattr(ev, "_DENSE_LIMIT", 0)
    return request.param


# --------------------------------------------------------------------------- hand-worked AP


def test_average_precision_hand_worked() -> None:
    # 2 positives at 0-based positions 0 and 2 (ranks 1 and 3):
    #   j=0, r=0: p0 = 1 (r == 0), p1 = 1/1 = 1        -> trapezoid (1 + 1) * 1/2 / 2 = 1/2
    #   j=1, r=2: p0 = 1/2,         p1 = 2/3            -> (1/2 + 2/3) * 1/2 / 2 = 7/24
    #   AP = 12/24 + 7/24 = 19/24
    assert average_precision(np.array([0, 2]), 2) == pytest.approx(19 / 24, rel=1e-15)
    # 1 positive at position 1: p0 = 0/1, p1 = 1/2 -> AP = (0 + 1/2) / 2 = 1/4
    assert average_precision(np.array([1]), 1) == pytest.approx(0.25, rel=1e-15)
    assert average_precision(np.array([1]), 1) == pytest.approx(ap_positives_last(1, 1), rel=1e-15)
    # 1 of 2 positives retrieved, first: (1 + 1) * 1/2 / 2 = 1/2 (the unretrieved one adds 0)
    assert average_precision(np.array([0]), 2) == pytest.approx(0.5, rel=1e-15)
    assert average_precision(np.array([0, 1, 2]), 3) == 1.0
    assert average_precision(np.array([], dtype=int), 3) == 0.0
    assert math.isnan(average_precision(np.array([], dtype=int), 0))


def test_compute_map_hand_worked(lookup: str) -> None:
    ranks = np.array(
        [
            [5, 9, 7, 3, 1, 2, 4, 6, 8, 0],  # ok {5, 7} at 0 and 2                    -> 19/24
            [9, 5, 8, 1, 7, 3, 2, 4, 6, 0],  # junk {9, 8} removed: [5, 1, 7, ...]      -> 19/24
            [8, 5, 9, 7, 3, 2, 4, 6, 1, 0],  # junk {9} removed: [8, 5, 7]: r = 1, 2
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 0],  # no positive: excluded from the means
        ]
    )
    # query 2: j=0, r=1: p0 = 0, p1 = 1/2; j=1, r=2: p0 = 1/2, p1 = 2/3 -> (1/2 + 7/6) / 4 = 5/12
    gnd = [
        {"ok": [5, 7], "junk": []},
        {"ok": [5, 7], "junk": [9, 8]},
        {"ok": [5, 7], "junk": [9]},
        {"ok": [], "junk": [1]},
    ]
    res = compute_map(ranks, gnd, kappas=(1, 2, 5))
    np.testing.assert_allclose(res.aps[:3], [19 / 24, 19 / 24, 5 / 12], rtol=1e-15)
    assert math.isnan(res.aps[3]) and np.isnan(res.prs[3]).all()
    assert res.map == pytest.approx((19 / 24 + 19 / 24 + 5 / 12) / 3, rel=1e-15)
    # P@k, query 0: 1-based junk-free positive positions [1, 3], last positive 3:
    #   k=1: kq = 1 -> 1/1;  k=2: kq = 2 -> 1/2;  k=5 > #positives: kq = min(3, 5) = 3 -> 2/3 (not 2/5)
    np.testing.assert_allclose(res.prs[0], [1.0, 0.5, 2 / 3], rtol=1e-15)
    # query 2: positions [2, 3]: k=1: 0/1; k=2: 1/2; k=5: kq = 3 -> 2/3
    np.testing.assert_allclose(res.prs[2], [0.0, 0.5, 2 / 3], rtol=1e-15)
    np.testing.assert_allclose(res.mpr, np.nanmean(res.prs, axis=0), rtol=1e-15)
    mAP, aps, mpr, prs = res  # unpacks like revisitop's tuple
    assert aps.shape == (4,) and prs.shape == (4, 3) and mpr.shape == (3,)


def test_partial_top_k(lookup: str) -> None:
    # 3 positives {5, 7, 11}, only the top 3 listed: 5 at 0, 7 at 2, 11 not listed.
    # AP is still divided by 3: (2 + 7/6) / (2 * 3) = 19/36.
    ranks = np.array([[5, 2, 7]])
    res = compute_map(ranks, [{"ok": [5, 7, 11], "junk": []}], kappas=(1, 2, 5))
    assert res.aps[0] == pytest.approx(19 / 36, rel=1e-15)
    # a positive is unlisted, so kq = k: P@1 = 1, P@2 = 1/2, P@5 = 2/5
    np.testing.assert_allclose(res.prs[0], [1.0, 0.5, 0.4], rtol=1e-15)
    # nothing retrieved: AP 0 and P@k 0 (still counted in the mean)
    res = compute_map(np.array([[1, 2], [5, 0]]), [{"ok": [9]}, {"ok": [5]}], kappas=(1,))
    np.testing.assert_array_equal(res.aps, [0.0, 1.0])
    assert res.map == 0.5 and res.mpr[0] == 0.5


def test_partial_lists_agree_with_full_ranking(rng: np.random.Generator) -> None:
    ranks, gnd = random_case(rng, nq=30, n_db=400)
    full = compute_map(ranks, gnd, kappas=(1, 5, 10))
    top = compute_map(ranks[:, :60], gnd, kappas=(1, 5, 10))
    # every query has <= 11 junk, so the first 49 non-junk entries are listed: P@k for k <= 10 agrees
    np.testing.assert_array_equal(top.prs, full.prs)
    # AP of the truncated list misses only the positives ranked after 60
    assert (top.aps[~np.isnan(top.aps)] <= full.aps[~np.isnan(full.aps)]).all()


def test_minus_one_entries_are_skipped(lookup: str) -> None:
    # faiss pads with -1; a -1 takes no position
    a = compute_map(np.array([[5, -1, 7, -1]]), [{"ok": [5, 7], "junk": []}])
    b = compute_map(np.array([[5, 7, 3, 4]]), [{"ok": [5, 7], "junk": []}])
    assert a.aps[0] == b.aps[0] == 1.0
    np.testing.assert_array_equal(a.prs, b.prs)


def test_all_queries_without_positives() -> None:
    res = compute_map(np.array([[0, 1], [1, 0]]), [{"ok": []}, {"ok": np.array([], dtype=np.int64)}])
    assert math.isnan(res.map) and np.isnan(res.mpr).all() and np.isnan(res.aps).all()


# --------------------------------------------------------------------------- oracle


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("k", [None, 37])
def test_compute_map_matches_slow_loop(lookup: str, overlap: bool, k: int | None) -> None:
    rng = np.random.default_rng(1234 + (k or 0) + overlap)
    ranks, gnd = random_case(rng, overlap=overlap)
    if k is not None:
        ranks = ranks[:, :k].copy()
        ranks[::5, -3:] = -1  # some padded rows
    kappas = (1, 3, 5, 10, 50)
    got = compute_map(ranks, gnd, kappas)
    want = slow_map(ranks, gnd, kappas)
    assert got.map == want[0]  # identical bits, not just close
    np.testing.assert_array_equal(got.aps, want[1])
    np.testing.assert_array_equal(got.mpr, want[2])
    np.testing.assert_array_equal(got.prs, want[3])


# --------------------------------------------------------------------------- protocols


def test_registry() -> None:
    assert PROTOCOLS.list() == ["classic", "gldv2", "map", "revisited", "ukbench"]
    assert PROTOCOLS.get("revisited").info.keys == ("easy", "hard", "junk")
    assert PROTOCOLS.get("revisited").info.splits == ("easy", "medium", "hard")
    assert PROTOCOLS.get("classic").info.keys == ("ok", "junk")
    with pytest.raises(KeyError, match="revisited"):
        evaluate(np.zeros((1, 2), dtype=int), [{"easy": [], "hard": [], "junk": []}], protocol="revisted")


def test_revisited_hand_worked(lookup: str) -> None:
    # database 0..5; query 0: easy {0}, hard {1}, junk {2}; query 1: no easy image, hard {4}
    gnd = [{"easy": [0], "hard": [1], "junk": [2]}, {"easy": [], "hard": [4], "junk": [5]}]
    ranks = np.array([[3, 0, 2, 1, 4, 5], [4, 0, 1, 2, 3, 5]])
    m = as_dict(evaluate(ranks, gnd, "revisited", kappas=(1, 5)))
    # query 0, ranking [3, 0, 2, 1]:
    #   Easy   (ok {0}, junk {2, 1}): [3, 0]    -> positive at r=1: (0 + 1/2) / 2 = 1/4
    #   Medium (ok {0, 1}, junk {2}): [3, 0, 1] -> r=1, 2: 5/12 (as in test_compute_map_hand_worked)
    #   Hard   (ok {1}, junk {2, 0}): [3, 1]    -> 1/4
    # query 1 (hard 4 ranked first): Medium = Hard = 1, Easy excluded (no positive)
    assert m["easy", "mAP"] == pytest.approx(25.0, rel=1e-14)
    assert m["medium", "mAP"] == pytest.approx(100 * (5 / 12 + 1) / 2, rel=1e-14)
    assert m["hard", "mAP"] == pytest.approx(100 * (1 / 4 + 1) / 2, rel=1e-14)
    # mP@1: Easy q0 0; Medium q0 0, q1 1; Hard q0 0, q1 1
    # mP@5: Easy q0 kq = min(2, 5) -> 1/2; Medium q0 kq = 3 -> 2/3, q1 1; Hard q0 kq = 2 -> 1/2, q1 1
    assert m["easy", "mP@1"] == 0.0 and m["easy", "mP@5"] == pytest.approx(50.0)
    assert m["medium", "mP@1"] == pytest.approx(50.0) and m["medium", "mP@5"] == pytest.approx(100 * (2 / 3 + 1) / 2)
    assert m["hard", "mP@5"] == pytest.approx(75.0)
    names = [(x.split, x.name) for x in evaluate(ranks, gnd, "revisited")]
    assert names == [(s, n) for s in ("easy", "medium", "hard") for n in ("mAP", "mP@1", "mP@5", "mP@10")]


def test_revisited_splits_are_compute_map_on_merged_lists(rng: np.random.Generator) -> None:
    ranks, g = random_case(rng, nq=25, n_db=200)
    gnd = []
    for q in g:
        ok = np.asarray(q["ok"])
        gnd.append({"easy": ok[: len(ok) // 2], "hard": ok[len(ok) // 2 :], "junk": q["junk"]})
    m = as_dict(evaluate(ranks, gnd, "revisited"))
    for split, ok, junk in (("easy", ("easy",), ("junk", "hard")), ("medium", ("easy", "hard"), ("junk",)), ("hard", ("hard",), ("junk", "easy"))):
        merged = [{"ok": np.concatenate([q[k] for k in ok]), "junk": np.concatenate([q[k] for k in junk])} for q in gnd]
        res = compute_map(ranks, merged)
        assert m[split, "mAP"] == 100 * res.map
        assert [m[split, f"mP@{k}"] for k in (1, 5, 10)] == list(100 * res.mpr)


def test_classic_protocol() -> None:
    gnd = [{"ok": [1, 2], "junk": [0]}, {"ok": [3], "junk": []}]
    ranks = np.array([[0, 1, 3, 2], [3, 0, 1, 2]])
    m = as_dict(evaluate(ranks, gnd, "classic", kappas=(1,)))
    # q0 junk-free [1, 3, 2]: 19/24; q1: 1
    assert m == {("all", "mAP"): pytest.approx(100 * (19 / 24 + 1) / 2), ("all", "mP@1"): pytest.approx(100.0)}


def test_ukbench_protocol(lookup: str) -> None:
    # 3 groups of 4 views; every image is a query whose ok list is its group (itself included)
    groups = np.arange(12) // 4
    gnd = [{"ok": np.flatnonzero(groups == groups[q]), "junk": []} for q in range(12)]
    perfect = np.array([np.concatenate([g["ok"], np.setdiff1d(np.arange(12), g["ok"])]) for g in gnd])
    m = as_dict(evaluate(perfect, gnd, "ukbench"))
    assert m == {("all", "N-S"): 4.0, ("all", "mAP"): 100.0}
    # swap the 4th result with the 5th for every query: 3 relevant in the top 4
    worse = perfect.copy()
    worse[:, [3, 4]] = worse[:, [4, 3]]
    m = as_dict(evaluate(worse, gnd, "ukbench"))
    assert m["all", "N-S"] == 3.0
    # positions 0, 1, 2, 4: AP = (2 + 2 + 2 + (3/4 + 4/5)) / 8
    assert m["all", "mAP"] == pytest.approx(100 * (6 + 3 / 4 + 4 / 5) / 8)


def test_map_protocol_recall() -> None:
    gnd = [{"ok": [2], "junk": [0]}, {"ok": [4], "junk": []}, {"ok": [], "junk": []}]
    ranks = np.array([[0, 2, 1, 3, 4], [0, 1, 2, 3, 4], [0, 1, 2, 3, 4]])
    m = as_dict(evaluate(ranks, gnd, "map", kappas=(1, 5)))
    # q0: junk removed, positive first; q1: positive 5th; q2 excluded
    assert m["all", "R@1"] == 50.0 and m["all", "R@5"] == 100.0
    assert m["all", "mAP"] == pytest.approx(100 * (1 + (0 + 1 / 5) / 2) / 2)
    assert [n for _, n in m] == ["mAP", "mP@1", "mP@5", "R@1", "R@5"]


# --------------------------------------------------------------------------- validation


def test_evaluate_validates_ranks() -> None:
    gnd = [{"ok": [0], "junk": []}] * 2
    with pytest.raises(ValueError, match=r"2-D .*shape \(4,\)"):
        evaluate(np.arange(4), gnd, "classic")
    with pytest.raises(ValueError, match=r"shape \(3, 4\) has 3 rows .* 2 queries"):
        evaluate(np.zeros((3, 4), dtype=int), gnd, "classic")
    with pytest.raises(ValueError, match="integer"):
        evaluate(np.zeros((2, 4)), gnd, "classic")
    with pytest.raises(ValueError, match=">= 0"):
        evaluate(np.full((2, 4), -2), gnd, "classic")
    with pytest.raises(ValueError, match="kappas"):
        evaluate(np.zeros((2, 4), dtype=int), gnd, "classic", kappas=(0, 5))
    with pytest.raises(ValueError, match="sequence of per-query dicts"):
        evaluate(np.tile(np.arange(4), (2, 1)), {"gnd": gnd}, "classic")


def test_evaluate_validates_gnd() -> None:
    ranks = np.tile(np.arange(3, dtype=np.int32), (2, 1))
    with pytest.raises(ValueError, match=r"gnd\[1\] lacks key 'hard' required by protocol 'revisited'"):
        evaluate(ranks, [{"easy": [], "hard": [], "junk": []}, {"easy": [0], "junk": [], "bbx": [0, 0, 1, 1]}])
    with pytest.raises(ValueError, match=r"gnd\[0\] lacks key 'ok'"):
        evaluate(ranks, [{"easy": [0], "hard": [], "junk": []}] * 2, "classic")
    with pytest.raises(ValueError, match=r"gnd\[1\]\['junk'\].*>= 0"):
        evaluate(ranks, [{"ok": [0], "junk": []}, {"ok": [0], "junk": [-3]}], "classic")
    with pytest.raises(ValueError, match=r"gnd\[0\]\['ok'\].*integer"):
        evaluate(ranks, [{"ok": [0.5], "junk": []}, {"ok": [0], "junk": []}], "classic")
    with pytest.raises(ValueError, match=r"gnd\[1\]\['ok'\].*1-D"):
        evaluate(ranks, [{"ok": [0], "junk": []}, {"ok": [[0, 1]], "junk": []}], "classic")


def test_raw_pickle_form_and_gnd_from_pickle() -> None:
    raw = {
        "imlist": ["a", "b", "c", "d"],
        "qimlist": ["q0", "q1"],
        "gnd": [
            {"easy": [1], "hard": [2, 3], "junk": [], "bbx": [0.0, 0.0, 10.0, 10.0]},
            {"easy": [], "hard": [0], "junk": [3], "bbx": [1.0, 1.0, 5.0, 5.0]},
        ],
    }
    gnd = gnd_from_pickle(raw, "revisited")
    assert [sorted(g) for g in gnd] == [["easy", "hard", "junk"]] * 2
    assert all(v.dtype == np.int64 and v.ndim == 1 for g in gnd for v in g.values())
    np.testing.assert_array_equal(gnd[0]["hard"], [2, 3])
    assert gnd[1]["easy"].size == 0
    ranks = np.array([[3, 2, 1, 0], [0, 1, 2, 3]])
    assert evaluate(ranks, raw["gnd"]) == evaluate(ranks, gnd)
    assert evaluate(SearchResult(np.zeros((2, 4)), ranks), gnd) == evaluate(ranks, gnd)
    assert evaluate(ranks, [{k: np.asarray(v, dtype=float) for k, v in g.items()} for g in gnd]) == evaluate(ranks, gnd)
    with pytest.raises(ValueError, match="lacks key 'ok'"):
        gnd_from_pickle(raw, "classic")


# --------------------------------------------------------------------------- benchmark script


def test_benchmark_script_runs(capsys: pytest.CaptureFixture[str]) -> None:
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_evaluation.py"
    spec = importlib.util.spec_from_file_location("bench_evaluation", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--synthetic", "--repeats", "1"]) == 0  # raises if the numbers differ
    assert "numbers identical" in capsys.readouterr().out


# --------------------------------------------------------------------------- real ground truth


REVISITED = [("gnd_roxford5k.pkl", 4993), ("gnd_rparis6k.pkl", 6322)]
CLASSIC = [("gnd_oxford5k.pkl", 5063), ("gnd_paris6k.pkl", 6392)]


def ranking(n_db: int, *first: np.ndarray) -> np.ndarray:
    """The ids in ``first`` in that order, then every other database id."""
    head = np.concatenate([np.asarray(f, dtype=np.int64) for f in first])
    return np.concatenate([head, np.setdiff1d(np.arange(n_db), head)])


@pytest.mark.realdata
@pytest.mark.parametrize(("name", "n_db"), REVISITED)
def test_revisited_real_sizes_and_perfect_ranking(name: str, n_db: int) -> None:
    data = load_gnd_pickle(shared_path("revisitop", name))
    assert len(data["imlist"]) == n_db and len(data["qimlist"]) == len(data["gnd"]) == 70
    gnd = gnd_from_pickle(data, "revisited")
    # One ranking with easy, then hard, then junk first is perfect for all three splits: in Easy the
    # hard images are junk (skipped), in Hard the easy images are junk, so each split's positives
    # come first once its junk is removed.
    ranks = np.stack([ranking(n_db, g["easy"], g["hard"], g["junk"]) for g in gnd])
    m = as_dict(evaluate(ranks, data["gnd"], n_database=n_db))  # the raw pickle form (lists, bbx) works as is
    assert len(m) == 12
    assert m == pytest.approx(dict.fromkeys(m, 100.0), rel=1e-14)  # sums of 1/n terms round
    # Putting the hard images after the unrelated ones keeps Easy perfect, but not Medium / Hard.
    ranks = np.stack([ranking(n_db, g["easy"], np.setdiff1d(np.arange(n_db), np.concatenate(list(g.values()))), g["hard"]) for g in gnd])
    m = as_dict(evaluate(ranks, gnd))
    assert m["easy", "mAP"] == pytest.approx(100.0, rel=1e-14)
    assert m["medium", "mAP"] < 99.0 and m["hard", "mAP"] < 99.0


@pytest.mark.realdata
@pytest.mark.parametrize(("name", "n_db"), REVISITED)
def test_revisited_real_reversed_ranking_closed_form(name: str, n_db: int) -> None:
    gnd = gnd_from_pickle(load_gnd_pickle(shared_path("revisitop", name)), "revisited")
    # reversed [easy, hard, junk, rest] = [rest, junk, hard, easy]: in every split the split's
    # junk is skipped and its positives end the list, after the M = N - |easy + hard + junk| others
    ranks = np.stack([ranking(n_db, g["easy"], g["hard"], g["junk"])[::-1] for g in gnd])
    m = as_dict(evaluate(ranks, gnd))
    for split, n_pos in (
        ("easy", lambda g: len(g["easy"])),
        ("medium", lambda g: len(g["easy"]) + len(g["hard"])),
        ("hard", lambda g: len(g["hard"])),
    ):
        per_query = [ap_positives_last(n_db - sum(map(len, g.values())), n_pos(g)) for g in gnd if n_pos(g) > 0]
        assert m[split, "mAP"] == pytest.approx(100 * math.fsum(per_query) / len(per_query), rel=1e-12)
        assert m[split, "mP@10"] == 0.0  # more than 10 others come first
    # rOxford has 2 queries without easy images: the Easy mean is over 68 queries
    if name == "gnd_roxford5k.pkl":
        assert sum(len(g["easy"]) == 0 for g in gnd) == 2


@pytest.mark.realdata
@pytest.mark.parametrize(("name", "n_db"), CLASSIC)
def test_classic_real(name: str, n_db: int) -> None:
    data = load_gnd_pickle(shared_path("classic", name))
    assert len(data["imlist"]) == n_db and len(data["qimlist"]) == len(data["gnd"]) == 55
    gnd = gnd_from_pickle(data, "classic")
    perfect = np.stack([ranking(n_db, g["ok"], g["junk"]) for g in gnd])
    m = as_dict(evaluate(perfect, data["gnd"], "classic"))
    assert m == pytest.approx(dict.fromkeys(m, 100.0), rel=1e-14)
    reversed_ = perfect[:, ::-1]  # [rest, junk, ok]: ok last after the M = N - |ok| - |junk| others
    m = as_dict(evaluate(reversed_, gnd, "classic"))
    want = [ap_positives_last(n_db - len(g["ok"]) - len(g["junk"]), len(g["ok"])) for g in gnd]
    assert m["all", "mAP"] == pytest.approx(100 * math.fsum(want) / len(want), rel=1e-12)
    # partial top-100 of the reversed ranking retrieves nothing
    assert as_dict(evaluate(reversed_[:, :100], gnd, "classic"))["all", "mAP"] == 0.0


@pytest.mark.realdata
def test_real_gnd_matches_slow_loop(rng: np.random.Generator) -> None:
    data = load_gnd_pickle(shared_path("revisitop", "gnd_roxford5k.pkl"))
    gnd = gnd_from_pickle(data, "revisited")
    n_db = len(data["imlist"])
    scores = rng.standard_normal((len(gnd), n_db))
    for q, g in enumerate(gnd):
        scores[q, g["easy"]] += 2.0
        scores[q, g["hard"]] += 1.0
    ranks = np.argsort(-scores, axis=1)
    merged = [{"ok": np.concatenate([g["easy"], g["hard"]]), "junk": g["junk"]} for g in gnd]
    got, want = compute_map(ranks, merged, n_database=n_db), slow_map(ranks, merged, (1, 5, 10))
    assert got.map == want[0]
    np.testing.assert_array_equal(got.aps, want[1])
    np.testing.assert_array_equal(got.prs, want[3])


def test_per_query_ap_matches_the_means_and_the_hand_worked_values():
    from retrbench.evaluation import per_query_ap

    gnd = [{"easy": [0], "hard": [1], "junk": [2]}, {"easy": [], "hard": [3], "junk": []}]
    ranks = np.array([[1, 2, 0, 3, 4], [3, 0, 1, 2, 4]])
    aps = per_query_ap(ranks, gnd, "revisited")
    assert set(aps) == {"easy", "medium", "hard"}
    # query 0, easy: junk = {2} + hard {1}; its only positive 0 is at junk-free position 0 -> AP 1
    assert aps["easy"][0] == pytest.approx(1.0) and math.isnan(aps["easy"][1])
    # query 0, medium: positives {0, 1} at positions 0 and 1 (junk 2 removed) -> AP 1
    assert aps["medium"][0] == pytest.approx(1.0)
    metrics = {(m.split, m.name): m.value for m in evaluate(ranks, gnd, "revisited")}
    for split in ("easy", "medium", "hard"):
        assert metrics[(split, "mAP")] == pytest.approx(100 * np.nanmean(aps[split]))
    classic = per_query_ap(ranks, [{"ok": [4], "junk": []}, {"ok": [0, 1], "junk": [3]}], "classic")
    # one positive at 0-based position 4: trapezoid (0/4 + 1/5) / 2 = 0.1 (revisitop's rule)
    assert classic["all"] == pytest.approx([0.1, 1.0])
    assert per_query_ap(ranks, [{"ok": [4], "junk": []}, {"ok": [0], "junk": []}], "gldv2") == {}


@pytest.mark.parametrize("name", PROTOCOLS.list())
def test_every_protocol_entry(name):
    """Registry-wide: each protocol reports exactly its declared splits, 100 % mAP for a perfect
    ranking and less for the reversed one, and has a help line."""
    entry = PROTOCOLS.get(name)
    assert entry.help and entry.info.keys and entry.info.splits
    n = 12
    if "easy" in entry.info.keys:
        gnd = [{"easy": [0, 1], "hard": [2], "junk": [3]}, {"easy": [4], "hard": [5, 6], "junk": []}]
        relevant = [[0, 1, 2], [4, 5, 6]]
    else:
        gnd = [{"ok": [0, 1, 2, 3], "junk": [4]}, {"ok": [5, 6, 7, 8], "junk": []}]
        relevant = [[0, 1, 2, 3], [5, 6, 7, 8]]
    perfect = np.stack([np.array(r + [i for i in range(n) if i not in r]) for r in relevant])
    good = evaluate(perfect, gnd, name)
    bad = evaluate(perfect[:, ::-1].copy(), gnd, name)
    assert {m.split for m in good} == set(entry.info.splits)
    maps = [m for m in good if m.name.startswith("mAP")]
    assert maps and all(m.value == pytest.approx(100.0) for m in maps)
    worse = {(m.split, m.name): m.value for m in bad}
    assert all(worse[(m.split, m.name)] < m.value for m in maps)
