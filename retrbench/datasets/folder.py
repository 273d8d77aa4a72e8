"""A user's own benchmark: a folder of images plus a ground-truth file (``folder:PATH``).

Layout::

    PATH/**/<image>.<ext>                  the database: every image below PATH (recursive)
    PATH/groundtruth.csv  (or .json)       queries and their positives / junk (or ``gt=FILE``)

The database is every file below ``PATH`` whose extension is one of :data:`IMAGE_EXTENSIONS`
(case-insensitive), hidden files and folders (``.name``) excepted, sorted by their path relative
to ``PATH`` (``/``-separated). Image names in the ground truth are those relative paths; a bare
file name is accepted when exactly one image below ``PATH`` has it.

Ground truth, CSV (a header row, then one row per query-positive pair)::

    query,positive,junk,box
    q/eiffel_1.jpg,db/eiffel_07.jpg,,12 30 410 388
    q/eiffel_1.jpg,db/eiffel_11.jpg,db/eiffel_blurred.jpg,
    q/louvre_1.jpg,db/louvre_02.jpg,,

``positive`` and ``junk`` hold one image name each (either may be empty); ``junk`` and ``box``
columns are optional. Rows of the same ``query`` are merged, in order of first appearance; its
``box`` (``x0 y0 x1 y1``, original-image pixels) may be given on any of its rows but must not
differ between rows. A row naming only a query declares a query without positives.

Ground-truth files are UTF-8 (a byte-order mark is allowed); another encoding is an error
naming the file, the byte offset and the line of the first byte that is not UTF-8.

Ground truth, JSON: a list (or ``{"queries": [...]}``) of one object per query::

    [{"query": "q/eiffel_1.jpg", "positive": ["db/eiffel_07.jpg", "db/eiffel_11.jpg"],
      "junk": ["db/eiffel_blurred.jpg"], "box": [12, 30, 410, 388]}]

Here every entry is its own query (the same image may appear twice with different boxes).

Queries in the database (``queries_in_db``). A query image is normally also a file below
``PATH``:

* ``None`` (default, automatic): a query image leaves the database, unless the ground truth
  names it as a positive or junk image of some query (all-vs-all benchmarks, where every image
  is a query and the others of its group are its positives): then it stays.
* ``False``: every query image leaves the database; naming one as a positive is an error
  (naming one as junk is harmless: the entry is dropped).
* ``True``: every image stays in the database.

A query image that stays in the database is junk for its own query (ignored, neither a positive
nor a negative), so the trivial self-match never counts; a ground truth listing a query as its
own positive has that entry turned into junk (counted in notes). Protocol ``map``: mAP, mP@k,
R@k. Positives that are also listed as junk of the same query are an error.

``DATASETS.create("folder:PATH", gt=..., queries_in_db=..., allow_missing=...)`` builds one
through the registry's ``folder:`` resolver (a ``data_root`` passed along is ignored: the path
is the data).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..types import Query, RetrievalDataset
from ..utils.images import image_size
from ._common import SHOW, md5_file
from .base import DATASETS
from .groundtruth import read_text_file

__all__ = ["IMAGE_EXTENSIONS", "GT_NAMES", "load_folder", "scan_images"]

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
GT_NAMES = ("groundtruth.csv", "groundtruth.json")


# ----------------------------------------------------------------------------- image scan


def scan_images(folder: str | Path, extensions: frozenset[str] = IMAGE_EXTENSIONS) -> list[str]:
    """Sorted ``/``-separated paths, relative to ``folder``, of the image files below it (hidden ones skipped)."""
    folder = Path(folder)
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = Path(dirpath).relative_to(folder)
        for fn in filenames:
            if not fn.startswith(".") and os.path.splitext(fn)[1].lower() in extensions:
                out.append((rel_dir / fn).as_posix())
    return sorted(out)


# ----------------------------------------------------------------------------- ground truth parsing


@dataclass
class _Entry:
    """One query as read from the ground-truth file (names as written, not yet resolved)."""

    query: str
    where: str  # "<file> row 3" / "<file> entry 2", for messages
    box: tuple[float, float, float, float] | None = None
    box_where: str = ""
    positive: list[tuple[str, str]] = field(default_factory=list)  # (name, where)
    junk: list[tuple[str, str]] = field(default_factory=list)


def _clean_name(s: str) -> str:
    s = s.strip().replace("\\", "/")
    while s.startswith("./"):
        s = s[2:]
    return s


def _parse_box(value: Any, where: str) -> tuple[float, float, float, float] | None:
    """``x0 y0 x1 y1`` (a string of 4 numbers or a 4-list) -> floats; None when empty."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    tokens = value.replace(",", " ").split() if isinstance(value, str) else value
    if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Sequence):
        raise ValueError(f"{where}: box must be 4 numbers x0 y0 x1 y1, got {value!r}")
    try:
        box = tuple(float(t) for t in tokens)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: box must be 4 numbers x0 y0 x1 y1, got {value!r}") from None
    if len(box) != 4 or not all(np.isfinite(box)):
        raise ValueError(f"{where}: box must be 4 finite numbers x0 y0 x1 y1, got {value!r}")
    x0, y0, x1, y1 = box
    if x0 < 0 or y0 < 0 or x1 <= x0 or y1 <= y0:
        raise ValueError(
            f"{where}: bad box {box}: need 0 <= x0 < x1 and 0 <= y0 < y1 (corners x0 y0 x1 y1, not x y w h)"
        )
    return box  # type: ignore[return-value]


