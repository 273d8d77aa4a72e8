"""InsCLR steps 4 and 5: mini-batch selection and pseudo-positive mining.

Both read similarities from the un-augmented :class:`~retrbench.train.memory.DatasetBank`.

**Mini-batch selection** (:func:`select`): inside a tuple, a member stays only if its
similarity to the anchor is at least ``threshold``; the others become hard negatives of that
tuple. As the model improves, the bank's similarities improve and the filter corrects tuples
built from the initial model's neighbours.

**Pseudo-positive mining** (:func:`mine_positives`): the filtered tuple is the query set; each
image of the tuple's candidate set is scored against it and the best-scoring ones join it, for
several rounds, the number taken growing each round (``first_k``, ``first_k * growth``, ...; the
InsCLR article reports average scoring with top-k growing 4x as best). A candidate's score is its
average similarity to the query-set members it is at least ``min_sim`` similar to (``avg``, as
InsCLR's code, ``avg0.60``), or its largest such similarity (``max``); a candidate similar to no
member at ``min_sim`` is never taken. The query set at the end is the anchor's pseudo-class.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .memory import DatasetBank

__all__ = ["Selection", "select", "mine_positives", "mine", "pair_precision", "SCORES"]

SCORES = ("avg", "max")


@dataclass(frozen=True, eq=False)
class Selection:
    """One tuple after mini-batch selection.

    Attributes:
        members: the tuple as sampled, ``[anchor, c_1, ..., c_k]``.
        kept: the anchor and the members at least ``threshold`` similar to it (tuple order).
        rejected: the other members: hard negatives of this tuple.
        similarity: ``(k,)`` bank similarity of ``c_1..c_k`` to the anchor.
    """

    members: np.ndarray
    kept: np.ndarray
    rejected: np.ndarray
    similarity: np.ndarray

    @property
    def anchor(self) -> int:
        return int(self.members[0])


def select(bank: DatasetBank, tuples: Sequence[np.ndarray], threshold: float) -> list[Selection]:
    """Mini-batch selection of every tuple against its anchor in the un-augmented ``bank``.

    ``threshold=-inf`` keeps every member (no selection).
    """
    out = []
    for t in tuples:
        t = np.asarray(t, dtype=np.int64)
        a = torch.as_tensor(t[:1])
        rest = torch.as_tensor(t[1:])
        sim = bank.similarity(a, rest)[0].float().cpu().numpy() if len(rest) else np.empty(0, np.float32)
        keep = sim >= threshold
        out.append(Selection(t, np.concatenate([t[:1], t[1:][keep]]), t[1:][~keep], sim))
    return out


@torch.no_grad()
def mine_positives(
    query: Tensor,
    candidates: Tensor,
    *,
    rounds: int,
    first_k: int,
    growth: float = 4.0,
    min_sim: float = 0.0,
    score: str = "avg",
) -> Tensor:
    """Iterative pseudo-positive mining on embeddings.

    Args:
        query: ``(Q, D)`` embeddings of the starting query set (the filtered tuple).
        candidates: ``(C, D)`` embeddings of the tuple's candidate set.
        rounds: number of rounds; round ``r`` takes the ``round(first_k * growth ** r)``
            best-scoring candidates not yet taken (fewer if fewer are eligible).
        first_k: how many are taken in the first round.
        growth: factor by which that number grows each round (4 in the InsCLR article).
        min_sim: similarities below this are ignored when scoring; a candidate with none at or
            above it is never taken.
        score: ``avg`` (mean of the counted similarities) or ``max``.

    Returns:
        ``(M,)`` int64 positions in ``candidates`` of the mined positives, in the order taken
        (within a round, best score first).
    """
    if score not in SCORES:
        raise ValueError(f"mine_positives: score must be one of {SCORES}, got {score!r}")
    if rounds < 0 or first_k < 0 or growth <= 0:
        raise ValueError(f"mine_positives: rounds, first_k >= 0 and growth > 0 required, got {rounds}, {first_k}, {growth}")
    c = int(candidates.shape[0])
    taken = torch.zeros(c, dtype=torch.bool, device=candidates.device)
    order: list[Tensor] = []
    if c == 0 or rounds == 0 or first_k == 0:
        return torch.empty(0, dtype=torch.long)
    cand = candidates.float()
    # running statistics over the query set, updated as members join: size: C
    total = torch.zeros(c, device=cand.device)
    count = torch.zeros(c, device=cand.device)
    best = torch.full((c,), -float("inf"), device=cand.device)
    new = query.float()
    for r in range(rounds):
        if new.shape[0]:
            s = cand @ new.T  # (C, q_new)
            counted = s >= min_sim
            total += (s * counted).sum(dim=1)
            count += counted.sum(dim=1)
            best = torch.maximum(best, torch.where(counted, s, torch.full_like(s, -float("inf"))).amax(dim=1))
        eligible = (count > 0) & ~taken
        n_el = int(eligible.sum())
        want = min(int(round(first_k * growth**r)), n_el)
        if want == 0:
            break
        sc = total / count.clamp(min=1) if score == "avg" else best
        sc = torch.where(eligible, sc, torch.full_like(sc, -float("inf")))
        pick = torch.topk(sc, want).indices  # best first; ties by position (topk on CPU is stable enough here)
        taken[pick] = True
        order.append(pick)
        new = cand[pick]
    return torch.cat(order).cpu() if order else torch.empty(0, dtype=torch.long)


def mine(
    bank: DatasetBank,
    kept: np.ndarray,
    pool: np.ndarray,
    *,
    rounds: int,
    first_k: int,
    growth: float = 4.0,
    min_sim: float = 0.0,
    score: str = "avg",
) -> np.ndarray:
    """:func:`mine_positives` on dataset indices: the images of ``pool`` mined for the query set ``kept``.

    Returns int64 dataset indices, in the order taken.
    """
    pool = np.asarray(pool, dtype=np.int64)
    if pool.size == 0:
        return pool
    q = bank.features[torch.as_tensor(np.asarray(kept, dtype=np.int64), device=bank.device)]
    c = bank.features[torch.as_tensor(pool, device=bank.device)]
    pos = mine_positives(q, c, rounds=rounds, first_k=first_k, growth=growth, min_sim=min_sim, score=score)
    return pool[pos.numpy()]


def pair_precision(anchor: int, others: np.ndarray, labels: np.ndarray) -> tuple[int, int]:
    """``(correct, total)``: how many of ``others`` share the anchor's true label (measurement only).

    ``labels`` below 0 mark images with no true positive anywhere (distractors): an anchor with
    such a label is not measured (``(0, 0)``), and such an image paired with an anchor is wrong.
    """
    others = np.asarray(others, dtype=np.int64)
    la = labels[anchor]
    if others.size == 0 or la < 0:
        return 0, 0
    return int((labels[others] == la).sum()), int(others.size)
