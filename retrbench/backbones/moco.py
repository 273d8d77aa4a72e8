"""MoCo v1 / v2 ResNet-50 (He et al. 2020, Chen et al. 2020): the query encoder of the official checkpoints.

torchvision's ResNet-50 from the official MoCo pre-training checkpoints
``{'epoch', 'arch', 'state_dict', 'optimizer'}``: the query encoder ``module.encoder_q.*`` is
kept (prefix stripped) without its ``fc`` head (a Linear in v1, the MLP ``fc.0`` / ``fc.2`` in
v2); ``module.encoder_k.*``, ``module.queue`` and ``module.queue_ptr`` are ignored. The map is
the unpooled ``layer4`` output, 2048 channels at stride 32.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor

from ..utils.checkpoint import CheckpointError, preview_keys, read_checkpoint, tensor_mapping, top_level
from ..utils.io import sha256_file
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
from .resnet import TorchvisionResNet
from .weights import load_into, resolve_weights, verify_published_digest

__all__ = ["MOCO_INFO", "build_moco", "moco_encoder_state_dict"]

logger = logging.getLogger(__name__)


def _moco_info(version: int, epochs: int, card_note: str, label: str, order: int) -> BackboneInfo:
    tag = f"moco_v{version}_{epochs}ep"
    return BackboneInfo(
        label=label,
        order=order,
        help=f"MoCo v{version} ResNet-50 ({epochs} epochs, query encoder): 2048-channel layer4 map, stride 32",
        channels=2048,
        stride=32,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        default_size=1024,
        weights_source=f"facebookresearch/moco, MoCo v{version} ResNet-50, {epochs} epochs on ImageNet-1k {card_note}".strip(),
        weights_file=f"{tag}_pretrain.pth.tar",
        url=f"https://dl.fbaipublicfiles.com/moco/moco_checkpoints/{tag}/{tag}_pretrain.pth.tar",
        sha256=None,  # the README publishes an md5 prefix only (checked on load)
        licence="CC-BY-NC 4.0 (facebookresearch/moco README); later source headers say MIT",
        card="moco.md",
    )


MOCO_INFO: dict[str, BackboneInfo] = {
    "mocov1": _moco_info(1, 200, "", "MoCov1", 30),
    "mocov2": _moco_info(2, 200, "(mlp, aug+, cos)", "MoCov2", 31),
    "mocov2_800ep": _moco_info(2, 800, "(mlp, aug+, cos)", "MoCov2 (800ep)", 32),
}
_MOCO_VERSION = {"mocov1": 1, "mocov2": 2, "mocov2_800ep": 2}
_MOCO_EPOCHS = {"mocov1": 200, "mocov2": 200, "mocov2_800ep": 800}
_MOCO_HEAD = {1: (r"^fc\.(weight|bias)$",), 2: (r"^fc\.[02]\.(weight|bias)$",)}
_MOCO_LAYOUT = "{'epoch', 'arch', 'state_dict', 'optimizer'} with state_dict keys module.encoder_q.*"


def moco_encoder_state_dict(path: str | Path, version: int) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The query encoder of a MoCo pre-training checkpoint, with torchvision names, and the file's metadata.

    Keeps ``module.encoder_q.*`` (prefix stripped; the ``fc`` head stays in the dict, to be
    ignored by the caller) and drops ``module.encoder_k.*``, ``module.queue`` and
    ``module.queue_ptr``. A file without the ``module.`` prefix (single-GPU run) is accepted.

    Raises:
        CheckpointError: not this layout, another architecture, any other key, or the head of
            the other MoCo version (v1: ``fc`` Linear; v2: ``fc.0`` / ``fc.2`` MLP).
    """
    ck = top_level(read_checkpoint(path, fmt="MoCo"), path, ("state_dict",), "MoCo pre-training", _MOCO_LAYOUT)
    arch = ck.get("arch")
    if arch is not None and arch != "resnet50":
        raise CheckpointError(f"{path}: a MoCo checkpoint of arch {arch!r}; these entries are ResNet-50 only")
    sd = tensor_mapping(ck["state_dict"], path, "under 'state_dict'")
    wrapped = any(k.startswith("module.") for k in sd)
    pre = "module." if wrapped else ""
    q = {k[len(pre + "encoder_q.") :]: v for k, v in sd.items() if k.startswith(pre + "encoder_q.")}
    if not q:
        raise CheckpointError(
            f"{path}: no {pre}encoder_q.* keys: not a MoCo pre-training checkpoint (expected {_MOCO_LAYOUT}; "
            f"found state_dict keys {preview_keys(list(sd))}). A main_lincls.py checkpoint (module.conv1... + a "
            f"1000-way fc) is not supported here."
        )
    known = re.compile(rf"^{re.escape(pre)}(encoder_q\.|encoder_k\.|queue$|queue_ptr$)")
    other = [k for k in sd if not known.match(k)]
    if other:
        raise CheckpointError(f"{path}: unexpected keys in a MoCo checkpoint: {preview_keys(other)}")
    found = 2 if "fc.0.weight" in q else 1 if "fc.weight" in q else None
    if found is not None and found != version:
        use = "mocov2 / mocov2_800ep" if found == 2 else "mocov1"
        raise CheckpointError(
            f"{path}: a MoCo v{found} checkpoint (its head is {'the MLP fc.0 / fc.2' if found == 2 else 'one Linear fc'}), "
            f"not v{version}; use {use}"
        )
    return q, {k: ck[k] for k in ("epoch", "arch") if k in ck}


