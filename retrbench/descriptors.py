"""Descriptor files in and out, so that retrbench reads what other tools extracted and writes
what they can read: database descriptors ``(N, D)``, query descriptors ``(Q, D)``, optionally the
image ids of both (in row order) and a JSON ``config`` (what made them). The path's suffix picks
the format (:func:`descriptor_format`):

* ``F.npz``: ``database``, ``queries`` (float32 rows), ``database_ids``, ``query_ids`` (string
  arrays), ``config`` (a 0-d string array of JSON);
* ``F.h5`` / ``F.hdf5`` (needs ``h5py``: ``pip install 'retrbench[h5]'``): the same datasets, ids
  as UTF-8 strings, ``config`` a file attribute;
* ``F`` (no suffix, or an existing folder): ``database.npy``, ``queries.npy``, ``database_ids.txt``,
  ``query_ids.txt`` (one id a line; ``.json`` lists are read too, and written when an id holds a
  line break), ``config.json``;
* ``F.mat``: revisitop's layout, ``X`` (database) and ``Q`` (queries) as **columns** (``D x N``),
  plus ``database_ids`` / ``query_ids`` cells and a ``config`` string when retrbench wrote it.
  MATLAB v7.3 files (HDF5) are read with ``h5py`` (``X`` and ``Q`` only).

Every write is atomic (:mod:`retrbench.utils.io`); a folder is replaced by two renames once complete.

``retrbench extract`` / :func:`retrbench.extract` write what ``retrbench run`` would post-process:
the pooled descriptors, **not** L2-normalised and **not** whitened (for an ensemble ``a+b``: the
concatenation of each model's L2-normalised descriptors). ``retrbench evaluate --features`` applies
L2 -> (PCA-whitening -> L2) -> search -> rerank, exactly as ``run`` does after extraction.

Reading refuses what would silently give wrong numbers: arrays that are not 2-D floating point,
unequal dimensions, NaN / inf, a wrong number of ids and, against a ground truth
(:meth:`Descriptors.aligned`), row counts other than its ``imlist`` / ``qimlist`` or ids naming
other images (ids naming the same images in another order are reordered). Every error names the
file and the array.
"""

from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import shutil
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .utils.io import atomic_save_npy, atomic_write, atomic_write_bytes, atomic_write_text

__all__ = ["DESCRIPTOR_FORMAT", "DESCRIPTOR_NOTE", "EVALUATION_FIELDS", "Descriptors", "descriptor_format", "load_descriptors", "save_descriptors"]

log = logging.getLogger(__name__)

DESCRIPTOR_FORMAT = "retrbench-descriptors/1"  # the ``format`` entry of the config retrbench writes
DESCRIPTOR_NOTE = (
    "pooled descriptors before post-processing (not L2-normalised, not whitened); for an ensemble "
    "the concatenation of each model's L2-normalised descriptors"
)
# RunConfig fields applied after extraction: not part of a descriptor file's configuration
EVALUATION_FIELDS = ("whiten", "whiten_source", "rerank", "topk")

_SUFFIXES = {".npz": "npz", ".h5": "h5", ".hdf5": "h5", ".mat": "mat"}
_IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
_CHUNK_ROWS = 65_536  # rows checked for NaN / inf at a time (bounds the temporary mask)


