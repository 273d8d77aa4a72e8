"""Run configuration: a frozen dataclass that round-trips through dicts / YAML and keys caches."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, fields
from typing import Any

__all__ = ["RunConfig", "config_id", "stable_hash"]


def stable_hash(obj: Any, n: int = 16) -> str:
    """Hex digest of the canonical JSON of ``obj`` (sorted keys), truncated to ``n`` characters."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines one benchmark run.

    Attributes:
        model: backbone registry name (``retrbench models``), or ``random`` for chance level.
        weights: checkpoint path overriding where the entry's weights come from.
        dataset: dataset registry name (``retrbench datasets``).
        data_root: where datasets live (default ``$RETRBENCH_DATA``).
        image_size: longer image side in pixels; None uses the model's default.
        query_resize: ``crop`` crops the query box and then resizes the crop so its longer side
            is ``image_size`` (cirtorch convention); ``full`` resizes the full query image as a
            database image would be and then crops the box (same scale as the database).
        pooling: pooling spec, e.g. ``gem``, ``gem:p=4``, ``rmac``, ``rmac:levels=3``.
        whiten: PCA-whitening output dimension; None keeps the L2-normalised descriptor.
        whiten_source: dataset to learn the whitening on; None learns it on the database.
        rerank: rerank spec (``none`` for global search only).
        batch_size: images per forward pass (images of equal size are batched together).
        device: ``auto`` (GPU when present), ``cpu``, ``cuda``, ``cuda:1`` ...
        workers: image-decoding worker processes (0 decodes in the main process).
        bn_recalibrate: before extraction, re-estimate BatchNorm statistics on this many
            database images (training-mode forward passes, cumulative average), as the paper
            does; 0 keeps the checkpoint's statistics.
        allow_missing: evaluate on the images present when a dataset is incomplete.
        dataset_options: extra keyword options of the dataset loader as ``(key, value)`` pairs,
            e.g. ``(("max_distractors", 1000),)`` or ``(("split", "public"),)``.
        topk: length of the ranking kept per query; None keeps the full ranking for databases
            up to 100,000 images and the top 1,000 beyond (100 for GLDv2's mAP@100).
    """

    model: str = "efficientnet_lite0"
    weights: str | None = None
    dataset: str = "demo"
    data_root: str | None = None
    image_size: int | None = None
    query_resize: str = "crop"
    pooling: str = "gem"
    whiten: int | None = 512
    whiten_source: str | None = None
    rerank: str = "none"
    batch_size: int = 8
    device: str = "auto"
    workers: int = 2
    bn_recalibrate: int = 0
    allow_missing: bool = False
    dataset_options: tuple[tuple[str, Any], ...] = ()
    topk: int | None = None

    def __post_init__(self) -> None:
        if self.query_resize not in ("crop", "full"):
            raise ValueError(f"query_resize must be 'crop' or 'full', got {self.query_resize!r}")
        if self.image_size is not None and self.image_size < 16:
            raise ValueError(f"image_size must be >= 16 pixels, got {self.image_size}")
        if self.whiten is not None and self.whiten < 1:
            raise ValueError(f"whiten must be a positive dimension or None, got {self.whiten}")
        if self.topk is not None and self.topk < 1:
            raise ValueError(f"topk must be >= 1, got {self.topk}")
        object.__setattr__(self, "dataset_options", tuple((str(k), v) for k, v in dict(self.dataset_options).items()))
        if self.bn_recalibrate < 0:
            raise ValueError(f"bn_recalibrate must be >= 0 images, got {self.bn_recalibrate}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """Build from a dict (e.g. parsed YAML); unknown keys are an error naming them."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown RunConfig keys {unknown}; allowed: {sorted(names)}")
        return cls(**d)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)


def config_id(cfg: RunConfig) -> str:
    """Identity of a configuration for results: the hash of its non-default fields only, so
    that adding a field with a default to :class:`RunConfig` keeps earlier ids valid."""
    default = RunConfig().to_dict()
    return stable_hash({k: v for k, v in cfg.to_dict().items() if v != default[k]})
