"""Deterministic, atomic build of the demo dataset folder.

:func:`generate` draws every file in memory: one generator per image, seeded from
:data:`SEED` and the image's name, fixed JPEG settings, no metadata; two builds with the same
Pillow / numpy are byte-identical. :func:`build_demo` writes them (through
:mod:`retrbench.utils.io`) into a temporary folder beside the target and swaps it into place; a
folder whose files do not match its manifest is rebuilt, a valid one is reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ...utils.io import atomic_write_bytes, atomic_write_text, sha256_file
from .catalogue import DISTRACTORS, INSTANCES, SOURCES, read_source
from .geometry import box_in_view, label, measure
from .render import RECIPES, Photo, distractor_view, encode_jpeg, instance_view, is_grey, query_view, reduce_photo

__all__ = ["VERSION", "DIRNAME", "GND_FILE", "SEED", "build_demo", "generate", "is_valid", "manifest"]

log = logging.getLogger(__name__)

VERSION = 1
DIRNAME = f"demo-v{VERSION}"
GND_FILE = "gnd_demo.pkl"
SEED = 20240611


def _rng(*key: object) -> np.random.Generator:
    """The generator of one image (or of the shuffle), seeded from :data:`SEED` and ``key``."""
    return np.random.default_rng([SEED, zlib.crc32("/".join(map(str, key)).encode())])


def _rounded(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()}


@dataclass(frozen=True)
class _Item:
    """One drawn image: its stem (before renaming), JPEG bytes, ``views.json`` record,
    instance index (-1 for a distractor) and geometry measurements."""

    stem: str
    jpeg: bytes
    record: dict[str, Any]
    instance: int
    measures: dict[str, float]


def _make_instance_view(i: int, photo: Photo, recipe: str, backgrounds: list[Image.Image]) -> _Item:
    inst = INSTANCES[i]
    rng = _rng("view", inst.name, recipe)
    img, g = instance_view(inst, photo, recipe, rng, backgrounds)
    meas = _rounded(measure(g, photo.box))
    q = int(rng.integers(35, 91))
    rec = {"instance": inst.name, "recipe": recipe, "quality": q, **meas}
    return _Item(f"{inst.name}/{recipe}", encode_jpeg(img, q), rec, i, meas)


def _make_query(i: int, photo: Photo, k: int) -> _Item:
    inst = INSTANCES[i]
    rng = _rng("query", inst.name, k)
    img, g = query_view(photo, k, rng)
    meas = _rounded(measure(g, photo.box))
    bbx = [round(float(v), 1) for v in box_in_view(g, photo.box)]
    q = int(rng.integers(80, 93))
    rec = {"instance": inst.name, "recipe": f"query{k}", "quality": q, "bbx": bbx, **meas}
    return _Item(f"query_{inst.name}_{k}", encode_jpeg(img, q), rec, i, meas)


def _make_distractor(key: str, region: tuple[int, int, int, int], photo: Photo, grey: bool, j: int) -> _Item:
    rng = _rng("distractor", key, region, j)
    q = int(rng.integers(35, 91))
    data = encode_jpeg(distractor_view(photo, grey, j, rng), q)
    rec = {"instance": None, "distractor": key, "region": list(region), "recipe": f"distractor{j % 4}", "quality": q}
    return _Item(f"{key}/{region}/{j}", data, rec, -1, {})


def generate() -> tuple[dict[str, bytes], list[str]]:
    """Every file of the dataset in memory (``{relative path: bytes}``) and the mismatched sources.

    Each image has its own seeded generator (keyed by its name), so changing one recipe does
    not change the others.
    """
    mismatched: list[str] = []
    originals = {src.key: read_source(src, mismatched) for src in SOURCES}
    # Whole distractor photos also serve as backgrounds of composited views and as occluders.
    backgrounds = [
        reduce_photo(originals[k], (0, 0, *originals[k].size), (0, 0, 1, 1)).image
        for k, r, _ in DISTRACTORS
        if r is None
    ]

    db_jobs: list[Callable[[], _Item]] = []
    q_jobs: list[Callable[[], _Item]] = []
    for i, inst in enumerate(INSTANCES):
        photo = reduce_photo(originals[inst.source], inst.region, inst.box)
        db_jobs += [partial(_make_instance_view, i, photo, recipe, backgrounds) for recipe in RECIPES]
        q_jobs += [partial(_make_query, i, photo, k) for k in (1, 2)]
    for key, region, n in DISTRACTORS:
        img = originals[key]
        region = region or (0, 0, img.width, img.height)
        photo = reduce_photo(img, region, region)
        db_jobs += [partial(_make_distractor, key, region, photo, is_grey(img), j) for j in range(n)]
    items = [job() for job in db_jobs]
    queries = [job() for job in q_jobs]

    order = _rng("shuffle").permutation(len(items))
    imlist = [f"demo_{r:03d}" for r in range(len(items))]
    files: dict[str, bytes] = {}
    records: list[dict[str, Any]] = []
    for row, idx in enumerate(order):
        files[f"jpg/{imlist[row]}.jpg"] = items[idx].jpeg
        records.append({"name": imlist[row], "role": "database", **items[idx].record})
    gnd: list[dict[str, Any]] = []
    for query in queries:
        files[f"jpg/{query.stem}.jpg"] = query.jpeg
        records.append({"name": query.stem, "role": "query", **query.record})
        lists: dict[str, list[int]] = {"easy": [], "hard": [], "junk": []}
        for row, idx in enumerate(order):
            if items[idx].instance == query.instance:
                lists[label(items[idx].measures, query.measures)].append(row)
        gnd.append({**lists, "bbx": [float(v) for v in query.record["bbx"]]})
    data = {"imlist": imlist, "qimlist": [q.stem for q in queries], "gnd": gnd}
    files[GND_FILE] = pickle.dumps(data, protocol=4)
    files["views.json"] = (json.dumps(records, indent=1, sort_keys=True) + "\n").encode()
    return files, mismatched


def manifest(files: dict[str, bytes], mismatched: list[str]) -> dict[str, Any]:
    """``manifest.json``: version, seed, Pillow / numpy versions, sources (licence, credit, match), sha256 per file."""
    import PIL

    return {
        "name": "demo",
        "version": VERSION,
        "seed": SEED,
        "generator": {"pillow": PIL.__version__, "numpy": np.__version__},
        "sources": {
            s.key: {
                "package": s.package,
                "path": s.path,
                "licence": s.licence,
                "credit": s.credit,
                "sha256_expected": s.sha256,
                "matches": s.key not in mismatched,
            }
            for s in SOURCES
        },
        "files": {k: hashlib.sha256(v).hexdigest() for k, v in sorted(files.items())},
    }


def is_valid(ddir: Path) -> bool:
    """True when ``ddir/manifest.json`` is this version's and every listed file matches its sha256."""
    try:
        man = json.loads((ddir / "manifest.json").read_text())
        if man.get("name") != "demo" or man.get("version") != VERSION or not man.get("files"):
            return False
        return all(sha256_file(ddir / rel) == sha for rel, sha in man["files"].items())
    except (OSError, ValueError, AttributeError, TypeError):
        return False


