"""Helpers shared by the dataset loaders (private to :mod:`retrbench.datasets`).

Data root resolution, the ground-truth checksum written in notes, box parsing, the
``allow_missing`` re-indexing and dataset assembly, and a fast existence check for large
image lists.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from ..types import Query, RetrievalDataset
from ..utils.paths import default_data_root

__all__ = [
    "SHOW",
    "as_bbox",
    "build_dataset",
    "existing_files",
    "md5_file",
    "preview",
    "reindex",
    "resolve_data_root",
]

SHOW = 5  # how many missing names an error message lists
# Above this many files, existing_files lists the folders instead of one stat per file.
STAT_LIMIT = 20_000


def resolve_data_root(data_root: str | Path | None) -> Path:
    """``data_root`` with ``~`` expanded, or :func:`~retrbench.utils.paths.default_data_root` when None."""
    return Path(data_root).expanduser() if data_root is not None else default_data_root()


def md5_file(path: Path) -> str:
    """Hex md5 of a (small) file: the ground-truth fingerprint recorded in a dataset's notes."""
    return hashlib.md5(path.read_bytes()).hexdigest()


def preview(names: Iterable[str]) -> str:
    """The first :data:`SHOW` of ``names``, comma-separated, with ``, ...`` when there are more."""
    names = list(names)
    return ", ".join(names[:SHOW]) + (", ..." if len(names) > SHOW else "")


def as_bbox(values: object, where: str) -> tuple[float, float, float, float]:
    """Four numbers ``(x0, y0, x1, y1)`` as floats; ``ValueError`` naming ``where`` otherwise."""
    box = tuple(float(v) for v in np.asarray(values, dtype=np.float64).reshape(-1))
    if len(box) != 4:
        raise ValueError(f"{where}: expected a 4-value box (x0, y0, x1, y1), got {box}")
    return box  # type: ignore[return-value]


def reindex(gnd: Sequence[dict[str, np.ndarray]], keep: np.ndarray) -> list[dict[str, np.ndarray]]:
    """Drop database rows where ``keep`` (``(N,)`` bool) is False and renumber the ground truth to the kept rows."""
    new_index = np.cumsum(keep, dtype=np.int64) - 1
    return [{k: new_index[v[keep[v]]] for k, v in g.items()} for g in gnd]


def build_dataset(
    name: str,
    protocol: str,
    root: Path,
    *,
    db_paths: Sequence[str],
    keep_db: np.ndarray,
    queries: Sequence[Query],
    keep_q: np.ndarray,
    gnd: Sequence[dict[str, np.ndarray]],
    notes: dict[str, str],
) -> RetrievalDataset:
    """Apply the ``keep`` masks (``allow_missing``), fill the count notes and build the dataset.

    Args:
        name, protocol, root: as on :class:`~retrbench.types.RetrievalDataset`.
        db_paths: ``N`` database image paths relative to ``root``; ``keep_db`` ``(N,)`` bool.
        queries: ``Q`` queries; ``keep_q`` ``(Q,)`` bool.
        gnd: ``Q`` ground-truth dicts indexing the ``N`` database images (re-indexed here).
        notes: the dataset's notes; ``images``, ``queries`` and (when rows were dropped)
            ``missing`` are added to it.
    """
    n_drop_db = int((~keep_db).sum())
    n_drop_q = int((~keep_q).sum())
    gnd = reindex(gnd, keep_db)
    gnd = [g for g, k in zip(gnd, keep_q, strict=True) if k]
    images = tuple(p for p, k in zip(db_paths, keep_db, strict=True) if k)
    kept_queries = tuple(q for q, k in zip(queries, keep_q, strict=True) if k)
    if n_drop_db or n_drop_q:
        notes["missing"] = (
            f"allow_missing: dropped {n_drop_db} of {len(db_paths)} database images and {n_drop_q} of "
            f"{len(queries)} queries whose files are absent; ground truth re-indexed to the rest"
        )
    notes["images"] = f"{len(images)} database images"
    notes["queries"] = f"{len(kept_queries)} queries"
    return RetrievalDataset(name, root, images, kept_queries, tuple(gnd), protocol, notes)


def existing_files(folder: str | Path, rel_paths: Sequence[str]) -> np.ndarray:
    """``(N,)`` bool: which of ``rel_paths`` (``/``-separated, relative to ``folder``) are files.

    For many paths (a million distractors) the folders holding them are listed once instead of
    one ``stat`` per file, which is much faster on network file systems.
    """
    folder = Path(folder)
    if len(rel_paths) <= STAT_LIMIT:
        return np.fromiter(((folder / p).is_file() for p in rel_paths), dtype=bool, count=len(rel_paths))
    by_dir: dict[str, set[str]] = {}
    for p in rel_paths:
        d, _, name = p.rpartition("/")
        by_dir.setdefault(d, set()).add(name)
    present: set[str] = set()
    for d, names in by_dir.items():
        try:
            with os.scandir(folder / d if d else folder) as it:
                for entry in it:
                    if entry.name in names and entry.is_file():
                        present.add(f"{d}/{entry.name}" if d else entry.name)
        except (FileNotFoundError, NotADirectoryError):
            continue
    return np.fromiter((p in present for p in rel_paths), dtype=bool, count=len(rel_paths))
