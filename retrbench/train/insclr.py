"""InsCLR training: configuration, the staged training loop, checkpoints, log and plot.

One stage (:func:`train` runs ``len(config.stages)`` of them):

1. candidate sets from the current model (:mod:`.candidates`; cached in ``OUT/candidates/``);
2. the un-augmented bank starts from those descriptors, the cross-batch memory is filled
   (``memory_init``) (:mod:`.memory`);
3. each step: sample tuples (:mod:`.tuples`); embed the batch without augmentation (no
   gradient) and write it to the bank; mini-batch selection and pseudo-positive mining on the
   bank (:mod:`.mining`); embed the augmented batch (gradients); loss against the batch and the
   memory (:mod:`.loss`); optimiser step; the augmented embeddings enter the memory.

The embedding is the one ``retrbench run --pooling gem --whiten none`` computes:
``L2(GeM_p(backbone(x)))``; no head is added, so the fine-tuned backbone is a drop-in
replacement for the original one.

Output directory::

    OUT/config.yaml          the configuration (a resumed run must match it)
    OUT/last.pth             the network's own state dict (``--model NAME --weights OUT/last.pth``)
    OUT/last_insclr.pth      ResNet-50/101 only: InsCLR layout for ``--model insclr_r50_instre`` / ``insclr_r101_gldv2``
    OUT/stage<s>.pth         the network after stage s (same layout as last.pth)
    OUT/state.pth            everything needed to resume (network, optimiser, memories, position)
    OUT/log.csv              one row per step: losses, mining statistics, throughput
    OUT/stages.csv           one row per stage (and summary.json)
    OUT/training.png         loss and mining statistics over the steps
    OUT/candidates/          candidate sets per stage, and the descriptors they came from

Checkpoints are written atomically every ``checkpoint_every`` steps and at the end of every
stage; calling :func:`train` again with the same directory resumes from ``state.pth``. The
batches and augmentations of a step depend only on ``(seed, stage, step)``, so on a CPU a
resumed run gives the same weights as an uninterrupted one.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from ..backbones import Backbone
from ..backbones.weights import sha256_file
from ..config import stable_hash
from ..extraction import FeatureCache, ImageSpec, load_image, resolve_device
from ..pooling import gem
from ..types import RetrievalDataset
from .candidates import CandidateSets, candidate_sets, describe, load_or_compute
from .loss import insclr_loss
from .memory import CrossBatchMemory, DatasetBank
from .mining import SCORES, mine, pair_precision, select
from .tuples import TupleSampler, step_rng, tuple_candidate_set

__all__ = [
    "InsCLRConfig",
    "TrainResult",
    "train",
    "embed",
    "default_trainable",
    "true_labels",
    "insclr_state_dict",
    "plot_log",
    "LOG_COLUMNS",
]

log = logging.getLogger(__name__)

STATE_FORMAT = 1
MEMORY_INIT = ("descriptors", "augmented", "none")

# Which parameters are fine-tuned when the config names none: the last stages only, which keeps
# CPU runs cheap (no gradient is computed through the frozen early blocks).
_DEFAULT_TRAINABLE = {
    # EfficientNet-Lite0 (timm names): stages 5 and 6 (the 192- and 320-channel blocks) and the
    # 1x1 head convolution + BN that make the 1280-channel map; stem and stages 0-4 frozen.
    "efficientnet_lite0": r"^(blocks\.[56]\.|conv_head\.|bn2\.)",
}

# fields that do not change what is trained; a resumed run may change them
_RUNTIME_FIELDS = ("device", "workers", "batch_size_extract", "checkpoint_every", "amp")


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
            fine-tuned; None: :func:`default_trainable`.
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
        return self.lr[0] if len(self.lr) == 1 else self.lr[stage]

    @property
    def batch_images(self) -> int:
        return self.tuples_per_batch * (self.tuple_k + 1)

    def to_dict(self) -> dict[str, Any]:
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
        import yaml

        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, Mapping):
            raise ValueError(f"{path}: expected a mapping of InsCLRConfig fields")
        return cls.from_dict(data)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **changes: Any) -> InsCLRConfig:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` wrote.

    Attributes:
        out: the output directory.
        last: the fine-tuned network's state dict (``--model NAME --weights last``).
        insclr_checkpoint: ``last_insclr.pth`` for ResNet-50/101 backbones, else None.
        log, plot: per-step CSV log and its plot.
        stages: per-stage summary rows (see ``stages.csv``).
        images_per_s: training throughput over the steps run by this call (batch images per
            second; each is embedded with and without augmentation).
    """

    out: Path
    last: Path
    insclr_checkpoint: Path | None
    log: Path
    plot: Path
    stages: list[dict[str, Any]] = field(default_factory=list)
    images_per_s: float = float("nan")