def _read_csv(path: Path) -> list[_Entry]:
    rows = list(csv.reader(io.StringIO(read_text_file(path), newline="")))
    if not rows:
        raise ValueError(f"{path}: empty ground-truth file (expected a header: query,positive[,junk][,box])")
    header = [h.strip().lower() for h in rows[0]]
    unknown = [h for h in header if h not in ("query", "positive", "junk", "box")]
    if "query" not in header or "positive" not in header or unknown:
        raise ValueError(
            f"{path} row 1: header must name the columns query, positive and optionally junk, box; got {rows[0]}"
        )
    col = {h: i for i, h in enumerate(header)}
    entries: dict[str, _Entry] = {}
    for r, row in enumerate(rows[1:], start=2):
        where = f"{path} row {r}"
        if not any(c.strip() for c in row):
            continue  # blank line
        if len(row) > len(header):
            raise ValueError(f"{where}: {len(row)} fields for {len(header)} columns ({', '.join(header)}): {row}")
        cell = {h: (row[i] if i < len(row) else "") for h, i in col.items()}
        q = _clean_name(cell["query"])
        if not q:
            raise ValueError(f"{where}: empty query name: {row}")
        e = entries.setdefault(q, _Entry(q, where))
        box = _parse_box(cell.get("box"), where)
        if box is not None:
            if e.box is not None and e.box != box:
                raise ValueError(f"{where}: box {box} of query {q!r} differs from {e.box} given on {e.box_where}")
            e.box, e.box_where = box, where
        for key in ("positive", "junk"):
            name = _clean_name(cell.get(key, ""))
            if name:
                getattr(e, key).append((name, where))
    return list(entries.values())


def _json_names(value: Any, key: str, where: str) -> list[tuple[str, str]]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}: {key!r} must be a list of image names, got {value!r}")
    return [(_clean_name(v), where) for v in value if _clean_name(v)]


