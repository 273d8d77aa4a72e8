"""The one place where the stages meet: dataset -> backbone -> extraction -> whitening ->
search -> rerank -> evaluation -> tidy results. The CLI and notebooks both call :func:`run`.
"""

from __future__ import annotations

import copy
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .backbones import BACKBONES, Backbone
from .config import RunConfig, config_id, stable_hash
from .datasets import DATASETS, default_cache_root
from .evaluation import evaluate
from .extraction import CACHE_FORMAT, FeatureCache, ImageSpec, extract
from .pooling import parse_pooling
from .rerank import RankState, build_reranker
from .results import RunResult, append_results, tidy_rows
from .search import search
from .types import RetrievalDataset
from .whitening import l2_normalize, postprocess

__all__ = ["run", "load_dataset", "dataset_features", "make_backbone"]

log = logging.getLogger(__name__)

BN_SEED = 0  # seed of the image sample used for BatchNorm re-calibration


def load_dataset(
    name: str,
    data_root: str | Path | None = None,
    allow_missing: bool = False,
    **options: Any,
) -> RetrievalDataset:
    """Build the registered dataset ``name`` (or ``folder:PATH``) from ``data_root``.

    ``options`` are passed to the dataset's loader (e.g. ``max_distractors=1000``).
    """
    if allow_missing:
        options["allow_missing"] = True
    if name.startswith("folder:"):
        from .datasets.folder import load_folder

        return load_folder(name.split(":", 1)[1], **options)
    if data_root is not None:
        options["data_root"] = Path(data_root)
    entry = DATASETS.get(name)
    try:
        return entry.factory(**options)
    except TypeError as e:
        if "unexpected keyword" in str(e):
            raise ValueError(f"dataset {entry.name!r} does not take the option(s) {sorted(options)}: {e}") from None
        raise


def _dataset_image_size(name: str) -> int | None:
    if name.startswith("folder:"):
        return None
    return DATASETS.get(name).info.image_size


def _ranking_length(n_database: int, protocol: str, topk: int | None) -> int:
    if topk is not None:
        return min(topk, n_database)
    if protocol == "gldv2":
        return min(100, n_database)
    return n_database if n_database <= 100_000 else 1000


class _NativeDescriptor(torch.nn.Module):
    """A backbone's own global descriptor ``(B, D)`` presented as a ``(B, D, 1, 1)`` map."""

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.native(x)[:, :, None, None]


