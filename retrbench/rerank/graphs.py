"""k-nearest-neighbour graphs of the database, for DBA and diffusion.

Neighbour search (the ``knn`` parameter of ``dba``, ``dfs`` and ``dfs-offline``):

* ``exact``: every pair scored. Blocked products over the upper triangle of ``x @ x.T`` (the
  matrix is symmetric: about half the work), screened in bfloat16 where the CPU multiplies it
  natively (AVX512-BF16 / AMX: 2-3x faster than float32), the few pairs that the screen's
  proven error bound cannot rule out rescored in float32, so the lists are those of float32
  products (:mod:`._exact`); faiss's flat kernel for ``k > 256``;
* ``ivf`` (alias ``approx``): a faiss ``IVF{nlist},Flat`` index (``nlist = 2 sqrt(N)``,
  trained on ``40 nlist`` sampled vectors; ``SQ8`` codes instead of ``Flat`` when a float32
  copy of the database would exceed 4 GiB) searched with ``nprobe`` lists (default 8);
* ``hnsw``: a faiss ``HNSW32`` index searched with ``efSearch`` (default ``max(64, 2 k)``);
* ``auto`` (default): exact up to :data:`EXACT_KNN_MAX_N` (20,000) database vectors, ``ivf`` above.

Every graph carries an ``info`` dict that says how it was made (``kind``, ``index``,
``params``) and, for the approximate ones, its recall@k against exact search measured on a
seeded sample of :data:`RECALL_SAMPLE` vectors: the rerankers put it in their reports, so the
result rows say what was approximated. Queries are always searched exactly.

Graphs are cached in memory (:mod:`.cache`) and, from :data:`DISK_CACHE_MIN_N` vectors, on
disk under ``$RETRBENCH_CACHE/graphs/<database digest>/``, keyed by a digest of the database's
bytes and the parameters; an approximate graph is built in chunks of rows, each written
atomically, so a killed build resumes where it stopped. A cached list for a larger ``k`` is
sliced rather than recomputed. torch and faiss are imported on first use.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..types import as_rows
from ..utils.io import atomic_write, stable_hash
from ..utils.linalg import exact_knn, exact_search, recall_at_k
from ..utils.paths import default_cache_root
from ._exact import _exact_graph
from .base import progress_bar
from .cache import CACHE, freeze

__all__ = [
    "DISK_CACHE_MIN_N",
    "EXACT_KNN_MAX_N",
    "KNN_METHODS",
    "KnnGraph",
    "content_digest",
    "database_knn",
    "knn_graph",
    "resolve_knn",
]

# ``knn=auto`` builds exact kNN graphs up to this many database vectors, approximate ones above.
EXACT_KNN_MAX_N = 20000
KNN_METHODS = ("exact", "approx", "auto", "ivf", "hnsw")
DISK_CACHE_MIN_N = 50000  # graphs of databases this large are also kept on disk
RECALL_SAMPLE = 1000  # vectors searched exactly to measure an approximate graph's recall
_FLAT_MAX_BYTES = 4 << 30  # above this, an IVF graph stores SQ8 codes, not a float32 copy
_CHUNK_ROWS = 1 << 16  # rows searched (and saved) per chunk of an index graph
_TOPK_MAX_K = 256  # exact graphs: blocked products + top-k up to this k, faiss's kernel above


def resolve_knn(method: str, n: int) -> str:
    """``exact``, ``ivf`` or ``hnsw`` for a database of ``n`` vectors; ``ValueError`` for an unknown method."""
    method = str(method).lower()
    if method == "auto":
        return "exact" if n <= EXACT_KNN_MAX_N else "ivf"
    if method == "approx":
        return "ivf"
    if method not in KNN_METHODS:
        raise ValueError(f"knn must be one of {', '.join(KNN_METHODS)}, got {method!r}")
    return method


@dataclass(frozen=True, eq=False)
class KnnGraph:
    """The ``k`` nearest database vectors of every database vector (itself included), best first.

    Attributes:
        sims: ``(N, k)`` float32 inner products (``-inf`` where an index found fewer), read-only.
        ids: ``(N, k)`` int64 database indices (``-1`` where nothing), read-only.
        info: how it was made (JSON-able): ``kind`` (``exact``, ``ivf``, ``hnsw``), ``exact``,
            ``index`` (faiss string or ``"flat"``), ``params`` (``nprobe`` / ``efSearch``),
            ``k``, ``train_size``, ``recall`` (recall@k on a sample; 1.0 when exact),
            ``recall_sample``, ``build_s``, ``cached`` (``memory``, ``disk`` or ``""``).
    """

    sims: np.ndarray
    ids: np.ndarray
    info: Mapping[str, Any]

    def head(self, k: int) -> KnnGraph:
        """The first ``k`` neighbours of every vector (views); ``recall`` becomes the recall@k
        measured on the same sample (``recall_by_k`` holds every ``k`` up to 128)."""
        if k >= self.ids.shape[1]:
            return self
        info = dict(self.info, k=int(k))
        by_k = info.get("recall_by_k", {})
        if str(k) in by_k:
            info["recall"] = by_k[str(k)]
        elif not info.get("exact", False):
            info["recall"] = None  # not measured for this k
        return KnnGraph(self.sims[:, :k], self.ids[:, :k], info)


# --------------------------------------------------------------------------- index graphs


def _index_string(kind: str, n: int, d: int) -> str:
    if kind == "hnsw":
        return "HNSW32"
    nlist = max(1, min(int(round(2 * math.sqrt(n))), n // 39))
    codes = "Flat" if n * d * 4 <= _FLAT_MAX_BYTES else "SQ8"
    return f"IVF{nlist},{codes}"


class _DiskGraph:
    """Files of one graph under ``<root>/<digest>/``: the final ``.npz``, resumable parts and
    the trained empty index; every write atomic."""

    def __init__(self, root: Path, digest: str, stem: str) -> None:
        self.dir = root / digest[:32]
        self.stem = stem

    def final(self, k: int) -> Path:
        return self.dir / f"{self.stem}-k{k}.npz"

    def find(self, k: int) -> tuple[Path, int] | None:
        """The cached graph with the smallest ``k' >= k``, or None."""
        best = None
        for p in self.dir.glob(f"{self.stem}-k*.npz"):
            try:
                kk = int(p.stem.rsplit("-k", 1)[1])
            except ValueError:
                continue
            if kk >= k and (best is None or kk < best[1]):
                best = (p, kk)
        return best

    def part(self, k: int, lo: int) -> Path:
        return self.dir / f"{self.stem}-k{k}.part{lo:012d}.npz"

    def trained(self, k: int) -> Path:
        return self.dir / f"{self.stem}-k{k}.trained.faiss"

    @staticmethod
    def save(path: Path, **arrays: np.ndarray) -> None:
        with atomic_write(path) as f:
            np.savez(f, **arrays)

    @staticmethod
    def load(path: Path) -> dict[str, np.ndarray]:
        with np.load(path, allow_pickle=False) as z:
            return {name: z[name] for name in z.files}


