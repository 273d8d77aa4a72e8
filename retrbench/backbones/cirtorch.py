"""cirtorch ResNet-101 GeM networks (Radenović et al., filipradenovic/cnnimageretrieval-pytorch).

``cirtorch_r101_gem`` and ``cirtorch_gl18_r101_gem_w`` give the unpooled layer4 map and, as
``native``, ``l2n(GeM_p(features))``, then ``l2n(whiten(.))`` when the network has a learned
whitening layer. The files are ``{'meta', 'state_dict'}`` with ``features.*``, ``pool.p``,
``whiten.*``; a post-hoc learned whitening stored in ``meta['Lw']`` (numpy arrays) is read with
a numpy-only allow-list (:data:`retrbench.utils.checkpoint.NUMPY_GLOBALS`) and kept as the
backbone's shipped whitening (:func:`cirtorch_whiten`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..utils.checkpoint import NUMPY_GLOBALS, CheckpointError, read_checkpoint, tensor_mapping, top_level
from ..utils.io import sha256_file
from ..utils.linalg import l2n
from .base import BACKBONES, IMAGENET_MEAN, IMAGENET_STD, BackboneInfo, finish, new_network
from .layers import GeM
from .native import NativeBackbone, check_depth, random_native, with_normalisation
from .resnet import TorchvisionResNet
from .weights import load_into, resolve_weights

__all__ = ["CIRTORCH_INFO", "CirtorchGeMNet", "build_cirtorch", "cirtorch_whiten", "read_cirtorch"]


class CirtorchGeMNet(nn.Module):
    """cirtorch's ``ImageRetrievalNet`` for a ResNet with GeM: ``features.0..7``, ``pool.p``, optional ``whiten``.

    ``features`` is torchvision's ResNet without ``avgpool`` / ``fc`` (``conv1, bn1, relu, maxpool,
    layer1..4`` numbered 0..7). ``descriptor(x)`` (also ``forward``): ``l2n(GeM(features(x)))``,
    then ``l2n(whiten(.))`` if the network has a whitening layer, ``(B, 2048)``, as rows (cirtorch
    itself returns the transpose, one column per image).
    """

    def __init__(self, depth: int = 101, whitening: bool = False, dim: int = 2048) -> None:
        super().__init__()
        r = TorchvisionResNet(depth, num_classes=None)
        self.features = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1, r.layer2, r.layer3, r.layer4)
        self.pool = GeM(3.0, learned=True, full_kernel=True)
        self.whiten = nn.Linear(dim, dim, bias=True) if whitening else None

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)

    def descriptor(self, x: Tensor) -> Tensor:
        o = torch.flatten(l2n(self.pool(self.features(x))), 1)
        if self.whiten is not None:
            o = l2n(self.whiten(o))
        return o

    forward = descriptor


def cirtorch_whiten(x: np.ndarray, m: np.ndarray, P: np.ndarray, dimensions: int | None = None) -> np.ndarray:
    """cirtorch's ``whitenapply`` on rows: ``(N, D) -> (N, dimensions or D)``, ``P[:d] (x - m)`` then L2 (+1e-6)."""
    y = (np.asarray(x, dtype=np.float64) - np.asarray(m, dtype=np.float64).reshape(1, -1)) @ np.asarray(
        P, dtype=np.float64
    )[:dimensions].T
    return y / (np.linalg.norm(y, ord=2, axis=1, keepdims=True) + 1e-6)


_CIRTORCH_NETS = "http://cmp.felk.cvut.cz/cnnimageretrieval/data/networks"


def _cirtorch_info(file: str, folder: str, source: str, label: str, order: int, native: str) -> BackboneInfo:
    return BackboneInfo(
        label=label,
        order=order,
        help=f"cirtorch {source}: layer4 map; native {native}",
        channels=2048,
        stride=32,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        default_size=1024,
        weights_source=f"filipradenovic/cnnimageretrieval-pytorch {file} ({source})",
        weights_file=file,
        url=f"{_CIRTORCH_NETS}/{folder}/{file}",
        sha256=None,  # not published
        licence="MIT (cnnimageretrieval-pytorch)",
        card="cirtorch.md",
    )


CIRTORCH_INFO: dict[str, BackboneInfo] = {
    "cirtorch_r101_gem": _cirtorch_info(
        "retrievalSfM120k-resnet101-gem-b80fb85.pth",
        "retrieval-SfM-120k",
        "ResNet-101 GeM fine-tuned on retrieval-SfM-120k",
        "cirtorch GeM R101",
        60,
        "l2n(GeM_p)",
    ),
    "cirtorch_gl18_r101_gem_w": _cirtorch_info(
        "gl18-tl-resnet101-gem-w-a4d43db.pth",
        "gl18",
        "ResNet-101 GeM + learned whitening, triplet loss on Google Landmarks 2018",
        "cirtorch GeM R101 (GL18, whitened)",
        61,
        "l2n(whiten(l2n(GeM_p)))",
    ),
}
_CIRTORCH_LAYOUT = "{'meta', 'state_dict'} with meta architecture / pooling / whitening / mean / std"
_CIRTORCH_BY_DEPTH = {101: "cirtorch_r101_gem"}