@dataclass(frozen=True, eq=False)
class Descriptors:
    """Database and query descriptors, with the image ids of their rows.

    Attributes:
        database: ``(N, D)`` float32 rows.
        queries: ``(Q, D)`` float32 rows.
        database_ids: ``N`` image ids in row order, or None when the file has none.
        query_ids: ``Q`` query image ids in row order, or None.
        config: what made them (retrbench writes the run configuration, weights sha256, image
            size used, version); ``{}`` when unknown.
        source: the file they were read from ("" when built in memory); errors name it.
        layout: ``"rows"``, or ``"columns"`` when the file stores ``D x N`` columns (``.mat``:
            ``X`` and ``Q``); only used to word errors.

    Construction checks shapes, dtypes and values (ValueError naming ``source`` and the array).
    """

    database: np.ndarray
    queries: np.ndarray
    database_ids: tuple[str, ...] | None = None
    query_ids: tuple[str, ...] | None = None
    config: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    layout: str = "rows"

    def __post_init__(self) -> None:
        src = self.source or "descriptors"
        a, b = self.array_names
        db = _checked_rows(self.database, src, a, self.layout)
        q = _checked_rows(self.queries, src, b, self.layout)
        if db.shape[1] != q.shape[1]:
            if self.layout == "columns":
                (dx, nx), (dq, nq) = self.database.shape[::-1], self.queries.shape[::-1]  # X, Q as stored
                hint = ""
                if nx == nq:
                    hint = " (they look like rows, one image a row: transpose both)"
                elif nx == dq:
                    hint = f" ('{a}' looks stored with one image a row: transpose it)"
                elif dx == nq:
                    hint = f" ('{b}' looks stored with one image a row: transpose it)"
                raise ValueError(f"{src}: '{a}' has D={db.shape[1]} rows but '{b}' has D={q.shape[1]}: both must be D x n columns{hint}")
            raise ValueError(f"{src}: '{a}' is {db.shape} but '{b}' is {q.shape}: the descriptor dimensions (columns) differ")
        object.__setattr__(self, "database", db)
        object.__setattr__(self, "queries", q)
        for name, ids, arr in (("database_ids", self.database_ids, db), ("query_ids", self.query_ids, q)):
            if ids is None:
                continue
            ids = tuple(str(i) for i in ids)
            if len(ids) != arr.shape[0]:
                what = a if name == "database_ids" else b
                raise ValueError(f"{src}: {len(ids)} {name} for {arr.shape[0]} descriptors in '{what}' (one id per descriptor)")
            object.__setattr__(self, name, ids)
        object.__setattr__(self, "config", dict(self.config or {}))

    @property
    def array_names(self) -> tuple[str, str]:
        """The names of the two arrays in the file (for messages)."""
        return ("X", "Q") if self.layout == "columns" else ("database", "queries")

    @property
    def dim(self) -> int:
        return int(self.database.shape[1])

    def save(self, path: str | Path) -> Path:
        """Write to ``path`` in the format of its suffix (see the module docstring); returns it."""
        return save_descriptors(self, path)

    def aligned(self, database_names: Sequence[str], query_names: Sequence[str], *, reference: str = "the ground truth") -> Descriptors:
        """These descriptors with one row per name of ``database_names`` / ``query_names``, in
        their order (a ground truth's ``imlist`` / ``qimlist``).

        Without ids the row counts must equal the list lengths. With ids, they must name the
        same images: compared as written, then without an image extension (``a.jpg`` =
        ``a``), then by file name (``jpg/a.jpg`` = ``a``); a permutation is reordered, anything
        else raises ``ValueError`` naming the file, the ids that do not match and the names
        missing. ``reference`` names the ground truth in messages.
        """
        src = self.source or "descriptors"
        a, b = self.array_names
        db_order = _order(self.database, self.database_ids, list(database_names), src, a, "database_ids", reference, "imlist", self.layout)
        q_order = _order(self.queries, self.query_ids, list(query_names), src, b, "query_ids", reference, "qimlist", self.layout)
        if db_order is None and q_order is None:
            return self
        db, q, db_ids, q_ids = self.database, self.queries, self.database_ids, self.query_ids
        if db_order is not None:
            db, db_ids = db[db_order], tuple(db_ids[i] for i in db_order)  # ids exist when an order does
        if q_order is not None:
            q, q_ids = q[q_order], tuple(q_ids[i] for i in q_order)
        log.info("%s: rows reordered by their ids to %s's order", src, reference)
        return replace(self, database=db, queries=q, database_ids=db_ids, query_ids=q_ids)


# ----------------------------------------------------------------------------- checks


