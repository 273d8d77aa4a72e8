"""Steps 4-5: mini-batch selection raises tuple precision; mining recovers positives outside the top-k.

The clustered data has known true positives (same cluster). The candidate sets come from
*initial* descriptors (the true positions plus heavy noise: an ImageNet model's view); the
un-augmented bank holds the true positions plus light noise (a better model's view).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from retrbench.train.candidates import candidate_sets
from retrbench.train.memory import DatasetBank
from retrbench.train.mining import mine, mine_positives, pair_precision, select
from retrbench.train.tuples import make_tuple, tuple_candidate_set


def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def world() -> dict:
    rng = np.random.default_rng(7)
    n_clusters, per, dim = 10, 20, 16
    labels = np.repeat(np.arange(n_clusters), per)
    centres = rng.normal(size=(n_clusters, dim))
    true = centres[labels] + 0.35 * rng.normal(size=(len(labels), dim))
    initial = unit_rows(true + 1.1 * rng.normal(size=true.shape))  # noisy initial model
    clean = unit_rows(true + 0.1 * rng.normal(size=true.shape))  # improved model (the bank)
    return {"labels": labels, "cands": candidate_sets(initial, 60), "bank": DatasetBank(torch.from_numpy(clean))}


def angle(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def test_select_keeps_members_above_the_threshold():
    bank = DatasetBank(torch.tensor([angle(0), angle(10), angle(80), angle(30), angle(-20)]))
    (s,) = select(bank, [np.array([0, 1, 2, 3, 4])], threshold=math.cos(math.radians(25)))
    assert s.anchor == 0
    np.testing.assert_array_equal(s.kept, [0, 1, 4])
    np.testing.assert_array_equal(s.rejected, [2, 3])
    np.testing.assert_allclose(s.similarity, [math.cos(math.radians(d)) for d in (10, 80, 30, 20)], rtol=1e-6)
    (every,) = select(bank, [np.array([0, 2, 3])], threshold=-math.inf)
    assert every.rejected.size == 0


def test_selection_raises_tuple_precision(world):
    labels, cands, bank = world["labels"], world["cands"], world["bank"]
    tuples = [make_tuple(cands, a, 3) for a in range(len(labels))]
    before = np.array([pair_precision(int(t[0]), t[1:], labels) for t in tuples]).sum(0)
    sel = select(bank, tuples, threshold=0.7)
    after = np.array([pair_precision(s.anchor, s.kept[1:], labels) for s in sel]).sum(0)
    p_before, p_after = before[0] / before[1], after[0] / after[1]
    assert p_before < 0.8  # the initial model's tuples are noisy ...
    assert p_after > 0.97 and p_after > p_before + 0.2  # ... selection on the bank cleans them
    assert after[1] > 0.5 * before[1]  # while keeping most true members
    rejected = np.concatenate([s.rejected for s in sel])
    anchors = np.repeat([s.anchor for s in sel], [len(s.rejected) for s in sel])
    assert (labels[rejected] != labels[anchors]).mean() > 0.9  # the rejected are mostly the wrong ones


def test_mining_recovers_positives_outside_the_initial_top_k(world):
    labels, cands, bank = world["labels"], world["cands"], world["bank"]
    found, mined_total, correct = [], 0, 0
    for a in range(0, len(labels), 7):
        (s,) = select(bank, [make_tuple(cands, a, 3)], threshold=0.7)
        pool = tuple_candidate_set(cands, s.kept, exclude=s.rejected)
        got = mine(bank, s.kept, pool, rounds=2, first_k=2, growth=4, min_sim=0.3)
        assert not set(got.tolist()) & set(s.members.tolist())  # never a tuple member: outside the top-k
        ok, tot = pair_precision(a, got, labels)
        correct += ok
        mined_total += tot
        found.append(ok)
        assert tot <= 2 + 8
    assert correct / mined_total > 0.95
    assert np.mean(found) > 7  # of the 16 true positives outside each top-3, most are recovered


def test_mining_rounds_grow_by_the_factor():
    rng = np.random.default_rng(0)
    q = torch.from_numpy(unit_rows(rng.normal(size=(2, 5))))
    c = torch.from_numpy(unit_rows(rng.normal(size=(40, 5))))
    got = mine_positives(q, c, rounds=3, first_k=1, growth=4, min_sim=-2.0)
    assert len(got) == 1 + 4 + 16 and len(set(got.tolist())) == 21
    assert len(mine_positives(q, c, rounds=4, first_k=1, growth=4, min_sim=-2.0)) == 40  # capped by the pool
    assert len(mine_positives(q, c, rounds=0, first_k=3)) == 0
    assert len(mine_positives(q, c[:0], rounds=2, first_k=3)) == 0


def reference_mining(query: np.ndarray, cand: np.ndarray, rounds: int, first_k: int, growth: float, min_sim: float, score: str) -> list[int]:
    """Slow reference: rescoring every candidate against the whole query set each round."""
    qset, taken = [*query], []
    for r in range(rounds):
        scores = {}
        for j, v in enumerate(cand):
            if j in taken:
                continue
            s = [float(v @ m) for m in qset if float(v @ m) >= min_sim]
            if s:
                scores[j] = np.mean(s) if score == "avg" else max(s)
        pick = sorted(scores, key=lambda j: -scores[j])[: min(round(first_k * growth**r), len(scores))]
        if not pick:
            break
        taken += pick
        qset += [cand[j] for j in pick]
    return taken


@pytest.mark.parametrize("score", ["avg", "max"])
def test_mining_matches_the_slow_reference(score):
    rng = np.random.default_rng(3)
    q = unit_rows(rng.normal(size=(3, 6)))
    c = unit_rows(rng.normal(size=(30, 6)) + q[rng.integers(0, 3, 30)])
    got = mine_positives(torch.from_numpy(q), torch.from_numpy(c), rounds=3, first_k=2, growth=4, min_sim=0.2, score=score)
    assert got.tolist() == reference_mining(q, c, 3, 2, 4, 0.2, score)


def test_average_scoring_and_min_sim_by_hand():
    # query: 0 deg. Round 0 takes the best, A at 10 deg. Round 1 scores by the average over
    # {query, A} of the similarities >= min_sim = cos(35 deg):
    #   B at 30 deg: cos 30 and cos 20 -> mean 0.903;  C at -25 deg: cos 25 and (cos 35, counted) -> 0.863
    #   D at -40 deg: cos 40 < min_sim and cos 50 < min_sim -> never eligible
    query = torch.tensor([angle(0)])
    cand = torch.tensor([angle(-25), angle(30), angle(10), angle(-40)])
    got = mine_positives(query, cand, rounds=2, first_k=1, growth=4, min_sim=math.cos(math.radians(35)) - 1e-6)
    assert got.tolist() == [2, 1, 0]
    with pytest.raises(ValueError):
        mine_positives(query, cand, rounds=1, first_k=1, score="median")


def test_pair_precision_ignores_anchors_without_a_true_label():
    labels = np.array([0, 0, 1, -1, -1])
    assert pair_precision(0, np.array([1, 2, 3]), labels) == (1, 3)
    assert pair_precision(3, np.array([4, 0]), labels) == (0, 0)  # a distractor anchor is not measured
    assert pair_precision(0, np.array([], dtype=np.int64), labels) == (0, 0)
