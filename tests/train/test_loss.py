"""Step 6, loss: XBM's contrastive loss against a loop reference and by hand; the memory's labels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from retrbench.train.loss import batch_masks, contrastive_loss, insclr_loss, memory_masks


def reference_xbm(q: torch.Tensor, q_labels: torch.Tensor, k: torch.Tensor, k_labels: torch.Tensor, margin: float) -> float:
    """The per-row loop of XBM's / InsCLR's ContrastiveLoss (positives: equal labels)."""
    s = q @ k.T
    total = 0.0
    for i in range(q.shape[0]):
        pos = s[i][(k_labels == q_labels[i])]
        pos = pos[pos < 1 - 1e-5]
        neg = s[i][(k_labels != q_labels[i])]
        neg = neg[neg > margin]
        total += float((1 - pos).sum() + neg.sum())
    return total / q.shape[0]


def test_batch_term_equals_the_loop_reference(rng):
    x = F.normalize(torch.from_numpy(rng.normal(size=(12, 5)).astype(np.float32)), dim=1)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 4, 4])
    pos, neg = batch_masks(labels)
    loss, stats = contrastive_loss(x, x, pos, neg, margin=0.1)
    assert float(loss) == pytest.approx(reference_xbm(x, labels, x, labels, 0.1), rel=1e-5)
    assert stats["pos_pairs"] == pytest.approx(float(pos.sum()) / 12)  # random vectors: every positive counts


def test_memory_term_equals_the_loop_reference_with_index_labels(rng):
    x = F.normalize(torch.from_numpy(rng.normal(size=(4, 6)).astype(np.float32)), dim=1)
    mem = F.normalize(torch.from_numpy(rng.normal(size=(9, 6)).astype(np.float32)), dim=1)
    mem_index = torch.tensor([10, 11, 12, 13, 14, 15, 10, 16, 17])
    class_sets = [np.array([10, 11, 16]), np.array([12]), np.array([13, 14])]
    item_class = torch.tensor([0, 0, 1, 2])
    pos, neg = memory_masks(item_class, class_sets, mem_index)
    # as labels: memory entry label = its class (or -1), batch label = its class
    mem_label = torch.tensor([0, 0, 1, 2, 2, -1, 0, 0, -1])
    loss, _ = contrastive_loss(x, mem, pos, neg, margin=0.0)
    assert float(loss) == pytest.approx(reference_xbm(x, item_class, mem, mem_label, 0.0), rel=1e-5)


def test_by_hand():
    # q = [1, 0]; keys at 60 deg (positive: 1 - 0.5), 0 deg (a positive at similarity 1: ignored),
    # 30 deg (negative above margin 0.4: + cos 30), 90 deg (negative below margin: 0)
    q = torch.tensor([[1.0, 0.0]])
    keys = torch.tensor([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in (60, 0, 30, 90)])
    pos = torch.tensor([[True, True, False, False]])
    loss, stats = contrastive_loss(q, keys, pos, ~pos, margin=0.4)
    assert float(loss) == pytest.approx(0.5 + math.cos(math.radians(30)), rel=1e-5)
    assert stats == {"pos_pairs": 1.0, "neg_pairs": 1.0}
    loss_pm, _ = contrastive_loss(q, keys, pos, ~pos, margin=0.4, pos_margin=0.6)  # positives above 0.4 are good enough
    assert float(loss_pm) == pytest.approx(math.cos(math.radians(30)), rel=1e-5)


def test_memory_masks():
    mem_index = torch.tensor([5, 6, 7, 5, 8])
    pos, neg = memory_masks(torch.tensor([1, 0, 0]), [np.array([5, 8]), np.array([7])], mem_index)
    assert pos.tolist() == [[False, False, True, False, False], [True, False, False, True, True], [True, False, False, True, True]]
    assert (neg == ~pos).all()
    _, none = memory_masks(torch.tensor([0]), [np.array([5])], mem_index, negatives=False)
    assert not none.any()


def test_gradient_pulls_positives_together_and_pushes_negatives_apart():
    torch.manual_seed(0)
    raw = torch.randn(6, 4, requires_grad=True)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    opt = torch.optim.SGD([raw], lr=0.1)
    first = None
    for _ in range(100):
        x = F.normalize(raw, dim=1)
        loss, _ = insclr_loss(x, labels, [np.array([0]), np.array([1])], margin=0.0)
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    x = F.normalize(raw.detach(), dim=1)
    s = x @ x.T
    assert float(loss.detach()) < 0.2 * first
    assert s[:3, :3].min() > 0.9 and s[:3, 3:].max() < 0.2


def test_insclr_loss_adds_the_weighted_memory_term(rng):
    x = F.normalize(torch.from_numpy(rng.normal(size=(4, 3)).astype(np.float32)), dim=1)
    labels = torch.tensor([0, 0, 1, 2])
    sets = [np.array([0, 1, 9]), np.array([2]), np.array([3])]
    batch_only, st = insclr_loss(x, labels, sets)
    assert st["memory_loss"] == 0.0 and float(batch_only) == pytest.approx(st["batch_loss"])
    empty, _ = insclr_loss(x, labels, sets, torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    assert float(empty) == pytest.approx(float(batch_only))
    mem = F.normalize(torch.from_numpy(rng.normal(size=(5, 3)).astype(np.float32)), dim=1)
    idx = torch.tensor([9, 2, 4, 0, 3])
    both, st = insclr_loss(x, labels, sets, mem, idx, memory_weight=0.5, margin=0.2)
    assert float(both) == pytest.approx(st["batch_loss"] + 0.5 * st["memory_loss"], rel=1e-5)
    assert st["memory_loss"] > 0


def test_no_queries_gives_zero_with_a_gradient_path():
    q = torch.zeros(0, 3, requires_grad=True)
    loss, _ = contrastive_loss(q, torch.randn(4, 3), torch.zeros(0, 4, dtype=torch.bool), torch.zeros(0, 4, dtype=torch.bool))
    loss.backward()
    assert float(loss.detach()) == 0.0
