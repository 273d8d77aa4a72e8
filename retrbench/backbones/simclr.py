"""SimCLR v1 ResNet-50 of width 1x / 2x / 4x (Chen et al. 2020), converted to PyTorch.

Every layer is widened by ``w`` (the stem too: ``64 * w`` channels), as in the official
TensorFlow code and in the PyTorch conversion of tonylins/simclr-converter (``resnet_wider.py``);
not torchvision's ``wide_resnet50_2``, which widens only the bottleneck's inner convolutions.
The converted file is ``{'state_dict': ...}`` with torchvision-style names; its ``fc.*``
classifier is dropped. The map is the unpooled ``layer4`` output, ``2048 * w`` channels at
stride 32. Inputs are RGB in [0, 1] without mean / std normalisation.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from ..utils.checkpoint import CheckpointError, read_state_dict
from ..utils.io import sha256_file
from .base import BACKBONES, Backbone, BackboneInfo, finish, new_network, refuse_weights_with_random
from .resnet import RESNET_BLOCKS
from .weights import load_into, resolve_weights

__all__ = ["SIMCLR_INFO", "SimCLRResNet50", "build_simclr"]


class _WideBottleneck(nn.Module):
    """Bottleneck of the SimCLR ResNet: 1x1 (in -> planes), 3x3 (stride), 1x1 (planes -> 4 planes)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = 4 * planes
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + identity)


class SimCLRResNet50(nn.Module):
    """SimCLR v1 ResNet-50 of width ``w``: every layer widened, the stem included.

    Stem: 7x7 conv 3 -> ``64 w``, BN, ReLU, 3x3 max pool; stages of 3, 4, 6, 3 bottlenecks with
    inner widths ``64 w, 128 w, 256 w, 512 w`` and outputs four times that, so ``layer4`` has
    ``2048 w`` channels (2048, 4096, 8192 for 1x, 2x, 4x). Parameter names follow torchvision
    (``conv1``, ``bn1``, ``layerN.i.conv1..3``, ``bnN``, ``downsample.0/1``); width 1 is exactly
    torchvision's ``resnet50`` without ``fc``.

    ``forward_features(x)``: ``(B, 3, H, W) -> (B, 2048 w, H / 32, W / 32)``;
    ``forward(x)``: the ``(B, 2048 w)`` average-pooled representation SimCLR evaluates.
    """

    def __init__(self, width: int = 1) -> None:
        super().__init__()
        self.width = width
        stem = 64 * width
        self.conv1 = nn.Conv2d(3, stem, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = stem
        for i, (planes, blocks, stride) in enumerate(
            zip((64, 128, 256, 512), RESNET_BLOCKS[50], (1, 2, 2, 2), strict=True), 1
        ):
            layer = []
            for b in range(blocks):
                layer.append(_WideBottleneck(inplanes, planes * width, stride if b == 0 else 1))
                inplanes = 4 * planes * width
            setattr(self, f"layer{i}", nn.Sequential(*layer))
        self.num_features = inplanes
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.forward_features(x), 1), 1)


def _simclr_info(width: int) -> BackboneInfo:
    return BackboneInfo(
        label=f"SimClr{width}x",
        order=20 + {1: 0, 2: 1, 4: 2}[width],
        help=f"SimCLR v1 ResNet-50 ({width}x, every layer widened): {2048 * width}-channel layer4 map, stride 32",
        channels=2048 * width,
        stride=32,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        default_size=1024,
        weights_source=(
            f"SimCLR v1 ResNet-50 ({width}x), google-research/simclr ResNet50_{width}x, converted to PyTorch "
            f"with tonylins/simclr-converter"
        ),
        weights_file=f"resnet50-{width}x.pth",
        url=None,  # only the TensorFlow checkpoints are published; the conversion is made locally
        sha256=None,
        licence="Apache-2.0 (tonylins/simclr-converter); google-research/simclr weights: Apache-2.0 (not re-verified here)",
        card="simclr.md",
    )


SIMCLR_INFO: dict[int, BackboneInfo] = {w: _simclr_info(w) for w in (1, 2, 4)}
_SIMCLR_HOW = (
    "SimCLR v1 is published only as TensorFlow checkpoints "
    "(https://storage.cloud.google.com/simclr-gcs/checkpoints/ResNet50_{w}x.zip). Convert it with "
    "https://github.com/tonylins/simclr-converter: python convert.py ResNet50_{w}x/model.ckpt-225206 "
    "resnet50-{w}x.pth, then pass --weights resnet50-{w}x.pth or put it in the cache directory."
)


def build_simclr(width: int, weights: str | Path | None = None, pretrained: bool = True) -> Backbone:
    """SimCLR v1 ResNet-50 of width 1, 2 or 4, returning its ``(B, 2048 w, H/32, W/32)`` layer4 map.

    Args:
        width: 1, 2 or 4.
        weights: the converter's ``{'state_dict': ...}`` file (``fc.*`` dropped); None: the cache.
        pretrained: False gives a seeded random initialisation (``weights_id="random-init"``).
    """
    info, name = SIMCLR_INFO[width], f"simclr{width}x"
    if not pretrained:
        refuse_weights_with_random(weights)
        return finish(new_network(lambda: SimCLRResNet50(width), pretrained=False), info, name, "random-init")
    path = resolve_weights(info, weights, how_to_get=_SIMCLR_HOW.format(w=width))
    sd = read_state_dict(path, key="state_dict")
    stem = sd.get("conv1.weight")
    if stem is not None and stem.dim() == 4 and stem.shape[0] % 64 == 0 and stem.shape[0] // 64 != width:
        other = stem.shape[0] // 64
        raise CheckpointError(
            f"{path}: a SimCLR ResNet-50 of width {other}x (its stem has {stem.shape[0]} channels), not "
            f"{width}x; use simclr{other}x"
        )
    net = new_network(lambda: SimCLRResNet50(width), pretrained=True)
    load_into(net, sd, path, ignore=(r"^fc\.(weight|bias)$",))
    return finish(net, info, name, sha256_file(path))


def _simclr_factory(width: int) -> Callable[..., Backbone]:
    def build(weights: str | Path | None = None, pretrained: bool = True) -> Backbone:
        return build_simclr(width, weights, pretrained)

    build.__name__ = build.__qualname__ = f"build_simclr{width}x"
    build.__doc__ = SIMCLR_INFO[width].help
    return build


for _w in (1, 2, 4):
    BACKBONES.register(
        f"simclr{_w}x",
        _simclr_factory(_w),
        aliases=(f"simclr_{_w}x", f"simclr-{_w}x", f"simclr-r50-{_w}x"),
        info=SIMCLR_INFO[_w],
    )
