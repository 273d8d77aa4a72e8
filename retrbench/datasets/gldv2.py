"""Google Landmarks Dataset v2, retrieval task (``gldv2``), evaluated by mAP@100.

Layout (the files of https://github.com/cvdfoundation/google-landmark, version 2.1)::

    <root>/gldv2/index.csv                    index image ids (column ``id``; 761,757 rows)
    <root>/gldv2/test.csv                     test image ids (column ``id``; 117,577 rows), optional
    <root>/gldv2/retrieval_solution_v2.1.csv  columns id, images, Usage
    <root>/gldv2/index/<a>/<b>/<c>/<id>.jpg   <a><b><c> = the first three characters of <id>
    <root>/gldv2/test/<a>/<b>/<c>/<id>.jpg

``retrieval_solution_v2.1.csv`` has one row per test image: ``images`` is a space-separated list
of the index ids showing the same landmark, or ``None``; ``Usage`` is ``Public``, ``Private`` or
``Ignored`` (the reference reader, DELF ``dataset_file_io.ReadSolution``, skips ``Ignored`` rows;
in its tests those rows have ``images`` = ``None``). Queries are the test images with at least
one match, in file order; ``split`` keeps ``"public"``, ``"private"`` or ``"all"`` of them (the
published numbers are per split: the repository's table and DELF's
``compute_retrieval_metrics.py`` report Public and Private mAP@100 separately; ``"all"`` pools
both into one mean, which no published table reports). The database is ``index.csv``, in its
order; queries are not in it. Whole images, no boxes.

Protocol ``gldv2`` (this module only names it; ``retrbench.evaluation.gldv2_protocol`` computes
it): for each query with ``m >= 1`` relevant index images, ``AP@100 = (1 / min(m, 100)) * sum_{k=1..100} P(k) rel(k)``, with ``P(k)`` the
precision among the first ``k`` results and ``rel(k)`` 1 if the k-th result is relevant;
``mAP@100`` is the mean over those queries, in percent. As DELF's ``metrics.MeanAveragePrecision``
(the Kaggle metric's reference code): a result listed again counts once (its repeat takes a
position but is not relevant), positions beyond the list add nothing. retrbench conventions on
top: ``-1`` entries (nothing) and ``junk`` ids (none in GLDv2) are removed before the cut at
100, as in the other protocols.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import numpy as np

from ..types import Query, RetrievalDataset
from ._common import SHOW, build_dataset, existing_files, md5_file, preview, resolve_data_root
from .base import DATASETS, DatasetInfo
from .groundtruth import read_text_file

__all__ = ["load_gldv2", "GLDV2_SOLUTION", "GLDV2_SPLITS"]

GLDV2_SOLUTION = "retrieval_solution_v2.1.csv"
GLDV2_SPLITS = ("all", "public", "private")
_USAGE = {"Public": "public", "Private": "private"}
_ID = re.compile(r"[0-9A-Za-z]{3,}")
_LAYOUT = (
    "<data_root>/gldv2/{index.csv, test.csv, retrieval_solution_v2.1.csv} and "
    "<data_root>/gldv2/{index,test}/<a>/<b>/<c>/<id>.jpg"
)


# ----------------------------------------------------------------------------- loader


def _image_path(split_dir: str, image_id: str) -> str:
    return f"{split_dir}/{image_id[0]}/{image_id[1]}/{image_id[2]}/{image_id}.jpg"


def _read_ids(path: Path) -> list[str]:
    """The ``id`` column of a GLDv2 metadata CSV (index.csv / test.csv)."""
    with io.StringIO(read_text_file(path), newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header or "id" not in [h.strip() for h in header]:
            raise ValueError(f"{path} row 1: expected a header with an 'id' column, got {header}")
        col = [h.strip() for h in header].index("id")
        ids = []
        for r, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) <= col or not _ID.fullmatch(row[col].strip()):
                raise ValueError(f"{path} row {r}: expected an image id (>= 3 letters / digits), got {row}")
            ids.append(row[col].strip())
    return ids


def _read_solution(path: Path) -> list[tuple[str, list[str], str, int]]:
    """Rows ``(test id, index ids, usage, row number)`` with matches, Public / Private only."""
    out = []
    with io.StringIO(read_text_file(path), newline="") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        if header[:3] != ["id", "images", "Usage"]:
            raise ValueError(f"{path} row 1: expected the header id,images,Usage, got {header}")
        for r, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != 3:
                raise ValueError(f"{path} row {r}: expected 3 fields (id, images, Usage), got {row}")
            test_id, images, usage = (c.strip() for c in row)
            if not _ID.fullmatch(test_id):
                raise ValueError(f"{path} row {r}: bad test image id {test_id!r}")
            if usage == "Ignored":
                continue
            if usage not in _USAGE:
                raise ValueError(f"{path} row {r}: Usage must be Public, Private or Ignored, got {usage!r}")
            matches = [] if images in ("", "None") else images.split()
            if not matches:
                continue
            bad = [m for m in matches if not _ID.fullmatch(m)]
            if bad:
                raise ValueError(f"{path} row {r}: bad index image ids {bad[:SHOW]}")
            out.append((test_id, list(dict.fromkeys(matches)), _USAGE[usage], r))
    return out


def load_gldv2(
    data_root: str | Path | None = None,
    *,
    split: str = "all",
    allow_missing: bool = False,
    check_images: bool = True,
) -> RetrievalDataset:
    """GLDv2 retrieval: test images with matches query the 761,757 index images.

    Args:
        data_root: folder holding ``gldv2/``; default :func:`~retrbench.utils.paths.default_data_root`.
        split: ``"public"``, ``"private"`` (the two published splits) or ``"all"`` (both pooled).
        allow_missing: drop absent images (and queries whose image is absent) instead of
            raising; the ground truth is re-indexed (an AP then divides by the matches left) and
            the counts go in notes.
        check_images: when False, do not look at the image files (ground truth only).
    """
    if split not in GLDV2_SPLITS:
        raise ValueError(f"gldv2: split must be one of {GLDV2_SPLITS}, got {split!r}")
    ddir = resolve_data_root(data_root) / "gldv2"
    sol_path, index_path, test_path = ddir / GLDV2_SOLUTION, ddir / "index.csv", ddir / "test.csv"
    for p in (sol_path, index_path):
        if not p.is_file():
            raise FileNotFoundError(f"gldv2: {p} not found; expected {_LAYOUT}")
    index_ids = _read_ids(index_path)
    position = {s: i for i, s in enumerate(index_ids)}
    if len(position) != len(index_ids):
        raise ValueError(f"{index_path}: {len(index_ids) - len(position)} repeated ids")
    rows = _read_solution(sol_path)
    n_with_matches = len(rows)
    if split != "all":
        rows = [r for r in rows if r[2] == split]
    test_ids = set(_read_ids(test_path)) if test_path.is_file() else None

    gnd, queries = [], []
    for test_id, matches, _, r in rows:
        where = f"{sol_path} row {r}"
        if test_ids is not None and test_id not in test_ids:
            raise ValueError(f"{where}: test image {test_id} is not in {test_path.name}")
        unknown = [m for m in matches if m not in position]
        if unknown:
            raise ValueError(f"{where}: index ids not in {index_path.name}: {unknown[:SHOW]}")
        gnd.append({"ok": np.array([position[m] for m in matches], dtype=np.int64), "junk": np.zeros(0, np.int64)})
        queries.append(Query(_image_path("test", test_id)))

    db_paths = [_image_path("index", s) for s in index_ids]
    keep_db = np.ones(len(db_paths), dtype=bool)
    keep_q = np.ones(len(queries), dtype=bool)
    if check_images:
        keep_db = existing_files(ddir, db_paths)
        keep_q = existing_files(ddir, [q.image for q in queries])
        missing = [p for p, k in zip(db_paths, keep_db, strict=True) if not k]
        missing += [q.image for q, k in zip(queries, keep_q, strict=True) if not k]
        if missing and not allow_missing:
            first = preview(missing)
            raise FileNotFoundError(
                f"gldv2: {len(missing)} of {len(db_paths) + len(queries)} images are missing under {ddir} "
                f"(first: {first}); expected layout: {_LAYOUT}. Pass allow_missing=True to drop them (the ground "
                "truth is re-indexed), or check_images=False to load the ground truth without the images."
            )

    split_note = {
        "all": "all: Public and Private test images pooled into one mean (published numbers are per split)",
        "public": "public: the Public test images (as the 'Public mAP@100' of the GLDv2 tables)",
        "private": "private: the Private test images (as the 'Private mAP@100' of the GLDv2 tables)",
    }[split]
    notes = {
        "protocol": "gldv2: mAP@100 (Kaggle GLDv2 retrieval / DELF MeanAveragePrecision) and mP@k, percent",
        "ground_truth": f"{sol_path.name} md5 {md5_file(sol_path)}",
        "split": f"{split_note}; {len(rows)} of {n_with_matches} test images with matches ('Ignored' / None left out)",
        "query_crop": "none: whole image",
        "query_in_database": "no: test images query the index set",
        "image_order": f"database in {index_path.name} order",
    }
    if test_ids is None:
        notes["test_ids_checked"] = f"no: {test_path.name} absent, test ids not checked against it"
    if not check_images:
        notes["images_checked"] = "no: check_images=False, image files were not looked at"
    return build_dataset(
        "gldv2", "gldv2", ddir, db_paths=db_paths, keep_db=keep_db, queries=queries, keep_q=keep_q, gnd=gnd, notes=notes
    )


@DATASETS.register(
    "gldv2",
    aliases=("gldv2-retrieval",),
    info=DatasetInfo(
        "gldv2",
        "gldv2/{index,test}.csv + retrieval_solution_v2.1.csv + gldv2/{index,test}/a/b/c/<id>.jpg",
        label="GLDv2",
        order=100,
        help="Google Landmarks v2 retrieval: 761,757 index images, test images with matches, mAP@100",
    ),
)
def gldv2(
    data_root: str | Path | None = None,
    *,
    split: str = "all",
    allow_missing: bool = False,
    check_images: bool = True,
) -> RetrievalDataset:
    """GLDv2 retrieval (v2.1 ground truth): test images with matches against the index set, mAP@100."""
    return load_gldv2(data_root, split=split, allow_missing=allow_missing, check_images=check_images)
