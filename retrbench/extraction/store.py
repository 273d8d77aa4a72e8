"""The on-disk store of one descriptor set (see :mod:`retrbench.extraction`): memory-mapped
``features.npy`` written in place, the batch plan, the progress journal, per-image file stats
and the ``meta.json`` commit mark."""


from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..utils.io import atomic_save_npy, atomic_write_text

__all__ = ["CACHE_FORMAT", "CacheWarning", "FeatureCache"]

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # bump when extraction semantics change, so old caches are not reused


class CacheWarning(UserWarning):
    """The feature cache could not be used (read-only, damaged); the run continued without it."""


class FeatureCache:
    """The on-disk store of one descriptor set, ``<directory>/<key>/`` (see the module docstring).

    Args:
        directory: folder holding the sets of one model and dataset.
        key: the set's name; it must change whenever anything that determines the descriptors
            does (the pipeline hashes ``meta``).
        meta: JSON-able description written to ``meta.json`` when the set is complete.
    """

    def __init__(self, directory: str | Path, key: str, meta: dict[str, Any]) -> None:
        self.dir = Path(directory) / key
        self.key = key
        self.meta = meta
        self.path = self.dir / "features.npy"

    # --- files
    @property
    def _meta_file(self) -> Path:
        return self.dir / "meta.json"

    @property
    def complete(self) -> bool:
        """Whether a finished set is stored (its descriptors may still be stale for changed files)."""
        return self._meta_file.is_file() and self.path.is_file()

    def load(self) -> np.ndarray | None:
        """The stored ``(N, C)`` descriptors, memory-mapped read-only, or None when not complete."""
        if not self.complete:
            return None
        try:
            return np.load(self.path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:  # a damaged file is recomputed, never used
            log.warning("ignoring unreadable feature cache %s (%s)", self.path, e)
            return None

    def stale_rows(self, stats: np.ndarray) -> np.ndarray | None:
        """Rows whose image changed (size or mtime) since they were extracted; None if unknown."""
        try:
            old = np.load(self.dir / "files.npy", allow_pickle=False)
        except (OSError, ValueError):
            return None
        if old.shape != stats.shape:
            return None
        return np.flatnonzero((old != stats).any(axis=1))

    def read_plan(self, n: int) -> tuple[np.ndarray, int] | None:
        try:
            sizes = np.load(self.dir / "sizes.npy", allow_pickle=False)
            batch_size = int(json.loads((self.dir / "plan.json").read_text())["batch_size"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return (sizes, batch_size) if sizes.shape == (n, 2) else None

    def done_batches(self) -> set[int]:
        """Batch numbers recorded as finished (a torn last line is ignored)."""
        try:
            text = (self.dir / "progress.log").read_text()
        except OSError:
            return set()
        lines = text.split("\n")[:-1]  # the part after the last newline may be torn
        done: set[int] = set()
        for line in lines:
            with contextlib.suppress(ValueError):
                done.update(int(t) for t in line.split())
        return done

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Exclusive access for extraction (blocks while another process extracts this set)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "a+") as f:
            try:
                import fcntl
            except ImportError:  # pragma: no cover - not POSIX: no cross-process lock
                yield
                return
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.warning("%s is being extracted by another process; waiting for it", self.dir)
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def start(self, sizes: np.ndarray, batch_size: int) -> None:
        """Begin a new set (or restart one whose plan is lost): plan files written, progress reset."""
        self._meta_file.unlink(missing_ok=True)
        (self.dir / "progress.log").unlink(missing_ok=True)
        self.path.unlink(missing_ok=True)
        atomic_save_npy(self.dir / "sizes.npy", np.asarray(sizes, dtype=np.int32))
        atomic_write_text(self.dir / "plan.json", json.dumps({"batch_size": int(batch_size), "format": CACHE_FORMAT}))

    def rows(self, n: int, dim: int) -> np.ndarray:
        """The writable ``(n, dim)`` memory map of ``features.npy`` (created when absent)."""
        if self.path.is_file():
            with contextlib.suppress(OSError, ValueError):  # damaged: recreated below
                arr = np.load(self.path, mmap_mode="r+", allow_pickle=False)
                if arr.shape == (n, dim) and arr.dtype == np.float32:
                    return arr
                del arr
        return np.lib.format.open_memmap(self.path, mode="w+", dtype=np.float32, shape=(n, dim))

    def record(self, arr: np.ndarray, batches: Sequence[int]) -> None:
        """Flush the rows of ``batches`` to disk, then log them as finished."""
        if not batches:
            return
        if isinstance(arr, np.memmap):
            arr.flush()
        with open(self.dir / "progress.log", "a", encoding="ascii") as f:
            f.write(" ".join(map(str, batches)) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def finish(self, arr: np.ndarray, stats: np.ndarray) -> None:
        """Commit: file stats, then ``meta.json`` (the mark of a complete set)."""
        if isinstance(arr, np.memmap):
            arr.flush()
        atomic_save_npy(self.dir / "files.npy", stats)
        atomic_write_text(self._meta_file, json.dumps({**self.meta, "format": CACHE_FORMAT, "shape": list(arr.shape)}, indent=1, sort_keys=True, default=str))
        (self.dir / "progress.log").unlink(missing_ok=True)

