"""InsCLR step 2, training tuples and the batches they form.

A *training tuple* is an anchor plus the top-``k`` of its candidate set, assumed to show the
same instance (a pseudo-class). The tuple's *candidate set* is the de-duplicated union of its
members' candidate sets, without the members themselves: the pool pseudo-positive mining draws
from.

A batch holds several tuples of different pseudo-classes. Here no image appears in two tuples of
one batch (so no anchor lies in another tuple, and every batch image has exactly one
pseudo-class); anchors are drawn in a random order and a tuple that overlaps the ones already
taken is skipped. Optionally (``separation``) tuples are also kept apart in the candidate graph,
so that two tuples of one instance rarely meet in a batch (collections with many images per
instance need it: such tuples are each other's negatives). The batch of a given step depends only on ``(seed, stage, step)``, so a run
resumed from a checkpoint sees the same batches as one that was never interrupted.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from .candidates import CandidateSets

__all__ = ["make_tuple", "tuple_candidate_set", "sample_tuples", "step_rng", "TupleSampler"]


def make_tuple(cands: CandidateSets, anchor: int, k: int) -> np.ndarray:
    """``[anchor, c_1, ..., c_k]``: the anchor then the top-``k`` of its candidate set (fewer if it has fewer)."""
    return np.concatenate([[int(anchor)], cands.of(int(anchor))[:k]]).astype(np.int64)


def tuple_candidate_set(cands: CandidateSets, members: Iterable[int], exclude: Iterable[int] = ()) -> np.ndarray:
    """De-duplicated union of the members' candidate sets, minus the members and ``exclude``.

    Returns a sorted int64 array of image indices.
    """
    m = np.asarray(list(members), dtype=np.int64)
    if m.size == 0:
        return np.empty(0, dtype=np.int64)
    pool = np.unique(cands.indices[m].reshape(-1))
    pool = pool[pool >= 0]
    drop = np.concatenate([m, np.asarray(list(exclude), dtype=np.int64)])
    return np.setdiff1d(pool, drop, assume_unique=False).astype(np.int64)


def sample_tuples(
    cands: CandidateSets, n_tuples: int, k: int, rng: np.random.Generator, separation: int = 0
) -> list[np.ndarray]:
    """Up to ``n_tuples`` tuples with pairwise disjoint members (so anchors are never in another tuple).

    Anchors are tried in a random order; a tuple sharing an image with one already taken is
    skipped. With ``separation > 0`` a tuple is also skipped when one of its members is among the
    top-``separation`` candidates of a member of a tuple already taken, or the other way round,
    which makes two tuples of one instance in a batch unlikely (they would be each other's
    negatives). Fewer tuples come back only when the collection cannot supply ``n_tuples`` such
    tuples (after trying every anchor).
    """
    if n_tuples < 1:
        raise ValueError(f"sample_tuples: n_tuples must be >= 1, got {n_tuples}")
    if separation < 0:
        raise ValueError(f"sample_tuples: separation must be >= 0, got {separation}")
    taken = np.zeros(len(cands), dtype=bool)
    near = np.zeros(len(cands), dtype=bool)  # top-`separation` candidates of taken members
    out: list[np.ndarray] = []
    for a in rng.permutation(len(cands)):
        if taken[a] or near[a]:
            continue
        t = make_tuple(cands, int(a), k)
        if taken[t].any() or near[t].any():
            continue
        close = cands.indices[t, :separation].reshape(-1)
        close = close[close >= 0]
        if taken[close].any():
            continue
        taken[t] = True
        near[close] = True
        out.append(t)
        if len(out) == n_tuples:
            break
    return out


def step_rng(seed: int, *keys: int) -> np.random.Generator:
    """A generator determined by ``seed`` and the integer ``keys`` (e.g. stage, step, slot)."""
    return np.random.default_rng([int(seed), *(int(k) for k in keys)])


class TupleSampler:
    """The tuples of every training step of one stage, reproducible from ``(seed, stage, step)``.

    Args:
        cands: the stage's candidate sets.
        n_tuples: tuples per batch.
        k: tuple size minus one (the anchor's top-``k`` candidates).
        seed: run seed.
        stage: stage number (part of every step's seed).
        separation: see :func:`sample_tuples`.
    """

    def __init__(self, cands: CandidateSets, n_tuples: int, k: int, seed: int, stage: int, separation: int = 0) -> None:
        self.cands = cands
        self.n_tuples = n_tuples
        self.k = k
        self.seed = seed
        self.stage = stage
        self.separation = separation

    def tuples(self, step: int) -> list[np.ndarray]:
        """The tuples of ``step`` (the same every time it is asked)."""
        rng = step_rng(self.seed, 1, self.stage, step)
        return sample_tuples(self.cands, self.n_tuples, self.k, rng, self.separation)

    def batches(self, steps: Sequence[int]) -> Iterable[list[np.ndarray]]:
        for s in steps:
            yield self.tuples(s)
