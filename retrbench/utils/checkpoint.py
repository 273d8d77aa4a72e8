"""Safe checkpoint reading for every stage that loads weights (backbones, training).

Every PyTorch file is read on CPU with ``torch.load(weights_only=True)``: tensors, plain
containers and numbers, plus only the extra globals a caller allow-lists explicitly
(``allow=``: :data:`NUMPY_GLOBALS` for numpy arrays, :func:`sklearn_pca_globals` for the
scikit-learn ``PCA`` that deep-image-retrieval pickles). A file that asks for anything else is
refused with a :class:`CheckpointError` naming the global; nothing from it is imported or run.

* :func:`read_checkpoint`: the whole object (state dict beside hyperparameters, epochs, PCAs).
* :func:`read_state_dict`: a flat ``{name: tensor}`` mapping, at the top level, under a given
  ``key``, or under the first of ``nested`` keys that holds one (:data:`NESTED_KEYS`:
  ``state_dict``, ``model``, ``state_dict_ema``, ``model_ema``); ``.safetensors`` files too;
  an optional prefix carried by every key (``module.`` of ``nn.DataParallel``) stripped.
* :func:`tensor_mapping`, :func:`top_level`, :func:`strip_prefix`: the structure checks the
  readers use, for callers that read a whole checkpoint and pick its parts themselves.

**``FILE#KEY``**: wherever a state dict is read (:func:`read_state_dict`, hence ``--weights``
of ``timm:``, ``hf-hub:``, ``hub:`` models), ``ckpt.pth#state_dict_ema`` reads the weights
stored under the top-level key ``state_dict_ema`` of ``ckpt.pth``: the way to pick nested
weights from the command line (``--weights ckpt.pth#KEY``; ``weights="ckpt.pth#KEY"`` in
Python). A path that exists as a file is always taken whole, so a ``#`` in a file name still
works; otherwise the text after the last ``#`` is the key (:func:`split_weights_key`).
:func:`weights_digest` is the sha256 of the file plus ``#KEY``, identifying the weights.

A file refused by the allow-list is reported with the globals it asks for (found by reading
the pickle's opcodes with :mod:`pickletools`, nothing imported or run), never as "truncated".

Example::

    sd = read_state_dict("net.pth.tar", nested=NESTED_KEYS, strip="module.")
    sd = read_state_dict("train.pth#model_ema")          # the mapping under 'model_ema'
    ck = read_checkpoint("Resnet-101-AP-GeM.pt", allow=sklearn_pca_globals(), fmt="GeM-AP")
"""

from __future__ import annotations

import functools
import io
import pickle
import pickletools
import re
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import Tensor

from .io import sha256_file

__all__ = [
    "preview_keys",
    "NESTED_KEYS",
    "NUMPY_GLOBALS",
    "CheckpointError",
    "read_checkpoint",
    "read_state_dict",
    "sklearn_pca_globals",
    "split_weights_key",
    "strip_prefix",
    "tensor_mapping",
    "top_level",
    "weights_digest",
]

NESTED_KEYS: tuple[str, ...] = ("state_dict", "model", "state_dict_ema", "model_ema")
"""Top-level keys under which training scripts (timm, torchvision references, MoCo ...) store the weights."""

_SHOW = 10  # keys listed in error messages
_SHOW_GLOBALS = 4  # refused globals named in an error message
_SCAN_PICKLES = 6  # pickles read in a legacy (non-zip) file: magic, protocol, sys info, object, storage keys
_WEIGHTS_KEY_HINT = '--weights FILE#KEY (weights="FILE#KEY" in Python)'


class CheckpointError(ValueError):
    """A weights file that exists but cannot be used (corrupt, unsafe or wrongly structured)."""


# --------------------------------------------------------------------------------------------
# Allow-lists


