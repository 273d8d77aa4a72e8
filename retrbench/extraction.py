"""Descriptor extraction: images -> backbone feature maps -> pooled ``(N, C)`` descriptors.

Images are decoded in worker processes, resized so that the longer side is ``image_size``
(up or down), optionally cropped to a query box, and batched with other images of the same
size (no padding, so no pooled value is ever changed by batching). Descriptors are returned
un-normalised, as the pooling gives them.

Results are cached on disk under a key built from everything that determines them; the
extraction writes finished chunks atomically, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from .utils.device import resolve_device
from .utils.images import ImageSpec, load_image, target_size
from .utils.io import atomic_save_npy, atomic_write_text

__all__ = ["ImageSpec", "target_size", "load_image", "extract", "FeatureCache", "resolve_device"]

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when extraction semantics change, so old caches are not reused


class _Images(torch.utils.data.Dataset):
    def __init__(self, specs: Sequence[ImageSpec]) -> None:
        self.specs = specs

    def __len__(self) -> int:
        return len(self.specs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return load_image(self.specs[i]), i


def _collate(batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, list[int]]:
    return torch.stack([b[0] for b in batch]), [b[1] for b in batch]


def _size_batches(sizes: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Group indices into batches of equal input size, keeping first-seen order of sizes."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(sizes):
        groups.setdefault(s, []).append(i)
    return [g[j : j + batch_size] for g in groups.values() for j in range(0, len(g), batch_size)]


@torch.inference_mode()
def _extract_chunk(
    net: torch.nn.Module,
    pool: Callable[[torch.Tensor], torch.Tensor],
    specs: Sequence[ImageSpec],
    mean: torch.Tensor,
    std: torch.Tensor,
    device: torch.device,
    batch_size: int,
    workers: int,
    on_batch: Callable[[int], None],
) -> np.ndarray:
    sizes = [target_size(s) for s in specs]
    loader = torch.utils.data.DataLoader(
        _Images(specs),
        batch_sampler=_size_batches(sizes, batch_size),
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    out: np.ndarray | None = None
    for x, idx in loader:
        x = x.to(device, non_blocking=True).float().div_(255.0)
        x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)  # (B, 3, H, W)
        v = pool(net(x))  # (B, C)
        v = v.float().cpu().numpy()
        if out is None:
            out = np.empty((len(specs), v.shape[1]), dtype=np.float32)
        out[idx] = v
        on_batch(len(idx))
    assert out is not None
    return out


class FeatureCache:
    """Descriptors stored as ``<dir>/<key>.npy`` with a JSON sidecar, written atomically.

    During extraction, finished chunks live in ``<dir>/<key>.partial/`` so a killed run resumes.
    """

    def __init__(self, directory: Path, key: str, meta: dict) -> None:
        self.dir = Path(directory)
        self.key = key
        self.meta = meta
        self.path = self.dir / f"{key}.npy"
        self.partial = self.dir / f"{key}.partial"

    def load(self) -> np.ndarray | None:
        if not self.path.exists():
            return None
        try:
            arr = np.load(self.path, allow_pickle=False)
        except (OSError, ValueError) as e:  # a damaged file is recomputed, never used
            log.warning("ignoring unreadable feature cache %s (%s)", self.path, e)
            return None
        return arr

    def save(self, arr: np.ndarray) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_save_npy(self.path, arr)
        atomic_write_text(self.dir / f"{self.key}.json", json.dumps(self.meta, indent=1, sort_keys=True))
        shutil.rmtree(self.partial, ignore_errors=True)

    def chunk_path(self, i: int) -> Path:
        return self.partial / f"chunk{i:06d}.npy"


def extract(
    backbone: torch.nn.Module,
    pool: Callable[[torch.Tensor], torch.Tensor],
    specs: Sequence[ImageSpec],
    *,
    mean: Sequence[float],
    std: Sequence[float],
    device: str | torch.device = "auto",
    batch_size: int = 8,
    workers: int = 2,
    cache: FeatureCache | None = None,
    chunk_size: int = 512,
    progress: bool = False,
    desc: str = "extract",
) -> np.ndarray:
    """Pooled descriptors of ``specs``: ``(N, C)`` float32, row ``i`` for ``specs[i]``.

    ``backbone`` maps a normalised ``(B, 3, H, W)`` batch to ``(B, C, h, w)``; ``pool`` maps
    that to ``(B, C)``. With a ``cache``, a finished result is returned without running the
    network and chunks of ``chunk_size`` images are kept as they finish.
    """
    if cache is not None:
        hit = cache.load()
        if hit is not None and hit.shape[0] == len(specs):
            return hit
    dev = resolve_device(device) if isinstance(device, str) else device
    # channels-last is the faster layout for convolutions on CPU (oneDNN) and GPU alike
    backbone = backbone.to(dev, memory_format=torch.channels_last).eval()
    mean_t = torch.tensor(list(mean), dtype=torch.float32, device=dev).view(1, 3, 1, 1)
    std_t = torch.tensor(list(std), dtype=torch.float32, device=dev).view(1, 3, 1, 1)
    workers = min(workers, os.cpu_count() or 1)

    from tqdm.auto import tqdm

    bar = tqdm(total=len(specs), desc=desc, unit="img", disable=not progress, leave=False)
    parts: list[np.ndarray] = []
    try:
        for c, start in enumerate(range(0, len(specs), chunk_size)):
            chunk = specs[start : start + chunk_size]
            done = None
            if cache is not None and cache.chunk_path(c).exists():
                try:
                    done = np.load(cache.chunk_path(c), allow_pickle=False)
                except (OSError, ValueError):
                    done = None
                if done is not None and done.shape[0] != len(chunk):
                    done = None
            if done is None:
                done = _extract_chunk(backbone, pool, chunk, mean_t, std_t, dev, batch_size, workers, bar.update)
                if cache is not None:
                    cache.partial.mkdir(parents=True, exist_ok=True)
                    atomic_save_npy(cache.chunk_path(c), done)
            else:
                bar.update(len(chunk))
            parts.append(done)
    finally:
        bar.close()
    if not parts:
        raise ValueError("extract: no images given")
    feats = np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)
    if cache is not None:
        cache.save(feats)
    return feats
