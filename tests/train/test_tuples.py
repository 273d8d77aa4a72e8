"""Step 2, training tuples: anchor + top-k, the tuple candidate set, batches of disjoint tuples."""

from __future__ import annotations

import numpy as np
import pytest

from retrbench.train.candidates import CandidateSets
from retrbench.train.tuples import TupleSampler, make_tuple, sample_tuples, step_rng, tuple_candidate_set


def cands_from(rows: list[list[int]]) -> CandidateSets:
    idx = np.array(rows, dtype=np.int64)
    return CandidateSets(idx, -np.arange(idx.shape[1], dtype=np.float32)[None].repeat(len(rows), 0))


# 8 images in two groups {0..3}, {4..7}; candidate sets list the own group first
HAND = cands_from(
    [
        [1, 2, 3, 4],
        [0, 2, 3, 5],
        [3, 0, 1, 6],
        [2, 1, 0, 7],
        [5, 6, 7, 0],
        [4, 7, 6, 1],
        [7, 4, 5, 2],
        [6, 5, 4, 3],
    ]
)


def test_make_tuple_is_anchor_then_top_k():
    np.testing.assert_array_equal(make_tuple(HAND, 2, 2), [2, 3, 0])
    np.testing.assert_array_equal(make_tuple(HAND, 5, 1), [5, 4])
    padded = CandidateSets(np.array([[1, -1], [0, -1]]), np.array([[1.0, -np.inf], [1.0, -np.inf]]))
    np.testing.assert_array_equal(make_tuple(padded, 0, 2), [0, 1])  # -1 padding is not a member


def test_tuple_candidate_set_is_the_deduplicated_union_without_members():
    # members 0 and 1: candidate sets {1,2,3,4} and {0,2,3,5}; union minus members = {2,3,4,5}
    np.testing.assert_array_equal(tuple_candidate_set(HAND, [0, 1]), [2, 3, 4, 5])
    np.testing.assert_array_equal(tuple_candidate_set(HAND, [0, 1], exclude=[4, 9]), [2, 3, 5])
    assert tuple_candidate_set(HAND, []).size == 0


def test_sampled_tuples_are_disjoint_so_anchors_are_in_no_other_tuple(rng):
    cands = CandidateSets(np.array([rng.permutation(np.delete(np.arange(40), i))[:6] for i in range(40)]), np.zeros((40, 6)))
    for seed in range(20):
        tuples = sample_tuples(cands, 5, 3, np.random.default_rng(seed))
        assert len(tuples) == 5 and all(len(t) == 4 for t in tuples)
        flat = np.concatenate(tuples)
        assert len(set(flat.tolist())) == len(flat)
        for i, t in enumerate(tuples):
            np.testing.assert_array_equal(t, make_tuple(cands, int(t[0]), 3))
            for j, u in enumerate(tuples):
                assert i == j or t[0] not in u


def test_fewer_tuples_when_the_collection_cannot_supply_them():
    tuples = sample_tuples(HAND, 5, 3, np.random.default_rng(0))  # every tuple of 4 spans both groups' images
    assert 1 <= len(tuples) < 5
    assert len(set(np.concatenate(tuples).tolist())) == 4 * len(tuples)
    with pytest.raises(ValueError):
        sample_tuples(HAND, 0, 1, np.random.default_rng(0))


def test_sampler_batches_depend_only_on_seed_stage_and_step():
    a = TupleSampler(HAND, 2, 1, seed=3, stage=0)
    b = TupleSampler(HAND, 2, 1, seed=3, stage=0)
    for step in (0, 5, 17):
        for x, y in zip(a.tuples(step), b.tuples(step), strict=True):
            np.testing.assert_array_equal(x, y)
    seen = {tuple(np.concatenate(a.tuples(s)).tolist()) for s in range(30)}
    assert len(seen) > 5  # steps differ
    other = TupleSampler(HAND, 2, 1, seed=3, stage=1)
    assert any(not np.array_equal(np.concatenate(a.tuples(s)), np.concatenate(other.tuples(s))) for s in range(10))
    assert step_rng(1, 2, 3).integers(1 << 30) == step_rng(1, 2, 3).integers(1 << 30)


def test_separation_keeps_tuples_of_one_group_out_of_a_batch():
    # 5 groups of 8 images; each candidate set lists the 7 others of its group first, then 3 strangers
    group = np.repeat(np.arange(5), 8)
    rng = np.random.default_rng(1)
    rows = []
    for i in range(40):
        own = rng.permutation([j for j in range(40) if group[j] == group[i] and j != i]).tolist()
        rows.append(own + [(i + 8 * s) % 40 for s in (1, 2, 3)])
    cands = cands_from(rows)
    mixed = 0
    for seed in range(30):
        loose = sample_tuples(cands, 4, 2, np.random.default_rng(seed))
        mixed += len({int(group[t[0]]) for t in loose}) < len(loose)
        tight = sample_tuples(cands, 4, 2, np.random.default_rng(seed), separation=7)
        assert len(tight) == 4 and len({int(group[t[0]]) for t in tight}) == 4  # one tuple per group
    assert mixed >= 3  # without separation, two tuples of one group do share a batch
    with pytest.raises(ValueError):
        sample_tuples(cands, 2, 1, np.random.default_rng(0), separation=-1)
