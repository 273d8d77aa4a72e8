"""Step 3, memory banks: the XBM queue (FIFO, cut at the end, indices aligned; lightly's update as oracle) and the dataset bank."""

from __future__ import annotations

import pytest
import torch

from retrbench.train.memory import CrossBatchMemory, DatasetBank

BATCHES = [(0, 2), (10, 2), (20, 3), (30, 1), (40, 4)]  # fills, crosses the end (cut), wraps


def batch(start: int, n: int, dim: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.arange(start, start + n)
    return idx[:, None].float().repeat(1, dim), idx  # feature row i is [i, i, i]


def test_starts_empty():
    m = CrossBatchMemory(5, 3)
    f, i = m.entries()
    assert len(m) == 0 and m.capacity == 5 and f.shape == (0, 3) and i.shape == (0,)


def test_fifo_update_cuts_at_the_end_and_keeps_indices_with_their_features():
    m = CrossBatchMemory(5, 3)
    ptrs, sizes = [], []
    for start, n in BATCHES:
        f, i = batch(start, n)
        m.enqueue(f, i)
        feats, idx = m.entries()
        torch.testing.assert_close(feats[:, 0], idx.float())  # each entry's index is its own
        ptrs.append(int(m.ptr))
        sizes.append(len(m))
    # (0,2) -> 0 1 | (10,2) -> 10 11 | (20,3): only 20 fits, pointer wraps | (30) at 0 | (40..43) at 1..4, wraps
    assert ptrs == [2, 4, 0, 1, 0] and sizes == [2, 4, 5, 5, 5]
    assert m.index.tolist() == [30, 40, 41, 42, 43]


def test_update_equals_lightlys_memory_bank():
    lightly_bank = pytest.importorskip("lightly.models.modules.memory_bank")
    torch.manual_seed(0)
    ours = CrossBatchMemory(5, 3)
    after_ours = torch.rand(4)
    torch.manual_seed(0)
    ref = lightly_bank.MemoryBankModule(size=(5, 3), feature_dim_first=False)
    after_ref = torch.rand(4)
    torch.testing.assert_close(ours.bank, ref.bank)  # same initial content ...
    assert torch.equal(after_ours, after_ref)  # ... drawn alike from the global generator (runs stay bit-identical)
    for start, n in BATCHES:
        f, i = batch(start, n)
        ours.enqueue(f, i)
        ref._dequeue_and_enqueue(f)
        torch.testing.assert_close(ours.bank, ref.bank)
        assert int(ours.ptr) == int(ref.bank_ptr)


def test_entries_are_detached_and_snapshot_restores():
    m = CrossBatchMemory(4, 2)
    x = torch.randn(3, 2, requires_grad=True)
    m.enqueue(x * 2, torch.tensor([5, 6, 7]))
    f, i = m.entries()
    assert not f.requires_grad and i.tolist() == [5, 6, 7]
    snap = m.snapshot()
    m.enqueue(torch.zeros(3, 2), torch.tensor([1, 2, 3]))
    m.restore(snap)
    f2, i2 = m.entries()
    torch.testing.assert_close(f2, f)
    assert i2.tolist() == [5, 6, 7] and int(m.ptr) == 3
    with pytest.raises(ValueError):
        CrossBatchMemory(3, 2).restore(snap)
    with pytest.raises(ValueError):
        m.enqueue(torch.zeros(2, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        CrossBatchMemory(0, 2)


def test_memory_buffers_move_with_the_module_but_stay_out_of_the_state_dict():
    m = CrossBatchMemory(4, 2).to(torch.float64)
    assert m.bank.dtype == torch.float64 and m.index.dtype == torch.long
    assert m.state_dict() == {}


def test_dataset_bank_update_and_similarity():
    feats = torch.eye(4)
    bank = DatasetBank(feats)
    feats[0, 0] = 9  # the bank holds its own copy
    assert len(bank) == 4 and bank.features[0, 0] == 1
    bank.update(torch.tensor([2]), torch.tensor([[1.0, 0, 0, 0]]))
    s = bank.similarity(torch.tensor([0, 1]), torch.tensor([2, 3]))
    torch.testing.assert_close(s, torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(ValueError):
        DatasetBank(torch.zeros(3))