def _read_json(path: Path) -> list[_Entry]:
    try:
        data = json.loads(read_text_file(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if isinstance(data, dict) and "queries" in data:
        data = data["queries"]
    if not isinstance(data, list):
        raise ValueError(
            f"{path}: expected a list of query objects (or {{'queries': [...]}}), got {type(data).__name__}"
        )
    entries = []
    for i, item in enumerate(data):
        where = f"{path} entry {i}"
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected an object with query, positive[, junk][, box], got {item!r}")
        unknown = sorted(set(item) - {"query", "positive", "junk", "box"})
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown} (allowed: query, positive, junk, box)")
        q = item.get("query")
        if not isinstance(q, str) or not _clean_name(q):
            raise ValueError(f"{where}: 'query' must be an image name, got {q!r}")
        e = _Entry(_clean_name(q), where, box=_parse_box(item.get("box"), where), box_where=where)
        e.positive = _json_names(item.get("positive"), "positive", where)
        e.junk = _json_names(item.get("junk"), "junk", where)
        entries.append(e)
    return entries


def _find_gt(folder: Path) -> Path:
    found = [folder / n for n in GT_NAMES if (folder / n).is_file()]
    if len(found) > 1:
        raise ValueError(f"{folder}: both {GT_NAMES[0]} and {GT_NAMES[1]} exist; pass gt= to choose one")
    if not found:
        raise FileNotFoundError(
            f"{folder}: no ground truth ({' or '.join(GT_NAMES)}); pass gt=FILE (CSV: query,positive[,junk][,box])"
        )
    return found[0]


# ----------------------------------------------------------------------------- loader


class _Resolver:
    """Maps ground-truth names to database paths: exact relative path, or a unique file name."""

    def __init__(self, images: Sequence[str]) -> None:
        self.exact = set(images)
        self.by_name: dict[str, list[str]] = {}
        for p in images:
            self.by_name.setdefault(p.rpartition("/")[2], []).append(p)

    def __call__(self, name: str, where: str) -> str | None:
        if name in self.exact:
            return name
        cands = self.by_name.get(name, []) if "/" not in name else []
        if len(cands) > 1:
            raise ValueError(f"{where}: image name {name!r} is ambiguous ({', '.join(cands[:SHOW])}); give its path")
        return cands[0] if cands else None


def _check_box_in_image(root: Path, image: str, box: tuple[float, float, float, float], where: str) -> None:
    """Boxes are in the pixels of the upright photo (EXIF orientation applied, as runs do for
    folders by default); only the header is read, so no pixel limit applies here."""
    try:
        w, h = image_size(root / image, exif=True, max_pixels=None)
    except (OSError, ValueError) as e:
        raise ValueError(f"{where}: cannot read query image {root / image} ({e})") from e
    if box[2] > w + 1e-6 or box[3] > h + 1e-6:
        raise ValueError(f"{where}: box {box} of {image} exceeds the image ({w} x {h} pixels)")


def load_folder(
    path: str | Path,
    gt: str | Path | None = None,
    *,
    allow_missing: bool = False,
    queries_in_db: bool | None = None,
) -> RetrievalDataset:
    """A benchmark from a folder of images and a CSV / JSON ground truth (see the module docstring).

    Args:
        path: the image folder; the database is every image below it.
        gt: ground-truth file; default ``<path>/groundtruth.csv`` or ``<path>/groundtruth.json``.
        allow_missing: drop ground-truth names not found below ``path`` (a query whose image is
            absent goes entirely) instead of raising; the counts go in notes.
        queries_in_db: ``None`` (automatic: a query image stays in the database only when the
            ground truth names it as some query's positive or junk), ``False`` (query images
            leave the database) or ``True`` (they stay). One that stays is junk for itself.

    Raises:
        FileNotFoundError: no folder, no images, no ground-truth file, or (unless
            ``allow_missing``) names not found, listing the file, row and first names.
        ValueError: malformed rows / entries, bad boxes, a positive also listed as junk,
            ``queries_in_db=False`` with a query image named as a positive.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"folder dataset: {root} is not a directory")
    gt_path = Path(gt).expanduser() if gt is not None else _find_gt(root)
    if not gt_path.is_file():
        raise FileNotFoundError(f"folder dataset: ground-truth file {gt_path} not found")
    suffix = gt_path.suffix.lower()
    if suffix not in (".csv", ".json"):
        raise ValueError(f"{gt_path}: ground truth must be a .csv or .json file")
    entries = _read_csv(gt_path) if suffix == ".csv" else _read_json(gt_path)

    all_images = scan_images(root)
    if not all_images:
        exts = " ".join(sorted(IMAGE_EXTENSIONS))
        raise FileNotFoundError(f"folder dataset: no images below {root} (extensions: {exts})")
    resolve = _Resolver(all_images)

    # resolve every name; collect the unknown ones with where they appear
    unknown: list[str] = []
    resolved: list[tuple[_Entry, str | None, list[str], list[str]]] = []
    for e in entries:
        q = resolve(e.query, e.where)
        if q is None:
            unknown.append(f"{e.query!r} (query, {e.where})")
        lists = []
        for key in ("positive", "junk"):
            names = []
            for n, w in getattr(e, key):
                p = resolve(n, w)
                if p is None:
                    unknown.append(f"{n!r} ({key}, {w})")
                else:
                    names.append(p)
            lists.append(list(dict.fromkeys(names)))
        resolved.append((e, q, lists[0], lists[1]))
    if unknown and not allow_missing:
        more = ", ..." if len(unknown) > SHOW else ""
        raise FileNotFoundError(
            f"folder dataset: {len(unknown)} ground-truth names are not images below {root}: "
            f"{'; '.join(unknown[:SHOW])}{more}. Names are paths relative to the folder (or a unique file name); "
            "pass allow_missing=True to drop them."
        )
    n_dropped_q = sum(1 for _, q, _, _ in resolved if q is None)
    resolved = [r for r in resolved if r[1] is not None]

    # self-positives become junk; positive-and-junk is an error
    n_self = 0
    cleaned: list[tuple[_Entry, str, list[str], list[str]]] = []
    for e, q, pos, junk in resolved:
        assert q is not None
        if q in pos:
            pos = [p for p in pos if p != q]
            n_self += 1
        both = sorted(set(pos) & set(junk))
        if both:
            raise ValueError(f"{e.where}: {both[:SHOW]} listed as both positive and junk of query {q!r}")
        cleaned.append((e, q, pos, junk))

    # which query images stay in the database
    query_images = {q for _, q, _, _ in cleaned}
    referenced = {p for _, _, pos, junk in cleaned for p in (*pos, *junk)}
    if queries_in_db is True:
        leave: set[str] = set()
    elif queries_in_db is False:
        named = sorted(query_images & {p for _, _, pos, _ in cleaned for p in pos})
        if named:
            raise ValueError(
                f"{gt_path}: queries_in_db=False removes query images from the database, but {len(named)} of them "
                f"are positives of other queries (first: {', '.join(named[:SHOW])}); use queries_in_db=True or None"
            )
        leave = set(query_images)
    else:
        leave = query_images - referenced
    images = tuple(p for p in all_images if p not in leave)
    index = {p: i for i, p in enumerate(images)}

    queries, gnd = [], []
    for e, q, pos, junk in cleaned:
        if e.box is not None:
            _check_box_in_image(root, q, e.box, e.box_where)
        junk_ids = [index[p] for p in junk if p in index]
        if q in index:
            junk_ids.append(index[q])
        queries.append(Query(q, bbox=e.box))
        gnd.append(
            {
                "ok": np.array([index[p] for p in pos if p in index], dtype=np.int64),
                "junk": np.array(list(dict.fromkeys(junk_ids)), dtype=np.int64),
            }
        )

    n_in_db = len(query_images - leave)
    policy = {None: "automatic (queries_in_db=None)", True: "queries_in_db=True", False: "queries_in_db=False"}
    notes = {
        "protocol": "map: mAP, mP@k and R@k over the queries with at least one positive",
        "ground_truth": f"{gt_path.name} md5 {md5_file(gt_path)}",
        "images": f"{len(images)} database images",
        "queries": f"{len(queries)} queries ({sum(q.bbox is not None for q in queries)} with a box)",
        "query_crop": "query cropped to its box (x0, y0, x1, y1, original-image pixels) where given; else whole image",
        "query_in_database": (
            f"{policy[queries_in_db]}: {n_in_db} of {len(query_images)} query images stay in the database "
            f"(junk for their own query), {len(leave)} left out"
        ),
        "image_order": f"every image below the folder ({', '.join(sorted(IMAGE_EXTENSIONS))}), sorted by relative path",
    }
    no_pos = sum(1 for g in gnd if g["ok"].size == 0)
    if no_pos:
        notes["queries_without_positives"] = f"{no_pos} queries have no positive in the database (left out of means)"
    if n_self:
        notes["self_positives"] = f"{n_self} queries listed themselves as a positive; counted as junk instead"
    if unknown:
        notes["missing"] = (
            f"allow_missing: {len(unknown)} ground-truth names not found were dropped ({n_dropped_q} queries)"
        )
    return RetrievalDataset(f"folder:{root.name}", root, images, tuple(queries), tuple(gnd), "map", notes, exif_orientation=True)


@DATASETS.resolver(
    "folder:",
    help="your images below PATH plus PATH/groundtruth.csv or .json (query,positive[,junk][,box]); "
    "options gt=FILE, queries_in_db=, allow_missing=",
)
def folder_dataset(
    path: str,
    data_root: str | Path | None = None,
    *,
    gt: str | Path | None = None,
    allow_missing: bool = False,
    queries_in_db: bool | None = None,
) -> RetrievalDataset:
    """``folder:PATH``: :func:`load_folder` on ``PATH`` (``data_root`` is accepted and ignored)."""
    del data_root  # the path names the data itself
    return load_folder(path, gt, allow_missing=allow_missing, queries_in_db=queries_in_db)
