"""UKBench (Nister and Stewenius 2006): groups of 4 views of one object, N-S score.

Layout: ``<root>/ukbench/ukbench%05d.jpg`` or, as the original archive unpacks,
``<root>/ukbench/full/ukbench%05d.jpg``. Images ``4g .. 4g+3`` show object ``g``.

Every image is a query against the whole database, itself included: its ground truth ``ok``
is the 4 images of its group (the query among them), ``junk`` is empty. The N-S score is the
mean number of those 4 in the top 4 (max 4). The full benchmark has 10200 images; a subset of
whole groups (e.g. the first 14 groups) is accepted and the count is recorded in notes.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..types import Query, RetrievalDataset
from ._common import preview, resolve_data_root
from .base import DATASETS, DatasetInfo

__all__ = ["load_ukbench", "UKBENCH_FULL_SIZE"]

UKBENCH_FULL_SIZE = 10200  # 2550 groups of 4
_NAME = re.compile(r"ukbench(\d{5})\.jpg")
_LAYOUT = "<data_root>/ukbench/ukbench%05d.jpg (or <data_root>/ukbench/full/ukbench%05d.jpg)"


def _image_dir(ddir: Path) -> tuple[Path, dict[int, str]]:
    """The first of ``ukbench/`` and ``ukbench/full/`` holding ukbench images, with ``number -> file``."""
    for d in (ddir, ddir / "full"):
        if d.is_dir():
            found = {int(m.group(1)): p.name for p in d.iterdir() if (m := _NAME.fullmatch(p.name)) and p.is_file()}
            if found:
                return d, found
    raise FileNotFoundError(f"ukbench: no ukbench%05d.jpg images in {ddir} or {ddir / 'full'}; expected {_LAYOUT}")


def load_ukbench(data_root: str | Path | None = None, *, allow_missing: bool = False) -> RetrievalDataset:
    """UKBench from ``<data_root>/ukbench/``; every image queries the full database (itself included).

    Args:
        data_root: folder holding ``ukbench/``; default :func:`~retrbench.utils.paths.default_data_root`.
        allow_missing: drop incomplete groups (fewer than 4 images, or a group missing before the
            last one present) instead of raising; whole groups go so every query keeps 4
            relevant images (N-S max 4). The count goes in notes.
    """
    root = resolve_data_root(data_root)
    img_dir, found = _image_dir(root / "ukbench")
    n_groups = max(found) // 4 + 1
    members = [[4 * g + v for v in range(4) if 4 * g + v in found] for g in range(n_groups)]
    incomplete = [g for g, m in enumerate(members) if len(m) < 4]
    if incomplete and not allow_missing:
        missing = [f"ukbench{4 * g + v:05d}.jpg" for g in incomplete for v in range(4) if 4 * g + v not in found]
        first = preview(missing)
        raise FileNotFoundError(
            f"ukbench: {len(incomplete)} of {n_groups} groups in {img_dir} are incomplete "
            f"({len(missing)} images missing, first: {first}); every group 4g..4g+3 must be present "
            f"(layout {_LAYOUT}). Pass allow_missing=True to drop incomplete groups."
        )
    groups = [g for g, m in enumerate(members) if len(m) == 4]
    images = tuple(found[4 * g + v] for g in groups for v in range(4))
    queries = tuple(Query(im) for im in images)
    gnd = tuple(
        {"ok": np.arange(4 * k, 4 * k + 4, dtype=np.int64), "junk": np.zeros(0, dtype=np.int64)}
        for k in range(len(groups))
        for _ in range(4)
    )
    full = "the full benchmark" if len(images) == UKBENCH_FULL_SIZE else f"a subset of the {UKBENCH_FULL_SIZE}"
    notes = {
        "protocol": "ukbench: N-S score = mean number of the 4 group images in the top 4 (max 4)",
        "images": f"{len(images)} images, {len(groups)} groups of 4 ({full})",
        "queries": f"{len(queries)} queries: every image",
        "query_crop": "none: whole image",
        "query_in_database": "yes: the query is in the database and counts as one of its 4 relevant images",
        "image_order": "by image number",
    }
    if incomplete:
        dropped = sum(len(members[g]) for g in incomplete)
        notes["missing"] = (
            f"allow_missing: dropped {len(incomplete)} incomplete groups ({dropped} images present in them)"
        )
    return RetrievalDataset("ukbench", img_dir, images, queries, gnd, "ukbench", notes)


@DATASETS.register(
    "ukbench",
    info=DatasetInfo(
        "ukbench",
        "ukbench/ukbench%05d.jpg (or ukbench/full/)",
        label="UKBench",
        order=80,
        help="UKBench: 4 views per object, N-S score",
        image_size=640,  # native 640x480: no upscaling
    ),
)
def ukbench(data_root: str | Path | None = None, *, allow_missing: bool = False) -> RetrievalDataset:
    """UKBench: each image queries all images (itself included); N-S score over groups of 4."""
    return load_ukbench(data_root, allow_missing=allow_missing)