def _shape_text(arr: np.ndarray, name: str, layout: str) -> str:
    if layout == "columns":  # as stored: D x n
        return f"'{name}' is {arr.shape[1]} x {arr.shape[0]} (D x n as stored)"
    return f"'{name}' is {tuple(arr.shape)}"


def _checked_rows(x: Any, src: str, name: str, layout: str) -> np.ndarray:
    """``x`` as float32 C-contiguous ``(n, D)`` rows, or ValueError naming the file and array."""
    arr = np.asarray(x)
    if arr.ndim != 2:
        want = "a 2-D D x n matrix (one column per image)" if layout == "columns" else "a 2-D (n, D) array (one row per image)"
        raise ValueError(f"{src}: '{name}' has shape {arr.shape}; expected {want}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{src}: '{name}' holds {arr.dtype} values; descriptors must be floating point")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    total, first = 0, -1
    for start in range(0, arr.shape[0], _CHUNK_ROWS):
        bad = ~np.isfinite(arr[start : start + _CHUNK_ROWS])
        if bad.any():
            total += int(bad.sum())
            first = first if first >= 0 else start + int(np.flatnonzero(bad.any(axis=1))[0])
    if total:
        what = "column" if layout == "columns" else "row"
        raise ValueError(f"{src}: '{name}' holds {total} non-finite values (NaN or inf), the first in {what} {first}; refused")
    return arr


def _no_extension(name: str) -> str:
    root, ext = posixpath.splitext(name.replace("\\", "/"))
    return root if ext.lower() in _IMAGE_EXTENSIONS else name.replace("\\", "/")


def _file_name(name: str) -> str:
    return posixpath.basename(_no_extension(name))


_MATCHES = (str, _no_extension, _file_name)  # as written, without image extension, by file name


def _examples(items: Sequence[str], n: int = 3) -> str:
    shown = ", ".join(repr(s) for s in items[:n])
    return shown + (f" ... ({len(items)} in all)" if len(items) > n else "")


def _order(arr: np.ndarray, ids: tuple[str, ...] | None, names: list[str], src: str, array: str, ids_name: str, reference: str, list_name: str, layout: str) -> np.ndarray | None:  # fmt: skip
    """Row order that puts ``arr`` in the order of ``names`` (None: as it is), or ValueError."""
    n = len(names)
    if ids is None:
        if arr.shape[0] == n:
            return None
        shape = _shape_text(arr, array, layout)
        if arr.shape[1] == n:
            if layout == "columns":
                raise ValueError(
                    f"{src}: {shape} but {reference} lists {n} images ({list_name}): it is stored with one row per "
                    f"image; revisitop's .mat layout is one column per image (D x n): transpose it"
                )
            raise ValueError(f"{src}: {shape} but {reference} lists {n} images ({list_name}): it looks transposed; descriptors are rows (n, D)")
        raise ValueError(f"{src}: {shape}: {arr.shape[0]} descriptors, but {reference} lists {n} images ({list_name})")
    for key in _MATCHES:
        have, want = [key(i) for i in ids], [key(s) for s in names]
        if have == want:
            return None
        if len(have) == n and len(set(have)) == n and len(set(want)) == n and set(have) == set(want):
            pos = {k: i for i, k in enumerate(have)}
            return np.array([pos[k] for k in want], dtype=np.int64)
    # report at the comparison that matches the most names
    key = max(_MATCHES, key=lambda k: len({k(i) for i in ids} & {k(s) for s in names}))
    have, want = [key(i) for i in ids], [key(s) for s in names]
    extra = [i for i, k in zip(ids, have, strict=True) if k not in set(want)]
    missing = [s for s, k in zip(names, want, strict=True) if k not in set(have)]
    parts = []
    if extra:
        parts.append(f"{len(extra)} ids not in {list_name} ({_examples(extra)})")
    if missing:
        parts.append(f"{len(missing)} {list_name} names without an id ({_examples(missing)})")
    if not parts:
        dup = [k for k, c in Counter(have).items() if c > 1]
        parts.append(f"ids repeat ({_examples(dup)}) so they cannot be matched one to one" if dup else "the names repeat in the ground truth")
    raise ValueError(
        f"{src}: {ids_name} ({len(ids)}) do not name the images of {reference}'s {list_name} ({n}): {'; '.join(parts)}. "
        f"Ids are matched as written, without image extensions, or by file name; drop the ids to match by position"
    )


