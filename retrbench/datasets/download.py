"""Download the public benchmark datasets into the layouts their loaders expect.

``download_dataset(name, data_root)`` fetches every archive of :data:`SOURCES` ``[name]`` into
``<data_root>/_downloads/`` with :func:`retrbench.utils.io.download` (resumable through
a ``.part`` file, checked against ``sha256`` when one is known, renamed atomically), unpacks it
safely (absolute paths, ``..`` members, links and device files are refused or skipped; tar
members also go through ``tarfile.data_filter`` where Python has it) into a staging folder, and
only then moves the files into place (files are written plainly into the staging folder, which
is the unit of atomicity, then each is renamed into place). A ``.complete`` marker per dataset and
archive (written atomically) makes a re-run skip what is already done, without touching the network.

Layouts produced (see each loader)::

    roxford5k/jpg/<name>.jpg + roxford5k/gnd_roxford5k.pkl     (rparis6k, oxford5k, paris6k alike)
    revisitop1m/revisitop1m.txt + revisitop1m/jpg/<listed path>
    ukbench/ukbench%05d.jpg
    coil20/obj<o>__<v>.png

Official sources (revisitop ``python/download.py``, cirtorch ``utils/download.py``, the VGG
Oxford/Paris Buildings pages, CAVE COIL-20; UKBench's original host is gone, the Internet
Archive copy is used). No checksums are published for these files, so ``sha256`` is None
throughout: pin one in :data:`SOURCES` (or a mirror) once you have verified a copy.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
import shutil
import tarfile
import urllib.error
import urllib.parse
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..utils.io import atomic_write_text, download
from ._common import resolve_data_root

__all__ = ["Archive", "SOURCES", "UnsafeArchiveError", "download_dataset"]

logger = logging.getLogger(__name__)

_KINDS = ("file", "tgz", "tar.gz", "zip")
_RETRIES = 3


class UnsafeArchiveError(ValueError):
    """An archive member would land outside the target folder (absolute path or ``..``)."""


@dataclass(frozen=True)
class Archive:
    """One file of a dataset's sources.

    Attributes:
        url: official address.
        filename: name under ``<data_root>/_downloads/`` (and, for ``kind="file"``, in ``dest_subdir``).
        sha256: expected hex digest, or None where none is published (not verified then).
        kind: ``file`` (copied as is), ``tgz`` / ``tar.gz`` (gzip tar) or ``zip``.
        dest_subdir: folder under the data root receiving the file or the archive's members.
        flatten: put every extracted file directly in ``dest_subdir`` under its base name
            (dropping the archive's folders, e.g. Paris' ``paris/<landmark>/``); False keeps them.
        include: regex (``re.search`` on the member path); members not matching are skipped.
    """

    url: str
    filename: str
    sha256: str | None
    kind: str
    dest_subdir: str
    flatten: bool = False
    include: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"Archive {self.filename}: kind must be one of {_KINDS}, got {self.kind!r}")


_REVISITOP = "http://cmp.felk.cvut.cz/revisitop/data/datasets"
_CIRTORCH = "http://cmp.felk.cvut.cz/cnnimageretrieval/data/test"
_OXFORD_IMAGES = "https://www.robots.ox.ac.uk/~vgg/data/oxbuildings/oxbuild_images-v1.tgz"
_PARIS_IMAGES = tuple(f"https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/paris_{i}-v1.tgz" for i in (1, 2))
_R1M = "http://ptak.felk.cvut.cz/revisitop/revisitop1m"
_JPG = r"\.jpg$"


def _oxford_images(name: str) -> list[Archive]:
    return [Archive(_OXFORD_IMAGES, "oxbuild_images-v1.tgz", None, "tgz", f"{name}/jpg", flatten=True, include=_JPG)]


def _paris_images(name: str) -> list[Archive]:
    return [
        Archive(u, u.rsplit("/", 1)[1], None, "tgz", f"{name}/jpg", flatten=True, include=_JPG) for u in _PARIS_IMAGES
    ]


def _gnd(base: str, name: str) -> Archive:
    return Archive(f"{base}/{name}/gnd_{name}.pkl", f"gnd_{name}.pkl", None, "file", name)


SOURCES: dict[str, list[Archive]] = {
    "roxford5k": [_gnd(_REVISITOP, "roxford5k"), *_oxford_images("roxford5k")],
    "rparis6k": [_gnd(_REVISITOP, "rparis6k"), *_paris_images("rparis6k")],
    "oxford5k": [_gnd(_CIRTORCH, "oxford5k"), *_oxford_images("oxford5k")],
    "paris6k": [_gnd(_CIRTORCH, "paris6k"), *_paris_images("paris6k")],
    "revisitop1m": [
        Archive(f"{_R1M}/revisitop1m.txt", "revisitop1m.txt", None, "file", "revisitop1m"),
        *(
            Archive(f"{_R1M}/jpg/revisitop1m.{i}.tar.gz", f"revisitop1m.{i}.tar.gz", None, "tar.gz", "revisitop1m/jpg")
            for i in range(1, 101)
        ),
    ],
    # The zip holds full/ (the images), thumbnails/ (same names, smaller) and html pages.
    "ukbench": [
        Archive(
            "https://archive.org/download/ukbench/ukbench.zip",
            "ukbench.zip",
            None,
            "zip",
            "ukbench",
            flatten=True,
            include=r"(^|/)full/ukbench\d{5}\.jpg$",
        )
    ],
    "coil20": [
        Archive(
            "http://www.cs.columbia.edu/CAVE/databases/SLAM_coil-20_coil-100/coil-20/coil-20-proc.zip",
            "coil-20-proc.zip",
            None,
            "zip",
            "coil20",
            flatten=True,
            include=r"obj\d+__\d+\.png$",
        )
    ],
}


# ----------------------------------------------------------------------------- safe extraction


def _safe_relpath(name: str, archive: Path) -> str:
    """The member path normalised to a relative POSIX path; ``UnsafeArchiveError`` if it escapes."""
    s = name.replace("\\", "/")
    parts = s.split("/")
    if s.startswith("/") or re.match(r"^[A-Za-z]:", s) or ".." in parts:
        raise UnsafeArchiveError(f"{archive}: refusing member {name!r} (absolute path or '..'); nothing was unpacked")
    rel = posixpath.normpath(s)
    return "" if rel == "." else rel


def _target(rel: str, archive: Archive) -> str | None:
    """Where a member file goes inside the staging folder, or None to skip it."""
    if not rel or (archive.include is not None and not re.search(archive.include, rel)):
        return None
    return posixpath.basename(rel) if archive.flatten else rel


def _write(src, staging: Path, target: str) -> None:  # noqa: ANN001 (a binary file object)
    out = staging / target
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f:
        shutil.copyfileobj(src, f, 1 << 20)


def _extract_tar(path: Path, staging: Path, archive: Archive) -> int:
    n = 0
    with tarfile.open(path, "r|*") as tf:
        for m in tf:
            rel = _safe_relpath(m.name, path)
            if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 / 3.12: the "data" extraction filter
                try:
                    tarfile.data_filter(m, str(staging))
                except tarfile.FilterError as e:
                    raise UnsafeArchiveError(f"{path}: refusing member {m.name!r} ({e}); nothing was unpacked") from e
            if not m.isfile():
                if not m.isdir():
                    logger.warning("%s: skipping %s (not a regular file)", path, m.name)
                continue
            target = _target(rel, archive)
            if target is None:
                continue
            src = tf.extractfile(m)
            assert src is not None
            _write(src, staging, target)
            n += 1
    return n


def _extract_zip(path: Path, staging: Path, archive: Archive) -> int:
    n = 0
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        rels = [_safe_relpath(i.filename, path) for i in infos]  # all checked before anything is written
        for info, rel in zip(infos, rels, strict=True):
            if info.is_dir() or (info.external_attr >> 16) & 0o170000 == 0o120000:  # folders, symlinks
                continue
            target = _target(rel, archive)
            if target is None:
                continue
            with zf.open(info) as src:
                _write(src, staging, target)
            n += 1
    return n


def _merge(staging: Path, dest: Path) -> None:
    """Move every file of ``staging`` to the same relative path under ``dest`` (replacing)."""
    for dirpath, _, filenames in os.walk(staging):
        rel = Path(dirpath).relative_to(staging)
        (dest / rel).mkdir(parents=True, exist_ok=True)
        for fn in filenames:
            os.replace(Path(dirpath) / fn, dest / rel / fn)


def _unpack(path: Path, dest: Path, archive: Archive, work: Path) -> int:
    """Extract ``path`` into ``dest`` via a staging folder: on any error nothing reaches ``dest``."""
    staging = work / f"{archive.filename}.unpack"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        if archive.kind == "zip":
            n = _extract_zip(path, staging, archive)
        else:
            n = _extract_tar(path, staging, archive)
        _merge(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return n


# ----------------------------------------------------------------------------- download


def _source_url(archive: Archive, base_url: str | None) -> str:
    if base_url is None:
        return archive.url
    return base_url.rstrip("/") + urllib.parse.urlparse(archive.url).path


def _fetch(url: str, dest: Path, sha256: str | None, progress: bool) -> Path:
    """:func:`~retrbench.utils.io.download` retried on interrupted transfers (each retry resumes the part file)."""
    for attempt in range(1, _RETRIES + 1):
        try:
            return download(url, dest, sha256=sha256, progress=progress)
        except urllib.error.HTTPError:
            raise
        except OSError as e:
            if attempt == _RETRIES:
                raise
            logger.warning("%s (attempt %d of %d); resuming", e, attempt, _RETRIES)
    raise AssertionError("unreachable")


def download_dataset(
    name: str,
    data_root: str | Path | None = None,
    *,
    base_url: str | None = None,
    progress: bool = True,
    keep_archives: bool = False,
) -> Path:
    """Download and unpack dataset ``name`` (a key of :data:`SOURCES`) under ``data_root``.

    Args:
        name: ``roxford5k``, ``rparis6k``, ``oxford5k``, ``paris6k``, ``revisitop1m``, ``ukbench``
            or ``coil20``.
        data_root: default :func:`~retrbench.utils.paths.default_data_root`.
        base_url: replaces scheme and host of every source (a mirror keeping the official paths;
            e.g. ``http://mirror/x`` fetches ``http://mirror/x/~vgg/data/oxbuildings/oxbuild_images-v1.tgz``).
        progress: progress bars (on a terminal only).
        keep_archives: keep the downloaded archives in ``<data_root>/_downloads/`` after unpacking.

    Returns:
        The data root (pass it to ``load_dataset``).

    Raises:
        KeyError: unknown name. ValueError: checksum mismatch (the download is deleted) or an
        unsafe archive member (nothing is unpacked). OSError: network failure after retries
        (the ``.part`` file is kept for the next call to resume).
    """
    if name not in SOURCES:
        raise KeyError(f"no download source for dataset {name!r}; known: {', '.join(sorted(SOURCES))}")
    root = resolve_data_root(data_root)
    work = root / "_downloads"
    markers = work / name
    markers.mkdir(parents=True, exist_ok=True)
    for archive in SOURCES[name]:
        marker = markers / f"{archive.filename}.complete"
        if marker.is_file():
            logger.info("%s: %s already done (%s); skipping", name, archive.filename, marker)
            continue
        dest = root / archive.dest_subdir
        url = _source_url(archive, base_url)
        if archive.kind == "file":
            _fetch(url, dest / archive.filename, archive.sha256, progress)
        else:
            path = work / archive.filename
            if not path.is_file():  # an archive kept by an earlier run (or another dataset) is reused
                _fetch(url, path, archive.sha256, progress)
            n = _unpack(path, dest, archive, work)
            logger.info("%s: unpacked %d files from %s into %s", name, n, archive.filename, dest)
            if not keep_archives:
                path.unlink()
        atomic_write_text(marker, f"{url}\n")
    return root
