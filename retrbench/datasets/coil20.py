"""COIL-20 (Columbia Object Image Library, processed set): 20 objects x 72 views, mAP.

Layout: ``<root>/coil20/obj{o}__{v}.png``; the original archive's folder name is accepted too,
as ``<root>/coil20/coil-20-proc/`` or ``<root>/coil-20-proc/``. Views ``v`` are 0..71 (5 degree
steps of a turntable).

Every image is a query against the whole database: its ground truth ``ok`` is the other views
of its object and ``junk`` is the query image itself, so the trivial self-match is ignored.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..types import Query, RetrievalDataset
from ._common import preview, resolve_data_root
from .base import DATASETS, DatasetInfo

__all__ = ["load_coil20", "COIL20_VIEWS"]

COIL20_VIEWS = 72
_NAME = re.compile(r"obj(\d+)__(\d+)\.png")
_LAYOUT = "<data_root>/coil20/obj<o>__<v>.png (or <data_root>/coil20/coil-20-proc/, <data_root>/coil-20-proc/)"


def _image_dir(root: Path) -> tuple[Path, dict[tuple[int, int], str]]:
    """The first candidate folder holding ``obj*__*.png`` files, with ``(object, view) -> file``."""
    for d in (root / "coil20", root / "coil20" / "coil-20-proc", root / "coil-20-proc"):
        if d.is_dir():
            found = {
                (int(m.group(1)), int(m.group(2))): p.name
                for p in d.iterdir()
                if (m := _NAME.fullmatch(p.name)) and p.is_file()
            }
            if found:
                return d, found
    raise FileNotFoundError(f"coil20: no obj<o>__<v>.png images under {root}; expected {_LAYOUT}")


def load_coil20(data_root: str | Path | None = None, *, allow_missing: bool = False) -> RetrievalDataset:
    """COIL-20 from ``<data_root>/coil20/``; each view queries all images, its other views are positives.

    Args:
        data_root: folder holding ``coil20/``; default :func:`~retrbench.utils.paths.default_data_root`.
        allow_missing: accept objects with fewer than 72 views (their queries then have fewer
            positives) instead of raising; the count goes in notes.
    """
    root = resolve_data_root(data_root)
    img_dir, found = _image_dir(root)
    objects = sorted({o for o, _ in found})
    bad = sorted(v for _, v in found if not 0 <= v < COIL20_VIEWS)
    if bad:
        raise ValueError(f"coil20: view numbers must be 0..{COIL20_VIEWS - 1}; {img_dir} has {bad[:5]}")
    missing = [f"obj{o}__{v}.png" for o in objects for v in range(COIL20_VIEWS) if (o, v) not in found]
    if missing and not allow_missing:
        first = preview(missing)
        raise FileNotFoundError(
            f"coil20: {len(missing)} views missing in {img_dir} for its {len(objects)} objects (first: {first}); "
            f"every object needs views 0..{COIL20_VIEWS - 1} (layout {_LAYOUT}). Pass allow_missing=True to accept."
        )
    keys = sorted(found)  # (object, view), numerically
    images = tuple(found[k] for k in keys)
    obj = np.array([o for o, _ in keys], dtype=np.int64)
    gnd = []
    for i, (o, _) in enumerate(keys):
        same = np.flatnonzero(obj == o).astype(np.int64)
        gnd.append({"ok": same[same != i], "junk": np.array([i], dtype=np.int64)})
    notes = {
        "protocol": "map: mAP over all images as queries",
        "images": f"{len(images)} images, {len(objects)} objects (views 0..{COIL20_VIEWS - 1} at 5 degree steps)",
        "queries": f"{len(images)} queries: every image",
        "query_crop": "none: whole image",
        "query_in_database": "yes, but the query image itself is junk (ignored); positives = other views of its object",
        "image_order": "by (object, view) numerically",
    }
    if missing:
        notes["missing"] = f"allow_missing: {len(missing)} of {len(objects) * COIL20_VIEWS} views absent"
    queries = tuple(Query(im) for im in images)
    return RetrievalDataset("coil20", img_dir, images, queries, tuple(gnd), "map", notes)


@DATASETS.register(
    "coil20",
    aliases=("coil-20",),
    info=DatasetInfo(
        "map",
        "coil20/obj<o>__<v>.png (or coil-20-proc/)",
        label="COIL-20",
        order=90,
        help="COIL-20: 20 objects x 72 views, mAP",
        image_size=128,  # native 128x128
    ),
)
def coil20(data_root: str | Path | None = None, *, allow_missing: bool = False) -> RetrievalDataset:
    """COIL-20: each of the 1440 views queries all images; other views of its object are positives."""
    return load_coil20(data_root, allow_missing=allow_missing)