def _feature_stage(backbone: Backbone, pooling: str) -> tuple[torch.nn.Module, Any, str]:
    """(network, pooling, cache spec) for ``pooling``; ``native`` uses the model's own head."""
    if pooling.strip().lower() == "native":
        if not callable(getattr(backbone, "native", None)):
            raise ValueError(
                f"model {backbone.name!r} has no native global descriptor (only models whose checkpoint "
                "carries a learned pooling / head do); choose --pooling mac, spoc, gem or rmac"
            )
        return _NativeDescriptor(backbone), parse_pooling("mac"), "native"
    pool = parse_pooling(pooling)
    return backbone, pool, pool.spec


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
    bn_recalibrate: int = 0,
    cache_dir: Path | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Pooled (un-normalised) descriptors: database ``(N, C)``, queries ``(Q, C)``, and info.

    Both are cached under ``cache_dir`` (default ``$RETRBENCH_CACHE/features``) keyed by
    model, weights checksum, image size, pooling, BatchNorm re-calibration, dataset and the
    exact image / box lists. With ``bn_recalibrate=N`` a copy of the backbone re-estimates
    its BatchNorm statistics on N database images first (seeded sample; only when something
    has to be extracted).
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_root() / "features"
    common = {
        "format": CACHE_FORMAT,
        "model": backbone.name,
        "weights_id": backbone.weights_id,
        "image_size": image_size,
        "pooling": pooling if pooling.strip().lower() == "native" else parse_pooling(pooling).spec,
        "dataset": ds.name,
    }
    if bn_recalibrate:
        common["bn_recalibrate"] = {"n": int(bn_recalibrate), "seed": BN_SEED}
    root = Path(ds.root)
    db_specs = [ImageSpec(root / p, None, image_size) for p in ds.images]
    # A whole-image query that is also a database image (UKBench, COIL-20, folder datasets)
    # has exactly the database descriptor: reuse that row instead of extracting it again.
    db_row = {p: i for i, p in enumerate(ds.images)}
    reuse = {j: db_row[q.image] for j, q in enumerate(ds.queries) if q.bbox is None and q.image in db_row}
    todo = [j for j in range(len(ds.queries)) if j not in reuse]
    q_specs = [ImageSpec(root / ds.queries[j].image, ds.queries[j].bbox, image_size, query_resize) for j in todo]
    folder = cache_dir / re.sub(r"[^A-Za-z0-9_.+-]", "_", ds.name) / re.sub(r"[^A-Za-z0-9_.+-]", "_", backbone.name)
    jobs = []
    for role, specs, items in (
        ("database", db_specs, list(ds.images)),
        ("queries", q_specs, [(ds.queries[j].image, ds.queries[j].bbox) for j in todo]),
    ):
        meta = {**common, "role": role, "items": stable_hash(items, 32)}
        if role == "queries":
            meta["query_resize"] = query_resize
        jobs.append((role, specs, FeatureCache(folder, f"{role}-{stable_hash(meta, 24)}", meta)))

    info: dict[str, Any] = {"extract_s": 0.0, "cache_hits": 0, "bn_recalibrate_s": 0.0}
    if bn_recalibrate and any(specs and not cache.path.exists() for _, specs, cache in jobs):
        from .backbones.bn import recalibrate_on_images, recalibration_specs

        t0 = time.perf_counter()
        backbone = copy.deepcopy(backbone)
        recal = recalibration_specs(ds.images, bn_recalibrate, BN_SEED, size=image_size, root=root)
        recalibrate_on_images(backbone, recal, backbone.info.mean, backbone.info.std, batch_size, device, workers=workers)
        info["bn_recalibrate_s"] = time.perf_counter() - t0
    net, pool, _ = _feature_stage(backbone, pooling)

    out = []
    for role, specs, cache in jobs:
        if not specs:
            out.append(np.empty((0, 0), dtype=np.float32))
            info["cache_hits"] += 1
            continue
        hit = cache.path.exists()
        t0 = time.perf_counter()
        feats = extract(
            net,
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
    db = out[0]
    queries = np.empty((len(ds.queries), db.shape[1]), dtype=np.float32)
    if reuse:
        queries[list(reuse)] = db[list(reuse.values())]
    if todo:
        queries[todo] = out[1]
    info["queries_reused_from_database"] = len(reuse)
    return db, queries, info


def _split_models(cfg: RunConfig) -> list[tuple[str, str | None]]:
    """``model`` / ``weights`` specs as (name, weights) pairs; ``a+b`` is an ensemble."""
    names = [m.strip() for m in cfg.model.split("+") if m.strip()]
    if not names:
        raise ValueError(f"model spec {cfg.model!r} names no model")
    if cfg.weights is None:
        return [(n, None) for n in names]
    weights = cfg.weights.split("+") if len(names) > 1 else [cfg.weights]
    if len(weights) != len(names):
        raise ValueError(f"ensemble {cfg.model!r} has {len(names)} models but --weights gives {len(weights)} files (join them with '+')")
    return list(zip(names, weights, strict=True))


def make_backbone(name: str, weights: str | None = None) -> Backbone:
    """A registry entry, or (when available) a ``timm:`` / ``hub:`` model."""
    from . import backbones

    create = getattr(backbones, "create_backbone", None)
    if create is not None:
        return create(name, weights=weights)
    return BACKBONES.create(name, weights=weights)


def run(
    config: RunConfig | None = None,
    *,
    results_dir: str | Path | None = None,
    progress: bool = False,
    backbones: dict[tuple[str, str | None], Backbone] | None = None,
    postprocess_fn: Callable[..., tuple[np.ndarray, np.ndarray, dict[str, Any]]] | None = None,
    **overrides: Any,
) -> RunResult:
    """Run one benchmark and return its metrics.

    ``rb.run(model="efficientnet_lite0", dataset="demo", pooling="rmac", whiten=512)`` is the
    same as ``retrbench run --model ... --dataset ...``. Keyword overrides replace fields of
    ``config`` (default :class:`RunConfig`). With ``results_dir``, tidy rows are appended to
    ``<results_dir>/results.jsonl``.

    A model spec ``a+b`` is an ensemble: each model's descriptors are L2-normalised and
    concatenated, then post-processed together (PCA-whitening reduces the concatenation, as
    the paper does). ``backbones`` is an optional memo of built models, shared across calls
    (sweeps use it so that a model is loaded once). ``postprocess_fn`` replaces
    :func:`~retrbench.whitening.postprocess` (sweeps pass a memo that fits each PCA once).
    """
    cfg = (config or RunConfig()).replace(**overrides) if overrides else (config or RunConfig())
    t_start = time.perf_counter()
    options = dict(cfg.dataset_options)
    allow_missing = bool(options.pop("allow_missing", False)) or cfg.allow_missing
    ds = load_dataset(cfg.dataset, cfg.data_root, allow_missing, **options)
    memo = backbones if backbones is not None else {}
    parts_db, parts_q, parts_train, weight_ids, sizes = [], [], [], [], []
    info: dict[str, Any] = {"extract_s": 0.0, "cache_hits": 0}
    for name, weights in _split_models(cfg):
        if (name, weights) not in memo:
            memo[(name, weights)] = make_backbone(name, weights)
        backbone = memo[(name, weights)]
        size = cfg.image_size or _dataset_image_size(cfg.dataset) or backbone.info.default_size
        feat_kw = dict(
            pooling=cfg.pooling,
            image_size=size,
            query_resize=cfg.query_resize,
            batch_size=cfg.batch_size,
            device=cfg.device,
            workers=cfg.workers,
            bn_recalibrate=cfg.bn_recalibrate,
            progress=progress,
        )
        db, q, finfo = dataset_features(ds, backbone, **feat_kw)
        info["extract_s"] += finfo["extract_s"]
        info["cache_hits"] += finfo["cache_hits"]
        parts_db.append(db)
        parts_q.append(q)
        if cfg.whiten is not None and cfg.whiten_source and cfg.whiten_source != cfg.dataset:
            src = load_dataset(cfg.whiten_source, cfg.data_root)
            parts_train.append(dataset_features(src, backbone, **feat_kw)[0])
        weight_ids.append(backbone.weights_id)
        sizes.append(size)
    if len(parts_db) == 1:
        db, q = parts_db[0], parts_q[0]
        train = parts_train[0] if parts_train else None
    else:
        db = np.hstack([l2_normalize(x) for x in parts_db])
        q = np.hstack([l2_normalize(x) for x in parts_q])
        train = np.hstack([l2_normalize(x) for x in parts_train]) if parts_train else None

    t0 = time.perf_counter()
    dbw, qw, winfo = (postprocess_fn or postprocess)(db, q, cfg.whiten, train)
    t_post = time.perf_counter() - t0

    t0 = time.perf_counter()
    result = search(qw, dbw, k=_ranking_length(dbw.shape[0], ds.protocol, cfg.topk))
    t_search = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = build_reranker(cfg.rerank)(RankState(qw, dbw, result)).result
    t_rerank = time.perf_counter() - t0

    metrics = evaluate(result.indices, ds.gnd, ds.protocol)
    provenance = {
        "config_id": config_id(cfg),
        "weights_sha256": "+".join(weight_ids),
        "image_size_used": sizes[0] if len(set(sizes)) == 1 else "+".join(map(str, sizes)),
        "dim": int(dbw.shape[1]),
        "n_database": len(ds.images),
        "n_queries": len(ds.queries),
        "ranking_length": int(result.k),
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
