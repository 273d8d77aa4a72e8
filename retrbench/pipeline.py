"""The one place where the stages meet: dataset -> backbone -> extraction -> whitening ->
search -> rerank -> evaluation -> tidy results. The CLI and notebooks both call :func:`run`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .backbones import BACKBONES, Backbone
from .config import RunConfig, stable_hash
from .datasets import DATASETS, default_cache_root
from .evaluation import evaluate
from .extraction import CACHE_FORMAT, FeatureCache, ImageSpec, extract
from .pooling import parse_pooling
from .rerank import build_reranker, RankState
from .results import RunResult, append_results, tidy_rows
from .search import search
from .types import RetrievalDataset
from .whitening import postprocess

__all__ = ["run", "load_dataset", "dataset_features"]

log = logging.getLogger(__name__)


def load_dataset(name: str, data_root: str | Path | None = None, allow_missing: bool = False) -> RetrievalDataset:
    """Build the registered dataset ``name`` from ``data_root`` (default ``$RETRBENCH_DATA``)."""
    kwargs: dict[str, Any] = {}
    if data_root is not None:
        kwargs["data_root"] = Path(data_root)
    if allow_missing:
        kwargs["allow_missing"] = True
    try:
        return DATASETS.create(name, **kwargs)
    except TypeError as e:
        if allow_missing:
            raise ValueError(f"dataset {name!r} does not support allow_missing") from e
        raise


def dataset_features(
    ds: RetrievalDataset,
    backbone: Backbone,
    *,
    pooling: str,
    image_size: int,
    query_resize: str = "crop",
    batch_size: int = 8,
    device: str = "auto",
    workers: int = 2,
    cache_dir: Path | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Pooled (un-normalised) descriptors: database ``(N, C)``, queries ``(Q, C)``, and info.

    Both are cached under ``cache_dir`` (default ``$RETRBENCH_CACHE/features``) keyed by
    model, weights checksum, image size, pooling, dataset and the exact image / box lists.
    """
    pool = parse_pooling(pooling)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_root() / "features"
    common = {
        "format": CACHE_FORMAT,
        "model": backbone.name,
        "weights_id": backbone.weights_id,
        "image_size": image_size,
        "pooling": pool.spec,
        "dataset": ds.name,
    }
    root = Path(ds.root)
    db_specs = [ImageSpec(root / p, None, image_size) for p in ds.images]
    q_specs = [ImageSpec(root / q.image, q.bbox, image_size, query_resize) for q in ds.queries]
    out = []
    info: dict[str, Any] = {"extract_s": 0.0, "cache_hits": 0}
    for role, specs, items in (
        ("database", db_specs, list(ds.images)),
        ("queries", q_specs, [(q.image, q.bbox) for q in ds.queries]),
    ):
        meta = {**common, "role": role, "items": stable_hash(items, 32)}
        if role == "queries":
            meta["query_resize"] = query_resize
        key = stable_hash(meta, 24)
        cache = FeatureCache(cache_dir / ds.name / backbone.name, f"{role}-{key}", meta)
        hit = cache.path.exists()
        t0 = time.perf_counter()
        feats = extract(
            backbone,
            pool,
            specs,
            mean=backbone.info.mean,
            std=backbone.info.std,
            device=device,
            batch_size=batch_size,
            workers=workers,
            cache=cache,
            progress=progress,
            desc=f"{ds.name} {role}",
        )
        info["extract_s"] += time.perf_counter() - t0
        info["cache_hits"] += int(hit)
        out.append(feats)
    return out[0], out[1], info


def run(config: RunConfig | None = None, *, results_dir: str | Path | None = None, progress: bool = False, **overrides: Any) -> RunResult:
    """Run one benchmark and return its metrics.

    ``rb.run(model="efficientnet_lite0", dataset="demo", pooling="rmac", whiten=512)`` is the
    same as ``retrbench run --model ... --dataset ...``. Keyword overrides replace fields of
    ``config`` (default :class:`RunConfig`). With ``results_dir``, tidy rows are appended to
    ``<results_dir>/results.jsonl``.
    """
    cfg = (config or RunConfig()).replace(**overrides) if overrides else (config or RunConfig())
    t_start = time.perf_counter()
    ds = load_dataset(cfg.dataset, cfg.data_root, cfg.allow_missing)
    backbone = BACKBONES.create(cfg.model, weights=cfg.weights)
    size = cfg.image_size or DATASETS.get(cfg.dataset).info.image_size or backbone.info.default_size
    feat_kw = dict(
        pooling=cfg.pooling,
        image_size=size,
        query_resize=cfg.query_resize,
        batch_size=cfg.batch_size,
        device=cfg.device,
        workers=cfg.workers,
        progress=progress,
    )
    db, q, info = dataset_features(ds, backbone, **feat_kw)

    train = None
    if cfg.whiten is not None and cfg.whiten_source and cfg.whiten_source != cfg.dataset:
        src = load_dataset(cfg.whiten_source, cfg.data_root)
        train, _, _ = dataset_features(src, backbone, **feat_kw)
    t0 = time.perf_counter()
    dbw, qw, winfo = postprocess(db, q, cfg.whiten, train)
    t_post = time.perf_counter() - t0

    t0 = time.perf_counter()
    result = search(qw, dbw, k=dbw.shape[0])
    t_search = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = build_reranker(cfg.rerank)(RankState(qw, dbw, result)).result
    t_rerank = time.perf_counter() - t0

    metrics = evaluate(result.indices, ds.gnd, ds.protocol)
    provenance = {
        "weights_sha256": backbone.weights_id,
        "image_size_used": size,
        "dim": int(dbw.shape[1]),
        "n_database": len(ds.images),
        "n_queries": len(ds.queries),
        "whitening": winfo,
        "dataset_notes": dict(ds.notes),
        "retrbench_version": __version__,
    }
    rows = tidy_rows(cfg, metrics, protocol=ds.protocol, provenance=provenance)
    info.update(
        postprocess_s=t_post,
        search_s=t_search,
        rerank_s=t_rerank,
        total_s=time.perf_counter() - t_start,
        whitening=winfo,
        dataset_notes=dict(ds.notes),
    )
    if results_dir is not None:
        info["results_file"] = str(append_results(rows, results_dir))
    return RunResult(cfg, rows, info, result)
