"""InsCLR configuration: :class:`InsCLRConfig`, every field that determines a training run, validated.

The config round-trips through a dict and YAML (``OUT/config.yaml``); a resumed run must match
the saved one except in :data:`RUNTIME_FIELDS`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .mining import SCORES

__all__ = ["InsCLRConfig", "MEMORY_INIT", "RUNTIME_FIELDS"]

MEMORY_INIT = ("descriptors", "augmented", "none")
"""How the cross-batch memory is filled at the start of a stage (``InsCLRConfig.memory_init``)."""

RUNTIME_FIELDS = ("device", "workers", "batch_size_extract", "checkpoint_every", "amp")
"""Fields that do not change what is trained: a resumed run may change them."""


@dataclass(frozen=True)
class InsCLRConfig:
    """Everything that determines an InsCLR fine-tuning run (round-trips through dict / YAML).

    Attributes:
        model, weights: backbone registry name and optional checkpoint (as ``retrbench run``).
        dataset, data_root: training collection: a dataset name or ``folder:PATH``; only its
            database images are used, never its labels.
        image_size: training resolution: augmented views are ``image_size`` squared crops,
            un-augmented views (and candidate-set descriptors) have this longer side.
        stages: training steps of each stage; candidate sets are recomputed before each stage.
        lr: Adam learning rate per stage (one value: every stage).
        weight_decay, grad_clip: Adam weight decay; gradient-norm clipping (0: none).
        candidates_k: candidate-set size ``K``.
        tuple_k: tuple size minus one: the anchor's top-``k`` candidates.
        tuples_per_batch: tuples per step (batch = tuples_per_batch * (tuple_k + 1) images).
        tuple_separation: tuples of one batch also avoid each other's top-``tuple_separation``
            candidates (0: only disjoint; see :func:`retrbench.train.tuples.sample_tuples`).
        selection_threshold: mini-batch selection keeps members at least this similar to the anchor.
        mining_rounds, mining_first_k, mining_growth, mining_min_sim, mining_score: pseudo-positive
            mining (see :func:`retrbench.train.mining.mine_positives`); ``mining_rounds=0`` disables it.
        margin, pos_margin: contrastive-loss margins.
        memory_size: cross-batch memory entries (None: the collection size).
        memory_weight: weight of the memory term of the loss.
        memory_negatives: False uses only the memory's pseudo-positives.
        memory_init: fill the memory at stage start with the candidate descriptors
            (``descriptors``, free), with an augmented pass over the collection (``augmented``,
            as InsCLR does; one forward per image), or not at all (``none``).
        aug_scale, aug_ratio, hflip: augmentation: random resized crop (area fraction, aspect
            ratio) to ``image_size`` squared, random horizontal flip.
        gem_p: GeM exponent of the embedding (``retrbench run --pooling gem:p=...``).
        trainable: regex (``re.search``) on the network's parameter names selecting those
            fine-tuned; None: :func:`retrbench.train.network.default_trainable`.
        bn_eval: BatchNorm layers use and keep their running statistics (eval mode) while
            training; False puts the BatchNorm layers of trainable parameters in train mode.
        amp: mixed precision (float16 autocast + gradient scaling) when on a GPU.
        device: ``auto`` (GPU when present), ``cpu``, ``cuda`` ...
        workers: image-loading processes.
        batch_size_extract: batch size of the candidate-set extraction.
        checkpoint_every: steps between checkpoints.
        seed: seeds batches, augmentations and the network-independent randomness.
    """

    model: str = "efficientnet_lite0"
    weights: str | None = None
    dataset: str = "demo"
    data_root: str | None = None
    image_size: int = 224
    stages: tuple[int, ...] = (200, 200)
    lr: tuple[float, ...] = (1e-4, 3e-5)
    weight_decay: float = 1e-4
    grad_clip: float = 10.0
    candidates_k: int = 100
    tuple_k: int = 3
    tuples_per_batch: int = 8
    tuple_separation: int = 0
    selection_threshold: float = 0.6
    mining_rounds: int = 2
    mining_first_k: int = 2
    mining_growth: float = 4.0
    mining_min_sim: float = 0.6
    mining_score: str = "avg"
    margin: float = 0.4
    pos_margin: float = 0.0
    memory_size: int | None = None
    memory_weight: float = 1.0
    memory_negatives: bool = True
    memory_init: str = "descriptors"
    aug_scale: tuple[float, float] = (0.4, 1.0)
    aug_ratio: tuple[float, float] = (0.75, 1.3333)
    hflip: bool = True
    gem_p: float = 3.0
    trainable: str | None = None
    bn_eval: bool = True
    amp: bool = True
    device: str = "auto"
    workers: int = 2
    batch_size_extract: int = 16
    checkpoint_every: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("stages", "lr", "aug_scale", "aug_ratio"):
            v = getattr(self, name)
            object.__setattr__(self, name, tuple(v) if isinstance(v, (list, tuple)) else (v,))
        object.__setattr__(self, "stages", tuple(int(s) for s in self.stages))
        object.__setattr__(self, "lr", tuple(float(x) for x in self.lr))
        if not self.stages or any(s < 0 for s in self.stages):
            raise ValueError(f"stages must be one or more non-negative step counts, got {self.stages}")
        if len(self.lr) not in (1, len(self.stages)):
            raise ValueError(f"lr needs one value or one per stage ({len(self.stages)}), got {self.lr}")
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")
        if self.candidates_k < 1 or self.tuple_k < 1 or self.tuples_per_batch < 1:
            raise ValueError("candidates_k, tuple_k and tuples_per_batch must be >= 1")
        if not 0 <= self.tuple_separation <= self.candidates_k:
            raise ValueError(f"tuple_separation must be in [0, candidates_k], got {self.tuple_separation}")
        if self.tuple_k > self.candidates_k:
            raise ValueError(f"tuple_k ({self.tuple_k}) cannot exceed candidates_k ({self.candidates_k})")
        if self.mining_score not in SCORES:
            raise ValueError(f"mining_score must be one of {SCORES}, got {self.mining_score!r}")
        if self.memory_init not in MEMORY_INIT:
            raise ValueError(f"memory_init must be one of {MEMORY_INIT}, got {self.memory_init!r}")
        if self.memory_size is not None and self.memory_size < 1:
            raise ValueError(f"memory_size must be >= 1 or None, got {self.memory_size}")
        if len(self.aug_scale) != 2 or not 0 < self.aug_scale[0] <= self.aug_scale[1] <= 1:
            raise ValueError(f"aug_scale must be (low, high) with 0 < low <= high <= 1, got {self.aug_scale}")
        if len(self.aug_ratio) != 2 or not 0 < self.aug_ratio[0] <= self.aug_ratio[1]:
            raise ValueError(f"aug_ratio must be (low, high) with 0 < low <= high, got {self.aug_ratio}")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if self.trainable is not None:
            re.compile(self.trainable)

    def stage_lr(self, stage: int) -> float:
        """Learning rate of stage ``stage`` (0-based)."""
        return self.lr[0] if len(self.lr) == 1 else self.lr[stage]

    @property
    def batch_images(self) -> int:
        """Images per step: ``tuples_per_batch * (tuple_k + 1)``."""
        return self.tuples_per_batch * (self.tuple_k + 1)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (tuples as lists, as YAML writes them)."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> InsCLRConfig:
        """Build from a dict (e.g. parsed YAML); unknown keys are an error naming them."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown InsCLRConfig keys {unknown}; allowed: {sorted(names)}")
        return cls(**dict(d))

    @classmethod
    def from_yaml(cls, path: str | Path) -> InsCLRConfig:
        """Read a YAML mapping of fields (see :meth:`from_dict`)."""
        import yaml

        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, Mapping):
            raise ValueError(f"{path}: expected a mapping of InsCLRConfig fields")
        return cls.from_dict(data)

    def to_yaml(self) -> str:
        """The fields as YAML, in declaration order."""
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **changes: Any) -> InsCLRConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)
