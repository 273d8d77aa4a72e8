"""Descriptor extraction: images -> backbone feature maps -> pooled ``(N, C)`` descriptors.

Images are decoded in worker processes (:mod:`retrbench.utils.images`), and batched with other
images of the same input size (no padding, so no pooled value is ever changed by batching).
The batches are planned once for the whole image list (groups of equal size in first-seen
order, ``batch_size`` at a time), so an interrupted and resumed extraction runs exactly the
same batches as an uninterrupted one and gives bitwise the same descriptors. Descriptors are
returned un-normalised, as the pooling gives them.

The on-disk store (:class:`FeatureCache`) of one descriptor set is a folder ``<dir>/<key>/``:

* ``features.npy``: the ``(N, C)`` float32 array, written in place through a memory map (no
  concatenation copy; read back memory-mapped, so 1M x 2048 costs no RAM until touched);
* ``sizes.npy``: ``(N, 2)`` input sizes of the planned batches, and ``plan.json`` (batch size);
* ``progress.log``: one line of finished batch numbers per flush, appended after the rows are
  flushed to disk, so a killed run loses at most ``flush_seconds`` of work (a torn last line
  is ignored);
* ``files.npy``: ``(N, 2)`` size and modification time (ns) of every image when extracted; a
  file changed since (same name, new content) is extracted again, with its batch;
* ``meta.json``: what determines the descriptors, written last and atomically: the commit mark.

A lock file serialises concurrent runs on the same set (the second waits, then reuses the
result). A cache folder that cannot be written (read-only, full) is reported with a warning and
the extraction continues in memory. Non-finite descriptors (NaN / inf) are an error naming the
images and are never stored.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ..utils.device import resolve_device
from ..utils.images import ImageSpec, load_image, target_size
from .store import CACHE_FORMAT, CacheWarning, FeatureCache

__all__ = ["CACHE_FORMAT", "CacheWarning", "DTYPES", "FeatureCache", "ImageSpec", "describe", "extract", "load_image", "plan_batches", "resolve_device", "target_size"]

log = logging.getLogger(__name__)

FLUSH_SECONDS = 5.0  # default: work a killed extraction can lose

# ----------------------------------------------------------------------------------- batches


def plan_batches(sizes: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of equal input size, in first-seen order of the sizes,
    ``batch_size`` at a time: ``[[0, 3, 4], [1], [2, 5], ...]``."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(sizes):
        groups.setdefault((int(s[0]), int(s[1])), []).append(i)
    return [g[j : j + batch_size] for g in groups.values() for j in range(0, len(g), batch_size)]


class _Images(torch.utils.data.Dataset):
    """Decoded images; a decoding error is returned (not raised) so that the main process can
    raise it as it is, without the DataLoader worker's traceback wrapped into the message."""

    def __init__(self, specs: Sequence[ImageSpec]) -> None:
        self.specs = specs

    def __len__(self) -> int:
        return len(self.specs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int, BaseException | None]:
        try:
            return load_image(self.specs[i]), i, None
        except Exception as e:  # noqa: BLE001  (re-raised in the main process)
            return None, i, e


def _collate(batch: list[tuple[Any, int, BaseException | None]]) -> tuple[torch.Tensor | None, list[int], BaseException | None]:
    idx = [b[1] for b in batch]
    err = next((b[2] for b in batch if b[2] is not None), None)
    if err is not None:
        return None, idx, err
    return torch.stack([b[0] for b in batch]), idx, None


def _file_stats(specs: Sequence[ImageSpec]) -> np.ndarray:
    """``(N, 2)`` int64: size in bytes and modification time (ns) of each image file."""
    out = np.empty((len(specs), 2), dtype=np.int64)
    for i, s in enumerate(specs):
        try:
            st = os.stat(s.path)
        except FileNotFoundError:
            raise FileNotFoundError(f"{s.path}: image not found") from None
        out[i] = (st.st_size, st.st_mtime_ns)
    return out


# ---------------------------------------------------------------------------------- extract


