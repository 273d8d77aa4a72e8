"""AMDIM (Bachman, Hjelm and Buchwalter 2019): the self-supervised ImageNet encoder, ported.

The encoder is not a ResNet. This module re-implements the 128-pixel ImageNet encoder of the
public code (``amdim-public``, ``model.py``: ``Encoder``, ``Conv3x3``, ``ConvResNxN``,
``ConvResBlock``, ``MaybeBatchNorm2d``) with the same module names, so the published weights
load key for key. ``layer_list`` indices, with ``ndf`` the base width::

    0  conv 5x5 / 2, reflect padding 2, bias, ReLU         3      -> ndf
    1  conv 3x3, no padding, bias, ReLU                    ndf    -> ndf
    2  ConvResBlock 4x4 / 2                                ndf    -> 2 ndf
    3  ConvResBlock 4x4 / 2                                2 ndf  -> 4 ndf
    4  ConvResBlock 2x2 / 2                                4 ndf  -> 8 ndf
    5  BatchNorm (only with use_bn)                        8 ndf
    6  ConvResBlock 3x3                                    8 ndf  -> 8 ndf
    7  ConvResBlock 3x3                                    8 ndf  -> 8 ndf    <- "trunk" (default)
    8  ConvResNxN 3x3 into the embedding space             8 ndf  -> n_rkhs
    9  BatchNorm (always applied)                          n_rkhs             <- "rkhs"

A ConvResBlock is ``n_depth`` residual units (``ConvResNxN``): the first has the block's kernel
and stride, the others are 1x1. A unit computes ``conv1x1(relu(bn?(convKxK(x)))) + shortcut(x)``
where the shortcut is ``avg_pool(x, K, stride)`` zero-padded to the new width; no convolution
after the stem is padded, and nothing follows the residual sum (no ReLU). ``bn?`` (and layer 5)
run only when the checkpoint's ``hyperparams['use_bn']`` is true (the training default is 0);
their parameters are in every checkpoint either way. Total stride 16; unpadded convolutions lose
a border, so a side of ``H`` pixels gives ``trunk_size(H)`` cells (1024 -> 59; 128 -> 3).

Which map is the descriptor. At the training size (128 px) layer 8 is a 3x3 convolution over the
3x3 trunk map that yields AMDIM's 1x1 global embedding ("rkhs_1", fed to the linear evaluation
classifiers): it plays the role of a ResNet's pooling plus projection. The retrieval paper takes
"the output of the last convolutional block, just before the pooling", so the default map is the
trunk output (layer 7, ``8 * ndf`` channels). ``feature="rkhs"`` gives the layer-9 map instead
(``n_rkhs`` channels, the embedding AMDIM's own evaluation uses, one per 128-pixel window).

Both maps are signed (a residual sum, a BatchNorm output): GeM clamps the map at eps first, so
negative activations contribute ~0 and a channel negative everywhere pools to ~eps; MAC and R-MAC
take the raw maxima (possibly negative) before their L2 normalisations.

Checkpoint (``checkpoint.py``): ``{'model': Model.state_dict(), 'hyperparams': {ndf, n_classes,
n_rkhs, tclip, n_depth, encoder_size, use_bn}, 'cursor': {...}}``. The encoder sits under
``encoder.module.`` (an ``nn.DataParallel``); dropped, as documented heads: the encoder's
``rkhs_block_5`` / ``rkhs_block_7`` (1x1 projections of the 5x5 and 7x7 maps for the local
InfoMax losses), ``evaluator.*`` (the online linear and MLP ImageNet classifiers) and
``g2l_loss.masks_r5`` (a constant mask). Weights saved under mixed precision (fp16) are cast to
float32 on load. Input: RGB in [0, 1], ImageNet mean / std (``TransformsImageNet128``).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch.nn.functional as F
from torch import Tensor, nn

from ..utils.checkpoint import CheckpointError, read_checkpoint
from ..utils.io import sha256_file
from .base import BACKBONES, IMAGENET_MEAN, IMAGENET_STD, Backbone, BackboneInfo, refuse_weights_with_random, seeded
from .weights import remap_state_dict, resolve_weights, strict_load

__all__ = [
    "AMDIM",
    "AMDIM_LARGE",
    "AMDIMConfig",
    "AMDIMEncoder",
    "IGNORED_KEYS",
    "build_amdim",
    "build_amdim_large",
    "config_from_state_dict",
    "load_amdim_checkpoint",
    "trunk_size",
]

logger = logging.getLogger(__name__)

_URL = "https://amdimmodels.blob.core.windows.net/amdim/"
_LICENCE = "MIT (amdim-public repository, which publishes the weights without a separate licence)"

Feature = Literal["trunk", "rkhs"]
_TRUNK_END = 8  # layer_list[:8] is the trunk (layers 0..7)

IGNORED_KEYS: tuple[str, ...] = (
    r"^rkhs_block_[157]\.",  # 1x1 projections of the 5x5 / 7x7 maps for the local InfoMax costs
    r"^evaluator\.",  # online linear / MLP ImageNet classifiers
    r"^g2l_loss\.",  # constant uint8 mask (masks_r5) of the NCE cost
)
"""Checkpoint keys (after stripping ``encoder.module.``) that are not part of the feature extractor."""

_PREFIX_RULES = [(r"^encoder\.module\.", ""), (r"^encoder\.", ""), (r"^module\.", "")]


@dataclasses.dataclass(frozen=True)
class AMDIMConfig:
    """Hyperparameters of the 128-pixel encoder (``Model.hyperparams`` in the checkpoint)."""

    ndf: int = 256
    n_rkhs: int = 2048
    n_depth: int = 10
    use_bn: bool = False


class _Conv(nn.Module):
    """``Conv3x3`` of the stem: optional padding (reflect or zeros), conv with bias, ReLU."""

    def __init__(self, n_in: int, n_out: int, kernel: int, stride: int, pad: int, pad_mode: str = "constant") -> None:
        super().__init__()
        self.pad = pad
        self.pad_mode = pad_mode
        self.conv = nn.Conv2d(n_in, n_out, kernel, stride, 0, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        if self.pad > 0:
            x = F.pad(x, (self.pad,) * 4, mode=self.pad_mode)
        return F.relu(self.conv(x))


class _MaybeBN(nn.Module):
    """``MaybeBatchNorm2d``: a BatchNorm that holds parameters always and runs only if ``active``."""

    def __init__(self, n: int, active: bool) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(n, affine=True)
        self.active = active

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(x) if self.active else x

    def extra_repr(self) -> str:
        return f"active={self.active}"


class _ResUnit(nn.Module):
    """``ConvResNxN``: ``conv1x1(relu(bn?(convKxK/s(x)))) + zero_pad_channels(avg_pool(x, K, s))``."""

    def __init__(self, n_in: int, n_out: int, width: int, stride: int, use_bn: bool) -> None:
        super().__init__()
        if n_out < n_in:
            raise ValueError(f"AMDIM residual units only grow the width ({n_in} -> {n_out})")
        self.n_in, self.n_out, self.width, self.stride = n_in, n_out, width, stride
        self.conv1 = nn.Conv2d(n_in, n_out, width, stride, 0, bias=False)
        self.conv2 = nn.Conv2d(n_out, n_out, 1, 1, 0, bias=False)
        self.bn1 = _MaybeBN(n_out, use_bn)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv2(F.relu(self.bn1(self.conv1(x))))
        short = x if self.width == 1 and self.stride == 1 else F.avg_pool2d(x, self.width, self.stride, 0)
        if self.n_out > self.n_in:
            short = F.pad(short, (0, 0, 0, 0, 0, self.n_out - self.n_in))
        return h + short


class _ResBlock(nn.Module):
    """``ConvResBlock``: one KxK/s unit then ``depth - 1`` 1x1 units, in ``layer_list``."""

    def __init__(self, n_in: int, n_out: int, width: int, stride: int, depth: int, use_bn: bool) -> None:
        super().__init__()
        units = [_ResUnit(n_in, n_out, width, stride, use_bn)]
        units += [_ResUnit(n_out, n_out, 1, 1, use_bn) for _ in range(depth - 1)]
        self.layer_list = nn.Sequential(*units)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer_list(x)


class AMDIMEncoder(nn.Module):
    """The AMDIM ImageNet (128-pixel) encoder with upstream parameter names.

    ``forward_features(x)``: ``(B, 3, H, W)`` normalised -> the chosen map, ``(B, 8*ndf, h, w)``
    for ``feature="trunk"`` or ``(B, n_rkhs, h-2, w-2)`` for ``"rkhs"``, with
    ``h = trunk_size(H)``. ``forward(x)``: always the layer-9 ``rkhs`` map (at 128 px the
    ``(B, n_rkhs, 1, 1)`` global embedding of the paper).
    """

    def __init__(self, config: AMDIMConfig = AMDIMConfig(), feature: Feature = "trunk") -> None:
        super().__init__()
        if feature not in ("trunk", "rkhs"):
            raise ValueError(f"feature must be 'trunk' or 'rkhs', not {feature!r}")
        c, ndf, bn = config, config.ndf, config.use_bn
        self.config = config
        self.feature = feature
        self.layer_list = nn.ModuleList(
            [
                _Conv(3, ndf, 5, 2, 2, pad_mode="reflect"),
                _Conv(ndf, ndf, 3, 1, 0),
                _ResBlock(ndf, 2 * ndf, 4, 2, c.n_depth, bn),
                _ResBlock(2 * ndf, 4 * ndf, 4, 2, c.n_depth, bn),
                _ResBlock(4 * ndf, 8 * ndf, 2, 2, c.n_depth, bn),
                _MaybeBN(8 * ndf, bn),
                _ResBlock(8 * ndf, 8 * ndf, 3, 1, c.n_depth, bn),
                _ResBlock(8 * ndf, 8 * ndf, 3, 1, c.n_depth, bn),
                _ResUnit(8 * ndf, c.n_rkhs, 3, 1, bn),
                _MaybeBN(c.n_rkhs, True),
            ]
        )

    @property
    def channels(self) -> int:
        """Channels of ``forward_features``."""
        return 8 * self.config.ndf if self.feature == "trunk" else self.config.n_rkhs

    def _run(self, x: Tensor, end: int) -> Tensor:
        h, w = x.shape[-2:]
        if min(trunk_size(h), trunk_size(w)) < (1 if end <= _TRUNK_END else 3):
            need = 95 if end <= _TRUNK_END else 127
            raise ValueError(f"AMDIM needs inputs of at least {need}x{need} pixels for this map, got {h}x{w}")
        for layer in self.layer_list[:end]:
            x = layer(x)
        return x

    def forward_features(self, x: Tensor) -> Tensor:  # (B, 3, H, W) -> (B, C, h, w)
        return self._run(x, _TRUNK_END if self.feature == "trunk" else len(self.layer_list))

    def forward(self, x: Tensor) -> Tensor:  # (B, 3, H, W) -> (B, n_rkhs, h - 2, w - 2)
        return self._run(x, len(self.layer_list))


def trunk_size(side: int) -> int:
    """Cells of the trunk map along an input side of ``side`` pixels (the rkhs map has 2 fewer)."""
    s = (side - 1) // 2 + 1  # 5x5 / 2 with reflect padding 2
    s = s - 2  # 3x3
    s = (s - 4) // 2 + 1  # 4x4 / 2
    s = (s - 4) // 2 + 1  # 4x4 / 2
    s = (s - 2) // 2 + 1  # 2x2 / 2
    return s - 4  # two 3x3 blocks


def _rkhs_size(side: int) -> int:
    """Cells of the rkhs map (layer 9) along an input side of ``side`` pixels."""
    return trunk_size(side) - 2


def config_from_state_dict(sd: Mapping[str, Tensor], hyperparams: Mapping[str, Any] | None = None) -> AMDIMConfig:
    """The encoder configuration implied by parameter shapes (prefix-stripped keys), checked against ``hyperparams``.

    Raises:
        CheckpointError: the keys are not those of the 128-pixel AMDIM encoder, or the shapes
            contradict the checkpoint's own hyperparameters.
    """
    try:
        stem = sd["layer_list.0.conv.weight"]
        head = sd["layer_list.8.conv1.weight"]
    except KeyError as e:
        found = ", ".join(list(sd)[:5])
        raise CheckpointError(f"not an AMDIM encoder state dict: no {e.args[0]!r} (found keys {found}, ...)") from None
    if tuple(stem.shape[1:]) != (3, 5, 5):
        raise CheckpointError(
            f"AMDIM stem of shape {tuple(stem.shape)}: only the 128-pixel ImageNet encoder (5x5 stem) is supported"
        )
    unit = re.compile(r"^layer_list\.2\.layer_list\.(\d+)\.conv1\.weight$")
    depth = 1 + max((int(m.group(1)) for k in sd if (m := unit.match(k))), default=-1)
    hp = dict(hyperparams or {})
    cfg = AMDIMConfig(ndf=stem.shape[0], n_rkhs=head.shape[0], n_depth=depth, use_bn=bool(hp.get("use_bn", False)))
    for name in ("ndf", "n_rkhs", "n_depth"):
        if name in hp and int(hp[name]) != getattr(cfg, name):
            raise CheckpointError(
                f"AMDIM checkpoint: hyperparams[{name!r}] = {hp[name]} but the weights have {name} = {getattr(cfg, name)}"
            )
    if "encoder_size" in hp and int(hp["encoder_size"]) != 128:
        raise CheckpointError(
            f"AMDIM checkpoint for {hp['encoder_size']}-pixel inputs: only the 128-pixel ImageNet encoder is supported"
        )
    return cfg


def load_amdim_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read an AMDIM checkpoint: ``(state dict with the encoder.module. prefix stripped, hyperparams)``.

    Accepts the upstream ``{'model', 'hyperparams', 'cursor'}`` file (read once, with
    ``weights_only=True``) or a bare encoder state dict (hyperparams then ``{}``).
    """
    obj = read_checkpoint(path)
    hp: dict[str, Any] = {}
    if isinstance(obj, Mapping) and "model" in obj:
        hp = dict(obj.get("hyperparams") or {})
        sd = obj["model"]
    else:
        sd = obj
    if not isinstance(sd, Mapping) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in sd.items()):
        found = list(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(
            f"{path}: expected the AMDIM checkpoint structure {{'model', 'hyperparams', 'cursor'}} "
            f"(or a flat encoder state dict); found {found}"
        )
    return remap_state_dict(sd, _PREFIX_RULES), hp


AMDIM = BackboneInfo(
    label="AmDim",
    order=40,
    help="AMDIM-Medium (Bachman et al. 2019): 2048-channel trunk map at stride 16 (signed values)",
    channels=2048,
    stride=16,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    default_size=1024,
    weights_source="AMDIM-Medium (ndf 256, n_rkhs 2048, depth 10), self-supervised on ImageNet-1k, amdim-public",
    weights_file="amdim_ndf256_rkhs2048_rd10.pth",
    url=_URL + "amdim_ndf256_rkhs2048_rd10.pth",
    sha256=None,
    licence=_LICENCE,
    card="amdim.md",
    feature_size=trunk_size,
)

AMDIM_LARGE = dataclasses.replace(
    AMDIM,
    label="AmDim (large)",
    order=41,
    help="AMDIM-Large (ndf 320): 2560-channel trunk map at stride 16 (signed values)",
    channels=2560,
    weights_source="AMDIM-Large (ndf 320, n_rkhs 2560, depth 10), self-supervised on ImageNet-1k, amdim-public",
    weights_file="amdim_ndf320_rkhs2560_rd10.pth",
    url=_URL + "amdim_ndf320_rkhs2560_rd10.pth",
)

_NOMINAL = {"amdim": AMDIMConfig(256, 2048, 10), "amdim_large": AMDIMConfig(320, 2560, 10)}


def _build(name: str, info: BackboneInfo, weights: str | Path | None, pretrained: bool, feature: Feature) -> Backbone:
    if not pretrained:
        refuse_weights_with_random(weights)
        net = seeded(lambda: AMDIMEncoder(_NOMINAL[name], feature))  # the same random network every time
        weights_id = "random-init"
    else:
        path = resolve_weights(info, weights)
        sd, hp = load_amdim_checkpoint(path)
        cfg = config_from_state_dict(sd, hp)
        net = AMDIMEncoder(cfg, feature)
        strict_load(net, sd, ignore=IGNORED_KEYS)
        weights_id = sha256_file(path)
        if cfg != _NOMINAL[name]:
            logger.info("%s: %s holds an encoder with %s", name, path, cfg)
    net.requires_grad_(False)
    full_name = name if feature == "trunk" else f"{name}-rkhs"
    if feature == "trunk":
        info = dataclasses.replace(info, channels=net.channels)
    else:
        info = dataclasses.replace(info, channels=net.channels, feature_size=_rkhs_size, label=f"{info.label} rkhs")
    return Backbone(net, info, full_name, weights_id).eval()


@BACKBONES.register("amdim", aliases=("amdim_medium", "amdim-medium"), info=AMDIM)
def build_amdim(weights: str | Path | None = None, pretrained: bool = True, *, feature: Feature = "trunk") -> Backbone:
    """AMDIM-Medium: ``(B, 2048, h, w)`` trunk map at stride 16 (signed values; see ``models/amdim.md``).

    Args:
        weights: checkpoint path (upstream structure, or a bare encoder state dict); None: the
            weights cache, else the published URL (see ``resolve_weights``).
        pretrained: False gives a seeded random network of the published size
            (``weights_id="random-init"``; PyTorch's default init, not upstream's zero-init).
        feature: ``"trunk"`` (last convolutional block, the default) or ``"rkhs"`` (the
            embedding after the final 3x3 unit and BatchNorm, ``n_rkhs`` channels).

    The encoder architecture (width, depth, use_bn) is read from the checkpoint.
    """
    return _build("amdim", AMDIM, weights, pretrained, feature)


@BACKBONES.register("amdim_large", aliases=("amdim-large",), info=AMDIM_LARGE)
def build_amdim_large(
    weights: str | Path | None = None, pretrained: bool = True, *, feature: Feature = "trunk"
) -> Backbone:
    """AMDIM-Large: ``(B, 2560, h, w)`` trunk map at stride 16 (as ``amdim``, ndf 320)."""
    return _build("amdim_large", AMDIM_LARGE, weights, pretrained, feature)