def _numpy_globals() -> list[Any]:
    """numpy arrays and scalars of numeric dtypes, under both numpy 1.x and 2.x module names."""
    core = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray  # numpy 2 / numpy 1
    out: list[Any] = [np.ndarray, np.dtype]
    for fn in ("_reconstruct", "scalar"):
        f = getattr(core, fn)
        out += [(f, f"numpy.core.multiarray.{fn}"), (f, f"numpy._core.multiarray.{fn}")]
    # numpy >= 1.25 gives each dtype its own class, which unpickling must be allowed to build
    out += sorted({type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFDG"} - {np.dtype}, key=str)
    return out


NUMPY_GLOBALS: list[Any] = _numpy_globals()
"""numpy's array / scalar / dtype reconstruction: all an array of numbers needs (no object arrays' contents are code)."""


@functools.cache
def sklearn_pca_globals() -> list[Any]:
    """:data:`NUMPY_GLOBALS` plus scikit-learn's ``PCA`` under its current and pre-0.22 module names.

    deep-image-retrieval pickled its PCAs with scikit-learn < 0.22, where ``PCA`` lived in
    ``sklearn.decomposition.pca``. Imports scikit-learn on first call.
    """
    from sklearn.decomposition import PCA

    return [*NUMPY_GLOBALS, PCA, (PCA, "sklearn.decomposition.pca.PCA")]


def _global_name(g: Any) -> str:
    if isinstance(g, tuple):
        return g[1]
    return f"{getattr(g, '__module__', '?')}.{getattr(g, '__qualname__', repr(g))}"


# --------------------------------------------------------------------------------------------
# Reading


def preview_keys(keys: Iterable[object] | Mapping[Any, Any], n: int = _SHOW) -> str:
    """``'a', 'b', ... (12 more)``: the first ``n`` keys of a checkpoint, for error messages."""
    keys = list(keys)
    shown = ", ".join(repr(k) for k in keys[:n])
    return shown + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def _first_line(msg: str) -> str:
    detail = re.search(r"WeightsUnpickler error:\s*(.+?)(\n\n|$)", msg, re.S)
    lines = (detail.group(1) if detail else msg).strip().splitlines()
    return lines[0][:300] if lines else "no detail"


def split_weights_key(weights: str | Path) -> tuple[Path, str | None]:
    """``"FILE#KEY"`` -> ``(Path(FILE), KEY)``; anything else -> ``(path, None)``.

    The whole path is tried first, so a file whose name holds ``#`` is read whole. Otherwise
    the text after the last ``#`` is the key when the part before it is an existing file; when
    neither exists the whole path is returned, for the caller to report as missing. ``~`` is
    expanded.
    """
    p = Path(weights).expanduser()
    text = str(weights)
    if p.is_file() or "#" not in text:
        return p, None
    file, _, key = text.rpartition("#")
    head = Path(file).expanduser()
    if not key or not head.is_file():
        return p, None
    return head, key


def weights_digest(weights: str | Path) -> str:
    """sha256 of the weights file, with ``#KEY`` appended when ``weights`` is ``FILE#KEY``.

    Two keys of one file are different weights, so they must not share a feature cache.
    """
    p, key = split_weights_key(weights)
    return sha256_file(p) + (f"#{key}" if key else "")


def _existing(path: str | Path, fmt: str = "") -> Path:
    p = Path(path).expanduser()
    if p.is_file():
        return p
    file, key = split_weights_key(path)
    if key is not None and file.is_file():
        what = f"{fmt} checkpoints" if fmt else "this reader"
        raise CheckpointError(
            f"{file}: a #KEY ({key!r}) picks a nested state dict, which {what} do not take: "
            f"pass the file itself ({file})"
        )
    raise FileNotFoundError(f"weights file not found: {p}" + (" (it is a directory)" if p.is_dir() else ""))


def _normalise_global(module: str, name: str) -> str:
    module = {"__builtin__": "builtins", "copy_reg": "copyreg"}.get(module, module)
    text = f"{module}.{name}"
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)[:200]


def _globals_in_pickle(f: IO[bytes], out: list[str]) -> None:
    """Append ``module.name`` of each GLOBAL / STACK_GLOBAL / INST of one pickle to ``out``.

    Reads opcodes with :mod:`pickletools` (nothing is imported or run); the strings a
    STACK_GLOBAL takes are followed through the memo. Raises on damaged data (``out`` keeps
    what was found before).
    """
    memo: dict[int, object] = {}
    recent: list[object] = [None, None]  # the two latest pushed values (None: not a string)
    for op, arg, _ in pickletools.genops(f):
        name = op.name
        pushed: object = None
        if name in ("GLOBAL", "INST") and isinstance(arg, str):
            module, _, attr = arg.partition(" ")
            out.append(_normalise_global(module, attr))
        elif name == "STACK_GLOBAL":
            module, attr = recent
            if isinstance(module, str) and isinstance(attr, str):
                out.append(_normalise_global(module, attr))
        elif isinstance(arg, str) and ("UNICODE" in name or "STRING" in name):
            pushed = arg
        elif name == "MEMOIZE":
            memo[len(memo)] = recent[-1]
            continue
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[int(arg)] = recent[-1]
            continue
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            pushed = memo.get(int(arg))
        elif name in ("FRAME", "PROTO", "MARK"):
            continue
        recent = [recent[-1], pushed]


def _file_globals(p: Path) -> list[str]:
    """Globals named by the pickles of a checkpoint (zip: its ``.pkl`` members; else the leading pickles)."""
    found: list[str] = []
    try:
        if zipfile.is_zipfile(p):
            with zipfile.ZipFile(p) as zf:
                for member in zf.namelist():
                    if member.endswith(".pkl"):
                        _globals_in_pickle(io.BytesIO(zf.read(member)), found)
        else:
            with open(p, "rb") as f:
                for _ in range(_SCAN_PICKLES):
                    _globals_in_pickle(f, found)
    except Exception:  # damaged or not a pickle (any error of a parser fed arbitrary bytes): keep what was found
        pass
    return list(dict.fromkeys(found))


@functools.cache
def _torch_allowed() -> frozenset[str]:
    """``module.name`` of the globals ``torch.load(weights_only=True)`` allows without help."""
    try:
        from torch import _weights_only_unpickler as wo

        names = set(wo._get_allowed_globals()) | set(wo._get_user_allowed_globals())
    except (ImportError, AttributeError):  # another torch: fall back to its own namespace
        names = set()
    return frozenset(names)


def _refused_globals(p: Path, allow: Sequence[Any]) -> list[str]:
    """The globals of ``p`` that neither torch nor ``allow`` admits, in the order the file names them."""
    known = _torch_allowed()
    allowed = set(known) | {_global_name(g) for g in (*allow, *torch.serialization.get_safe_globals())}
    # without torch's list (another torch version), trust torch's own names rather than report them
    return [g for g in _file_globals(p) if g not in allowed and (known or not g.startswith("torch."))]


def read_checkpoint(path: str | Path, *, allow: Sequence[Any] = (), fmt: str = "PyTorch") -> Any:
    """The whole object of a PyTorch checkpoint, read on CPU with ``torch.load(weights_only=True)``.

    Args:
        path: checkpoint file.
        allow: extra globals the file may name, as ``torch.serialization.safe_globals`` takes
            them: a class or function, or ``(object, "name.in.the.file")`` for a class pickled
            under an older module path. Only data-holding classes belong here (numpy arrays, a
            scikit-learn PCA); nothing else in the file can be imported or called.
        fmt: name of the expected format, used in error messages.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file is truncated or not a PyTorch checkpoint, or it asks for a
            global outside the allow-list (the global is named and nothing from it is run).
    """
    p = _existing(path, fmt)
    # Only add what is not already allowed: leaving the context removes the globals it added.
    already = set(torch.serialization.get_safe_globals())
    extra = [g for g in allow if g not in already]
    try:
        with torch.serialization.safe_globals(extra):
            return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        allowed = sorted({_global_name(g) for g in allow})
        allowed_txt = (
            f"allowed beyond tensors and plain containers: {', '.join(allowed)}"
            if allowed
            else "only tensors and plain containers are allowed"
        )
        refused = _refused_globals(p, allow)
        if not refused:
            wanted = re.search(r"GLOBAL ([\w.]+)", msg) or re.search(r"but got <class '([\w.]+)'>", msg)
            wanted = wanted or re.search(r"unrecognized function (\S+)", msg)
            refused = [wanted.group(1)] if wanted else []
        if refused:
            also = refused[1:_SHOW_GLOBALS]
            more = len(refused) - 1 - len(also)
            also_txt = f" (also {', '.join(also)}{f' and {more} more' if more > 0 else ''})" if also else ""
            raise CheckpointError(
                f"{p}: refused: reading it would import or call {refused[0]}{also_txt}, which is not on the "
                f"allow-list for {fmt} checkpoints ({allowed_txt}). Nothing from the file was run. Either it "
                f"is not a {fmt} checkpoint, or it holds objects that need arbitrary unpickling; re-save "
                f"its tensors (torch.save(state_dict, ...)) from a trusted environment."
            ) from e
        opcode = re.search(r"Unsupported operand (\d+)", msg)
        if opcode:
            op = pickletools.code2op.get(chr(int(opcode.group(1))))
            op_txt = f"{op.name} (pickle protocol {op.proto})" if op is not None else f"code {opcode.group(1)}"
            raise CheckpointError(
                f"{p}: cannot be read safely: its pickle uses opcode {op_txt}, which torch.load(weights_only=True) "
                f"does not read. Nothing from the file was run. Re-save it with torch.save's default protocol "
                f"(torch.save(state_dict, path)) from a trusted environment."
            ) from e
        raise CheckpointError(f"{p}: truncated or not a PyTorch checkpoint ({_first_line(msg)})") from e
    except (RuntimeError, EOFError, KeyError, ValueError, zipfile.BadZipFile, AttributeError, IndexError) as e:
        raise CheckpointError(f"{p}: truncated or not a PyTorch checkpoint ({type(e).__name__}: {_first_line(str(e))})") from e
    except OSError as e:  # e.g. "[Errno 22] Invalid argument" from a zip cut before its directory
        if isinstance(e, PermissionError):
            raise
        raise CheckpointError(f"{p}: truncated or not a PyTorch checkpoint (OSError: {e})") from e


def _read_safetensors(p: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return dict(load_file(str(p), device="cpu"))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{p}: truncated or not a safetensors file ({e})") from e


def _is_flat(obj: object) -> bool:
    return isinstance(obj, Mapping) and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def read_state_dict(
    path: str | Path,
    *,
    key: str | None = None,
    nested: Sequence[str] = (),
    strip: str = "",
    allow: Sequence[Any] = (),
    fmt: str = "PyTorch",
) -> dict[str, Tensor]:
    """A flat ``{name: tensor}`` state dict from a PyTorch checkpoint or a ``.safetensors`` file.

    Args:
        path: the file (``.safetensors`` by suffix; anything else through :func:`read_checkpoint`),
            or ``FILE#KEY`` for the mapping under the top-level ``KEY`` of ``FILE`` (the same as
            ``key=KEY``; a path that exists as a file is taken whole, ``#`` and all).
        key: the top-level entry that must hold the state dict (e.g. ``"state_dict"``).
        nested: without ``key``: top-level entries to look in, in order, when the file itself
            is not the flat mapping (e.g. :data:`NESTED_KEYS`). Empty: the file must be flat.
        strip: a prefix removed when every key carries it (``"module."`` of ``nn.DataParallel``).
        allow, fmt: as for :func:`read_checkpoint`.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: unreadable or unsafe file, or no flat mapping where one was expected
            (the message names the keys found and, when the mapping is nested, how to pick
            one: ``--weights FILE#KEY``).
    """
    file, spec_key = split_weights_key(path)
    if spec_key is not None:
        if key is not None and key != spec_key:
            raise CheckpointError(f"{file}: #{spec_key} in the path and key={key!r} name different entries")
        key = spec_key
    p = _existing(file)
    if p.suffix == ".safetensors":
        if key is not None:
            raise CheckpointError(f"{p}: a safetensors file is one flat mapping of tensors; it has no key {key!r}")
        sd = _read_safetensors(p)
    else:
        obj = read_checkpoint(p, allow=allow, fmt=fmt)
        if key is not None:
            if not isinstance(obj, Mapping) or key not in obj:
                found = f"keys {preview_keys(obj)}" if isinstance(obj, Mapping) else f"a {type(obj).__name__}, not a mapping"
                raise CheckpointError(f"{p}: expected the top-level key {key!r}; found {found}")
            sd = tensor_mapping(obj[key], p, f"under {key!r}")
        elif nested and not _is_flat(obj):
            inner = [k for k in nested if isinstance(obj, Mapping) and _is_flat(obj.get(k))]
            if not inner:
                found = f"keys {preview_keys(obj)}" if isinstance(obj, Mapping) else f"a {type(obj).__name__}"
                raise CheckpointError(
                    f"{p}: no state dict found: expected a flat mapping of names to tensors, at the top level or "
                    f"under one of {list(nested)}; found {found}{_key_hint(obj, p)}"
                )
            sd = dict(obj[inner[0]])
        else:
            sd = tensor_mapping(obj, p, "at the top level", hint=_key_hint(obj, p))
    return strip_prefix(sd, strip) if strip else sd


def _key_hint(obj: Any, path: Path) -> str:
    """How to pick a nested mapping of ``obj`` (read from ``path``) from the command line, or ``""``."""
    inner = [k for k, v in obj.items() if isinstance(k, str) and isinstance(v, Mapping)] if isinstance(obj, Mapping) else []
    if not inner:
        return ""
    return f"; if the weights are under one of {preview_keys(inner, 5)}, pass {_WEIGHTS_KEY_HINT}, e.g. --weights {path}#{inner[0]}"


# --------------------------------------------------------------------------------------------
# Structure checks


def tensor_mapping(obj: Any, path: str | Path, where: str, *, hint: str = "") -> dict[str, Tensor]:
    """``obj`` as a flat ``{name: tensor}`` dict; else a CheckpointError naming ``where`` and what was found."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path}: expected a mapping of parameter names to tensors {where}; found a {type(obj).__name__}"
        )
    bad = [k for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, Tensor))]
    if bad:
        raise CheckpointError(
            f"{path}: expected a flat mapping of parameter names to tensors {where}; found keys "
            f"{preview_keys(obj)} of which {len(bad)} are not str -> tensor ({preview_keys(bad, 5)}){hint}"
        )
    return dict(obj)


def top_level(obj: Any, path: str | Path, required: Sequence[str], fmt: str, layout: str) -> Mapping[str, Any]:
    """``obj`` as a mapping holding every key of ``required``; else a CheckpointError describing both layouts."""
    if not isinstance(obj, Mapping) or any(k not in obj for k in required):
        found = f"keys {preview_keys(obj)}" if isinstance(obj, Mapping) else f"a {type(obj).__name__}"
        raise CheckpointError(f"{path}: not a {fmt} checkpoint: expected {layout}; found {found}")
    return obj


def strip_prefix(sd: Mapping[str, Tensor], prefix: str = "module.") -> dict[str, Tensor]:
    """Remove ``prefix`` from every key when all keys carry it (``nn.DataParallel``'s ``module.``)."""
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix) :]: v for k, v in sd.items()}
    return dict(sd)
