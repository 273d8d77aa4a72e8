"""Checkpoint utilities shared by every backbone: find, download, verify, read and load weights.

The path of a weights file is resolved once (:func:`resolve_weights`), read safely
(:func:`load_state_dict`, ``weights_only=True``), renamed to the target architecture's
parameter names (:func:`remap_state_dict`) and loaded with every key accounted for
(:func:`strict_load`). :func:`sha256_file` of the file used becomes the backbone's
``weights_id``, which keys the feature cache.

Example::

    path = resolve_weights(info, weights)            # explicit path, cache, or download
    sd = remap_state_dict(load_state_dict(path), [(r"^module\\.", "")])
    strict_load(net, sd, ignore=(r"^classifier\\.",))
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import pickle
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from .base import BackboneInfo

__all__ = [
    "CheckpointError",
    "default_cache_dir",
    "download",
    "load_state_dict",
    "remap_state_dict",
    "resolve_weights",
    "sha256_file",
    "strict_load",
]

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20  # 1 MiB
_SHOW = 10  # keys listed per category in strict_load errors
_sha_memo: dict[tuple[str, int, int], str] = {}


class CheckpointError(ValueError):
    """A weights file that exists but cannot be used (corrupt, unsafe or wrongly structured)."""


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks.

    Memoised in-process on ``(resolved path, size, mtime_ns)``, so rebuilding a backbone
    does not hash its weights again unless the file changed.
    """
    p = Path(path).resolve()
    st = p.stat()
    memo_key = (str(p), st.st_size, st.st_mtime_ns)
    if memo_key in _sha_memo:
        return _sha_memo[memo_key]
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    _sha_memo[memo_key] = digest
    return digest