# ----------------------------------------------------------------------------- formats


def descriptor_format(path: str | Path) -> str:
    """``"npz"``, ``"h5"``, ``"mat"`` or ``"npy"`` (a folder) for ``path``, by its suffix; an
    existing folder, or a path without suffix, is the folder layout. ValueError otherwise."""
    p = Path(path)
    if p.is_dir() or str(path).endswith(("/", os.sep)):
        return "npy"
    suffix = p.suffix.lower()
    if suffix in _SUFFIXES or not suffix:
        return _SUFFIXES.get(suffix, "npy")
    raise ValueError(f"{path}: unknown descriptor file type {suffix!r}; use .npz, .h5 / .hdf5, .mat, or a folder (a path without suffix) of .npy files")


def _h5py(path: str | Path) -> Any:
    try:
        import h5py
    except ImportError:
        raise RuntimeError(f"{path}: HDF5 files need h5py: pip install 'retrbench[h5]' (or h5py)") from None
    return h5py


def _present_ids(desc: Descriptors) -> list[tuple[str, tuple[str, ...]]]:
    return [(name, ids) for name in ("database_ids", "query_ids") if (ids := getattr(desc, name)) is not None]


def _config_json(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, default=str)


def _parse_config(text: Any, src: str) -> dict[str, Any]:
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    try:
        value = json.loads(str(text))
    except json.JSONDecodeError as e:
        raise ValueError(f"{src}: the config entry is not JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{src}: the config entry is JSON {type(value).__name__}, expected an object")
    return value


def save_descriptors(desc: Descriptors, path: str | Path) -> Path:
    """Write ``desc`` to ``path``, in the format of its suffix (atomically); returns the path."""
    fmt = descriptor_format(path)
    p = Path(path)
    if fmt == "npz":
        arrays = {"database": desc.database, "queries": desc.queries, "config": np.array(_config_json(desc.config))}
        arrays.update({name: np.array(ids, dtype=str) for name, ids in _present_ids(desc)})
        with atomic_write(p) as f:
            np.savez(f, **arrays)
    elif fmt == "h5":
        h5py = _h5py(p)
        buf = io.BytesIO()
        with h5py.File(buf, "w") as f:
            f.create_dataset("database", data=desc.database)
            f.create_dataset("queries", data=desc.queries)
            for name, ids in _present_ids(desc):
                ds = f.create_dataset(name, shape=(len(ids),), dtype=h5py.string_dtype("utf-8"))
                if ids:
                    ds[:] = list(ids)
            f.attrs["config"] = _config_json(desc.config)
        atomic_write_bytes(p, buf.getvalue())
    elif fmt == "mat":
        from scipy.io import savemat

        variables: dict[str, Any] = {"X": desc.database.T, "Q": desc.queries.T, "config": _config_json(desc.config)}
        for name, ids in _present_ids(desc):
            variables[name] = np.empty((len(ids),), dtype=object)  # a cell array
            variables[name][:] = list(ids)
        try:
            with atomic_write(p) as f:
                savemat(f, variables)
        except ValueError as e:  # MATLAB v5 files cap a variable at 2 GiB
            raise ValueError(f"{p}: cannot write a .mat file ({e}); use .h5 or .npz for large descriptor sets") from None
    else:
        _save_folder(desc, p)
    return p


