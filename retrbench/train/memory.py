"""InsCLR step 3, the two memory banks.

Every batch image is embedded twice, with and without data augmentation:

* :class:`CrossBatchMemory` holds **augmented** embeddings of past batches, as in XBM (Wang et
  al. 2020): a first-in-first-out queue the loss compares the batch against, with the dataset
  index of every entry kept beside it, because InsCLR's labels of memory entries are decided per
  step from those indices (an entry is a positive of a batch image when its index is in that
  image's mined pseudo-class).
* :class:`DatasetBank` holds one **un-augmented** embedding per image of the whole collection,
  overwritten whenever the image is in a batch. Every similarity judgement (mini-batch
  selection, pseudo-positive mining) reads it: augmented views make similarities unreliable.

Why the queue is our own and not lightly's ``MemoryBankModule``: that class is a ten-line ring
buffer, and retrbench used only its private ``_dequeue_and_enqueue`` (never its ``forward``), while
keeping the indices aligned meant restating lightly's update rule here anyway; a lightly release
changing that private rule would silently misalign features and indices. lightly also pulls in
pytorch-lightning, hydra and pydantic for those ten lines. The queue below keeps lightly's exact
behaviour (same initial content drawn from the global torch generator, same cut-at-the-end
update), so runs, checkpoints and ``state.pth`` files are unchanged; ``tests/train/test_memory.py``
checks it against lightly whenever lightly is installed.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["CrossBatchMemory", "DatasetBank"]


class CrossBatchMemory(nn.Module):
    """XBM queue of ``size`` augmented embeddings of dimension ``dim``, each with its dataset index.

    ``enqueue(features, indices)`` adds a batch, overwriting the oldest entries; a batch that
    reaches the end of the queue is cut there and the pointer wraps to 0 (the rest of that batch
    is dropped, as lightly's ``MemoryBankModule`` does). ``entries()`` gives the filled part:
    ``(M, D)`` features and ``(M,)`` dataset indices. The features are detached: the loss never
    back-propagates into the memory.

    Buffers (not in ``state_dict``; :meth:`snapshot` / :meth:`restore` save them): ``bank``
    ``(size, dim)`` float32, ``ptr`` ``(1,)`` int64 next slot, ``index`` ``(size,)`` int64
    dataset index per slot (``-1``: empty).
    """

    bank: Tensor
    ptr: Tensor
    index: Tensor

    def __init__(self, size: int, dim: int) -> None:
        if size < 1 or dim < 1:
            raise ValueError(f"CrossBatchMemory: size and dim must be >= 1, got {size}, {dim}")
        super().__init__()
        self.size = (int(size), int(dim))
        # empty slots hold random unit vectors (never read: entries() skips them); drawing them
        # from the global generator keeps the random stream of a run as it was with lightly
        self.register_buffer("bank", nn.functional.normalize(torch.randn(self.size), dim=-1), persistent=False)
        self.register_buffer("ptr", torch.zeros(1, dtype=torch.long), persistent=False)
        self.register_buffer("index", torch.full((int(size),), -1, dtype=torch.long), persistent=False)

    @property
    def capacity(self) -> int:
        return self.size[0]

    @torch.no_grad()
    def enqueue(self, features: Tensor, indices: Tensor) -> None:
        """Add ``(B, D)`` features with their ``(B,)`` dataset indices."""
        if features.ndim != 2 or features.shape[1] != self.size[1] or indices.shape != features.shape[:1]:
            raise ValueError(f"enqueue: expected (B, {self.size[1]}) features and (B,) indices, got {tuple(features.shape)}, {tuple(indices.shape)}")
        ptr, b = int(self.ptr), int(features.shape[0])
        n = self.capacity - ptr if ptr + b >= self.capacity else b  # cut at the end of the queue
        self.bank[ptr : ptr + n] = features[:n].detach().to(self.bank.dtype)
        self.index[ptr : ptr + n] = indices[:n].to(self.index.device, torch.long)
        self.ptr[0] = (ptr + n) % self.capacity

    def entries(self) -> tuple[Tensor, Tensor]:
        """The filled entries: ``(M, D)`` features (detached) and ``(M,)`` dataset indices."""
        filled = self.index >= 0
        return self.bank[filled].detach(), self.index[filled]

    def __len__(self) -> int:
        return int((self.index >= 0).sum())

    def snapshot(self) -> dict[str, Tensor]:
        """Everything needed to restore the queue (its buffers are not in ``state_dict``)."""
        return {"bank": self.bank.detach().cpu().clone(), "index": self.index.cpu().clone(), "ptr": self.ptr.cpu().clone()}

    @torch.no_grad()
    def restore(self, snap: dict[str, Tensor]) -> None:
        """Undo :meth:`snapshot` (on this memory's device)."""
        if tuple(snap["bank"].shape) != tuple(self.bank.shape):
            raise ValueError(f"restore: memory of shape {tuple(snap['bank'].shape)}, expected {tuple(self.bank.shape)}")
        self.bank.copy_(snap["bank"])
        self.index.copy_(snap["index"])
        self.ptr.copy_(snap["ptr"])


class DatasetBank:
    """One un-augmented, L2-normalised embedding per image of the collection: ``(N, D)``.

    Args:
        features: initial ``(N, D)`` embeddings (the candidate-set descriptors of the stage).
    """

    def __init__(self, features: Tensor) -> None:
        if features.ndim != 2:
            raise ValueError(f"DatasetBank: expected (N, D) features, got {tuple(features.shape)}")
        self.features = features.detach().float().clone()

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def device(self) -> torch.device:
        return self.features.device

    def to(self, device: torch.device | str) -> DatasetBank:
        self.features = self.features.to(device)
        return self

    @torch.no_grad()
    def update(self, indices: Tensor, features: Tensor) -> None:
        """Overwrite the rows ``indices`` with ``(B, D)`` features (a repeated index keeps the last)."""
        self.features[indices.to(self.device, torch.long)] = features.detach().to(self.device, self.features.dtype)

    def similarity(self, a: Tensor, b: Tensor) -> Tensor:
        """``(len(a), len(b))`` inner products between the rows ``a`` and the rows ``b``."""
        fa = self.features[a.to(self.device, torch.long)]
        fb = self.features[b.to(self.device, torch.long)]
        return fa @ fb.T