def _keys_preview(keys: Iterable[object], n: int = _SHOW) -> str:
    keys = list(keys)
    shown = ", ".join(repr(k) for k in keys[:n])
    return shown + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def load_state_dict(path: str | Path, *, key: str | None = None) -> dict[str, Tensor]:
    """Read a flat ``{name: tensor}`` state dict with ``torch.load(weights_only=True)`` on CPU.

    Args:
        path: checkpoint file.
        key: top-level entry holding the state dict (e.g. ``"state_dict"`` or ``"model"``);
            None: the file itself must be the flat mapping.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file is truncated or not a PyTorch checkpoint; it needs arbitrary
            unpickling (the refused global is named); or its structure is not a flat mapping of
            names to tensors (the expected and found keys are named).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"weights file not found: {p}" + (" (it is a directory)" if p.is_dir() else ""))
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", msg)
        if found:
            raise CheckpointError(
                f"{p}: refused by torch.load(weights_only=True): the file needs arbitrary unpickling "
                f"(it asks for the global {found.group(1)}). Re-save it as a plain state dict of tensors "
                f"(torch.save(model.state_dict(), ...)) from a trusted environment."
            ) from e
        if "Weights only load failed" in msg:
            detail = re.search(r"WeightsUnpickler error:\s*(.+?)\n\n", msg, re.S)
            reason = detail.group(1).strip() if detail else "unsupported pickle content"
            raise CheckpointError(
                f"{p}: truncated or not a PyTorch checkpoint (torch.load(weights_only=True) refused it: {reason})"
            ) from e
        raise CheckpointError(f"{p}: truncated or not a PyTorch checkpoint ({msg})") from e
    except (RuntimeError, EOFError, KeyError, ValueError, zipfile.BadZipFile, AttributeError, IndexError) as e:
        raise CheckpointError(f"{p}: truncated or not a PyTorch checkpoint ({type(e).__name__}: {e})") from e

    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            found_keys = list(obj) if isinstance(obj, Mapping) else f"a {type(obj).__name__}, not a mapping"
            raise CheckpointError(f"{p}: expected the top-level key {key!r}; found {_fmt_found(found_keys)}")
        obj = obj[key]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{p}: expected a mapping of parameter names to tensors; found a {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, Tensor))]
    if bad:
        nested = [k for k in obj if isinstance(obj[k], Mapping)]
        hint = f"; pass key= one of {nested!r} if it holds the weights" if nested and key is None else ""
        where = f"under {key!r}" if key is not None else "at the top level"
        raise CheckpointError(
            f"{p}: expected a flat mapping of parameter names to tensors {where}; found keys "
            f"{_keys_preview(obj)} of which {len(bad)} are not str -> tensor ({_keys_preview(bad, 5)}){hint}"
        )
    return dict(obj)


def _fmt_found(found: object) -> str:
    return f"keys {_keys_preview(found)}" if isinstance(found, list) else str(found)


def remap_state_dict(sd: Mapping[str, Tensor], rules: Iterable[tuple[str, str]]) -> dict[str, Tensor]:
    """Rename keys with regex rules, applied in order (each ``re.sub`` sees the previous result).

    Rules match anywhere unless anchored; write them so that a renamed key cannot match a later
    rule unintentionally (e.g. anchor with ``^`` and rename ``_bn0`` before ``_bn1``). Values are
    not copied. ``ValueError`` if two keys end up with the same name.

    Example: ``remap_state_dict(sd, [(r"^module\\.", ""), (r"\\.fc\\.", ".head.")])``.
    """
    compiled = [(re.compile(pat), rep) for pat, rep in rules]
    out: dict[str, Tensor] = {}
    source: dict[str, str] = {}
    for k, v in sd.items():
        new = k
        for pat, rep in compiled:
            new = pat.sub(rep, new)
        if new in out:
            raise ValueError(f"remap_state_dict: {source[new]!r} and {k!r} both map to {new!r}")
        out[new] = v
        source[new] = k
    return out


def strict_load(module: nn.Module, sd: Mapping[str, Tensor], *, ignore: tuple[str, ...] = ()) -> None:
    """Load ``sd`` into ``module``, requiring every key on both sides to match in name and shape.

    Args:
        module: target; its parameters and buffers are overwritten in place.
        sd: state dict with the module's own names (see :func:`remap_state_dict`).
        ignore: regex patterns (``re.search``) of keys allowed to be missing from ``sd``, unused
            in ``sd``, or of a different shape; such module entries keep their current values.

    Raises:
        ValueError: listing missing, unexpected and shape-mismatched keys (first 10 of each, with counts).
    """
    pats = [re.compile(p) for p in ignore]

    def ignored(k: str) -> bool:
        return any(p.search(k) for p in pats)

    own = module.state_dict()
    missing = [k for k in own if k not in sd and not ignored(k)]
    unexpected = [k for k in sd if k not in own and not ignored(k)]
    mismatched = [k for k in sd if k in own and tuple(sd[k].shape) != tuple(own[k].shape)]
    bad_shape = [k for k in mismatched if not ignored(k)]
    if missing or unexpected or bad_shape:
        name = type(module).__name__
        lines = [
            f"state dict does not fit {name}: {len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(bad_shape)} with another shape"
        ]
        if missing:
            lines.append(f"  missing from the checkpoint ({len(missing)}): {_keys_preview(missing)}")
        if unexpected:
            lines.append(f"  unexpected in the checkpoint ({len(unexpected)}): {_keys_preview(unexpected)}")
        if bad_shape:
            shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in bad_shape[:_SHOW]]
            more = f" ... ({len(bad_shape) - _SHOW} more)" if len(bad_shape) > _SHOW else ""
            lines.append(f"  shape mismatch ({len(bad_shape)}): " + "; ".join(shapes) + more)
        if ignore:
            lines.append(f"  (ignored patterns: {list(ignore)})")
        raise ValueError("\n".join(lines))
    skip = set(mismatched)
    result = module.load_state_dict({k: v for k, v in sd.items() if k in own and k not in skip}, strict=False)
    assert not result.unexpected_keys and all(ignored(k) for k in result.missing_keys), result


def default_cache_dir() -> Path:
    """``$RETRBENCH_CACHE/weights`` if that is set, else torch hub's ``<hub dir>/checkpoints``."""
    env = os.environ.get("RETRBENCH_CACHE")
    if env:
        return Path(env).expanduser() / "weights"
    return Path(torch.hub.get_dir()) / "checkpoints"