def _save_folder(desc: Descriptors, path: Path) -> None:
    if path.exists():
        if not path.is_dir():
            raise FileExistsError(f"{path}: exists and is not a folder; not replaced")
        if any(path.iterdir()) and not (path / "database.npy").is_file():
            raise FileExistsError(f"{path}: a folder holding other files (no database.npy); not replaced by descriptors")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir()  # the usual permissions (0777 minus the umask), unlike mkdtemp
    try:
        atomic_save_npy(tmp / "database.npy", desc.database)
        atomic_save_npy(tmp / "queries.npy", desc.queries)
        for name, ids in _present_ids(desc):
            if not all(i == "" or i.splitlines() == [i] for i in ids):  # a line break of any kind
                atomic_write_text(tmp / f"{name}.json", json.dumps(list(ids)) + "\n")
            else:
                atomic_write_text(tmp / f"{name}.txt", "".join(f"{i}\n" for i in ids))
        atomic_write_text(tmp / "config.json", json.dumps(desc.config, indent=1, sort_keys=True, default=str) + "\n")
        if path.exists():
            old = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_descriptors(path: str | Path) -> Descriptors:
    """Read a descriptor file of any format of the module docstring. Raises ``ValueError``
    (wrong content, naming the file and array), ``FileNotFoundError`` or ``RuntimeError``
    (HDF5 without h5py)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such descriptor file or folder")
    fmt = descriptor_format(p)
    reader = {"npz": _load_npz, "h5": _load_h5, "mat": _load_mat, "npy": _load_folder}[fmt]
    return reader(p)


def _require(keys: Sequence[str], have: Sequence[str], src: str, what: str) -> None:
    """ValueError naming the missing entries; ``what`` = ``"KIND; HINT"``."""
    missing = [k for k in keys if k not in have]
    if missing:
        kind, _, hint = what.partition("; ")
        has = ", ".join(map(repr, sorted(have))) or "nothing"
        raise ValueError(f"{src}: no {' or '.join(repr(k) for k in missing)} {kind} (it has {has})" + (f"; {hint}" if hint else ""))


def _load_npz(p: Path) -> Descriptors:
    src = str(p)
    try:
        z = np.load(p, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{src}: cannot read it as a numpy .npz archive ({e})") from None
    if not hasattr(z, "files"):
        raise ValueError(f"{src}: holds a single array, not a .npz archive of 'database' and 'queries'")
    with z:
        _require(("database", "queries"), z.files, src, "array; a descriptor archive holds 'database' (N, D) and 'queries' (Q, D)")
        out: dict[str, Any] = {}
        for name in ("database", "queries", "database_ids", "query_ids", "config"):
            if name not in z.files:
                continue
            try:
                out[name] = z[name]
            except ValueError as e:  # pickled object arrays
                raise ValueError(f"{src}: '{name}' cannot be read without unpickling ({e}); store ids as a string array (np.array(ids, dtype=str))") from None
    ids = {k: _string_list(out[k], src, k) for k in ("database_ids", "query_ids") if k in out}
    config = _parse_config(out["config"][()], src) if "config" in out else {}
    return Descriptors(out["database"], out["queries"], ids.get("database_ids"), ids.get("query_ids"), config, src)


def _string_list(arr: np.ndarray, src: str, name: str) -> tuple[str, ...]:
    arr = np.asarray(arr)
    if arr.ndim != 1 or arr.dtype.kind not in "US":
        raise ValueError(f"{src}: '{name}' must be a 1-D array of strings, got {arr.dtype} of shape {arr.shape}")
    return tuple(s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in arr.tolist())


_MAT_HINT = "variable; revisitop's feature files hold X (database, D x N) and Q (queries, D x Q)"


def _load_h5(p: Path, arrays: tuple[str, str] = ("database", "queries"), layout: str = "rows") -> Descriptors:
    """An HDF5 descriptor file, or (``arrays=("X", "Q")``) a MATLAB v7.3 .mat file, which is HDF5:
    MATLAB's column-major ``D x N`` matrix is an ``N x D`` dataset there, rows already."""
    h5py = _h5py(p)
    src = str(p)
    try:
        f = h5py.File(p, "r")
    except OSError as e:
        raise ValueError(f"{src}: cannot read it as an HDF5 file ({e})") from None
    with f:
        what = _MAT_HINT if layout == "columns" else "dataset; an HDF5 descriptor file holds 'database' (N, D) and 'queries' (Q, D)"
        _require(arrays, list(f.keys()), src, what)
        db, q = f[arrays[0]][()], f[arrays[1]][()]
        ids = {}
        for name in ("database_ids", "query_ids") if layout == "rows" else ():
            if name in f:
                ds = f[name]
                if ds.ndim != 1 or ds.dtype.kind not in "OS":
                    raise ValueError(f"{src}: '{name}' must be a 1-D dataset of strings, got {ds.dtype} of shape {ds.shape}")
                ids[name] = tuple(ds.asstr()[()].tolist())
        config = _parse_config(f.attrs["config"], src) if "config" in f.attrs and layout == "rows" else {}
    return Descriptors(db, q, ids.get("database_ids"), ids.get("query_ids"), config, src, layout)


