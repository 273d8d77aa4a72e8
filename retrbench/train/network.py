"""The network being fine-tuned: its embedding, which parameters train, and its modes.

The embedding is the one ``retrbench run --pooling gem --whiten none`` computes:
``L2(GeM_p(backbone(x)))``; no head is added, so the fine-tuned backbone is a drop-in
replacement for the original one.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..backbones import Backbone
from ..pooling import gem

__all__ = ["Net", "Normalise", "autocast", "default_trainable", "embed", "embed_plain", "set_trainable", "train_mode"]

# Which parameters are fine-tuned when the config names none: the last stages only, which keeps
# CPU runs cheap (no gradient is computed through the frozen early blocks).
_DEFAULT_TRAINABLE = {
    # EfficientNet-Lite0 (timm names): stages 5 and 6 (the 192- and 320-channel blocks) and the
    # 1x1 head convolution + BN that make the 1280-channel map; stem and stages 0-4 frozen.
    "efficientnet_lite0": r"^(blocks\.[56]\.|conv_head\.|bn2\.)",
}

# never fine-tuned, whatever the pattern: classifier heads the embedding does not use
_HEADS = ("classifier.", "fc.", "head.fc.")


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


def set_trainable(backbone: Backbone, pattern: str) -> list[nn.Parameter]:
    """Turn gradients on for the parameters whose name matches ``pattern`` (``re.search``), off
    for the others and for classifier heads; returns the trainable ones, in ``named_parameters`` order."""
    rx = re.compile(pattern)
    params = []
    for name, p in backbone.net.named_parameters():
        on = bool(rx.search(name)) and not name.startswith(_HEADS)
        p.requires_grad_(on)
        if on:
            params.append(p)
    if not params:
        raise ValueError(f"trainable pattern {pattern!r} selects no parameter of {backbone.name}")
    return params


def train_mode(backbone: Backbone, bn_eval: bool) -> None:
    """Mode for the gradient pass: eval everywhere (no dropout, BatchNorm statistics kept), except
    BatchNorm layers with trainable parameters when ``bn_eval`` is False."""
    backbone.eval()
    if not bn_eval:
        for m in backbone.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and any(p.requires_grad for p in m.parameters(recurse=False)):
                m.train()


def embed(backbone: nn.Module, x: Tensor, gem_p: float = 3.0) -> Tensor:
    """``(B, 3, H, W)`` normalised images -> ``(B, C)`` float32 ``L2(GeM_p(backbone(x)))``."""
    return nn.functional.normalize(gem(backbone(x), p=gem_p).float(), dim=1)


def autocast(device: torch.device, enabled: bool) -> Any:
    """float16 autocast on ``device`` when ``enabled`` (a no-op context otherwise)."""
    return torch.autocast(device_type=device.type, dtype=torch.float16, enabled=enabled)


class Normalise:
    """``(B, 3, H, W)`` uint8 views -> float32 normalised, channels-last, on ``device``."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device) -> None:
        self.mean = torch.tensor(list(mean), dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.device = device

    def __call__(self, x: Tensor) -> Tensor:
        x = x.to(self.device, non_blocking=True).float().div_(255.0)
        return ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)


@dataclass(frozen=True)
class Net:
    """The network of a run with what every forward pass needs.

    Attributes:
        backbone: the network (on ``norm.device``), modified in place by training.
        params: its trainable parameters (see :func:`set_trainable`).
        norm: input normalisation of the backbone, on the training device.
        gem_p: GeM exponent of the embedding.
        amp: float16 autocast on (a GPU run with ``InsCLRConfig.amp``).
    """

    backbone: Backbone
    params: list[nn.Parameter]
    norm: Normalise
    gem_p: float
    amp: bool

    @property
    def device(self) -> torch.device:
        return self.norm.device

    def __call__(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W)`` uint8 views -> ``(B, C)`` float32 embeddings (gradients as the caller's context)."""
        with autocast(self.device, self.amp):
            return embed(self.backbone, self.norm(x), self.gem_p)


@torch.no_grad()
def embed_plain(net: Net, views: Sequence[Tensor]) -> Tensor:
    """Un-augmented ``(3, H, W)`` uint8 views of varied sizes -> ``(B, C)`` embeddings (images of one size batched together)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for j, v in enumerate(views):
        groups.setdefault(tuple(v.shape[-2:]), []).append(j)
    out: Tensor | None = None
    for idx in groups.values():
        e = net(torch.stack([views[j] for j in idx]))
        if out is None:
            out = torch.empty((len(views), e.shape[1]), device=e.device)
        out[idx] = e
    assert out is not None
    return out
