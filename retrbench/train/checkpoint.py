"""The run directory of InsCLR training: checkpoints, the resume state, and resuming.

Output directory (:class:`RunDir`)::

    OUT/config.yaml          the configuration (a resumed run must match it)
    OUT/last.pth             the network's own state dict (``--model NAME --weights OUT/last.pth``)
    OUT/last_insclr.pth      ResNet-50/101 only: InsCLR layout for ``--model insclr_r50_instre`` / ``insclr_r101_gldv2``
    OUT/stage<s>.pth         the network after stage s (same layout as last.pth)
    OUT/state.pth            everything needed to resume (network, optimiser, memories, position)
    OUT/log.csv              one row per step: losses, mining statistics, throughput
    OUT/stages.csv           one row per stage (and summary.json)
    OUT/training.png         loss and mining statistics over the steps
    OUT/candidates/          candidate sets per stage, and the descriptors they came from

Every file is written atomically (:func:`retrbench.utils.io.atomic_write`). ``state.pth``
(format :data:`STATE_FORMAT`) holds ``format, config, stage, step, global_step,
base_weights_id, net`` and, when saved inside a stage, ``optimizer, scaler, bank, memory``
(:class:`StageState`); at the end of a stage it points at step 0 of the next one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..backbones import Backbone
from ..utils.io import atomic_write, atomic_write_text
from .config import RUNTIME_FIELDS, InsCLRConfig
from .memory import CrossBatchMemory, DatasetBank

__all__ = [
    "STATE_FORMAT",
    "Resume",
    "RunDir",
    "StageState",
    "check_resumable",
    "insclr_state_dict",
    "load_resume",
    "net_state",
    "save_checkpoint",
    "save_torch",
    "write_config",
]

log = logging.getLogger(__name__)

STATE_FORMAT = 1


@dataclass(frozen=True)
class RunDir:
    """The files of a training run under ``root`` (see the module docstring)."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def state(self) -> Path:
        return self.root / "state.pth"

    @property
    def last(self) -> Path:
        return self.root / "last.pth"

    @property
    def last_insclr(self) -> Path:
        return self.root / "last_insclr.pth"

    @property
    def log(self) -> Path:
        return self.root / "log.csv"

    @property
    def plot(self) -> Path:
        return self.root / "training.png"

    @property
    def candidates(self) -> Path:
        return self.root / "candidates"

    def stage(self, s: int) -> Path:
        """The network after stage ``s``."""
        return self.root / f"stage{s}.pth"


