"""InsCLR ResNets (Deng et al. 2022, zeludeng/insclr): torchvision trunk + GeM + projection head.

``insclr_r101_gldv2`` / ``insclr_r50_instre`` give the unpooled layer4 map and, as ``native``,
the global branch of InsCLR's ``nn.Sequential(backbone, combiner)``: ``backbone.*``
(torchvision names) and ``combiner.pool`` (GeM, p = 3 fixed unless the file has
``combiner.pool.p``) + ``combiner.head.fc`` (``norm_linear_norm`` without bias for the GLDv2
configs, ``linear_norm`` with bias for INSTRE). No weights were published: these load a file
you trained (``--weights``), e.g. with :mod:`retrbench.train`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..utils.checkpoint import CheckpointError, read_checkpoint, strip_prefix, tensor_mapping
from ..utils.io import sha256_file
from .base import BACKBONES, IMAGENET_MEAN, IMAGENET_STD, BackboneInfo, finish, new_network
from .layers import GeM
from .native import NativeBackbone, check_depth, random_native
from .resnet import TorchvisionResNet, resnet_depth
from .weights import load_into, resolve_weights

__all__ = ["INSCLR_INFO", "InsCLRNet", "build_insclr", "read_insclr"]

logger = logging.getLogger(__name__)


class _LinearNorm(nn.Module):
    """InsCLR ``linear_norm``: ``normalize(fc(x))``."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.fc(torch.flatten(x, 1)))


class _NormLinearNorm(nn.Module):
    """InsCLR ``norm_linear_norm``: ``normalize(fc(normalize(x)))``, ``fc`` without bias."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, out_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.fc(F.normalize(torch.flatten(x, 1))))


class _Norm(nn.Module):
    """InsCLR ``norm``: ``normalize(x)`` (no parameters)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(torch.flatten(x, 1), p=2, dim=1)


_INSCLR_HEADS = {"linear_norm": _LinearNorm, "norm_linear_norm": _NormLinearNorm}


