"""Oxford5k and Paris6k: revisited (``roxford5k``, ``rparis6k``) and classic (``oxford5k``, ``paris6k``).

Layouts under the data root (``<root>``, default :func:`~retrbench.utils.paths.default_data_root`)::

    <root>/roxford5k/gnd_roxford5k.pkl        revisitop ground truth (Radenovic et al. 2018)
    <root>/roxford5k/jpg/<name>.jpg           the images (same for rparis6k)
    <root>/oxford5k/gnd_oxford5k.pkl          classic ground truth as a pickle (cirtorch style) ...
    <root>/oxford5k/groundtruth/*_query.txt   ... or the original list files (*_good/_ok/_junk.txt)
    <root>/oxford5k/jpg/<name>.jpg            the images (same for paris6k)

Images may also sit in sub-folders of ``jpg/`` (the original Paris archive unpacks to
``paris/<landmark>/<name>.jpg``): a name not found directly in ``jpg/`` is looked up below it,
the shallowest match winning.

Protocols:

* revisited: queries are the ``qimlist`` images cropped to their ``bbx``; they are not in the
  database. Ground truth per query: ``easy``, ``hard``, ``junk``.
* classic: queries are cropped to their box and stay in the database, where they count as
  their own positive (they are in their ``good`` list). Ground truth per query: ``ok``
  (good + ok) and ``junk``.

Real files checked (``../shared/data``): ``gnd_oxford5k.pkl`` lists 5063 images and 55 queries,
``gnd_paris6k.pkl`` 6392 images and 55 queries; every query is in ``imlist`` and inside its
own ``ok`` list. The revisited files list the same images minus their 70 queries (4993 and
6322), in the same order, and their first 55 queries are the classic 55 with the same boxes.
Of the 6412 images of the Paris archive, the 20 known-corrupt files
(``https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/corrupt.txt``) are in neither Paris
pickle; the list-file loader leaves them out too (``exclude_corrupt=True``) so both sources give
the same 6392-image database.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from ..types import Query, RetrievalDataset
from ._common import SHOW, as_bbox, build_dataset, md5_file, preview, resolve_data_root
from .base import DATASETS, DatasetInfo
from .groundtruth import load_gnd_pickle, read_text_file

__all__ = ["PARIS_CORRUPT", "load_revisited", "load_classic"]

# The 20 unreadable files of the Paris archive (an HTML error page saved as .jpg).
PARIS_CORRUPT: frozenset[str] = frozenset(
    {
        "paris_louvre_000136",
        "paris_louvre_000146",
        "paris_moulinrouge_000422",
        "paris_museedorsay_001059",
        "paris_notredame_000188",
        "paris_pantheon_000284",
        "paris_pantheon_000960",
        "paris_pantheon_000974",
        "paris_pompidou_000195",
        "paris_pompidou_000196",
        "paris_pompidou_000201",
        "paris_pompidou_000467",
        "paris_pompidou_000640",
        "paris_sacrecoeur_000299",
        "paris_sacrecoeur_000330",
        "paris_sacrecoeur_000353",
        "paris_triomphe_000662",
        "paris_triomphe_000833",
        "paris_triomphe_000863",
        "paris_triomphe_000867",
    }
)

_REVISITED_KEYS = ("easy", "hard", "junk")
_CLASSIC_KEYS = ("ok", "junk")


# ----------------------------------------------------------------------------- helpers


def _scan_jpgs(jpg_dir: Path) -> dict[str, str]:
    """Map image stem -> path relative to ``jpg_dir`` for every ``*.jpg`` below it (shallowest wins)."""
    found: dict[str, tuple[int, str]] = {}
    if not jpg_dir.is_dir():
        return {}
    for dirpath, dirnames, filenames in os.walk(jpg_dir, followlinks=True):
        dirnames.sort()
        rel_dir = Path(dirpath).relative_to(jpg_dir)
        depth = len(rel_dir.parts)
        for fn in sorted(filenames):
            if not fn.endswith(".jpg"):
                continue
            stem = fn[: -len(".jpg")]
            rel = (rel_dir / fn).as_posix()
            if stem not in found or depth < found[stem][0]:
                found[stem] = (depth, rel)
    return {k: v[1] for k, v in found.items()}


def _locate(jpg_dir: Path, names: Iterable[str]) -> dict[str, str]:
    """``name -> relative path`` for the names whose ``.jpg`` exists under ``jpg_dir``."""
    names = list(names)
    located = {n: f"{n}.jpg" for n in names if (jpg_dir / f"{n}.jpg").is_file()}
    if len(located) < len(set(names)) and jpg_dir.is_dir():
        if any(p.is_dir() for p in jpg_dir.iterdir()):  # per-landmark sub-folders
            index = _scan_jpgs(jpg_dir)
            located.update({n: index[n] for n in names if n not in located and n in index})
    return located


def _as_index(values: object, n: int, where: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.int64).reshape(-1)
    if arr.size and (arr.min() < 0 or arr.max() >= n):
        raise ValueError(f"{where}: index out of range [0, {n}) ({arr.min()}..{arr.max()})")
    return arr


def _missing_error(name: str, missing: Sequence[str], total: int, jpg_dir: Path, layout: str) -> FileNotFoundError:
    first = preview(f"{m}.jpg" for m in missing)
    return FileNotFoundError(
        f"{name}: {len(missing)} of {total} images are missing under {jpg_dir} (first: {first}); "
        f"expected layout: {layout}. Pass allow_missing=True to drop them (the ground truth is "
        "re-indexed), or check_images=False to load the ground truth without the images."
    )


# ----------------------------------------------------------------------------- revisited


def load_revisited(
    name: str,
    data_root: str | Path | None = None,
    *,
    allow_missing: bool = False,
    check_images: bool = True,
) -> RetrievalDataset:
    """Revisited Oxford / Paris (``roxford5k`` or ``rparis6k``) from the revisitop layout.

    Args:
        name: ``roxford5k`` or ``rparis6k``.
        data_root: folder holding ``<name>/``; default :func:`~retrbench.utils.paths.default_data_root`.
        allow_missing: drop absent images (and queries whose image is absent) instead of raising;
            the ground truth is re-indexed to the remaining database and the count goes in notes.
        check_images: when False, do not look at the image files at all (ground truth only;
            paths are ``<name>.jpg`` as listed), e.g. to inspect the benchmark without its images.
    """
    ddir = resolve_data_root(data_root) / name
    gnd_path = ddir / f"gnd_{name}.pkl"
    layout = f"<data_root>/{name}/gnd_{name}.pkl and <data_root>/{name}/jpg/<image>.jpg (revisitop layout)"
    if not gnd_path.is_file():
        raise FileNotFoundError(f"{name}: ground-truth file {gnd_path} not found; expected {layout}")
    data = load_gnd_pickle(gnd_path)
    imlist = [str(s) for s in data["imlist"]]
    qimlist = [str(s) for s in data["qimlist"]]
    n = len(imlist)
    gnd: list[dict[str, np.ndarray]] = []
    boxes = []
    for i, g in enumerate(data["gnd"]):
        where = f"{gnd_path} query {i} ({qimlist[i]})"
        absent = [k for k in (*_REVISITED_KEYS, "bbx") if k not in g]
        if absent:
            raise ValueError(f"{where}: ground truth lacks {absent} (revisited needs easy, hard, junk, bbx)")
        gnd.append({k: _as_index(g[k], n, f"{where} {k}") for k in _REVISITED_KEYS})
        boxes.append(as_bbox(g["bbx"], f"{where} bbx"))

    jpg_dir = ddir / "jpg"
    db_paths = [f"{s}.jpg" for s in imlist]
    q_paths = [f"{s}.jpg" for s in qimlist]
    keep_db = np.ones(n, dtype=bool)
    keep_q = np.ones(len(qimlist), dtype=bool)
    if check_images:
        located = _locate(jpg_dir, imlist + qimlist)
        missing = [s for s in imlist + qimlist if s not in located]
        if missing and not allow_missing:
            raise _missing_error(name, missing, n + len(qimlist), jpg_dir, layout)
        db_paths = [located.get(s, p) for s, p in zip(imlist, db_paths, strict=True)]
        q_paths = [located.get(s, p) for s, p in zip(qimlist, q_paths, strict=True)]
        keep_db = np.array([s in located for s in imlist], dtype=bool)
        keep_q = np.array([s in located for s in qimlist], dtype=bool)

    queries = [Query(p, bbox=b) for p, b in zip(q_paths, boxes, strict=True)]
    notes = {
        "protocol": "revisited (Radenovic et al. 2018): easy / medium / hard splits",
        "ground_truth": f"{gnd_path.name} md5 {md5_file(gnd_path)}",
        "query_crop": "query cropped to its gnd bbx (x0, y0, x1, y1, original-image pixels)",
        "query_resize": "set by the extraction config (query_resize: crop = resize the crop, as cirtorch)",
        "query_in_database": "no: the 70 query images are not database images",
        "image_order": "database in gnd imlist order",
    }
    if not check_images:
        notes["images_checked"] = "no: check_images=False, image files were not looked at"
    return build_dataset(
        name,
        "revisited",
        jpg_dir,
        db_paths=db_paths,
        keep_db=keep_db,
        queries=queries,
        keep_q=keep_q,
        gnd=gnd,
        notes=notes,
    )


# ----------------------------------------------------------------------------- classic


def _natural_key(s: str) -> list[object]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _read_names(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"ground-truth list {path} not found (each *_query.txt needs _good, _ok, _junk lists)")
    out = []
    for token in read_text_file(path).split():
        s = token
        if s.endswith(".jpg"):
            s = s[: -len(".jpg")]
        if s:
            out.append(s)
    return out


def _parse_lists(gt_dir: Path) -> tuple[list[str], list[tuple[float, float, float, float]], list[dict[str, list[str]]]]:
    """Read original Oxford Buildings list files: query image names, boxes and name lists per query."""
    qfiles = sorted(gt_dir.glob("*_query.txt"), key=lambda p: _natural_key(p.name))
    if not qfiles:
        raise FileNotFoundError(f"{gt_dir}: no *_query.txt files (expected the original *_query/_good/_ok/_junk.txt)")
    qnames, boxes, lists = [], [], []
    for qf in qfiles:
        stem = qf.name[: -len("_query.txt")]
        tokens = read_text_file(qf).split()
        if len(tokens) < 5:
            raise ValueError(f"{qf}: expected '<image> x0 y0 x1 y1', got {' '.join(tokens)!r}")
        img = tokens[0]
        img = img[len("oxc1_") :] if img.startswith("oxc1_") else img
        img = img[: -len(".jpg")] if img.endswith(".jpg") else img
        qnames.append(img)
        boxes.append(as_bbox([float(t) for t in tokens[1:5]], str(qf)))
        good, ok, junk = (_read_names(gt_dir / f"{stem}_{kind}.txt") for kind in ("good", "ok", "junk"))
        lists.append({"ok": list(dict.fromkeys(good + ok)), "junk": list(dict.fromkeys(junk))})
    return qnames, boxes, lists


def load_classic(
    name: str,
    data_root: str | Path | None = None,
    *,
    allow_missing: bool = False,
    check_images: bool = True,
    exclude_corrupt: bool = True,
) -> RetrievalDataset:
    """Classic Oxford5k / Paris6k (``oxford5k`` or ``paris6k``) from a gnd pickle or the original lists.

    The ground truth is ``<name>/gnd_<name>.pkl`` when present, else the original list files in
    ``<name>/groundtruth/``; from lists, the database is every ``*.jpg`` under ``<name>/jpg/``
    (sub-folders included), sorted by name.

    Args:
        name: ``oxford5k`` or ``paris6k``.
        data_root: folder holding ``<name>/``; default :func:`~retrbench.utils.paths.default_data_root`.
        allow_missing: drop absent images (and queries whose image is absent; with lists, also
            names the lists mention that are not on disk) instead of raising; the ground truth is
            re-indexed and the counts go in notes.
        check_images: when False, do not look at the image files (pickle only).
        exclude_corrupt: list files only: leave the 20 known-corrupt Paris images out of the
            database, as the public pickles do.
    """
    ddir = resolve_data_root(data_root) / name
    gnd_path = ddir / f"gnd_{name}.pkl"
    gt_dir = ddir / "groundtruth"
    layout = (
        f"<data_root>/{name}/gnd_{name}.pkl (or the original list files in <data_root>/{name}/groundtruth/) "
        f"and <data_root>/{name}/jpg/<image>.jpg"
    )
    if gnd_path.is_file():
        return _classic_from_pickle(name, ddir, gnd_path, layout, allow_missing, check_images)
    if gt_dir.is_dir():
        if not check_images:
            raise ValueError(
                f"{name}: check_images=False needs {gnd_path}; from the list files in {gt_dir} the database "
                "is the images found on disk"
            )
        return _classic_from_lists(name, ddir, gt_dir, layout, allow_missing, exclude_corrupt)
    raise FileNotFoundError(f"{name}: no ground truth: neither {gnd_path} nor {gt_dir}/ exists; expected {layout}")


def _classic_notes(source: str) -> dict[str, str]:
    return {
        "protocol": "classic (Philbin et al. 2007): positives = good + ok, junk ignored",
        "ground_truth": source,
        "query_crop": "query cropped to its box (x0, y0, x1, y1, original-image pixels)",
        "query_resize": "set by the extraction config (query_resize: crop = resize the crop, as cirtorch)",
        "query_in_database": "yes: each query image is also a database image and one of its own positives",
    }


def _classic_from_pickle(
    name: str, ddir: Path, gnd_path: Path, layout: str, allow_missing: bool, check_images: bool
) -> RetrievalDataset:
    data = load_gnd_pickle(gnd_path)
    imlist = [str(s) for s in data["imlist"]]
    qimlist = [str(s) for s in data["qimlist"]]
    n = len(imlist)
    position = {s: i for i, s in enumerate(imlist)}
    not_in_db = [q for q in qimlist if q not in position]
    if not_in_db:
        raise ValueError(f"{gnd_path}: classic queries must be database images; not in imlist: {not_in_db[:SHOW]}")
    gnd: list[dict[str, np.ndarray]] = []
    boxes = []
    for i, g in enumerate(data["gnd"]):
        where = f"{gnd_path} query {i} ({qimlist[i]})"
        absent = [k for k in (*_CLASSIC_KEYS, "bbx") if k not in g]
        if absent:
            raise ValueError(f"{where}: ground truth lacks {absent} (classic needs ok, junk, bbx)")
        gnd.append({k: _as_index(g[k], n, f"{where} {k}") for k in _CLASSIC_KEYS})
        boxes.append(as_bbox(g["bbx"], f"{where} bbx"))

    jpg_dir = ddir / "jpg"
    db_paths = [f"{s}.jpg" for s in imlist]
    keep_db = np.ones(n, dtype=bool)
    if check_images:
        located = _locate(jpg_dir, imlist)
        missing = [s for s in imlist if s not in located]
        if missing and not allow_missing:
            raise _missing_error(name, missing, n, jpg_dir, layout)
        db_paths = [located.get(s, p) for s, p in zip(imlist, db_paths, strict=True)]
        keep_db = np.array([s in located for s in imlist], dtype=bool)
    qpos = [position[q] for q in qimlist]
    queries = [Query(db_paths[p], bbox=b) for p, b in zip(qpos, boxes, strict=True)]
    keep_q = keep_db[qpos] if qpos else np.ones(0, dtype=bool)
    notes = _classic_notes(f"{gnd_path.name} md5 {md5_file(gnd_path)}")
    notes["image_order"] = "database in gnd imlist order"
    if not check_images:
        notes["images_checked"] = "no: check_images=False, image files were not looked at"
    return build_dataset(
        name,
        "classic",
        jpg_dir,
        db_paths=db_paths,
        keep_db=keep_db,
        queries=queries,
        keep_q=keep_q,
        gnd=gnd,
        notes=notes,
    )


def _classic_from_lists(
    name: str, ddir: Path, gt_dir: Path, layout: str, allow_missing: bool, exclude_corrupt: bool
) -> RetrievalDataset:
    jpg_dir = ddir / "jpg"
    index = _scan_jpgs(jpg_dir)
    excluded = set(PARIS_CORRUPT) if exclude_corrupt else set()
    names = sorted(s for s in index if s not in excluded)
    if not names:
        raise FileNotFoundError(f"{name}: no images found under {jpg_dir}; expected {layout}")
    position = {s: i for i, s in enumerate(names)}

    qnames, boxes, lists = _parse_lists(gt_dir)
    referenced = list(dict.fromkeys([*qnames, *(s for d in lists for v in d.values() for s in v)]))
    missing = [s for s in referenced if s not in position and s not in excluded]
    if missing and not allow_missing:
        raise _missing_error(name, missing, len(referenced), jpg_dir, layout)

    keep_q = np.array([q in position for q in qnames], dtype=bool)
    gnd = [
        {k: np.array(sorted(position[s] for s in v if s in position), dtype=np.int64) for k, v in d.items()}
        for d in lists
    ]
    queries = [Query(index[q] if q in index else f"{q}.jpg", bbox=b) for q, b in zip(qnames, boxes, strict=True)]
    db_paths = [index[s] for s in names]
    notes = _classic_notes(f"original list files in {gt_dir.name}/ ({len(qnames)} *_query.txt)")
    notes["image_order"] = f"database = every *.jpg under {jpg_dir.name}/, sorted by name"
    on_disk = sum(1 for s in index if s in excluded)
    mentioned = sum(1 for s in referenced if s in excluded)
    if on_disk or mentioned:
        notes["corrupt"] = (
            f"known-corrupt Paris images left out of the database ({on_disk} on disk, {mentioned} named "
            "in the lists, whose mentions are ignored)"
        )
    if missing:
        notes["missing_references"] = (
            f"allow_missing: {len(missing)} images named by the lists are not on disk and were left out"
        )
    keep_db = np.ones(len(names), dtype=bool)
    return build_dataset(
        name,
        "classic",
        jpg_dir,
        db_paths=db_paths,
        keep_db=keep_db,
        queries=queries,
        keep_q=keep_q,
        gnd=gnd,
        notes=notes,
    )


# ----------------------------------------------------------------------------- registry
# ``order``: the paper's dataset order (Oxford 5k, Paris 6k, INSTRE, rOxford 5k, rParis 6k, ...).

_REV_LAYOUT = "{0}/gnd_{0}.pkl + {0}/jpg/<name>.jpg"
_CLS_LAYOUT = "{0}/gnd_{0}.pkl or {0}/groundtruth/*_query|good|ok|junk.txt, + {0}/jpg/<name>.jpg"


@DATASETS.register(
    "roxford5k",
    aliases=("roxford",),
    info=DatasetInfo(
        "revisited",
        _REV_LAYOUT.format("roxford5k"),
        resize="cirtorch",  # as cirtorch / revisitop (InsCLR: the same ImagesFromList)
        label="rOxford 5k",
        order=40,
        help="Revisited Oxford: 4993 images, 70 cropped queries",
    ),
)
def roxford5k(
    data_root: str | Path | None = None, *, allow_missing: bool = False, check_images: bool = True
) -> RetrievalDataset:
    """Revisited Oxford5k (4993 images, 70 queries cropped to their box, easy/medium/hard)."""
    return load_revisited("roxford5k", data_root, allow_missing=allow_missing, check_images=check_images)


@DATASETS.register(
    "rparis6k",
    aliases=("rparis",),
    info=DatasetInfo(
        "revisited",
        _REV_LAYOUT.format("rparis6k"),
        resize="cirtorch",  # as cirtorch / revisitop (InsCLR: the same ImagesFromList)
        label="rParis 6k",
        order=50,
        help="Revisited Paris: 6322 images, 70 cropped queries",
    ),
)
def rparis6k(
    data_root: str | Path | None = None, *, allow_missing: bool = False, check_images: bool = True
) -> RetrievalDataset:
    """Revisited Paris6k (6322 images, 70 queries cropped to their box, easy/medium/hard)."""
    return load_revisited("rparis6k", data_root, allow_missing=allow_missing, check_images=check_images)


@DATASETS.register(
    "oxford5k",
    info=DatasetInfo(
        "classic",
        _CLS_LAYOUT.format("oxford5k"),
        resize="cirtorch",  # as cirtorch / revisitop (InsCLR: the same ImagesFromList)
        label="Oxford 5k",
        order=10,
        help="Oxford Buildings: 5063 images, 55 cropped queries",
    ),
)
def oxford5k(
    data_root: str | Path | None = None,
    *,
    allow_missing: bool = False,
    check_images: bool = True,
    exclude_corrupt: bool = True,
) -> RetrievalDataset:
    """Classic Oxford5k (5063 images, 55 queries cropped to their box, queries in the database)."""
    return load_classic(
        "oxford5k", data_root, allow_missing=allow_missing, check_images=check_images, exclude_corrupt=exclude_corrupt
    )


@DATASETS.register(
    "paris6k",
    info=DatasetInfo(
        "classic",
        _CLS_LAYOUT.format("paris6k"),
        resize="cirtorch",  # as cirtorch / revisitop (InsCLR: the same ImagesFromList)
        label="Paris 6k",
        order=20,
        help="Paris: 6392 images (20 corrupt left out), 55 queries",
    ),
)
def paris6k(
    data_root: str | Path | None = None,
    *,
    allow_missing: bool = False,
    check_images: bool = True,
    exclude_corrupt: bool = True,
) -> RetrievalDataset:
    """Classic Paris6k (6392 images, 55 queries cropped to their box, queries in the database)."""
    return load_classic(
        "paris6k", data_root, allow_missing=allow_missing, check_images=check_images, exclude_corrupt=exclude_corrupt
    )