def read_cirtorch(path: str | Path, depth: int) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A cirtorch network file: ``(state_dict, meta)``; ``meta['Lw']`` (if any) as numpy arrays.

    Raises:
        CheckpointError: refused by the allow-list, another layout, or a variant this entry
            does not implement (not GeM, regional or local whitening, another architecture).
    """
    p = Path(path)
    obj = read_checkpoint(p, allow=NUMPY_GLOBALS, fmt="cirtorch")
    ck = top_level(obj, p, ("meta", "state_dict"), "cirtorch", _CIRTORCH_LAYOUT)
    meta = ck["meta"]
    if not isinstance(meta, Mapping):
        raise CheckpointError(f"{p}: meta is a {type(meta).__name__}, not a mapping")
    meta = dict(meta)
    arch = str(meta.get("architecture", ""))
    if not arch.startswith("resnet") or not arch[len("resnet") :].isdigit():
        raise CheckpointError(f"{p}: meta architecture {arch!r}: only ResNet networks are supported by this entry")
    check_depth(p, int(arch[len("resnet") :]), depth, "cirtorch", _CIRTORCH_BY_DEPTH)
    if meta.get("pooling") != "gem":
        raise CheckpointError(f"{p}: meta pooling {meta.get('pooling')!r}: only GeM networks are supported")
    for flag in ("regional", "local_whitening"):
        if meta.get(flag):
            raise CheckpointError(f"{p}: a cirtorch network with {flag}=True is not supported")
    sd = tensor_mapping(ck["state_dict"], p, "under 'state_dict'")
    return sd, meta


def _lw_whitenings(lw: Any, path: Path) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """``meta['Lw']`` = ``{dataset: {'ss': {'m', 'P'}, 'ms': {'m', 'P'}}}`` as named whitening functions."""
    out: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
    if not isinstance(lw, Mapping):
        raise CheckpointError(f"{path}: meta['Lw'] is a {type(lw).__name__}, not a mapping")
    for dataset, scales in lw.items():
        for scale, w in (scales or {}).items():
            if not (isinstance(w, Mapping) and "m" in w and "P" in w):
                raise CheckpointError(f"{path}: meta['Lw'][{dataset!r}][{scale!r}] has no 'm' and 'P'")
            m, P = (
                np.asarray(w[k].numpy() if isinstance(w[k], Tensor) else w[k], dtype=np.float64) for k in ("m", "P")
            )
            key = str(dataset) if scale == "ss" else f"{dataset}/{scale}"
            out[key] = functools.partial(cirtorch_whiten, m=m, P=P)
    return out


def build_cirtorch(name: str, weights: str | Path | None = None, pretrained: bool = True) -> NativeBackbone:
    """cirtorch ResNet-101 GeM network: layer4 map, and ``native`` = ``l2n(GeM_p(.))`` (+ ``l2n(whiten(.))``).

    Args:
        name: ``cirtorch_r101_gem`` or ``cirtorch_gl18_r101_gem_w``.
        weights: a cirtorch network file; None: the cache, else a download from the CMP server.
        pretrained: False gives a seeded random network (whitening layer as the entry's file has).
    """
    info = CIRTORCH_INFO[name]
    has_w = name.endswith("_w")
    if not pretrained:
        config = {"architecture": "resnet101", "pooling": "gem", "whitening": has_w}
        return random_native(lambda: CirtorchGeMNet(101, whitening=has_w), info, name, weights, config)
    path = resolve_weights(info, weights)
    sd, meta = read_cirtorch(path, 101)
    whitening = bool(meta.get("whitening", False))
    lw = _lw_whitenings(meta.pop("Lw"), path) if meta.get("Lw") is not None else {}
    net = new_network(lambda: CirtorchGeMNet(101, whitening=whitening), pretrained=True)
    agree = ("whiten.weight" in sd) == whitening
    hint = "" if agree else f"meta says whitening={whitening}, but the state dict does not agree"
    load_into(net, sd, path, hint=hint)
    info = with_normalisation(info, meta.get("mean"), meta.get("std"), path, "meta")
    return finish(net, info, name, sha256_file(path), NativeBackbone, shipped_whitening=lw, upstream_config=meta)


def _factory(name: str) -> Callable[..., NativeBackbone]:
    def factory(weights: str | Path | None = None, pretrained: bool = True) -> NativeBackbone:
        return build_cirtorch(name, weights, pretrained)

    factory.__name__ = factory.__qualname__ = f"build_{name}"
    factory.__doc__ = CIRTORCH_INFO[name].help
    return factory


for _name, _aliases in (
    ("cirtorch_r101_gem", ("cirtorch-gem", "retrievalsfm120k-resnet101-gem")),
    ("cirtorch_gl18_r101_gem_w", ("gl18-tl-resnet101-gem-w", "cirtorch-gl18")),
):
    BACKBONES.register(_name, _factory(_name), aliases=_aliases, info=CIRTORCH_INFO[_name])