def build_moco(name: str, weights: str | Path | None = None, pretrained: bool = True) -> Backbone:
    """MoCo v1 / v2 ResNet-50 (query encoder) returning its ``(B, 2048, H/32, W/32)`` layer4 map.

    Args:
        name: ``mocov1``, ``mocov2`` or ``mocov2_800ep``.
        weights: an official ``*_pretrain.pth.tar`` file; None: the cache, else a download.
        pretrained: False gives a seeded random initialisation (``weights_id="random-init"``).

    ``backbone.net(x)`` gives the ``(B, 2048)`` average-pooled representation (the head is dropped).
    """
    info, version = MOCO_INFO[name], _MOCO_VERSION[name]
    make = lambda: TorchvisionResNet(50, num_classes=None)  # noqa: E731
    if not pretrained:
        refuse_weights_with_random(weights)
        return finish(new_network(make, pretrained=False), info, name, "random-init")
    path = resolve_weights(info, weights)
    verify_published_digest(path)
    sd, meta = moco_encoder_state_dict(path, version)
    if meta.get("epoch") not in (None, _MOCO_EPOCHS[name]):
        logger.warning(
            "%s: %s says epoch %s; the published %s file is at epoch %d",
            name,
            path,
            meta["epoch"],
            name,
            _MOCO_EPOCHS[name],
        )
    net = new_network(make, pretrained=True)
    load_into(net, sd, path, ignore=_MOCO_HEAD[version])
    return finish(net, info, name, sha256_file(path))


def _moco_factory(name: str) -> Callable[..., Backbone]:
    def build(weights: str | Path | None = None, pretrained: bool = True) -> Backbone:
        return build_moco(name, weights, pretrained)

    build.__name__ = build.__qualname__ = f"build_{name}"
    build.__doc__ = MOCO_INFO[name].help
    return build


for _name, _aliases in (
    ("mocov1", ("moco_v1", "moco-v1", "mocov1_200ep")),
    ("mocov2", ("moco_v2", "moco-v2", "mocov2_200ep")),
    ("mocov2_800ep", ("moco_v2_800ep", "moco-v2-800ep")),
):
    BACKBONES.register(_name, _moco_factory(_name), aliases=_aliases, info=MOCO_INFO[_name])
