"""Revisited Oxford / Paris plus the revisitop 1M distractors (``roxford5k+1m``, ``rparis6k+1m``).

Layout under the data root::

    <root>/roxford5k/...                     the revisited dataset, as for ``roxford5k``
    <root>/revisitop1m/revisitop1m.txt       the distractor list: one path per line
    <root>/revisitop1m/jpg/<listed path>     the distractor images

This is the layout of the revisitop download code (``python/download.py``,
``download_distractors``: ``revisitop1m/jpg/`` from the 100 archives ``revisitop1m.{1..100}.tar.gz``
and the list ``revisitop1m.txt`` beside it; ``python/dataset.py`` reads the list with
``splitlines()`` and joins each line to ``jpg/`` with no extension added, while the MATLAB
``configdataset.m`` appends ``.jpg`` to a line without one; this loader does the same). The
R1M set of Radenovic et al. 2018 has 1,001,001 images.

The database is the base dataset's images followed by the distractors in list order; queries
and ground truth are the base dataset's, unchanged (distractors are negatives for every query,
and base image ``i`` keeps index ``i``). Image paths are relative to the data root
(``roxford5k/jpg/<name>.jpg``, ``revisitop1m/jpg/<path>``). ``max_distractors=N`` keeps the
first ``N`` listed (for quick runs; recorded in notes, numbers then are not R1M numbers).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from ..types import Query, RetrievalDataset
from ._common import existing_files, md5_file, preview, resolve_data_root
from .base import DATASETS, DatasetInfo
from .groundtruth import read_text_file
from .oxford import load_revisited

__all__ = ["load_with_distractors", "read_distractor_list", "REVISITOP1M_SIZE"]

REVISITOP1M_SIZE = 1_001_001
_LIST = "revisitop1m.txt"
_LAYOUT = "<data_root>/revisitop1m/revisitop1m.txt and <data_root>/revisitop1m/jpg/<listed path>"


def read_distractor_list(path: Path) -> list[str]:
    """The paths of ``revisitop1m.txt`` (relative to ``revisitop1m/jpg/``), ``.jpg`` added where a line has no extension."""
    out = []
    with io.StringIO(read_text_file(path, "distractor list")) as f:
        for r, line in enumerate(f, start=1):
            s = line.strip().replace("\\", "/")
            if not s:
                continue
            if s.startswith("/") or ".." in s.split("/"):
                raise ValueError(f"{path} line {r}: expected a path relative to revisitop1m/jpg/, got {s!r}")
            out.append(s if os.path.splitext(s)[1] else f"{s}.jpg")
    return out


def load_with_distractors(
    base: str,
    data_root: str | Path | None = None,
    *,
    max_distractors: int | None = None,
    allow_missing: bool = False,
    check_images: bool = True,
) -> RetrievalDataset:
    """``base`` (``roxford5k`` or ``rparis6k``) with the revisitop 1M distractors appended to its database.

    Args:
        base: the revisited dataset.
        data_root: folder holding ``<base>/`` and ``revisitop1m/``; default :func:`~retrbench.utils.paths.default_data_root`.
        max_distractors: keep only the first ``N`` listed distractors (``None``: all).
        allow_missing: drop absent base images (as :func:`load_revisited`) and absent
            distractors instead of raising; the counts go in notes.
        check_images: when False, look at no image file (ground truth and list only).
    """
    if max_distractors is not None and (int(max_distractors) != max_distractors or max_distractors < 0):
        raise ValueError(f"{base}+1m: max_distractors must be a non-negative integer or None, got {max_distractors!r}")
    root = resolve_data_root(data_root)
    list_path = root / "revisitop1m" / _LIST
    if not list_path.is_file():
        raise FileNotFoundError(f"{base}+1m: distractor list {list_path} not found; expected {_LAYOUT}")
    ds = load_revisited(base, root, allow_missing=allow_missing, check_images=check_images)

    listed = read_distractor_list(list_path)
    chosen = listed if max_distractors is None else listed[: int(max_distractors)]
    jpg_dir = root / "revisitop1m" / "jpg"
    kept = chosen
    n_missing = 0
    if check_images:
        present = existing_files(jpg_dir, chosen)
        missing = [p for p, k in zip(chosen, present, strict=True) if not k]
        n_missing = len(missing)
        if missing and not allow_missing:
            first = preview(missing)
            raise FileNotFoundError(
                f"{base}+1m: {len(missing)} of {len(chosen)} distractors are missing under {jpg_dir} (first: {first}); "
                f"expected layout: {_LAYOUT}. Pass allow_missing=True to drop them, max_distractors=N for a "
                "subset, or check_images=False to skip the check."
            )
        kept = [p for p, k in zip(chosen, present, strict=True) if k]

    prefix = ds.root.relative_to(root).as_posix()  # e.g. roxford5k/jpg
    images = tuple(f"{prefix}/{p}" for p in ds.images) + tuple(f"revisitop1m/jpg/{p}" for p in kept)
    queries = tuple(Query(f"{prefix}/{q.image}", bbox=q.bbox) for q in ds.queries)
    notes = dict(ds.notes)
    n_base = len(ds.images)
    subset = (
        f"the first {len(chosen)} (max_distractors={max_distractors}; not an R1M number)"
        if max_distractors is not None and len(chosen) < len(listed)
        else "all"
    )
    full = "" if len(listed) == REVISITOP1M_SIZE else f" (the full R1M list has {REVISITOP1M_SIZE})"
    notes["distractors"] = (
        f"revisitop 1M (Radenovic et al. 2018): {subset} of the {len(listed)} listed{full}, "
        f"{_LIST} md5 {md5_file(list_path)}"
    )
    notes["images"] = f"{n_base + len(kept)} database images: {n_base} {base} + {len(kept)} distractors"
    notes["image_order"] = f"{base} images in gnd imlist order, then the distractors in {_LIST} order"
    notes["image_paths"] = f"relative to the data root ({prefix}/..., revisitop1m/jpg/...)"
    if n_missing:
        notes["missing_distractors"] = f"allow_missing: {n_missing} of {len(chosen)} distractors absent and dropped"
    if not check_images:
        notes["images_checked"] = "no: check_images=False, image files were not looked at"
    return RetrievalDataset(f"{base}+1m", root, images, queries, ds.gnd, ds.protocol, notes)


@DATASETS.register(
    "roxford5k+1m",
    aliases=("roxford+1m", "roxford5k+r1m"),
    info=DatasetInfo(
        "revisited",
        "roxford5k/ (as roxford5k) + revisitop1m/revisitop1m.txt + revisitop1m/jpg/<path>",
        resize="cirtorch",  # as cirtorch / revisitop (InsCLR: the same ImagesFromList)
        label="rOxford 5k+1M",
        order=60,
        help="Revisited Oxford + 1M distractors: 4993 + 1,001,001 images, 70 cropped queries",
    ),
)
def roxford5k_1m(
    data_root: str | Path | None = None,
    *,
    max_distractors: int | None = None,
    allow_missing: bool = False,
    check_images: bool = True,
) -> RetrievalDataset:
    """Revisited Oxford5k plus the revisitop 1M distractors (R1M), easy/medium/hard."""
    return load_with_distractors(
        "roxford5k", data_root, max_distractors=max_distractors, allow_missing=allow_missing, check_images=check_images
    )


@DATASETS.register(
    "rparis6k+1m",
    aliases=("rparis+1m", "rparis6k+r1m"),
    info=DatasetInfo(
        "revisited",
        "rparis6k/ (as rparis6k) + revisitop1m/revisitop1m.txt + revisitop1m/jpg/<path>",
        resize="cirtorch",  # as cirtorch / revisitop (InsCLR: the same ImagesFromList)
        label="rParis 6k+1M",
        order=70,
        help="Revisited Paris + 1M distractors: 6322 + 1,001,001 images, 70 cropped queries",
    ),
)
def rparis6k_1m(
    data_root: str | Path | None = None,
    *,
    max_distractors: int | None = None,
    allow_missing: bool = False,
    check_images: bool = True,
) -> RetrievalDataset:
    """Revisited Paris6k plus the revisitop 1M distractors (R1M), easy/medium/hard."""
    return load_with_distractors(
        "rparis6k", data_root, max_distractors=max_distractors, allow_missing=allow_missing, check_images=check_images
    )