@dataclass
class StageState:
    """What changes from step to step inside a stage besides the network: saved by a mid-stage checkpoint.

    Attributes:
        optimizer: Adam over the trainable parameters (created at the start of each stage).
        scaler: gradient scaler (disabled without mixed precision).
        bank: the un-augmented ``(N, D)`` dataset bank.
        memory: the cross-batch memory.
    """

    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    bank: DatasetBank
    memory: CrossBatchMemory

    def to_state(self) -> dict[str, Any]:
        """The ``optimizer, scaler, bank, memory`` entries of ``state.pth`` (tensors on the CPU)."""
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(), "bank": self.bank.features.cpu(), "memory": self.memory.snapshot()}

    def restore(self, saved: Mapping[str, Any]) -> None:
        """Load the optimiser, scaler and memory of :meth:`to_state` (the bank is built from ``saved['bank']``)."""
        self.memory.restore(saved["memory"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scaler.load_state_dict(saved["scaler"])


@dataclass(frozen=True)
class Resume:
    """A saved run's position, read from ``state.pth``.

    Attributes:
        stage, step: the next step to run is ``step`` (0-based) of ``stage``.
        global_step: steps done over all stages.
        base_weights_id: the starting network's weights id (keys stage 0's candidate sets).
        net: the network's state dict.
        mid_stage: the :meth:`StageState.to_state` entries when saved inside a stage, else None.
    """

    stage: int
    step: int
    global_step: int
    base_weights_id: str
    net: dict[str, Tensor]
    mid_stage: dict[str, Any] | None


def save_torch(obj: Any, path: Path) -> None:
    """``torch.save(obj)`` to ``path`` atomically."""
    with atomic_write(path, "wb") as f:
        torch.save(obj, f)


def net_state(backbone: Backbone) -> dict[str, Tensor]:
    """The network's own state dict, on the CPU (the layout of ``last.pth`` and ``stage<s>.pth``)."""
    return {k: v.detach().cpu().contiguous() for k, v in backbone.net.state_dict().items()}


def insclr_state_dict(backbone: Backbone, gem_p: float = 3.0) -> dict[str, Any] | None:
    """``{'model': {backbone.*, combiner.pool.p}}`` for a torchvision ResNet-50/101, else None.

    The layout of ``retrbench.backbones.insclr.read_insclr``: ``backbone.*`` in torchvision
    names without the classifier, GeM with its exponent as ``combiner.pool.p``, no head (InsCLR's
    ``norm`` head: the descriptor is ``L2(GeM_p(layer4))``, what training optimised).
    """
    net = backbone.net
    if getattr(net, "depth", None) not in (50, 101) or not hasattr(net, "layer4"):
        return None
    sd = {f"backbone.{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items() if not k.startswith("fc.")}
    sd["combiner.pool.p"] = torch.tensor([float(gem_p)])
    return {"model": sd}


def save_checkpoint(
    run: RunDir,
    *,
    backbone: Backbone,
    config: InsCLRConfig,
    stage: int,
    step: int,
    global_step: int,
    base_weights_id: str,
    stage_state: StageState | None = None,
) -> None:
    """Write ``last.pth`` (and ``last_insclr.pth``), then ``state.pth`` at ``(stage, step)``.

    ``stage_state`` is given mid-stage (everything the stage's next step needs); None at the end
    of a stage, with ``(stage + 1, 0)`` as the position.
    """
    net = net_state(backbone)
    save_torch(net, run.last)
    ins = insclr_state_dict(backbone, config.gem_p)
    if ins is not None:
        save_torch(ins, run.last_insclr)
    state: dict[str, Any] = {
        "format": STATE_FORMAT,
        "config": config.to_dict(),
        "stage": stage,
        "step": step,
        "global_step": global_step,
        "base_weights_id": base_weights_id,
        "net": net,
    }
    if stage_state is not None:
        state.update(stage_state.to_state())
    save_torch(state, run.state)


def check_resumable(saved: Mapping[str, Any], config: InsCLRConfig, out: Path) -> None:
    """Raise ``ValueError`` naming the fields where ``config`` differs from the ``saved`` one
    (outside :data:`~retrbench.train.config.RUNTIME_FIELDS`)."""
    now = config.to_dict()
    diff = sorted(k for k in now if k not in RUNTIME_FIELDS and saved.get(k) != now[k])
    if diff:
        show = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in diff)
        raise ValueError(f"{out} holds a run with another configuration ({show}); use another output directory, or restart")


def load_resume(run: RunDir, config: InsCLRConfig) -> Resume | None:
    """The position saved in ``run.state``, or None when there is none.

    Raises ``ValueError`` for an unknown state format or another configuration (see
    :func:`check_resumable`).
    """
    if not run.state.is_file():
        return None
    saved = torch.load(run.state, map_location="cpu", weights_only=True)
    if saved.get("format") != STATE_FORMAT:
        raise ValueError(f"{run.state}: unknown state format {saved.get('format')!r}")
    check_resumable(saved["config"], config, run.root)
    mid = {k: saved[k] for k in ("optimizer", "scaler", "bank", "memory")} if "bank" in saved else None
    return Resume(int(saved["stage"]), int(saved["step"]), int(saved["global_step"]), saved["base_weights_id"], saved["net"], mid)


def write_config(run: RunDir, config: InsCLRConfig) -> None:
    """``config.yaml`` (written at every start, so it is the configuration of the latest call)."""
    atomic_write_text(run.config, config.to_yaml())