def describe(
    net: torch.nn.Module,
    pool: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    scales: Sequence[float] = (1.0,),
    power: float = 1.0,
) -> torch.Tensor:
    """Descriptors of a normalised batch ``(B, 3, H, W) -> (B, C)``.

    One scale ``(1,)``: ``pool(net(x))`` as pooled (not normalised). Several: cirtorch's
    ``extract_ms``: for each scale ``s`` the input is resized by bilinear ``interpolate``
    (``scale_factor=s``, ``align_corners=False``; ``s == 1`` uses the input as is), the pooled
    descriptor is L2-normalised (cirtorch's network ends with ``L2N``), raised to ``power``;
    the mean over scales is raised to ``1 / power`` and divided by its norm. ``power`` is the GeM
    exponent for GeM in cirtorch and 1 otherwise; ``power=1`` is also InsCLR's arithmetic mean
    (``extract_fn.py``: mean of the normalised per-scale descriptors, then L2).
    """
    if len(scales) == 1 and scales[0] == 1:
        return pool(net(x))
    acc: torch.Tensor | None = None
    for s in scales:
        xs = x if s == 1 else torch.nn.functional.interpolate(x, scale_factor=float(s), mode="bilinear", align_corners=False)
        v = pool(net(xs.contiguous(memory_format=torch.channels_last))).float()  # (B, C)
        v = v / (torch.linalg.vector_norm(v, dim=1, keepdim=True) + 1e-6)  # cirtorch's L2N (eps 1e-6)
        v = v.pow(power) if power != 1 else v
        acc = v if acc is None else acc + v
    assert acc is not None
    acc = acc / len(scales)
    if power != 1:
        acc = acc.pow(1.0 / power)
    return acc / torch.linalg.vector_norm(acc, dim=1, keepdim=True)


DTYPES = ("float32", "float16", "bfloat16")