def _mat_strings(value: Any, src: str, name: str) -> tuple[str, ...]:
    arr = np.asarray(value)
    if arr.dtype == object:  # a cell array: each cell a char array
        out = []
        for cell in arr.reshape(-1, order="F"):
            c = np.asarray(cell)
            out.append(str(c.reshape(-1)[0]) if c.size else "")
        return tuple(out)
    if arr.dtype.kind == "U":  # a char matrix, one padded name a row
        return tuple(str(s).rstrip() for s in arr.reshape(-1))
    raise ValueError(f"{src}: '{name}' must be a cell array of strings, got {arr.dtype}")


def _load_mat(p: Path) -> Descriptors:
    from scipy.io import loadmat

    src = str(p)
    try:
        m = loadmat(p)
    except NotImplementedError:  # MATLAB v7.3: HDF5
        return _load_h5(p, ("X", "Q"), "columns")
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{src}: cannot read it as a MATLAB .mat file ({e})") from None
    names = [k for k in m if not k.startswith("__")]
    _require(("X", "Q"), names, src, _MAT_HINT)
    X, Q = np.asarray(m["X"]), np.asarray(m["Q"])
    for name, v in (("X", X), ("Q", Q)):
        if v.ndim != 2:
            raise ValueError(f"{src}: '{name}' has shape {v.shape}; expected a D x n matrix (one column per image)")
    ids = {k: _mat_strings(m[k], src, k) for k in ("database_ids", "query_ids") if k in m}
    config = _parse_config(_mat_strings(m["config"], src, "config")[0], src) if "config" in m else {}
    return Descriptors(X.T, Q.T, ids.get("database_ids"), ids.get("query_ids"), config, src, layout="columns")


def _load_folder(p: Path) -> Descriptors:
    src = str(p)
    _require(("database.npy", "queries.npy"), [c.name for c in p.iterdir()], src, "file; a descriptor folder holds database.npy (N, D) and queries.npy (Q, D)")
    arrays = {}
    for name in ("database", "queries"):
        try:
            arrays[name] = np.load(p / f"{name}.npy", allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise ValueError(f"{src}/{name}.npy: cannot read it as a .npy array ({e})") from None
    ids: dict[str, tuple[str, ...]] = {}
    for name in ("database_ids", "query_ids"):
        js, txt = p / f"{name}.json", p / f"{name}.txt"
        if js.is_file():
            try:
                value = json.loads(js.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{js}: not JSON ({e})") from None
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{js}: expected a JSON list of strings")
            ids[name] = tuple(value)
        elif txt.is_file():
            ids[name] = tuple(txt.read_text(encoding="utf-8").splitlines())
    cfg = p / "config.json"
    config = _parse_config(cfg.read_text(encoding="utf-8"), str(cfg)) if cfg.is_file() else {}
    return Descriptors(arrays["database"], arrays["queries"], ids.get("database_ids"), ids.get("query_ids"), config, src)
