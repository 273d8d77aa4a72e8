"""GLDv2's retrieval metric (mAP@100, Kaggle / DELF definition) against DELF's loop."""

from __future__ import annotations

import numpy as np
import pytest

from retrbench.evaluation import gldv2_protocol, map_at_k, precision_at_k


def delf_map(ranks: np.ndarray, gnd: list[dict], k: int = 100) -> float:
    """DELF's MeanAveragePrecision loop (metrics.py) over queries with positives, in percent."""
    total, n = 0.0, 0
    for row, g in zip(ranks, gnd, strict=True):
        solution = set(np.asarray(g["ok"]).tolist())
        if not solution:
            continue
        ap, seen, correct = 0.0, set(), 0
        for i in range(min(len(row), k)):
            if row[i] not in seen:
                if row[i] in solution:
                    correct += 1
                    ap += correct / (i + 1)
                seen.add(row[i])
        total += ap / min(len(solution), k)
        n += 1
    return 100.0 * total / n


def test_map_at_k_hand_worked() -> None:
    gnd = [{"ok": np.array([0, 2]), "junk": np.array([], np.int64)}]
    assert map_at_k(np.array([[0, 1, 2, 3]]), gnd) == pytest.approx(100 * (1 + 2 / 3) / 2)
    # a repeated id takes a position but counts once: hits at 1 and 3
    assert map_at_k(np.array([[0, 0, 2]]), gnd) == pytest.approx(100 * (1 + 2 / 3) / 2)
    # unretrieved positives still count in the denominator min(m, k)
    assert map_at_k(np.array([[1, 0]]), gnd) == pytest.approx(100 * (1 / 2) / 2)
    # m > k: divide by k, so a perfect top-k scores 100
    many = [{"ok": np.arange(150), "junk": np.array([], np.int64)}]
    assert map_at_k(np.arange(150)[None], many, k=100) == pytest.approx(100.0)
    assert map_at_k(np.arange(150)[None], many, k=10) == pytest.approx(100.0)
    # results beyond k add nothing: positive at position 3 with k=2
    assert map_at_k(np.array([[0, 1, 2]]), gnd, k=2) == pytest.approx(100 * 1 / 2)


def test_map_at_k_skips_empty_queries_minus_one_and_junk() -> None:
    gnd = [
        {"ok": np.array([3]), "junk": np.array([7])},
        {"ok": np.array([], np.int64), "junk": np.array([], np.int64)},  # no match: left out of the mean
    ]
    ranks = np.array([[-1, 7, 3, 5], [3, 5, 7, 9]])
    assert map_at_k(ranks, gnd) == pytest.approx(100.0)  # -1 and junk removed before the cut
    assert np.isnan(map_at_k(ranks[1:], gnd[1:]))


def test_map_at_k_matches_delf_loop(rng: np.random.Generator) -> None:
    n_db, nq = 400, 60
    gnd = [
        {"ok": rng.choice(n_db, size=rng.integers(0, 130), replace=False), "junk": np.array([], np.int64)}
        for _ in range(nq)
    ]
    ranks = np.stack([rng.permutation(n_db)[:150] for _ in range(nq)])
    ranks[::7, 3] = ranks[::7, 1]  # some repeats
    assert map_at_k(ranks, gnd) == pytest.approx(delf_map(ranks, gnd), abs=1e-9)
    assert map_at_k(ranks[:, :40], gnd) == pytest.approx(delf_map(ranks[:, :40], gnd), abs=1e-9)


def test_precision_and_protocol() -> None:
    gnd = [
        {"ok": np.array([0, 2]), "junk": np.array([], np.int64)},
        {"ok": np.array([5]), "junk": np.array([], np.int64)},
    ]
    ranks = np.array([[0, 1, 2, 3, 4], [1, 2, 3, 4, 5]])
    assert precision_at_k(ranks, gnd, (1, 5)).tolist() == pytest.approx([50.0, 30.0])
    metrics = {(m.split, m.name): m.value for m in gldv2_protocol(ranks, gnd, (1, 5))}
    assert set(metrics) == {("all", "mAP@100"), ("all", "mP@1"), ("all", "mP@5")}
    assert metrics[("all", "mAP@100")] == pytest.approx(100 * ((1 + 2 / 3) / 2 + 1 / 5) / 2)
    with pytest.raises(ValueError, match="rows"):
        map_at_k(ranks[:1], gnd)
    with pytest.raises(ValueError, match="integer"):
        map_at_k(ranks.astype(float), gnd)