def _autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager[Any]:
    """Mixed precision for the network's forward: ``torch.autocast`` with ``dtype`` on a GPU
    (and bfloat16 on a CPU); float32 runs as is. Poolings compute in float32 (see
    :mod:`retrbench.pooling`) and descriptors are stored as float32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if device.type == "cpu" and dtype == "float16":
        raise ValueError("dtype float16 needs a GPU; on a CPU use float32 or bfloat16")
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


def _warn_no_cache(cache: FeatureCache, e: BaseException) -> None:
    msg = f"cannot write the feature cache {cache.dir} ({e}); extracting without caching"
    log.warning("%s", msg)
    warnings.warn(msg, CacheWarning, stacklevel=3)


@torch.inference_mode()
def _run_batches(
    net: torch.nn.Module,
    pool: Callable[[torch.Tensor], torch.Tensor],
    specs: Sequence[ImageSpec],
    batches: list[tuple[int, list[int]]],
    *,
    mean: torch.Tensor,
    std: torch.Tensor,
    device: torch.device,
    workers: int,
    out: Callable[[int], np.ndarray],
    on_flush: Callable[[list[int]], None],
    flush_seconds: float,
    desc: str,
    bar: Any,
    scales: Sequence[float] = (1.0,),
    power: float = 1.0,
    dtype: str = "float32",
) -> None:
    """Run ``batches`` (``(number, indices)``) and write each row of ``out(dim)``."""
    loader = torch.utils.data.DataLoader(
        _Images(specs),
        batch_sampler=[idx for _, idx in batches],
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    pending: list[int] = []
    last = time.monotonic()
    for (number, _), (x, idx, err) in zip(batches, loader, strict=True):
        if err is not None:
            raise err
        x = x.to(device, non_blocking=True).float().div_(255.0)
        x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)  # (B, 3, H, W)
        with _autocast(device, dtype):
            v = describe(net, pool, x, scales, power)
        v = v.float().cpu().numpy()  # (B, C)
        bad = ~np.isfinite(v).all(axis=1)
        if bad.any():
            names = [str(specs[i].path) for i in np.asarray(idx)[bad][:3]]
            raise ValueError(
                f"{desc}: the network gave non-finite descriptors (NaN or inf) for {int(bad.sum())} of {len(idx)} "
                f"images of a batch, first: {', '.join(names)}; check the weights (nothing was cached)"
            )
        out(v.shape[1])[idx] = v
        pending.append(number)
        bar.update(len(idx))
        if time.monotonic() - last >= flush_seconds:
            on_flush(pending)
            pending = []
            last = time.monotonic()
    on_flush(pending)


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
    flush_seconds: float = FLUSH_SECONDS,
    progress: bool = False,
    desc: str = "extract",
    scales: Sequence[float] = (1.0,),
    scale_power: float = 1.0,
    dtype: str = "float32",
) -> np.ndarray:
    """Pooled descriptors of ``specs``: ``(N, C)`` float32, row ``i`` for ``specs[i]``.

    ``scales`` / ``scale_power``: multi-scale extraction, see :func:`describe`. ``dtype``: the
    network's precision (``float16`` / ``bfloat16`` under ``torch.autocast``; see :func:`_autocast`).

    ``backbone`` maps a normalised ``(B, 3, H, W)`` batch to ``(B, C, h, w)``; ``pool`` maps
    that to ``(B, C)``. With a ``cache``, a finished set is returned memory-mapped without
    running the network (images changed since are extracted again), and an unfinished one
    resumes; finished batches are flushed at least every ``flush_seconds``.

    Raises:
        ValueError: no images; non-finite descriptors (naming the images).
        FileNotFoundError, OSError: a missing or undecodable image (naming it).
    """
    n = len(specs)
    if n == 0:
        raise ValueError(f"{desc}: no images given")
    stats = _file_stats(specs)
    if cache is not None:  # fast path without the lock (a read-only cache is fine here)
        hit = cache.load()
        if hit is not None and hit.shape[0] == n and (rows := cache.stale_rows(stats)) is not None and rows.size == 0:
            return hit
        del hit
    try:
        ctx = cache.writing() if cache is not None else contextlib.nullcontext()
        ctx.__enter__()
    except OSError as e:
        _warn_no_cache(cache, e)  # type: ignore[arg-type]
        cache, ctx = None, contextlib.nullcontext()
    try:
        return _extract_locked(
            backbone, pool, specs, stats, mean, std, device, batch_size, workers, cache, flush_seconds, progress, desc, tuple(scales), scale_power, dtype
        )
    finally:
        ctx.__exit__(None, None, None)


def _extract_locked(
    backbone: torch.nn.Module,
    pool: Callable[[torch.Tensor], torch.Tensor],
    specs: Sequence[ImageSpec],
    stats: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    device: str | torch.device,
    batch_size: int,
    workers: int,
    cache: FeatureCache | None,
    flush_seconds: float,
    progress: bool,
    desc: str,
    scales: tuple[float, ...] = (1.0,),
    power: float = 1.0,
    dtype: str = "float32",
) -> np.ndarray:
    n = len(specs)
    stale: np.ndarray | None = None
    if cache is not None and cache.complete:  # (again: another process may have finished it meanwhile)
        hit = cache.load()
        if hit is not None and hit.shape[0] == n:
            stale = cache.stale_rows(stats)
            if stale is not None and stale.size == 0:
                return hit
            stale = np.arange(n) if stale is None else stale  # stats unknown: trust nothing
            log.info("%s: %d images changed since they were extracted; extracting them again", desc, stale.size)
        del hit
    plan = cache.read_plan(n) if cache is not None else None
    done: set[int] = set()
    if plan is not None:
        sizes, batch_size = plan
        done = set(range(len(plan_batches(sizes, batch_size)))) if cache.complete else cache.done_batches()  # type: ignore[union-attr]
    else:
        sizes = np.array([target_size(s) for s in specs], dtype=np.int32).reshape(n, 2)
        if cache is not None:
            try:
                cache.start(sizes, batch_size)
            except OSError as e:
                _warn_no_cache(cache, e)
                cache = None
    batches = plan_batches(sizes, batch_size)
    if stale is not None and stale.size:
        changed = set(stale.tolist())
        done -= {b for b, idx in enumerate(batches) if changed.intersection(idx)}
    todo = [(b, idx) for b, idx in enumerate(batches) if b not in done]

    arr: np.ndarray | None = None
    if cache is not None and cache.path.is_file() and done:
        with contextlib.suppress(OSError, ValueError):
            existing = np.load(cache.path, mmap_mode="r+", allow_pickle=False)
            if existing.shape[0] == n:
                arr = existing
    if arr is None and done:  # rows of finished batches are unreadable: start over
        todo = list(enumerate(batches))

    def out(dim: int) -> np.ndarray:
        nonlocal arr, cache
        if arr is None:
            if cache is not None:
                try:
                    arr = cache.rows(n, dim)
                except OSError as e:
                    _warn_no_cache(cache, e)
                    cache = None
            if arr is None:
                arr = np.empty((n, dim), dtype=np.float32)
        return arr

    def flush(numbers: list[int]) -> None:
        nonlocal cache
        if cache is not None and arr is not None:
            try:
                cache.record(arr, numbers)
            except OSError as e:
                _warn_no_cache(cache, e)
                cache = None

    if todo:
        dev = resolve_device(device) if isinstance(device, str) else device
        # channels-last is the faster layout for convolutions on CPU (oneDNN) and GPU alike
        net = backbone.to(dev, memory_format=torch.channels_last).eval()
        mean_t = torch.tensor(list(mean), dtype=torch.float32, device=dev).view(1, 3, 1, 1)
        std_t = torch.tensor(list(std), dtype=torch.float32, device=dev).view(1, 3, 1, 1)
        from tqdm.auto import tqdm

        with tqdm(total=n, initial=n - sum(len(i) for _, i in todo), desc=desc, unit="img", disable=not progress, leave=False) as bar:
            _run_batches(
                net, pool, specs, todo, mean=mean_t, std=std_t, device=dev, workers=min(workers, os.cpu_count() or 1),
                out=out, on_flush=flush, flush_seconds=flush_seconds, desc=desc, bar=bar, scales=scales, power=power, dtype=dtype,
            )  # fmt: skip
    assert arr is not None
    if cache is not None:
        try:
            cache.finish(arr, stats)
            del arr
            hit = cache.load()
            if hit is not None:
                return hit
        except OSError as e:
            _warn_no_cache(cache, e)
    return np.asarray(arr)
