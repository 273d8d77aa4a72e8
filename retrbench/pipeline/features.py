"""The extraction half of the pipeline: dataset + backbones -> cached descriptors.

:func:`dataset_features` extracts (or reads from the cache) one model's database and query
descriptors of one dataset; :func:`extract_features` does it for every model of a run
configuration (an ensemble concatenates them) and for its whitening source.
"""


from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..backbones import BACKBONES, Backbone
from ..config import DEFAULT_MAX_PIXELS, RunConfig, parse_hw
from ..datasets import DATASETS, dataset_label, default_image_size, default_resize, load_dataset
from ..evaluation import PROTOCOLS
from ..extraction import CACHE_FORMAT, FeatureCache, ImageSpec
from ..extraction import extract as extract_set
from ..pooling import POOLINGS, Pooling, parse_pooling, pooling_label
from ..rerank import RankState, build_reranker, pipeline_label
from ..search import check_index
from ..specs import ModelRef, Step
from ..types import RetrievalDataset
from ..utils.io import stable_hash
from ..utils.linalg import l2_normalize
from ..utils.paths import default_cache_root, safe_name

__all__ = ["BN_SEED", "DatasetFeatures", "check_config", "dataset_features", "extract_features"]

log = logging.getLogger(__name__)

BN_SEED = 0  # seed of the image sample used for BatchNorm re-calibration


class _NativeDescriptor(torch.nn.Module):
    """A backbone's own global descriptor ``(B, D)`` presented as a ``(B, D, 1, 1)`` map."""

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.native(x)[:, :, None, None]


class _ResampleMap(torch.nn.Module):
    """A network whose ``(B, C, h, w)`` map is resampled to ``size = (H, W)``: area averaging
    (adaptive average pooling) when shrinking, so every activation counts and SPoC is unchanged;
    bilinear (``align_corners=False``) when enlarging. The paper brings AMDIM's larger map to the
    common map size this way before pooling."""

    def __init__(self, net: torch.nn.Module, size: tuple[int, int]) -> None:
        super().__init__()
        self.net = net
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.net(x)
        if tuple(m.shape[-2:]) == self.size:
            return m
        if m.shape[-2] >= self.size[0] and m.shape[-1] >= self.size[1]:
            return torch.nn.functional.adaptive_avg_pool2d(m, self.size)
        return torch.nn.functional.interpolate(m, size=self.size, mode="bilinear", align_corners=False)


def _feature_stage(backbone: Backbone, pool: Pooling) -> torch.nn.Module:
    """The network whose output ``pool`` reads: the feature map, or the model's own head."""
    if not POOLINGS.get(pool.name).info.native:
        return backbone
    if not callable(getattr(backbone, "native", None)):
        raise ValueError(
            f"model {backbone.name!r} has no native global descriptor (only models whose checkpoint "
            f"carries a learned pooling / head do); choose --pooling {', '.join(n for n in POOLINGS.list() if n != 'native')}"
        )
    return _NativeDescriptor(backbone)


@dataclass(frozen=True)
class _Plan:
    """The built, checked stages of a configuration."""

    pooling: Pooling
    reranker: Callable[[RankState], RankState]


def check_config(cfg: RunConfig) -> _Plan:
    """Build the pooling and reranker and check every name of ``cfg`` (models, dataset,
    whitening source, protocol) against its registry, before any work. Raises ``KeyError``
    (unknown name, with close matches) or ``ValueError`` (bad parameter)."""
    pool = parse_pooling(cfg.pooling)
    reranker = build_reranker(cfg.rerank)
    check_index(cfg.index)
    for ref in cfg.models:
        if not BACKBONES.is_known(ref.name):
            BACKBONES.get(ref.name)  # raises with close matches
    for name in filter(None, (cfg.dataset, cfg.whiten_source)):
        if not DATASETS.is_known(name):
            DATASETS.get(name)
    return _Plan(pool, reranker)


def _image_ids(ds: RetrievalDataset) -> tuple[list[str], list[str]]:
    return list(ds.images), [q.image for q in ds.queries]


