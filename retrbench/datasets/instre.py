"""INSTRE (Wang and Jiang 2015) with the retrieval protocol of Iscen et al. 2017 (``instre``).

Layout::

    <root>/instre/gnd_instre.mat            ground truth of Iscen et al. (MATLAB v5 file, ~200 KB)
    <root>/instre/<imlist / qimlist path>   the images, e.g. INSTRE-S1/<class>/<n>.jpg

The ground truth is the file distributed with the diffusion code of Iscen et al. (CVPR 2017,
``ftp://ftp.irisa.fr/local/texmex/corpus/instre/gnd_instre.mat``, also in their
``test_script.zip``). What this loader relies on, and where it was found:

* Variables ``imlist`` (1 x 27293 cell of paths), ``qimlist`` (1 x 1250 cell of paths) and
  ``gnd`` (1 x 1250 struct with fields ``ok`` and ``bbx``): read as
  ``mat["imlist"][0][i][0]``, ``mat["gnd"][0][i][0]`` / ``[1]`` by the public readers in OS2D
  (``os2d/data/dataset.py``, ``build_instre_dataset``) and VISSL (``InstreDataset``). Paths are
  relative to the dataset folder and include the extension (OS2D derives the ``.txt`` box file
  from them; VISSL opens ``<base_dir>/<imlist[i]>``).
* The readers disagree on the id base and the box format, so both are **detected from the file**
  (``id_base="auto"``, ``bbox_format="auto"``, the defaults) and the decision and its reason are
  written into the dataset notes (and so into every result row):

  - Iscen et al.'s MATLAB file, as OS2D and VISSL read it: ``ok`` holds **1-based** indices
    (OS2D subtracts 1, "WARNING - 1-based"; VISSL ``gnd[i][0][0] - 1``) and ``bbx`` is
    **corners** ``(x0, y0, x1, y1)`` (OS2D: "the matlab file has boxes in x1, y1, x2, y2, but the
    .txt files [of INSTRE] in x, y, w, h"; the ``gnd(i).bbx`` convention of the same authors'
    Oxford ground truth).
  - The InsCLR authors' evaluator (justforforfor/insclr,
    ``benchmark/evaluation/instre_evaluation.py``) reads ``bbx`` as ``(x, y, w, h)`` and turns it
    into corners, and uses ``ok`` directly as 0-based indices: a file in that convention (as
    written from INSTRE's own ``.txt`` boxes, which are x, y, w, h) is 0-based and ``xywh``.

  Id base: an index 0 means 0-based, an index equal to ``len(imlist)`` means 1-based (both:
  an error); neither: 1-based (the MATLAB file), noted as assumed. Box format: a box whose
  "corners" are not ordered rules out ``xyxy``; with the images at hand, boxes must lie inside
  their query image (1 pixel of slack), which rules one reading out whenever a box is near the
  right or bottom edge; when both readings fit every box, the convention that goes with the id
  base decides (1-based: ``xyxy``, 0-based: ``xywh``), noted as such. Either can be forced.
* Queries are **not** database images: INSTRE has 11,011 (S1) + 12,059 (S2) + 5,473 (M) =
  28,543 images (dataset homepage), and 27,293 + 1,250 = 28,543; Iscen et al. hold out 5 images
  per class of the 250 classes (100 S1 + 100 S2 + 50 M) as queries. The diffusion code's
  ``compute_map`` uses ``gnd(i).ok`` and no junk. Should a query path also appear in ``imlist``
  (not the case in the public file), it is made junk for its own query and noted.

Protocol ``map``: queries cropped to ``bbx`` (``crop_queries=True``, as OS2D and the diffusion
code's Oxford/Paris setup; VISSL uses the whole image), positives ``ok``, junk empty; mAP by the
same trapezoidal AP as Iscen et al.'s ``compute_map.m`` and the revisitop reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..types import Query, RetrievalDataset
from ._common import as_bbox, build_dataset, existing_files, md5_file, preview, resolve_data_root
from .base import DATASETS, DatasetInfo

__all__ = ["load_instre", "INSTRE_IMAGES", "INSTRE_QUERIES"]

INSTRE_IMAGES = 27293
INSTRE_QUERIES = 1250
_LAYOUT = "<data_root>/instre/gnd_instre.mat and <data_root>/instre/<imlist path> (e.g. INSTRE-S1/...)"


def _read_mat(path: Path) -> dict[str, Any]:
    """``scipy.io.loadmat`` of a v4/v5/v7 file; a clear error for v7.3 (HDF5)."""
    from scipy.io import loadmat
    from scipy.io.matlab import matfile_version

    try:
        major, _ = matfile_version(str(path))
    except Exception as e:  # scipy raises ValueError / MatReadError for non-MAT files
        raise ValueError(f"{path}: not a MATLAB .mat file ({e})") from e
    if major == 2:
        raise ValueError(
            f"{path}: MATLAB v7.3 (HDF5) file, which scipy.io.loadmat cannot read; the public gnd_instre.mat is "
            "v5: re-download it, or re-save it in MATLAB with save(..., '-v7')"
        )
    return loadmat(str(path))


def _strings(arr: Any, where: str) -> list[str]:
    """A MATLAB cell array of strings (as loadmat returns it) -> list of str."""
    out = []
    for i, item in enumerate(np.asarray(arr, dtype=object).reshape(-1)):
        a = np.asarray(item).reshape(-1)
        if a.size == 0:
            raise ValueError(f"{where}[{i}]: empty image path")
        if a.dtype.kind not in "US":
            raise ValueError(f"{where}[{i}]: expected a string, got {a.dtype}")
        out.append("".join(str(s) for s in a))
    return out


def _field(g: np.void, name: str, where: str) -> np.ndarray:
    if g.dtype.names is None or name not in g.dtype.names:
        raise ValueError(f"{where}: gnd struct lacks field {name!r} (has {g.dtype.names})")
    return np.asarray(g[name])


def _id_base(oks: list[np.ndarray], n: int, forced: str | int, path: Path) -> tuple[int, str]:
    """``(0 or 1, why)``: the base of the ``ok`` indices (module docstring)."""
    if forced != "auto":
        return int(forced), "given"
    ids = np.concatenate(oks) if oks else np.zeros(0, np.int64)
    has0, hasn = bool(ids.size and ids.min() == 0), bool(ids.size and ids.max() == n)
    if has0 and hasn:
        raise ValueError(f"{path}: ok indices span 0..{n}: neither 0-based nor 1-based for {n} images")
    if has0:
        return 0, "an index 0 occurs"
    if hasn:
        return 1, f"an index {n} occurs"
    return 1, "assumed: no index 0 or N occurs; the MATLAB convention"


def _query_sizes(ddir: Path, qimlist: list[str]) -> list[tuple[int, int] | None]:
    from ..utils.images import image_size

    out: list[tuple[int, int] | None] = []
    for q in qimlist:
        try:
            out.append(image_size(ddir / q, max_pixels=None))
        except (OSError, ValueError):
            out.append(None)
    return out


def _box_format(
    raw: list[tuple[float, float, float, float]], sizes: list[tuple[int, int] | None] | None, forced: str, base: int
) -> tuple[str, str]:
    """``("xyxy" | "xywh", why)`` for the boxes of the file (module docstring)."""
    if forced != "auto":
        return forced, "given"
    ordered = all(b[0] < b[2] and b[1] < b[3] for b in raw)
    if not ordered:
        return "xywh", "some boxes are not ordered corners"
    if sizes is not None and any(s is not None for s in sizes):
        fits = {"xyxy": True, "xywh": True}
        for b, sz in zip(raw, sizes, strict=True):
            if sz is None:
                continue
            w, h = sz
            fits["xyxy"] &= b[2] <= w + 1 and b[3] <= h + 1
            fits["xywh"] &= b[0] + b[2] <= w + 1 and b[1] + b[3] <= h + 1
        if fits["xyxy"] != fits["xywh"]:
            good = "xyxy" if fits["xyxy"] else "xywh"
            return good, f"only the {good} reading keeps every box inside its query image"
    pick = "xyxy" if base == 1 else "xywh"
    return pick, f"both readings fit; {base}-based ids go with {pick} files"


def load_instre(
    data_root: str | Path | None = None,
    *,
    allow_missing: bool = False,
    check_images: bool = True,
    crop_queries: bool = True,
    bbox_format: str = "auto",
    id_base: str | int = "auto",
) -> RetrievalDataset:
    """INSTRE from ``<data_root>/instre/gnd_instre.mat`` (1250 queries, 27293 database images).

    Args:
        data_root: folder holding ``instre/``; default :func:`~retrbench.utils.paths.default_data_root`.
        allow_missing: drop absent images (and queries whose image is absent) instead of
            raising; the ground truth is re-indexed and the counts go in notes.
        check_images: when False, do not look at the image files (ground truth only).
        crop_queries: crop each query to its ``bbx`` (default) or use the whole query image.
        bbox_format: how ``bbx`` is stored: ``"auto"`` (detected, see the module docstring),
            ``"xyxy"`` (corners) or ``"xywh"`` (converted to corners).
        id_base: ``"auto"`` (detected), 1 (MATLAB) or 0: the base of the ``ok`` indices.
    """
    if bbox_format not in ("auto", "xyxy", "xywh"):
        raise ValueError(f"instre: bbox_format must be 'auto', 'xyxy' or 'xywh', got {bbox_format!r}")
    if id_base not in ("auto", 0, 1):
        raise ValueError(f"instre: id_base must be 'auto', 0 or 1, got {id_base!r}")
    ddir = resolve_data_root(data_root) / "instre"
    gnd_path = ddir / "gnd_instre.mat"
    if not gnd_path.is_file():
        raise FileNotFoundError(f"instre: ground-truth file {gnd_path} not found; expected {_LAYOUT}")
    mat = _read_mat(gnd_path)
    absent = [k for k in ("imlist", "qimlist", "gnd") if k not in mat]
    if absent:
        raise ValueError(
            f"{gnd_path}: lacks variables {absent} (has {sorted(k for k in mat if not k.startswith('__'))})"
        )
    imlist = _strings(mat["imlist"], f"{gnd_path} imlist")
    qimlist = _strings(mat["qimlist"], f"{gnd_path} qimlist")
    entries = np.asarray(mat["gnd"]).reshape(-1)
    if len(entries) != len(qimlist):
        raise ValueError(f"{gnd_path}: {len(entries)} gnd entries for {len(qimlist)} queries")
    n = len(imlist)
    position = {s: i for i, s in enumerate(imlist)}

    oks, raw = [], []
    for i, g in enumerate(entries):
        where = f"{gnd_path} gnd({i + 1}) ({qimlist[i]})"
        ok = _field(g, "ok", where).reshape(-1).astype(np.float64)
        if ok.size and np.any(np.mod(ok, 1) != 0):
            raise ValueError(f"{where} ok: expected integer indices, got {ok[np.mod(ok, 1) != 0][:3]}")
        oks.append(ok.astype(np.int64))
        raw.append(as_bbox(_field(g, "bbx", where), f"{where} bbx"))
    base, base_why = _id_base(oks, n, id_base, gnd_path)
    sizes = _query_sizes(ddir, qimlist) if check_images and bbox_format == "auto" else None
    fmt, fmt_why = _box_format(raw, sizes, bbox_format, base)

    gnd: list[dict[str, np.ndarray]] = []
    boxes: list[tuple[float, float, float, float]] = []
    for i, (ok, box) in enumerate(zip(oks, raw, strict=True)):
        where = f"{gnd_path} gnd({i + 1}) ({qimlist[i]})"
        if ok.size and (ok.min() < base or ok.max() > n - 1 + base):
            raise ValueError(f"{where} ok: expected {base}-based indices in [{base}, {n - 1 + base}], got {ok.min()}..{ok.max()}")
        if fmt == "xywh":
            box = (box[0], box[1], box[0] + box[2], box[1] + box[3])
        if not (box[0] < box[2] and box[1] < box[3]):
            raise ValueError(
                f"{where} bbx: {box} is not (x0, y0, x1, y1) with x0 < x1 and y0 < y1"
                + ("; if the file stores (x, y, w, h), pass bbox_format='xywh'" if fmt == "xyxy" else "")
            )
        self_idx = [position[qimlist[i]]] if qimlist[i] in position else []
        gnd.append({"ok": ok - base, "junk": np.array(self_idx, dtype=np.int64)})
        boxes.append(box)
    n_q_in_db = sum(1 for q in qimlist if q in position)

    keep_db = np.ones(n, dtype=bool)
    keep_q = np.ones(len(qimlist), dtype=bool)
    if check_images:
        keep_db = existing_files(ddir, imlist)
        keep_q = existing_files(ddir, qimlist)
        missing = [s for s, k in zip(imlist, keep_db, strict=True) if not k]
        missing += [s for s, k in zip(qimlist, keep_q, strict=True) if not k]
        if missing and not allow_missing:
            first = preview(missing)
            raise FileNotFoundError(
                f"instre: {len(missing)} of {n + len(qimlist)} images are missing under {ddir} (first: {first}); "
                f"expected layout: {_LAYOUT}. Pass allow_missing=True to drop them (the ground truth is re-indexed), "
                "or check_images=False to load the ground truth without the images."
            )

    queries = [Query(p, bbox=b if crop_queries else None) for p, b in zip(qimlist, boxes, strict=True)]
    full = (n, len(qimlist)) == (INSTRE_IMAGES, INSTRE_QUERIES)
    notes = {
        "protocol": "map (Iscen et al. 2017 INSTRE protocol): positives ok, mAP by the trapezoidal AP of compute_map",
        "ground_truth": f"{gnd_path.name} md5 {md5_file(gnd_path)} ({'full' if full else 'non-standard size'}: "
        f"{n} images, {len(qimlist)} queries)",
        "query_crop": (
            f"query cropped to its gnd bbx, read as {fmt} ({fmt_why}); ids {base}-based ({base_why})"
            if crop_queries
            else "none: whole query image (crop_queries=False)"
        ),
        "query_resize": "set by the extraction config (query_resize)",
        "query_in_database": (
            "no: the query images are not database images"
            if n_q_in_db == 0
            else f"{n_q_in_db} query images are also in imlist: junk for their own query"
        ),
        "image_order": "database in gnd imlist order",
    }
    if not check_images:
        notes["images_checked"] = "no: check_images=False, image files were not looked at"
    return build_dataset(
        "instre", "map", ddir, db_paths=imlist, keep_db=keep_db, queries=queries, keep_q=keep_q, gnd=gnd, notes=notes
    )


@DATASETS.register(
    "instre",
    info=DatasetInfo(
        "map",
        "instre/gnd_instre.mat + instre/<imlist path>",
        resize="cirtorch",  # as cirtorch / revisitop (InsCLR: the same ImagesFromList)
        label="INSTRE",
        order=30,
        help="INSTRE (Iscen et al. 2017 split): 27293 images, 1250 cropped queries, mAP",
    ),
)
def instre(
    data_root: str | Path | None = None,
    *,
    allow_missing: bool = False,
    check_images: bool = True,
    crop_queries: bool = True,
    bbox_format: str = "auto",
    id_base: str | int = "auto",
) -> RetrievalDataset:
    """INSTRE: 1250 queries (cropped to their box) against 27293 images; queries not in the database."""
    return load_instre(
        data_root,
        allow_missing=allow_missing,
        check_images=check_images,
        crop_queries=crop_queries,
        bbox_format=bbox_format,
    )