def build_demo(root: str | Path, *, force: bool = False) -> Path:
    """Build the demo dataset under ``root`` (a data root) unless a valid one is there; its folder.

    Returns ``<root>/demo-v1``. With ``force``, rebuild even when the existing folder is valid.
    The files go (each written atomically) into a temporary folder beside the target, which then
    replaces the target in one rename; an existing folder is moved aside first and deleted after.
    """
    root = Path(root).expanduser()
    ddir = root / DIRNAME
    if not force and is_valid(ddir):
        return ddir
    log.info("building the demo dataset in %s (first use; a few seconds)", ddir)
    t0 = time.perf_counter()
    files, mismatched = generate()
    man = manifest(files, mismatched)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DIRNAME}.tmp-", dir=root))
    old: Path | None = None
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        (tmp / "jpg").mkdir()
        for rel, data in files.items():
            atomic_write_bytes(tmp / rel, data)
        atomic_write_text(tmp / "manifest.json", json.dumps(man, indent=1, sort_keys=True) + "\n")
        if not force and is_valid(ddir):  # another process finished first
            return ddir
        if ddir.exists() or ddir.is_symlink():  # incomplete, corrupt or forced: move it aside first
            old = Path(tempfile.mkdtemp(prefix=f".{DIRNAME}.old-", dir=root))
            os.replace(ddir, old / DIRNAME)
        try:
            os.replace(tmp, ddir)
        except OSError:
            if is_valid(ddir):  # another process finished first
                return ddir
            raise
    finally:
        for leftover in (tmp, old):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)
    log.info("built the demo dataset in %s (%d files, %.1f s)", ddir, len(files), time.perf_counter() - t0)
    return ddir