# --------------------------------------------------------------------------------------------
# The network


def default_trainable(backbone: Backbone) -> str:
    """Regex of the parameters fine-tuned by default: the last stages of the network.

    EfficientNet-Lite0: stages 5-6 and the head convolution; torchvision-style ResNets:
    ``layer4``; timm EfficientNet/MobileNet-like nets: the last two ``blocks`` and ``conv_head``;
    anything else: every parameter.
    """
    if backbone.name in _DEFAULT_TRAINABLE:
        return _DEFAULT_TRAINABLE[backbone.name]
    names = [n for n, _ in backbone.net.named_parameters()]
    if any(n.startswith("layer4.") for n in names):
        return r"^layer4\."
    blocks = sorted({int(m.group(1)) for n in names if (m := re.match(r"blocks\.(\d+)\.", n))})
    if blocks:
        last = "|".join(str(b) for b in blocks[-2:])
        return rf"^(blocks\.({last})\.|conv_head\.|bn2\.)"
    return r"."


def _set_trainable(backbone: Backbone, pattern: str) -> list[nn.Parameter]:
    rx = re.compile(pattern)
    params = []
    for name, p in backbone.net.named_parameters():
        on = bool(rx.search(name)) and not name.startswith(("classifier.", "fc.", "head.fc."))
        p.requires_grad_(on)
        if on:
            params.append(p)
    if not params:
        raise ValueError(f"trainable pattern {pattern!r} selects no parameter of {backbone.name}")
    return params


def _train_mode(backbone: Backbone, bn_eval: bool) -> None:
    backbone.eval()
    if not bn_eval:
        for m in backbone.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and any(p.requires_grad for p in m.parameters(recurse=False)):
                m.train()


def embed(backbone: nn.Module, x: Tensor, gem_p: float = 3.0) -> Tensor:
    """``(B, 3, H, W)`` normalised images -> ``(B, C)`` float32 ``L2(GeM_p(backbone(x)))``."""
    return nn.functional.normalize(gem(backbone(x), p=gem_p).float(), dim=1)