def dataset_features(
    ds: RetrievalDataset,
    backbone: Backbone,
    *,
    pooling: str | Step | Pooling,
    image_size: int,
    query_resize: str = "crop",
    resize: str = "longer",
    scales: tuple[float, ...] = (1.0,),
    scale_mean: str = "gem",
    feature_map_size: str | None = None,
    dtype: str = "float32",
    batch_size: int = 8,
    device: str = "auto",
    workers: int = 2,
    bn_recalibrate: int = 0,
    bn_momentum: float | None = None,
    exif: bool | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    cache_dir: Path | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Pooled (un-normalised) descriptors: database ``(N, C)``, queries ``(Q, C)``, and info.

    Both are cached under ``cache_dir`` (default ``$RETRBENCH_CACHE/features``) keyed by
    model, weights checksum, image size, pooling, BatchNorm re-calibration, dataset and the
    exact image / box lists. With ``bn_recalibrate=N`` a copy of the backbone re-estimates
    its BatchNorm statistics on N database images first (seeded sample; only when something
    has to be extracted). ``exif`` None follows the dataset's ``exif_orientation``; ``resize``
    is a mode of :mod:`retrbench.utils.images` (``fixed:HxW`` for fixed); ``scales`` /
    ``scale_mean``: multi-scale extraction (:func:`retrbench.extraction.describe`).
    """
    exif = ds.exif_orientation if exif is None else bool(exif)
    pool = pooling if isinstance(pooling, Pooling) else parse_pooling(pooling)
    mode, _, fixed_text = resize.partition(":")
    fixed = parse_hw(fixed_text, "resize") if mode == "fixed" else None
    power = float(pool.params.get("p", 1.0)) if (scale_mean == "gem" and pool.name == "gem") else 1.0
    image = dict(exif=exif, max_pixels=max_pixels, resize=mode, fixed=fixed)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_root() / "features"
    common: dict[str, Any] = {
        "format": CACHE_FORMAT,
        "model": backbone.name,
        "weights_id": backbone.weights_id,
        "image_size": image_size,
        "pooling": pool.spec,
        "dataset": ds.name,
        # the images' folder itself, so that another folder with the same file names never
        # shares descriptors (file contents are checked per image, by size and mtime)
        "root": str(Path(ds.root).resolve()),
        "exif": exif,
    }
    if resize != "longer":
        common["resize"] = resize
    if tuple(scales) != (1.0,):
        common["scales"] = {"scales": list(scales), "power": power}
    if feature_map_size:
        common["feature_map_size"] = feature_map_size
    if dtype != "float32":
        common["dtype"] = dtype
    if bn_recalibrate:
        common["bn_recalibrate"] = {"n": int(bn_recalibrate), "seed": BN_SEED}
        if bn_momentum is not None:
            common["bn_recalibrate"]["momentum"] = float(bn_momentum)
    root = Path(ds.root)
    db_specs = [ImageSpec(root / p, None, image_size, **image) for p in ds.images]
    # A whole-image query that is also a database image (UKBench, COIL-20, folder datasets)
    # has exactly the database descriptor: reuse that row instead of extracting it again.
    db_row = {p: i for i, p in enumerate(ds.images)}
    reuse = {j: db_row[q.image] for j, q in enumerate(ds.queries) if q.bbox is None and q.image in db_row}
    todo = [j for j in range(len(ds.queries)) if j not in reuse]
    q_specs = [
        ImageSpec(root / ds.queries[j].image, ds.queries[j].bbox, image_size, query_resize, **image)
        for j in todo
    ]
    folder = cache_dir / safe_name(ds.name) / safe_name(backbone.name)
    jobs = []
    for role, specs, items in (
        ("database", db_specs, list(ds.images)),
        ("queries", q_specs, [(ds.queries[j].image, ds.queries[j].bbox) for j in todo]),
    ):
        meta = {**common, "role": role, "items": stable_hash(items, 32)}
        if role == "queries" and mode == "longer":
            meta["query_resize"] = query_resize
        jobs.append((role, specs, FeatureCache(folder, f"{role}-{stable_hash(meta, 24)}", meta)))

    info: dict[str, Any] = {"extract_s": 0.0, "cache_hits": 0, "bn_recalibrate_s": 0.0}
    if bn_recalibrate and any(specs and not cache.complete for _, specs, cache in jobs):
        from ..backbones.bn import recalibrate_on_images, recalibration_specs

        t0 = time.perf_counter()
        backbone = copy.deepcopy(backbone)
        recal = recalibration_specs(ds.images, bn_recalibrate, BN_SEED, size=image_size, root=root, exif=exif, max_pixels=max_pixels)
        recalibrate_on_images(backbone, recal, backbone.info.mean, backbone.info.std, batch_size, device, workers=workers, momentum=bn_momentum)
        info["bn_recalibrate_s"] = time.perf_counter() - t0
    net = _feature_stage(backbone, pool)
    if feature_map_size:
        if POOLINGS.get(pool.name).info.native:
            raise ValueError("feature_map_size resamples feature maps; the native pooling has none")
        net = _ResampleMap(net, parse_hw(feature_map_size, "feature_map_size"))

    out = []
    for role, specs, cache in jobs:
        if not specs:
            out.append(np.empty((0, 0), dtype=np.float32))
            info["cache_hits"] += 1
            continue
        hit = cache.complete
        t0 = time.perf_counter()
        feats = extract_set(
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
            desc=f"{backbone.name} on {ds.name} {role}",
            scales=scales,
            scale_power=power,
            dtype=dtype,
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


def _build_backbone(ref: ModelRef, memo: dict[tuple[str, str | None], Backbone]) -> Backbone:
    key = (ref.name, ref.weights)
    if key not in memo:
        memo[key] = BACKBONES.create(ref.name, weights=ref.weights)
    return memo[key]


def _labels(cfg: RunConfig, backbones: list[Backbone], ds: RetrievalDataset) -> dict[str, str]:
    """Display names for the rows (reporting reads them instead of importing the registries)."""
    return {
        "model_label": "+".join(getattr(b.info, "label", "") or b.name for b in backbones),
        "pooling_label": pooling_label(cfg.pooling),
        "dataset_label": dataset_label(cfg.dataset),
        "rerank_label": pipeline_label(cfg.rerank),
        # what the network really sees (token models resize to a multiple of their patch)
        "input_rule": "+".join(getattr(b.info, "input_rule", "any") for b in backbones),
        "patch_size": "+".join(str(getattr(b.info, "patch_size", None) or "") for b in backbones) or None,
        **({"native_descriptor": "+".join(getattr(b.info, "native_descriptor", "") for b in backbones)} if POOLINGS.get(cfg.pooling.name).info.native else {}),
    }


@dataclass
class DatasetFeatures:
    """Descriptors of a dataset, ready for post-processing and search.

    Attributes:
        database: ``(N, D)`` float32 (un-normalised for one model; L2-normalised parts
            concatenated for an ensemble), in the dataset's image order.
        queries: ``(Q, D)`` float32, in ground-truth order.
        train: ``(n, D)`` descriptors of the whitening source, or None (whitening learned on the
            database).
        dataset: the dataset (ids, ground truth, protocol).
        backbones: the models used (their labels and weights ids go into the rows).
        image_sizes: the image size used per model.
        info: extraction timings and cache hits.
    """

    database: np.ndarray
    queries: np.ndarray
    train: np.ndarray | None
    dataset: RetrievalDataset
    backbones: list[Backbone]
    image_sizes: list[int]
    info: dict[str, Any]


def extract_features(
    cfg: RunConfig,
    *,
    progress: bool = False,
    backbones: dict[tuple[str, str | None], Backbone] | None = None,
    plan: _Plan | None = None,
) -> DatasetFeatures:
    """Load ``cfg``'s dataset and extract (or read from the cache) every descriptor a run needs:
    database, queries and, when ``cfg`` whitens on another dataset, that dataset's database.

    A model spec ``a+b`` is an ensemble: each model's descriptors are L2-normalised and
    concatenated. ``backbones`` is an optional memo of built models, shared across calls.
    """
    plan = plan or check_config(cfg)
    options = dict(cfg.dataset_options)
    allow_missing = bool(options.pop("allow_missing", False)) or cfg.allow_missing
    ds = load_dataset(cfg.dataset, cfg.data_root, allow_missing, **options)
    PROTOCOLS.get(ds.protocol)
    memo = backbones if backbones is not None else {}
    parts_db, parts_q, parts_train, built, sizes = [], [], [], [], []
    info: dict[str, Any] = {"extract_s": 0.0, "cache_hits": 0}
    for ref in cfg.models:
        backbone = _build_backbone(ref, memo)
        size = cfg.image_size or default_image_size(cfg.dataset)
        feat_kw = dict(
            pooling=plan.pooling,
            image_size=size,
            query_resize=cfg.query_resize,
            resize=cfg.resize or default_resize(cfg.dataset),
            scales=cfg.scales,
            scale_mean=cfg.scale_mean,
            feature_map_size=cfg.feature_map_size,
            dtype=cfg.dtype,
            batch_size=cfg.batch_size,
            device=cfg.device,
            workers=cfg.workers,
            bn_recalibrate=cfg.bn_recalibrate,
            bn_momentum=cfg.bn_momentum,
            exif=cfg.exif,
            max_pixels=cfg.max_pixels,
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
        built.append(backbone)
        sizes.append(size)
    if len(parts_db) == 1:
        db, q = parts_db[0], parts_q[0]
        train = parts_train[0] if parts_train else None
    else:
        db = np.hstack([l2_normalize(x) for x in parts_db])
        q = np.hstack([l2_normalize(x) for x in parts_q])
        train = np.hstack([l2_normalize(x) for x in parts_train]) if parts_train else None
    return DatasetFeatures(db, q, train, ds, built, sizes, info)

