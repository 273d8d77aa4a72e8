"""InsCLR step 6, the loss: XBM's contrastive loss with a margin, within the batch and against the memory.

For query embeddings ``q_i`` and key embeddings ``k_j`` (L2-normalised, similarity
``s_ij = q_i . k_j``), with positive pairs ``P`` and negative pairs ``N``::

    L = 1/Q * sum_i [ sum_{j in P_i, s_ij < 1 - pos_margin} (1 - s_ij)  +  sum_{j in N_i, s_ij > margin} s_ij ]

(the contrastive loss of XBM, Wang et al. 2020, as InsCLR uses it, margin 0.4 in its public
configs). The batch term pairs the augmented batch with itself (positives: same pseudo-class;
the diagonal is neither); the memory term pairs it with the cross-batch memory (positives:
memory entries whose dataset index is in the batch image's pseudo-class, i.e. the filtered
tuple plus its mined positives; negatives: every other entry). The total is
``batch + memory_weight * memory``.

lightly has no margin-based contrastive loss over labels (its losses are InfoNCE-style over two
views), so the loss is written here; its memory-bank module is used for the memory
(:mod:`retrbench.train.memory`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["contrastive_loss", "batch_masks", "memory_masks", "insclr_loss"]


def contrastive_loss(
    q: Tensor, k: Tensor, pos: Tensor, neg: Tensor, *, margin: float = 0.4, pos_margin: float = 0.0
) -> tuple[Tensor, dict[str, float]]:
    """The masked contrastive loss above.

    Args:
        q: ``(Q, D)`` query embeddings (gradients flow).
        k: ``(M, D)`` key embeddings (the batch itself, or the detached memory).
        pos, neg: ``(Q, M)`` boolean masks of positive and negative pairs (a pair in neither is ignored).
        margin: negatives count only above this similarity.
        pos_margin: positives count only below ``1 - pos_margin`` (0: all but exact duplicates).

    Returns:
        ``(loss, stats)``: the scalar loss (0 with a gradient path when ``Q == 0``) and per-query
        means of the active positive and negative pairs (``pos_pairs``, ``neg_pairs``).
    """
    if q.shape[0] == 0 or k.shape[0] == 0:
        return q.sum() * 0.0, {"pos_pairs": 0.0, "neg_pairs": 0.0}
    s = q.float() @ k.float().T  # (Q, M)
    p_act = pos & (s < 1 - 1e-5 - pos_margin)
    n_act = neg & (s > margin)
    loss = ((1 - s) * p_act).sum() + (s * n_act).sum()
    nq = q.shape[0]
    return loss / nq, {"pos_pairs": float(p_act.sum()) / nq, "neg_pairs": float(n_act.sum()) / nq}


def batch_masks(labels: Tensor) -> tuple[Tensor, Tensor]:
    """``(B, B)`` positive (same label, off the diagonal) and negative (different label) masks."""
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(labels.shape[0], dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


def memory_masks(item_class: Tensor, class_sets: Sequence[np.ndarray], memory_index: Tensor, *, negatives: bool = True) -> tuple[Tensor, Tensor]:
    """``(B, M)`` positive / negative masks of the batch against the memory.

    Args:
        item_class: ``(B,)`` int64, the position in ``class_sets`` of each batch image's class.
        class_sets: per class, the dataset indices of its members (pseudo-class: filtered tuple
            plus mined positives; a rejected tuple member forms a class of itself).
        memory_index: ``(M,)`` dataset index of each memory entry.
        negatives: False ignores every non-positive entry (InsCLR's ``USE_NEGATIVE: False``).
    """
    dev = memory_index.device
    member = torch.stack(
        [torch.isin(memory_index, torch.as_tensor(np.asarray(s, dtype=np.int64), device=dev)) for s in class_sets]
    ) if len(class_sets) else torch.zeros((0, memory_index.shape[0]), dtype=torch.bool, device=dev)  # (C, M)
    pos = member[item_class.to(dev)]
    neg = ~pos if negatives else torch.zeros_like(pos)
    return pos, neg


def insclr_loss(
    features: Tensor,
    labels: Tensor,
    class_sets: Sequence[np.ndarray],
    memory_features: Tensor | None = None,
    memory_index: Tensor | None = None,
    *,
    margin: float = 0.4,
    pos_margin: float = 0.0,
    memory_weight: float = 1.0,
    memory_negatives: bool = True,
) -> tuple[Tensor, dict[str, float]]:
    """Batch term plus weighted memory term.

    Args:
        features: ``(B, D)`` L2-normalised augmented embeddings of the batch.
        labels: ``(B,)`` int64 class of each batch image, a position in ``class_sets``.
        class_sets: see :func:`memory_masks`.
        memory_features, memory_index: the cross-batch memory's ``(M, D)`` entries and their
            dataset indices; None (or empty) gives the batch term only.

    Returns:
        ``(loss, stats)`` with ``batch_loss``, ``memory_loss`` and pair counts.
    """
    pos, neg = batch_masks(labels)
    b_loss, b_st = contrastive_loss(features, features, pos, neg, margin=margin, pos_margin=pos_margin)
    stats = {"batch_loss": float(b_loss.detach()), "batch_pos_pairs": b_st["pos_pairs"], "batch_neg_pairs": b_st["neg_pairs"]}
    if memory_features is None or memory_index is None or memory_features.shape[0] == 0:
        stats.update(memory_loss=0.0, memory_pos_pairs=0.0, memory_neg_pairs=0.0)
        return b_loss, stats
    mpos, mneg = memory_masks(labels, class_sets, memory_index, negatives=memory_negatives)
    m_loss, m_st = contrastive_loss(features, memory_features.to(features.device), mpos.to(features.device), mneg.to(features.device), margin=margin, pos_margin=pos_margin)
    stats.update(memory_loss=float(m_loss.detach()), memory_pos_pairs=m_st["pos_pairs"], memory_neg_pairs=m_st["neg_pairs"])
    return b_loss + memory_weight * m_loss, stats