def download(url: str, dest: str | Path, sha256: str | None = None, progress: bool = True) -> Path:
    """Download ``url`` to ``dest`` via ``dest.part``, resuming an existing part file.

    The part file is continued with an HTTP ``Range`` request (restarted if the server ignores it),
    checked against ``sha256`` when given, and only then renamed atomically to ``dest``. A wrong
    checksum deletes the part file and raises ``ValueError`` naming both hashes; an interrupted
    transfer keeps the part file for the next call. The progress bar is shown only on a terminal.

    Returns:
        ``dest`` as a Path.
    """
    from tqdm.auto import tqdm

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    start = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": "retrbench"})
    if start:
        req.add_header("Range", f"bytes={start}-")
    try:
        resp = urllib.request.urlopen(req, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not start:
            raise
        # Range not satisfiable: the part file is complete or longer than the file; start over.
        logger.warning("server refused to resume %s from byte %d; downloading again", url, start)
        part.unlink()
        return download(url, dest, sha256=sha256, progress=progress)
    with resp:
        resumed = bool(start) and getattr(resp, "status", None) == 206
        if start and not resumed:
            logger.info("server ignored the Range request for %s; downloading from the start", url)
            start = 0
        length = resp.headers.get("Content-Length")
        total = int(length) + start if length is not None else None
        logger.info("downloading %s to %s%s", url, dest, f" (resuming at byte {start})" if start else "")
        received = start
        show = progress and sys.stderr.isatty()
        with (
            open(part, "ab" if resumed else "wb") as f,
            tqdm(
                total=total,
                initial=start,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=dest.name,
                disable=not show,
            ) as bar,
        ):
            try:
                while chunk := resp.read(_CHUNK):
                    f.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            except (http.client.IncompleteRead, OSError) as e:
                f.write(getattr(e, "partial", b""))
                received += len(getattr(e, "partial", b""))
                raise OSError(f"download of {url} interrupted at byte {received}; {part} is kept to resume") from e
    if total is not None and received < total:
        raise OSError(f"download of {url} interrupted at byte {received} of {total}; {part} is kept to resume")
    if sha256 is not None:
        actual = sha256_file(part)
        if actual.lower() != sha256.lower():
            part.unlink()
            raise ValueError(
                f"checksum mismatch for {url}: expected sha256 {sha256.lower()}, got {actual}; "
                f"the download was deleted and not used"
            )
    os.replace(part, dest)
    return dest


def resolve_weights(info: BackboneInfo, weights: str | Path | None, *, cache_dir: Path | None = None) -> Path:
    """Path of the weights file to load for a backbone.

    Order: the explicit ``weights`` path (must exist); ``<cache_dir>/<info.weights_file>``;
    a download of ``info.url`` into the cache (verified against ``info.sha256``).
    ``cache_dir`` defaults to :func:`default_cache_dir`.

    Raises:
        FileNotFoundError: ``weights`` does not exist, or there is no cached file and no URL
            (the message says where it looked and how to pass ``--weights``).
    """
    if weights is not None:
        p = Path(weights).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"weights file not found: {p}")
        return p
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cached = root / info.weights_file if info.weights_file else None
    if cached is not None and cached.is_file():
        return cached
    if info.url:
        name = info.weights_file or Path(urllib.parse.urlparse(info.url).path).name
        return download(info.url, root / name, sha256=info.sha256)
    looked = f"looked for {cached}" if cached is not None else f"no file name is known to look for in {root}"
    source = f" ({info.weights_source})" if info.weights_source else ""
    raise FileNotFoundError(
        f"no weights available for this backbone{source}: {looked}, and no download URL is published. "
        f"Put the file there, set RETRBENCH_CACHE, or pass its path with --weights PATH (weights=PATH in Python)."
    )