def content_digest(x: np.ndarray) -> str:
    """Hex blake2b of an array's shape, dtype and bytes (read in 64 MiB pieces), memoised per array."""
    hit = CACHE.get(x, "digest", ())
    if hit is not None:
        return hit
    h = hashlib.blake2b(digest_size=20)
    h.update(repr((x.shape, x.dtype.str)).encode())
    rows = max(1, (64 << 20) // max(1, x.strides[0] if x.ndim else 1))
    for lo in range(0, x.shape[0], rows):
        h.update(np.ascontiguousarray(x[lo : lo + rows]).tobytes())
    return CACHE.put(x, "digest", (), h.hexdigest())


def _index_graph(
    x: np.ndarray, k: int, kind: str, nprobe: int | None, efsearch: int | None, seed: int, disk: _DiskGraph | None
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Approximate top-``k`` of every row among the rows, with a faiss index, in resumable chunks."""
    import faiss

    n, d = x.shape
    spec = _index_string(kind, n, d)
    idx = None
    train_size = 0
    if disk is not None and disk.trained(k).exists():
        idx = faiss.deserialize_index(np.fromfile(disk.trained(k), dtype=np.uint8))
    if idx is None:
        idx = faiss.index_factory(d, spec, faiss.METRIC_INNER_PRODUCT)
        if not idx.is_trained:
            ivf = faiss.extract_index_ivf(idx)
            ivf.cp.seed, ivf.cp.niter = 1234 + seed, 10
            train_size = min(n, 40 * ivf.nlist)
            sample = np.sort(np.random.default_rng(seed).choice(n, size=train_size, replace=False))
            idx.train(np.ascontiguousarray(x[sample], dtype=np.float32))
            if disk is not None:
                with atomic_write(disk.trained(k)) as f:
                    f.write(faiss.serialize_index(idx).tobytes())
    else:
        train_size = min(n, 40 * faiss.extract_index_ivf(idx).nlist)
    with progress_bar(total=n, desc=f"kNN graph: adding to {spec}", unit="vec") as bar:
        for lo in range(0, n, _CHUNK_ROWS):
            idx.add(np.ascontiguousarray(x[lo : lo + _CHUNK_ROWS], dtype=np.float32))
            bar.update(min(_CHUNK_ROWS, n - lo))
    ps = faiss.ParameterSpace()
    params: dict[str, int] = {}
    if kind == "hnsw":
        params["efSearch"] = int(efsearch or max(64, 2 * k))
        ps.set_index_parameter(idx, "efSearch", params["efSearch"])
    else:
        params["nprobe"] = int(nprobe or 8)
        ps.set_index_parameter(idx, "nprobe", params["nprobe"])
    sims = np.empty((n, k), np.float32)
    ids = np.empty((n, k), np.int64)
    with progress_bar(total=n, desc=f"kNN graph: searching {spec} (k={k})", unit="vec") as bar:
        for lo in range(0, n, _CHUNK_ROWS):
            hi = min(lo + _CHUNK_ROWS, n)
            part = disk.part(k, lo) if disk is not None else None
            if part is not None and part.exists():
                got = _DiskGraph.load(part)
                sims[lo:hi], ids[lo:hi] = got["sims"], got["ids"]
            else:
                s, i = idx.search(np.ascontiguousarray(x[lo:hi], dtype=np.float32), k)
                sims[lo:hi] = np.where(i >= 0, s, -np.inf)
                ids[lo:hi] = i
                if part is not None:
                    _DiskGraph.save(part, sims=sims[lo:hi], ids=ids[lo:hi])
            bar.update(hi - lo)
    del idx
    info = {"index": spec, "params": params, "train_size": int(train_size)}
    return sims, ids, info


def _measure_recall(x: np.ndarray, ids: np.ndarray, seed: int) -> dict[str, Any]:
    """Recall@k of the lists ``ids`` ``(N, k)`` against exact search on a seeded sample of rows."""
    n, k = ids.shape
    m = min(n, RECALL_SAMPLE)
    rows = np.sort(np.random.default_rng(seed + 1).choice(n, size=m, replace=False))
    exact = exact_search(x[rows], x, k).indices
    ats = range(1, k + 1) if k <= 128 else sorted({j for j in (1, 5, 10, 20, 50, 100) if j <= k} | {k})
    by_k = {str(j): recall_at_k(ids[rows], exact, j) for j in ats}
    return {"recall": by_k[str(k)], "recall_by_k": by_k, "recall_sample": int(m)}


# --------------------------------------------------------------------------- entry points


def knn_graph(
    database: np.ndarray,
    k: int,
    knn: str = "auto",
    nprobe: int | None = None,
    efsearch: int | None = None,
    *,
    seed: int = 0,
    disk: bool | None = None,
    cache_dir: str | Path | None = None,
) -> KnnGraph:
    """Top-``k`` neighbours of each database vector among the database (itself included), cached.

    Args:
        database: ``(N, D)`` float32.
        k: neighbours per vector (capped to ``N``).
        knn: ``exact``, ``ivf`` (alias ``approx``), ``hnsw`` or ``auto`` (exact up to
            :data:`EXACT_KNN_MAX_N` vectors, ``ivf`` above).
        nprobe: IVF lists scanned per vector (default 8).
        efsearch: HNSW search depth (default ``max(64, 2 k)``).
        seed: seed of the training sample, the k-means and the recall sample.
        disk: keep the graph on disk (resumable); None: from :data:`DISK_CACHE_MIN_N` vectors.
        cache_dir: default ``$RETRBENCH_CACHE/graphs``.

    Returns:
        :class:`KnnGraph` (read-only lists and how they were made).
    """
    db = as_rows(database, "database")
    n = db.shape[0]
    k = min(int(k), n)
    kind = resolve_knn(knn, n)
    if kind != "exact" and n <= 4 * max(k, 64):
        kind = "exact"  # nothing to gain on tiny databases
    knobs = {"ivf": {"nprobe": int(nprobe or 8)}, "hnsw": {"efSearch": int(efsearch or max(64, 2 * k))}}.get(kind, {})
    tag = (kind, tuple(sorted(knobs.items())), seed if kind != "exact" else 0)
    hit = CACHE.find(db, "knn", lambda p: p[0] == tag and p[1] >= k)
    if hit is not None:
        return _memory_hit(hit[1], k)
    use_disk = (n >= DISK_CACHE_MIN_N) if disk is None else bool(disk)
    store = None
    if use_disk:
        root = Path(cache_dir) if cache_dir is not None else default_cache_root() / "graphs"
        stem = f"{kind}-{stable_hash({'kind': kind, 'knobs': knobs, 'seed': tag[2], 'n': n, 'd': db.shape[1]}, 12)}"
        store = _DiskGraph(root, content_digest(db), stem)
        found = store.find(k)
        if found is not None:
            z = _DiskGraph.load(found[0])
            graph = KnnGraph(z["sims"], z["ids"], dict(json.loads(str(z["info"])), cached="disk"))
            freeze(graph.sims, graph.ids)
            CACHE.put(db, "knn", (tag, found[1]), graph)
            return graph.head(k)
    t0 = time.perf_counter()
    if kind == "exact":
        if k <= _TOPK_MAX_K:
            sims, ids = _exact_graph(db, k)
        else:
            res = exact_knn(db, k)
            sims, ids = res.scores, res.indices
        info: dict[str, Any] = {"index": "flat", "params": {}, "train_size": 0, "recall": 1.0, "recall_sample": 0}
    else:
        sims, ids, info = _index_graph(db, k, kind, knobs.get("nprobe"), knobs.get("efSearch"), seed, store)
        info["build_s"] = time.perf_counter() - t0
        info.update(_measure_recall(db, ids, seed))
    info.update(kind=kind, exact=kind == "exact", k=k, build_s=info.get("build_s", time.perf_counter() - t0), cached="")
    graph = KnnGraph(sims, ids, info)
    freeze(graph.sims, graph.ids)
    if store is not None:
        store.save(store.final(k), sims=sims, ids=ids, info=np.array(json.dumps(info)))
        for p in store.dir.glob(f"{store.stem}-k{k}.part*.npz"):
            p.unlink(missing_ok=True)
        store.trained(k).unlink(missing_ok=True)
    CACHE.put(db, "knn", (tag, k), graph)
    return graph


def _memory_hit(graph: KnnGraph, k: int) -> KnnGraph:
    out = graph.head(k)
    return KnnGraph(out.sims, out.ids, dict(out.info, cached="memory"))


def database_knn(
    database: np.ndarray, k: int, knn: str = "auto", nprobe: int | None = 8
) -> tuple[np.ndarray, np.ndarray]:
    """``(sims, ids)``, read-only ``(N, k)`` float32 and int64, best first: :func:`knn_graph`'s lists."""
    g = knn_graph(database, k, knn, nprobe)
    return g.sims, g.ids
