"""Atomic file writing, content hashing and resumable downloads.

Every file retrbench writes goes through :func:`atomic_write`: the content is written to a
temporary file in the destination folder and renamed over the destination, so a reader never
sees a half-written file and a killed writer leaves the previous version (or nothing). Files
get the usual permissions (``0666`` minus the umask), not ``mkstemp``'s ``0600``.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import logging
import os
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_save_npy",
    "download",
    "sha256_file",
    "stable_hash",
]

log = logging.getLogger(__name__)

_CHUNK = 1 << 20  # 1 MiB
_sha_memo: dict[tuple[str, int, int], str] = {}
_umask_lock = threading.Lock()


def _file_mode() -> int:
    with _umask_lock:
        mask = os.umask(0)
        os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Context manager yielding a file object whose content replaces ``path`` on success.

    The parent folder is created. On an exception (or ``KeyboardInterrupt``) the temporary
    file is removed and ``path`` is left as it was.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write: mode must be 'wb' or 'w', got {mode!r}")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_write(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with atomic_write(path, "w") as f:
        f.write(text)
    return Path(path)


def atomic_save_npy(path: str | Path, arr: Any) -> Path:
    """``np.save`` (no pickles) to ``path`` atomically; returns the path."""
    import numpy as np

    with atomic_write(path, "wb") as f:
        np.save(f, arr, allow_pickle=False)
    return Path(path)


def stable_hash(obj: Any, n: int = 16) -> str:
    """Hex sha256 of the canonical JSON of ``obj`` (sorted keys), truncated to ``n`` characters."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks.

    Memoised in-process on ``(resolved path, size, mtime_ns)``, so asking again does not hash
    the file again unless it changed.
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


def download(
    url: str,
    dest: str | Path,
    sha256: str | None = None,
    progress: bool = True,
    *,
    opener: Callable[..., Any] | None = None,
) -> Path:
    """Download ``url`` to ``dest`` via ``dest.part``, resuming an existing part file.

    The part file is continued with an HTTP ``Range`` request (restarted if the server ignores
    it), checked against ``sha256`` when given, and only then renamed atomically to ``dest``.
    A wrong checksum deletes the part file and raises ``ValueError`` naming both hashes; an
    interrupted transfer keeps the part file for the next call. The progress bar is shown only
    on a terminal.

    Returns:
        ``dest`` as a Path.
    """
    from tqdm.auto import tqdm

    urlopen = opener or urllib.request.urlopen
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    start = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": "retrbench"})
    if start:
        req.add_header("Range", f"bytes={start}-")
    try:
        resp = urlopen(req, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not start:
            raise
        # Range not satisfiable: the part file is complete or longer than the file; start over.
        log.warning("server refused to resume %s from byte %d; downloading again", url, start)
        part.unlink()
        return download(url, dest, sha256=sha256, progress=progress, opener=opener)
    with resp:
        resumed = bool(start) and getattr(resp, "status", None) == 206
        if start and not resumed:
            log.info("server ignored the Range request for %s; downloading from the start", url)
            start = 0
        length = resp.headers.get("Content-Length")
        total = int(length) + start if length is not None else None
        log.info("downloading %s to %s%s", url, dest, f" (resuming at byte {start})" if start else "")
        received = start
        show = progress and sys.stderr.isatty()
        with (
            open(part, "ab" if resumed else "wb") as f,
            tqdm(total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name, disable=not show) as bar,
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
