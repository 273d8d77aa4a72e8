"""Reading ground-truth files safely.

The public ground truth of Oxford / Paris (``gnd_*.pkl``) is a pickle. Unpickling runs
arbitrary code, so retrbench reads these files with an allow-list: built-in containers and
scalars, and numpy arrays / dtypes only. Anything else is refused with
:class:`UnsafePickleError`, one line naming the file and the global the pickle asked for;
nothing from the file is imported or run. :func:`load_gnd_pickle` also checks that every
index list (``easy``, ``hard``, ``junk``, ``ok``) holds ids of ``imlist`` images.

Text ground truth (CSV, JSON, lists) is read with :func:`read_text_file`: UTF-8 (a byte-order
mark is allowed), and a file that is not UTF-8 is one error line naming the file, the byte
offset and the line of the first bad byte.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["UnsafePickleError", "safe_load_pickle", "load_gnd_pickle", "read_text_file", "INDEX_KEYS"]

INDEX_KEYS: tuple[str, ...] = ("easy", "hard", "junk", "ok")
"""Keys of a ``gnd_*.pkl`` query entry that hold database indices (``bbx`` holds a box)."""

# (module, name) pairs a ground-truth pickle may reference. numpy moved its internals from
# ``numpy.core`` to ``numpy._core`` in 2.0; files written by either are accepted.
_ALLOWED: frozenset[tuple[str, str]] = frozenset(
    {
        ("builtins", n)
        for n in ("dict", "list", "tuple", "set", "frozenset", "str", "bytes", "int", "float", "bool", "complex", "slice")
    }
    | {
        (m, n)
        for m in ("numpy.core.multiarray", "numpy._core.multiarray")
        for n in ("_reconstruct", "scalar")
    }
    | {("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict")}
    # protocol-2 pickles of numpy arrays written by Python 3 encode raw bytes through _codecs
    | {("_codecs", "encode")}
    | {(m, "_frombuffer") for m in ("numpy.core.numeric", "numpy._core.numeric")}
)


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle referenced something outside the allow-list (the message names file and global)."""


def _one_line(text: str, limit: int = 200) -> str:
    """``text`` on one line: control characters escaped, cut to ``limit`` characters."""
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return out if len(out) <= limit else out[: limit - 3] + "..."


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, source: str, extra: frozenset[tuple[str, str]]) -> None:
        super().__init__(file, encoding="latin1")
        self._source = source
        self._allowed = _ALLOWED | extra

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._allowed:
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"{self._source}: refused to unpickle {_one_line(f'{module}.{name}')}; only built-in containers "
            "and numpy arrays are allowed in ground-truth files (nothing from the file was run)"
        )


def safe_load_pickle(path: str | Path, extra_allowed: frozenset[tuple[str, str]] = frozenset()) -> Any:
    """Unpickle ``path`` admitting only containers, scalars and numpy arrays (plus ``extra_allowed``)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f, str(path), extra_allowed).load()
    except FileNotFoundError:
        raise FileNotFoundError(f"ground-truth file not found: {path}") from None
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError, OverflowError) as e:
        raise ValueError(f"{path}: not a readable pickle ({_one_line(f'{type(e).__name__}: {e}')})") from e


def load_gnd_pickle(path: str | Path) -> dict[str, Any]:
    """Load an Oxford / Paris ground-truth pickle and check its keys.

    Returns the dict as stored: ``imlist`` (database names), ``qimlist`` (query names), ``gnd``
    (per query a dict with ``bbx`` and either ``easy`` / ``hard`` / ``junk`` or ``ok`` / ``junk``).
    """
    data = safe_load_pickle(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a dict at the top level, got {type(data).__name__}")
    missing = [k for k in ("imlist", "qimlist", "gnd") if k not in data]
    if missing:
        raise ValueError(f"{path}: ground truth lacks keys {missing} (has {sorted(data)})")
    if len(data["gnd"]) != len(data["qimlist"]):
        raise ValueError(f"{path}: {len(data['gnd'])} gnd entries for {len(data['qimlist'])} queries")
    _check_ids(data["gnd"], len(data["imlist"]), str(path))
    return data


def _check_ids(gnd: Any, n: int, source: str) -> None:
    """ValueError naming query, key and value when an index list holds an id outside ``[0, n)``.

    Entries that are not dicts and lists that are not integers are left to the dataset loaders,
    which name what they expected.
    """
    for q, entry in enumerate(gnd):
        if not isinstance(entry, Mapping):
            continue
        for key in INDEX_KEYS:
            if key not in entry:
                continue
            try:
                ids = np.asarray(entry[key]).reshape(-1)
            except (TypeError, ValueError):
                continue
            if not ids.size or not (np.issubdtype(ids.dtype, np.integer) or np.issubdtype(ids.dtype, np.floating)):
                continue
            bad = (ids < 0) | (ids >= n)
            if bad.any():
                v = ids[int(np.argmax(bad))]
                v = int(v) if float(v).is_integer() else float(v)
                span = f"imlist has {n} images (ids 0..{n - 1})" if n else "imlist is empty"
                raise ValueError(f"{source}: gnd[{q}][{key!r}] has database id {v}, out of range: {span}")


def read_text_file(path: str | Path, what: str = "ground-truth file") -> str:
    """The text of a UTF-8 file (a leading byte-order mark is dropped); ``\r\n`` is kept as is.

    Raises:
        FileNotFoundError: ``path`` does not exist (naming ``what``).
        ValueError: the file is not UTF-8: one line naming the file, the byte offset and line of
            the first bad byte, e.g. ``gt.csv: not UTF-8 text: byte 0xe9 at byte offset 41 (line 3):
            invalid continuation byte; save the ground-truth file as UTF-8``.
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {p}") from None
    bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = bom + e.start
        line = data.count(b"\n", 0, at) + 1
        raise ValueError(
            f"{p}: not UTF-8 text: byte 0x{data[at]:02x} at byte offset {at} (line {line}): {e.reason}; "
            f"save the {what} as UTF-8"
        ) from None