def insclr_state_dict(backbone: Backbone, gem_p: float = 3.0) -> dict[str, Any] | None:
    """``{'model': {backbone.*, combiner.pool.p}}`` for a torchvision ResNet-50/101, else None.

    The layout of ``retrbench.backbones.finetuned.read_insclr``: ``backbone.*`` in torchvision
    names without the classifier, GeM with its exponent as ``combiner.pool.p``, no head (InsCLR's
    ``norm`` head: the descriptor is ``L2(GeM_p(layer4))``, what training optimised).
    """
    net = backbone.net
    if getattr(net, "depth", None) not in (50, 101) or not hasattr(net, "layer4"):
        return None
    sd = {f"backbone.{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items() if not k.startswith("fc.")}
    sd["combiner.pool.p"] = torch.tensor([float(gem_p)])
    return {"model": sd}


# --------------------------------------------------------------------------------------------
# Images


def _random_resized_crop(w: int, h: int, scale: tuple[float, float], ratio: tuple[float, float], rng: np.random.Generator) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` as torchvision's ``RandomResizedCrop.get_params``, drawn from ``rng``."""
    area = w * h
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_r))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return x0, y0, x0 + cw, y0 + ch
    in_ratio = w / h  # fallback: central crop within the ratio range
    if in_ratio < ratio[0]:
        cw, ch = w, round(w / ratio[0])
    elif in_ratio > ratio[1]:
        cw, ch = round(h * ratio[1]), h
    else:
        cw, ch = w, h
    x0, y0 = (w - cw) // 2, (h - ch) // 2
    return x0, y0, x0 + cw, y0 + ch


class _Views(torch.utils.data.Dataset):
    """Item ``(index, stage, step, slot)`` -> augmented ``(3, S, S)`` and un-augmented ``(3, H, W)`` uint8 views."""

    def __init__(self, paths: Sequence[Path], cfg: InsCLRConfig) -> None:
        self.paths = list(paths)
        self.cfg = cfg

    def __len__(self) -> int:
        return len(self.paths)

    def augmented(self, i: int, rng: np.random.Generator) -> Tensor:
        c, s = self.cfg, self.cfg.image_size
        try:
            with Image.open(self.paths[i]) as im:
                img = im.convert("RGB")
        except OSError as e:
            raise OSError(f"{self.paths[i]}: cannot decode image ({e})") from e
        box = _random_resized_crop(img.width, img.height, c.aug_scale, c.aug_ratio, rng)
        img = img.resize((s, s), Image.Resampling.BILINEAR, box=box)
        if c.hflip and rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)

    def plain(self, i: int) -> Tensor:
        return load_image(ImageSpec(self.paths[i], None, self.cfg.image_size))

    def __getitem__(self, key: tuple[int, int, int, int]) -> tuple[Tensor, Tensor, int]:
        i, stage, step, slot = key
        rng = step_rng(self.cfg.seed, 2, stage, step, slot)
        return self.augmented(i, rng), self.plain(i), i


def _collate(items: list[tuple[Tensor, Tensor, int]]) -> tuple[Tensor, list[Tensor], Tensor]:
    return torch.stack([a for a, _, _ in items]), [p for _, p, _ in items], torch.tensor([i for _, _, i in items], dtype=torch.long)


class _Normalise:
    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device) -> None:
        self.mean = torch.tensor(list(mean), dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.device = device

    def __call__(self, x: Tensor) -> Tensor:
        x = x.to(self.device, non_blocking=True).float().div_(255.0)
        return ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)


def _autocast(device: torch.device, enabled: bool) -> Any:
    return torch.autocast(device_type=device.type, dtype=torch.float16, enabled=enabled)


@torch.no_grad()
def _embed_plain(backbone: Backbone, views: Sequence[Tensor], norm: _Normalise, gem_p: float, amp: bool) -> Tensor:
    """Un-augmented views of varied sizes -> ``(B, C)`` embeddings (images of one size batched together)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for j, v in enumerate(views):
        groups.setdefault(tuple(v.shape[-2:]), []).append(j)
    out: Tensor | None = None
    for idx in groups.values():
        with _autocast(norm.device, amp):
            e = embed(backbone, norm(torch.stack([views[j] for j in idx])), gem_p)
        if out is None:
            out = torch.empty((len(views), e.shape[1]), device=e.device)
        out[idx] = e
    assert out is not None
    return out


# --------------------------------------------------------------------------------------------
# Labels for measuring (never used for training)


def true_labels(ds: RetrievalDataset) -> np.ndarray:
    """A true instance label per database image, from the dataset's ground truth (measurement only).

    Images listed together for one query (easy + hard + junk, or ok + junk) share a label; lists
    that overlap are merged. Images listed for no query (distractors) get ``-1``.
    """
    n = len(ds.images)
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return int(i)

    listed = np.zeros(n, dtype=bool)
    for g in ds.gnd:
        members = np.unique(np.concatenate([np.asarray(v, dtype=np.int64).reshape(-1) for k, v in g.items() if k != "bbx"] or [np.empty(0, np.int64)]))
        members = members[(members >= 0) & (members < n)]
        if members.size == 0:
            continue
        listed[members] = True
        r0 = find(int(members[0]))
        for m in members[1:]:
            r = find(int(m))
            if r != r0:
                parent[r] = r0
    roots = np.array([find(i) for i in range(n)])
    _, labels = np.unique(roots, return_inverse=True)
    return np.where(listed, labels, -1).astype(np.int64)


# --------------------------------------------------------------------------------------------
# Files


def _atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a checkpoint is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _net_state(backbone: Backbone) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in backbone.net.state_dict().items()}


LOG_COLUMNS = (
    "stage", "step", "global_step", "lr", "loss", "batch_loss", "memory_loss",
    "batch_pos_pairs", "batch_neg_pairs", "memory_pos_pairs", "memory_neg_pairs", "memory_entries",
    "tuples", "images", "member_sim", "tuple_size", "kept_frac", "pool", "mined",
    "true_before", "n_before", "true_after", "n_after", "true_mined", "n_mined",
    "step_s", "images_per_s",
)  # fmt: skip
"""Columns of ``log.csv``. ``member_sim``: mean bank similarity of tuple members to their anchor (it
drifts if training shifts the similarity scale against the fixed thresholds); ``tuple_size``: mean
images per tuple after selection (anchor included);
``kept_frac``: fraction of non-anchor members kept; ``pool``: mean tuple candidate-set size;
``mined``: mean mined positives per anchor; ``true_*`` / ``n_*``: with measurement labels, members
sharing the anchor's true label / members, before selection, after it, and among the mined."""


def _truncate_log(path: Path, global_step: int) -> None:
    """Drop rows after ``global_step`` (written after the checkpoint a run resumes from)."""
    if not path.is_file():
        return
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    keep = [r for r in rows if int(r["global_step"]) <= global_step]
    if len(keep) == len(rows):
        return
    lines = [",".join(LOG_COLUMNS)] + [",".join(r.get(c, "") for c in LOG_COLUMNS) for r in keep]
    _atomic_text(path, "\n".join(lines) + "\n")


def plot_log(log_csv: str | Path, png: str | Path) -> Path:
    """Plot ``log.csv``: losses, tuple size after selection, mined positives per anchor, and
    (when measured) the true precision of tuples and mined positives; stages as vertical lines."""
    import pandas as pd
    from matplotlib.figure import Figure  # no pyplot: the caller's backend and figures are left alone

    df = pd.read_csv(log_csv)
    png = Path(png)
    measured = df["n_before"].sum() > 0 if len(df) else False
    n_ax = 4 if measured else 3
    fig = Figure(figsize=(7, 2.3 * n_ax))
    axes = fig.subplots(n_ax, 1, sharex=True)
    w = max(1, len(df) // 25)

    def smooth(s: pd.Series) -> pd.Series:
        return s.rolling(w, min_periods=1).mean()

    x = df["global_step"]
    for col in ("loss", "batch_loss", "memory_loss"):
        axes[0].plot(x, smooth(df[col]), label=col)
    axes[0].set_ylabel("loss")
    axes[0].legend(fontsize=7)
    axes[1].plot(x, smooth(df["tuple_size"]), label="tuple size after selection (with anchor)")
    axes[1].plot(x, smooth(df["mined"]), label="mined positives per anchor")
    axes[1].set_ylabel("images")
    axes[1].legend(fontsize=7)
    axes[2].plot(x, smooth(df["kept_frac"]), label="fraction of tuple members kept")
    axes[2].plot(x, smooth(df["member_sim"]), label="member-anchor similarity (bank)")
    axes[2].set_ylim(0, 1.02)
    axes[2].legend(fontsize=7)
    if measured:
        for name in ("before", "after", "mined"):
            prec = df[f"true_{name}"].rolling(w, min_periods=1).sum() / df[f"n_{name}"].rolling(w, min_periods=1).sum()
            axes[3].plot(x, prec, label={"before": "tuple precision (sampled)", "after": "tuple precision (selected)", "mined": "mined precision"}[name])
        axes[3].set_ylim(0, 1.02)
        axes[3].set_ylabel("true precision")
        axes[3].legend(fontsize=7)
    if len(df):
        for b in df.groupby("stage")["global_step"].min().iloc[1:]:
            for ax in axes:
                ax.axvline(b - 0.5, color="grey", ls=":", lw=1)
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    return png


def _stage_rows(log_csv: Path, cand_prec: Mapping[int, float]) -> list[dict[str, Any]]:
    import pandas as pd

    if not log_csv.is_file():
        return []
    df = pd.read_csv(log_csv)
    rows = []
    for s, g in df.groupby("stage"):
        row: dict[str, Any] = {
            "stage": int(s),
            "steps": len(g),
            "loss_first": float(g["loss"].iloc[: max(1, len(g) // 10)].mean()),
            "loss_last": float(g["loss"].iloc[-max(1, len(g) // 10) :].mean()),
            "tuple_size": float(g["tuple_size"].mean()),
            "kept_frac": float(g["kept_frac"].mean()),
            "mined_per_anchor": float(g["mined"].mean()),
            "images_per_s": float(g["images"].sum() / g["step_s"].sum()),
        }
        if g["n_before"].sum() > 0:
            for name in ("before", "after", "mined"):
                n = g[f"n_{name}"].sum()
                row[f"precision_{name}"] = float(g[f"true_{name}"].sum() / n) if n else float("nan")
        if int(s) in cand_prec:
            row["candidate_topk_precision"] = cand_prec[int(s)]
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# Training


def _resolve(config: InsCLRConfig, backbone: Backbone | None, images: Sequence[str | Path] | None) -> tuple[Backbone, list[Path]]:
    if backbone is None:
        from ..pipeline import make_backbone

        backbone = make_backbone(config.model, config.weights)
    if images is None:
        from ..pipeline import load_dataset

        ds = load_dataset(config.dataset, config.data_root)
        images = [Path(ds.root) / p for p in ds.images]
    paths = [Path(p) for p in images]
    if len(paths) < config.tuple_k + 2:
        raise ValueError(f"need at least {config.tuple_k + 2} training images, got {len(paths)}")
    return backbone, paths


def _check_resumable(saved: Mapping[str, Any], config: InsCLRConfig, out: Path) -> None:
    mine_ = config.to_dict()
    diff = sorted(k for k in mine_ if k not in _RUNTIME_FIELDS and saved.get(k) != mine_[k])
    if diff:
        show = ", ".join(f"{k}: {saved.get(k)!r} -> {mine_[k]!r}" for k in diff)
        raise ValueError(f"{out} holds a run with another configuration ({show}); use another output directory, or restart")


def train(
    config: InsCLRConfig,
    out: str | Path,
    *,
    backbone: Backbone | None = None,
    images: Sequence[str | Path] | None = None,
    eval_labels: np.ndarray | None = None,
    restart: bool = False,
    progress: bool = False,
    plot: bool = True,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Fine-tune a backbone with InsCLR on an unlabelled collection; resumes from ``out`` when it holds a run.

    Args:
        config: the run's configuration.
        out: output directory (see the module docstring for its files).
        backbone: the network to fine-tune (default: ``config.model`` / ``config.weights`` from
            the registry). It is modified in place.
        images: training image files (default: the database images of ``config.dataset``).
        eval_labels: optional true label per image (``-1``: none), used only to *measure* the
            precision of tuples and mined positives in the log; training never reads it.
        restart: ignore a run already in ``out`` and start over.
        progress: show a tqdm progress bar with the loss and mining statistics.
        plot: draw ``training.png`` at the end (about a second; the CSV log is always written).
        on_step: called with each step's log row after the step (tests use it to interrupt).
    """
    from tqdm.auto import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = config
    backbone, paths = _resolve(cfg, backbone, images)
    n = len(paths)
    if eval_labels is not None and len(eval_labels) != n:
        raise ValueError(f"eval_labels has {len(eval_labels)} entries for {n} images")
    labels = None if eval_labels is None else np.asarray(eval_labels, dtype=np.int64)
    device = resolve_device(cfg.device)
    use_amp = bool(cfg.amp and device.type == "cuda")
    pattern = cfg.trainable or default_trainable(backbone)
    backbone.to(device, memory_format=torch.channels_last)
    params = _set_trainable(backbone, pattern)
    norm = _Normalise(backbone.info.mean, backbone.info.std, device)
    views = _Views(paths, cfg)
    state_path, log_path, png = out / "state.pth", out / "log.csv", out / "training.png"
    base_weights_id = backbone.weights_id

    # --- where to start
    start_stage, start_step, resumed = 0, 0, None
    if restart:
        state_path.unlink(missing_ok=True)
        log_path.unlink(missing_ok=True)
    if state_path.is_file():
        resumed = torch.load(state_path, map_location="cpu", weights_only=True)
        if resumed.get("format") != STATE_FORMAT:
            raise ValueError(f"{state_path}: unknown state format {resumed.get('format')!r}")
        _check_resumable(resumed["config"], cfg, out)
        backbone.net.load_state_dict(resumed["net"])
        start_stage, start_step = int(resumed["stage"]), int(resumed["step"])
        base_weights_id = resumed["base_weights_id"]
        _truncate_log(log_path, int(resumed["global_step"]))
        log.info("resuming %s at stage %d step %d", out, start_stage, start_step)
    else:
        log_path.unlink(missing_ok=True)
    _atomic_text(out / "config.yaml", cfg.to_yaml())
    (out / "candidates").mkdir(exist_ok=True)

    total = sum(cfg.stages)
    global_step = sum(cfg.stages[:start_stage]) + start_step
    bar = tqdm(total=total, initial=global_step, desc="insclr", unit="step", disable=not progress)
    cand_prec: dict[int, float] = {}
    run_images, run_time = 0, 0.0
    new_log = not log_path.is_file()
    log_file = open(log_path, "a", newline="")  # noqa: SIM115 (closed in finally)
    writer = csv.DictWriter(log_file, fieldnames=LOG_COLUMNS)
    if new_log:
        writer.writeheader()
    try:
        for stage in range(start_stage, len(cfg.stages)):
            # --- 1. candidate sets from the model as it is at the start of the stage
            weights_id = base_weights_id if stage == 0 else sha256_file(out / f"stage{stage - 1}.pth")
            meta = {"weights_id": weights_id, "model": backbone.name, "image_size": cfg.image_size, "gem_p": cfg.gem_p, "images": stable_hash([str(p) for p in paths], 32)}
            key = stable_hash(meta, 20)
            cand_path = out / "candidates" / f"stage{stage}-{key}.npz"
            mid_stage = resumed is not None and stage == start_stage and "bank" in resumed
            if mid_stage and cand_path.is_file():
                cands, descriptors = CandidateSets.load(cand_path), None
            else:
                if mid_stage:
                    log.warning("%s is missing: recomputing the candidate sets with the resumed network", cand_path)
                feat_cache = FeatureCache(out / "candidates" / "features", f"stage{stage}-{key}", meta)
                descriptors = describe(
                    backbone, paths, cfg.image_size, mean=backbone.info.mean, std=backbone.info.std, gem_p=cfg.gem_p,
                    cache=feat_cache, device=device, batch_size=cfg.batch_size_extract, workers=cfg.workers,
                    progress=progress, desc=f"stage {stage} candidates",
                )  # fmt: skip
                cands = load_or_compute(cand_path, lambda d=descriptors: candidate_sets(d, cfg.candidates_k), n)
            if labels is not None:  # measured over anchors that have a true label
                has = labels >= 0
                top = cands.indices[has, : cfg.tuple_k]
                cand_prec[stage] = float((labels[top] == labels[has, None]).mean()) if has.any() else float("nan")

            # --- 2. memories and optimiser
            if mid_stage:
                assert resumed is not None
                bank = DatasetBank(resumed["bank"]).to(device)
            else:
                assert descriptors is not None
                bank = DatasetBank(torch.from_numpy(descriptors)).to(device)
            memory = CrossBatchMemory(cfg.memory_size or n, bank.features.shape[1]).to(device)
            optimizer = torch.optim.Adam(params, lr=cfg.stage_lr(stage), weight_decay=cfg.weight_decay)
            scaler = torch.amp.GradScaler(device.type, enabled=use_amp)
            first = start_step if stage == start_stage else 0
            if mid_stage:
                assert resumed is not None
                memory.restore(resumed["memory"])
                optimizer.load_state_dict(resumed["optimizer"])
                scaler.load_state_dict(resumed["scaler"])
            elif cfg.memory_init == "descriptors":
                memory.enqueue(bank.features, torch.arange(n, device=device))
            elif cfg.memory_init == "augmented":
                _fill_memory_augmented(memory, backbone, views, norm, cfg, stage, use_amp)
            resumed = None

            # --- 3. the steps
            sampler = TupleSampler(cands, cfg.tuples_per_batch, cfg.tuple_k, cfg.seed, stage, cfg.tuple_separation)
            steps = list(range(first, cfg.stages[stage]))
            plan = [sampler.tuples(t) for t in steps]
            keys = [[(int(i), stage, t, slot) for slot, i in enumerate(np.concatenate(tp))] for t, tp in zip(steps, plan, strict=True)]
            loader = torch.utils.data.DataLoader(
                views, batch_sampler=keys, num_workers=min(cfg.workers, os.cpu_count() or 1), collate_fn=_collate,
                pin_memory=device.type == "cuda",
            )  # fmt: skip
            t0 = time.perf_counter()  # step time includes waiting for the images, not checkpoints
            for t, tuples, (aug, plain, idx) in zip(steps, plan, loader, strict=True):
                row = _step(cfg, backbone, optimizer, scaler, params, bank, memory, cands, tuples, aug, plain, idx, norm, use_amp, labels)
                global_step += 1
                dt = time.perf_counter() - t0
                run_images += len(idx)
                run_time += dt
                row.update(stage=stage, step=t + 1, global_step=global_step, lr=optimizer.param_groups[0]["lr"], step_s=dt, images_per_s=len(idx) / dt)
                writer.writerow({c: row.get(c, "") for c in LOG_COLUMNS})
                bar.update(1)
                bar.set_postfix(stage=stage, loss=f"{row['loss']:.3f}", size=f"{row['tuple_size']:.2f}", mined=f"{row['mined']:.1f}", refresh=False)
                done = t + 1 == cfg.stages[stage]
                if (t + 1) % cfg.checkpoint_every == 0 and not done:
                    log_file.flush()
                    _checkpoint(out, backbone, cfg, stage, t + 1, global_step, optimizer, scaler, bank, memory, base_weights_id)
                if on_step is not None:
                    on_step(row)
                t0 = time.perf_counter()
            # --- end of stage: the network after it, then a state that starts the next stage
            log_file.flush()
            _atomic_torch_save(_net_state(backbone), out / f"stage{stage}.pth")
            _checkpoint(out, backbone, cfg, stage + 1, 0, global_step, None, None, None, None, base_weights_id)
    finally:
        bar.close()
        log_file.close()

    ins = out / "last_insclr.pth" if (out / "last_insclr.pth").exists() else None
    if plot:
        plot_log(log_path, png)
    stages = _stage_rows(log_path, cand_prec)
    _write_stage_summary(out, stages)
    return TrainResult(out, out / "last.pth", ins, log_path, png, stages, run_images / run_time if run_time else float("nan"))


def _write_stage_summary(out: Path, stages: list[dict[str, Any]]) -> None:
    import pandas as pd

    prev = {}
    p = out / "summary.json"
    if p.is_file():  # candidate-set precision measured by an earlier (interrupted) call
        try:
            prev = {r["stage"]: r for r in json.loads(p.read_text()).get("stages", [])}
        except (ValueError, KeyError, TypeError):
            prev = {}
    for r in stages:
        if "candidate_topk_precision" not in r and "candidate_topk_precision" in prev.get(r["stage"], {}):
            r["candidate_topk_precision"] = prev[r["stage"]]["candidate_topk_precision"]
    _atomic_text(p, json.dumps({"stages": stages}, indent=1))
    if stages:
        _atomic_text(out / "stages.csv", pd.DataFrame(stages).to_csv(index=False))


def _checkpoint(
    out: Path,
    backbone: Backbone,
    cfg: InsCLRConfig,
    stage: int,
    step: int,
    global_step: int,
    optimizer: torch.optim.Optimizer | None,
    scaler: torch.amp.GradScaler | None,
    bank: DatasetBank | None,
    memory: CrossBatchMemory | None,
    base_weights_id: str,
) -> None:
    net = _net_state(backbone)
    _atomic_torch_save(net, out / "last.pth")
    ins = insclr_state_dict(backbone, cfg.gem_p)
    if ins is not None:
        _atomic_torch_save(ins, out / "last_insclr.pth")
    state: dict[str, Any] = {
        "format": STATE_FORMAT,
        "config": cfg.to_dict(),
        "stage": stage,
        "step": step,
        "global_step": global_step,
        "base_weights_id": base_weights_id,
        "net": net,
    }
    if optimizer is not None:  # mid-stage: everything the stage's next step needs
        assert scaler is not None and bank is not None and memory is not None
        state.update(optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), bank=bank.features.cpu(), memory=memory.snapshot())
    _atomic_torch_save(state, out / "state.pth")


@torch.no_grad()
def _fill_memory_augmented(memory: CrossBatchMemory, backbone: Backbone, views: _Views, norm: _Normalise, cfg: InsCLRConfig, stage: int, amp: bool) -> None:
    """InsCLR's memory initialisation: one augmented view of every image (up to the memory size)."""
    backbone.eval()
    n = min(len(views), memory.capacity)
    for start in range(0, n, cfg.batch_size_extract):
        ids = list(range(start, min(n, start + cfg.batch_size_extract)))
        x = torch.stack([views.augmented(i, step_rng(cfg.seed, 3, stage, i)) for i in ids])
        with _autocast(norm.device, amp):
            e = embed(backbone, norm(x), cfg.gem_p)
        memory.enqueue(e, torch.tensor(ids, device=e.device))


def _step(
    cfg: InsCLRConfig,
    backbone: Backbone,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    params: list[nn.Parameter],
    bank: DatasetBank,
    memory: CrossBatchMemory,
    cands: CandidateSets,
    tuples: list[np.ndarray],
    aug: Tensor,
    plain: list[Tensor],
    idx: Tensor,
    norm: _Normalise,
    amp: bool,
    labels: np.ndarray | None,
) -> dict[str, Any]:
    dev = norm.device
    # un-augmented views -> the dataset bank (no gradient), then every similarity judgement
    backbone.eval()
    bank.update(idx, _embed_plain(backbone, plain, norm, cfg.gem_p, amp))
    sel = select(bank, tuples, cfg.selection_threshold)
    in_batch = idx.numpy()
    class_sets: list[np.ndarray] = []
    slot_class = np.empty(len(in_batch), dtype=np.int64)
    pos_of = {int(i): j for j, i in enumerate(in_batch)}
    mined_n, pool_n, st = [], [], dict.fromkeys(("true_before", "n_before", "true_after", "n_after", "true_mined", "n_mined"), 0)
    for s in sel:
        pool = tuple_candidate_set(cands, s.kept, exclude=np.setdiff1d(in_batch, s.kept))
        got = mine(bank, s.kept, pool, rounds=cfg.mining_rounds, first_k=cfg.mining_first_k, growth=cfg.mining_growth, min_sim=cfg.mining_min_sim, score=cfg.mining_score)
        mined_n.append(len(got))
        pool_n.append(len(pool))
        c = len(class_sets)
        class_sets.append(np.concatenate([s.kept, got]))
        for i in s.kept:
            slot_class[pos_of[int(i)]] = c
        for r in s.rejected:  # a hard negative of its tuple: a class of its own
            slot_class[pos_of[int(r)]] = len(class_sets)
            class_sets.append(np.array([r], dtype=np.int64))
        if labels is not None:
            for name, others in (("before", s.members[1:]), ("after", s.kept[1:]), ("mined", got)):
                ok, tot = pair_precision(s.anchor, others, labels)
                st[f"true_{name}"] += ok
                st[f"n_{name}"] += tot

    # augmented views -> loss against the batch and the memory
    mem_f, mem_i = memory.entries()
    _train_mode(backbone, cfg.bn_eval)
    with _autocast(dev, amp):
        feats = embed(backbone, norm(aug), cfg.gem_p)
    loss, ls = insclr_loss(
        feats, torch.as_tensor(slot_class, device=dev), class_sets, mem_f, mem_i,
        margin=cfg.margin, pos_margin=cfg.pos_margin, memory_weight=cfg.memory_weight, memory_negatives=cfg.memory_negatives,
    )  # fmt: skip
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if cfg.grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    memory.enqueue(feats.detach(), idx.to(dev))
    backbone.eval()

    members = sum(len(s.members) - 1 for s in sel)
    kept = sum(len(s.kept) - 1 for s in sel)
    return {
        "loss": float(loss.detach()),
        **ls,
        "memory_entries": int(mem_i.shape[0]),
        "tuples": len(sel),
        "images": len(in_batch),
        "member_sim": float(np.mean(np.concatenate([s.similarity for s in sel]))),
        "tuple_size": float(np.mean([len(s.kept) for s in sel])),
        "kept_frac": kept / members if members else float("nan"),
        "pool": float(np.mean(pool_n)),
        "mined": float(np.mean(mined_n)),
        **st,
    }
