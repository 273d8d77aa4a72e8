"""Reading ground-truth files safely.

The public ground truth of Oxford / Paris (``gnd_*.pkl``) is a pickle. Unpickling runs
arbitrary code, so retrbench reads these files with an allow-list: built-in containers and
scalars, and numpy arrays / dtypes only. Anything else is refused with an error naming the
file and the object the pickle asked for.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

__all__ = ["UnsafePickleError", "safe_load_pickle", "load_gnd_pickle"]

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
    """A pickle referenced something outside the allow-list."""


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, source: str, extra: frozenset[tuple[str, str]]) -> None:
        super().__init__(file, encoding="latin1")
        self._source = source
        self._allowed = _ALLOWED | extra

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._allowed:
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"{self._source}: refused to unpickle {module}.{name}; only built-in containers and "
            "numpy arrays are allowed in ground-truth files"
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
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: not a readable pickle ({e})") from e


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
    return data