class _InsCLRCombiner(nn.Module):
    def __init__(self, pool: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.pool = pool
        self.head = head


class InsCLRNet(nn.Module):
    """InsCLR's ``nn.Sequential(backbone, combiner)`` (global branch only).

    ``forward_features(x)``: the backbone's ``(B, 2048, H/32, W/32)`` layer4 map.
    ``descriptor(x)`` (also ``forward``): ``combiner.head(combiner.pool(.))``: GeM (p = 3 fixed, or
    the learned ``combiner.pool.p``), then the head: ``(B, out_dim)``, L2-normalised with
    ``F.normalize`` as upstream.

    Args:
        depth: 50 or 101.
        head: ``"norm_linear_norm"`` (GLDv2 configs), ``"linear_norm"`` (INSTRE configs) or ``"norm"``.
        out_dim: the head's output size (``MODEL.HEAD.OUT_DIM``).
        learned_p: GeM with a learned ``p`` (``MODEL.POOL.GMP.P <= 0`` in InsCLR's config).
    """

    def __init__(
        self, depth: int = 101, head: str = "norm_linear_norm", out_dim: int = 2048, learned_p: bool = False
    ) -> None:
        super().__init__()
        self.backbone = TorchvisionResNet(depth, num_classes=None)
        head_module = _Norm() if head == "norm" else _INSCLR_HEADS[head](2048, out_dim)
        self.combiner = _InsCLRCombiner(GeM(3.0, learned=learned_p), head_module)
        self.head_kind = head

    def forward_features(self, x: Tensor) -> Tensor:
        return self.backbone.forward_features(x)

    def descriptor(self, x: Tensor) -> Tensor:
        return self.combiner.head(self.combiner.pool(self.forward_features(x)))

    forward = descriptor


def _insclr_info(depth: int, config: str, head: str, out_dim: int, label: str, order: int) -> BackboneInfo:
    return BackboneInfo(
        label=label,
        order=order,
        help=f"InsCLR ResNet-{depth} ({config}, your own weights): layer4 map; native {head}(GeM)",
        channels=2048,
        stride=32,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        default_size=1024,
        weights_source=(
            f"your own InsCLR training (zeludeng/insclr, {config}: ResNet-{depth} + GeM + {head} {out_dim}); "
            f"no weights were published"
        ),
        weights_file=None,
        url=None,
        sha256=None,
        licence="your own weights (InsCLR code: no licence file found in the public repository)",
        card="insclr.md",
    )


INSCLR_INFO: dict[str, BackboneInfo] = {
    "insclr_r101_gldv2": _insclr_info(
        101, "configs/gldv2/*.yaml", "norm_linear_norm", 2048, "InsCLR R101 (GLDv2)", 70
    ),
    "insclr_r50_instre": _insclr_info(50, "configs/instre/*.yaml", "linear_norm", 256, "InsCLR R50 (INSTRE)", 71),
}
_INSCLR_DEFAULT = {"insclr_r101_gldv2": (101, "norm_linear_norm", 2048), "insclr_r50_instre": (50, "linear_norm", 256)}
_INSCLR_BY_DEPTH = {101: "insclr_r101_gldv2", 50: "insclr_r50_instre"}
_INSCLR_DROPPED = (r"^combiner\.(spatial_attention|attention_head)\.",)  # the optional 128-d attention branch


def read_insclr(path: str | Path, depth: int) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """An InsCLR checkpoint: ``(state_dict with backbone.* / combiner.* names, inferred config)``.

    Accepts ``{'model': sd, ...}`` (its ``Checkpointer``) or a flat ``sd``, with or without the
    ``module.`` prefix of ``nn.DataParallel``. The head is inferred: ``combiner.head.fc.bias``
    present -> ``linear_norm``; ``fc.weight`` alone -> ``norm_linear_norm``; no ``fc`` -> ``norm``.
    """
    p = Path(path)
    obj = read_checkpoint(p, fmt="InsCLR")
    if isinstance(obj, Mapping) and "model" in obj:
        sd = tensor_mapping(obj["model"], p, "under 'model'")
    else:
        sd = tensor_mapping(obj, p, "at the top level (or under 'model')")
    sd = strip_prefix(sd, "module.")
    if not any(k.startswith("backbone.") for k in sd) or not any(k.startswith("combiner.") for k in sd):
        raise CheckpointError(
            f"{p}: not an InsCLR checkpoint: expected {{'model': state_dict}} with keys backbone.* and combiner.* "
            f"(optionally prefixed by module.); found keys {list(sd)[:8]}"
        )
    check_depth(p, resnet_depth(sd, "backbone."), depth, "InsCLR", _INSCLR_BY_DEPTH)
    w = sd.get("combiner.head.fc.weight")
    head = "norm" if w is None else "linear_norm" if "combiner.head.fc.bias" in sd else "norm_linear_norm"
    config = {
        "backbone": f"resnet{depth}",
        "pool": "gem",
        "learned_p": "combiner.pool.p" in sd,
        "head": head,
        "out_dim": int(w.shape[0]) if w is not None else 2048,
    }
    return sd, config


def build_insclr(name: str, weights: str | Path | None = None, pretrained: bool = True) -> NativeBackbone:
    """InsCLR ResNet + GeM + head: layer4 map, and ``native`` = ``combiner.head(GeM(layer4))``.

    Args:
        name: ``insclr_r101_gldv2`` or ``insclr_r50_instre``.
        weights: your trained InsCLR checkpoint (required: none were published).
        pretrained: False gives a seeded random network with the public config's head.
    """
    info = INSCLR_INFO[name]
    depth, head, out_dim = _INSCLR_DEFAULT[name]
    if not pretrained:
        config = {"backbone": f"resnet{depth}", "pool": "gem", "learned_p": False, "head": head, "out_dim": out_dim}
        return random_native(lambda: InsCLRNet(depth, head, out_dim), info, name, weights, config)
    if weights is None:
        raise FileNotFoundError(
            f"{name}: no InsCLR weights were published. Train them with the InsCLR code "
            f"(https://github.com/zeludeng/insclr, {'configs/gldv2' if depth == 101 else 'configs/instre'}) and pass "
            f"the checkpoint with --weights PATH (weights=PATH in Python)."
        )
    path = resolve_weights(info, weights)
    sd, config = read_insclr(path, depth)
    if (config["head"], config["out_dim"]) != (head, out_dim):
        logger.info(
            "%s: %s has head %s -> %d, not the public config's %s -> %d",
            name,
            path,
            config["head"],
            config["out_dim"],
            head,
            out_dim,
        )
    net = new_network(lambda: InsCLRNet(depth, config["head"], config["out_dim"], config["learned_p"]), pretrained=True)
    load_into(net, sd, path, ignore=_INSCLR_DROPPED)
    return finish(net, info, name, sha256_file(path), NativeBackbone, upstream_config=config)


def _factory(name: str) -> Callable[..., NativeBackbone]:
    def factory(weights: str | Path | None = None, pretrained: bool = True) -> NativeBackbone:
        return build_insclr(name, weights, pretrained)

    factory.__name__ = factory.__qualname__ = f"build_{name}"
    factory.__doc__ = INSCLR_INFO[name].help
    return factory


for _name, _aliases in (
    ("insclr_r101_gldv2", ("insclr", "insclr-gldv2")),
    ("insclr_r50_instre", ("insclr-instre",)),
):
    BACKBONES.register(_name, _factory(_name), aliases=_aliases, info=INSCLR_INFO[_name])
