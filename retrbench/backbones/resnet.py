"""torchvision's bottleneck ResNet, and the ImageNet-supervised baseline ``resnet50`` (the paper's "Baseline").

:class:`TorchvisionResNet` (with ``forward_features``: the unpooled ``layer4`` map, stride 32)
is the trunk of every ResNet entry: ``resnet50`` here, MoCo (:mod:`.moco`), and the
retrieval-fine-tuned families (:mod:`.gem_ap`, :mod:`.cirtorch`, :mod:`.insclr`);
:func:`resnet_depth` tells a checkpoint's depth from its ``layer3`` blocks.

``resnet50``: torchvision's ResNet-50 with the ``IMAGENET1K_V1`` weights, a plain state dict
(``resnet50-0676ba61.pth``, or the older ``resnet50-19c8e357.pth``). The classifier is kept:
``backbone.net(x)`` gives the 1000 ImageNet logits.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor, nn
from torchvision.models.resnet import Bottleneck, ResNet

from ..utils.checkpoint import CheckpointError, preview_keys, read_checkpoint, tensor_mapping
from ..utils.io import sha256_file
from ..utils.paths import weights_cache_dir
from .base import (
    BACKBONES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Backbone,
    BackboneInfo,
    finish,
    new_network,
    refuse_weights_with_random,
)
from .weights import load_into, resolve_weights, verify_published_digest

__all__ = ["RESNET50", "RESNET_BLOCKS", "TorchvisionResNet", "build_resnet50", "resnet_depth"]

RESNET_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}  # bottleneck blocks per stage
_DEPTH_OF_LAYER3 = {blocks[2]: depth for depth, blocks in RESNET_BLOCKS.items()}


class TorchvisionResNet(ResNet):
    """torchvision's bottleneck ResNet (v1.5: stride in the 3x3 convolution) with ``forward_features``.

    Args:
        depth: 50, 101 or 152.
        num_classes: size of the ``fc`` classifier; None replaces it with an identity
            (``forward`` then gives the ``(B, 2048)`` average-pooled representation).

    ``forward_features(x)``: ``(B, 3, H, W) -> (B, 2048, H', W')``, the ``layer4`` output with
    ``H' = ceil(H / 32)`` for the usual sizes (7x7 conv stride 2 pad 3, max pool 3/2/1, three
    stride-2 stages).
    """

    def __init__(self, depth: int = 50, num_classes: int | None = 1000) -> None:
        super().__init__(Bottleneck, list(RESNET_BLOCKS[depth]), num_classes=num_classes or 1000)
        self.depth = depth
        if num_classes is None:
            self.fc = nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def resnet_depth(sd: Mapping[str, Tensor], prefix: str = "") -> int | None:
    """Depth (50, 101, 152) of the bottleneck ResNet whose ``layer3`` blocks are in ``sd`` under ``prefix``."""
    pat = re.compile(rf"^{re.escape(prefix)}layer3\.(\d+)\.")
    blocks = {int(m.group(1)) for k in sd if (m := pat.match(k))}
    return _DEPTH_OF_LAYER3.get(len(blocks)) if blocks else None


# --------------------------------------------------------------------------------------------
# resnet50: the ImageNet-supervised baseline

_RESNET50_LEGACY = "resnet50-19c8e357.pth"


def _cached_legacy_resnet50() -> Path | None:
    """torchvision's older published ResNet-50 file, if it is in the weights cache (found by ``local_weights``)."""
    p = weights_cache_dir() / _RESNET50_LEGACY
    return p if p.is_file() else None


RESNET50 = BackboneInfo(
    label="Baseline",
    order=10,
    help="torchvision ResNet-50, ImageNet-supervised (the paper's baseline): 2048-channel layer4 map, stride 32",
    channels=2048,
    stride=32,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    default_size=1024,
    weights_source="torchvision ResNet50_Weights.IMAGENET1K_V1 (ImageNet-1k, supervised); resnet50-19c8e357.pth also accepted",
    weights_file="resnet50-0676ba61.pth",
    url="https://download.pytorch.org/models/resnet50-0676ba61.pth",
    sha256=None,  # torchvision publishes only the first 8 hex digits, in the file name (checked on load)
    licence="BSD-3-Clause (torchvision); weights trained on ImageNet-1k, whose terms of access apply",
    card="resnet50.md",
    find_local=_cached_legacy_resnet50,
)


@BACKBONES.register("resnet50", aliases=("baseline", "resnet50-imagenet", "resnet50_imagenet"), info=RESNET50)
def build_resnet50(weights: str | Path | None = None, pretrained: bool = True) -> Backbone:
    """torchvision ResNet-50 (ImageNet-supervised) returning its ``(B, 2048, H/32, W/32)`` layer4 map.

    Args:
        weights: a torchvision-style flat state dict (the classifier ``fc.*`` included); None: the
            cache (either published file name), else a download of the ``IMAGENET1K_V1`` file.
        pretrained: False gives a seeded random initialisation (``weights_id="random-init"``).
    """
    if not pretrained:
        refuse_weights_with_random(weights)
        return finish(new_network(TorchvisionResNet, pretrained=False), RESNET50, "resnet50", "random-init")
    path = resolve_weights(RESNET50, weights, alternatives=(RESNET50.weights_file, _RESNET50_LEGACY))
    verify_published_digest(path)
    obj = read_checkpoint(path, fmt="torchvision")
    if isinstance(obj, Mapping) and obj and not all(isinstance(v, Tensor) for v in obj.values()):
        inner = obj.get("state_dict")
        moco = isinstance(inner, Mapping) and any(str(k).startswith(("module.encoder_q.", "encoder_q.")) for k in inner)
        hint = " It is a MoCo pre-training checkpoint: use mocov1 / mocov2 / mocov2_800ep." if moco else ""
        raise CheckpointError(
            f"{path}: not a torchvision state dict (a flat mapping of parameter names to tensors): it has "
            f"top-level keys {preview_keys(list(obj))}.{hint}"
        )
    sd = tensor_mapping(obj, path, "at the top level")
    net = new_network(TorchvisionResNet, pretrained=True)
    hint = (
        "Keys start with 'module.' (nn.DataParallel); re-save net.module.state_dict()."
        if "module.conv1.weight" in sd
        else ""
    )
    load_into(net, sd, path, hint=hint)
    return finish(net, RESNET50, "resnet50", sha256_file(path))
