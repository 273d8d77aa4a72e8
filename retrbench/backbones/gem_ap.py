"""GeM-AP ResNets (Revaud et al. 2019, naver/deep-image-retrieval "dirtorch"): the paper's upper bound "GeM (AP)".

``gem_ap_r101`` / ``gem_ap_r50`` / ``gem_ap_r101_lm18`` give the unpooled layer4 map and, as
``native``, ``L2(fc(GeM_p(layer4)))`` with a learned ``p`` (``resnet{50,101}_rmac`` of
``dirtorch``). The published ``Resnet-101-AP-GeM.pt`` is ``{'model_options', 'state_dict',
'pca', ...}``; ``pca`` maps a dataset name (``'Landmarks_clean'``) to a pickled scikit-learn
``PCA``, so the file is read with an allow-list of exactly the numpy and scikit-learn classes
that holds (:func:`retrbench.utils.checkpoint.sklearn_pca_globals`). The PCA is kept as the
backbone's shipped whitening (:func:`dirtorch_whiten`).
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..utils.checkpoint import (
    CheckpointError,
    read_checkpoint,
    sklearn_pca_globals,
    strip_prefix,
    tensor_mapping,
    top_level,
)
from ..utils.io import sha256_file
from .base import BACKBONES, IMAGENET_MEAN, IMAGENET_STD, BackboneInfo, finish, new_network
from .layers import GeM
from .native import NativeBackbone, check_depth, random_native, with_normalisation
from .resnet import TorchvisionResNet, resnet_depth
from .weights import load_into, resolve_weights

__all__ = ["GEM_AP_INFO", "DirtorchGeMNet", "build_gem_ap", "dirtorch_whiten", "read_gem_ap"]

logger = logging.getLogger(__name__)


class DirtorchGeMNet(TorchvisionResNet):
    """deep-image-retrieval's ``resnet{50,101}_rmac`` with GeM: names ``conv1 ... layer4``, ``adpool.p``, ``fc``.

    ``forward_features(x)``: the ``(B, 2048, H/32, W/32)`` layer4 map. ``descriptor(x)`` (also
    ``forward``): upstream's ``ResNet_RMAC.forward`` in eval mode: optional centre bias, GeM with
    the learned ``p``, optional L2 (``norm_features``), ``fc`` unless ``without_fc``, then
    ``F.normalize`` (upstream's own L2): ``(B, out_dim)``.
    """

    def __init__(
        self,
        depth: int = 101,
        out_dim: int = 2048,
        gemp: float = 3.0,
        norm_features: bool = False,
        without_fc: bool = False,
        center_bias: float = 0.0,
    ) -> None:
        super().__init__(depth, num_classes=None)
        self.adpool = GeM(gemp, learned=True)
        self.fc = nn.Linear(2048, out_dim)
        self.norm_features = norm_features
        self.without_fc = without_fc
        self.center_bias = center_bias

    def descriptor(self, x: Tensor) -> Tensor:
        f = self.forward_features(x)
        if self.center_bias > 0:
            b = self.center_bias
            bias = 1 + f.new_tensor([[[[0, 0, 0, 0], [0, b, b, 0], [0, b, b, 0], [0, 0, 0, 0]]]])
            f = f * F.interpolate(bias, size=f.shape[-2:], mode="bilinear", align_corners=True)
        g = self.adpool(f)  # (B, C, 1, 1)
        if self.norm_features:
            g = F.normalize(g, p=2, dim=1)
        g = torch.flatten(g, 1)
        if not self.without_fc:
            g = self.fc(g)
        return F.normalize(g, p=2, dim=-1)

    forward = descriptor


def dirtorch_whiten(
    x: np.ndarray,
    mean: np.ndarray,
    components: np.ndarray,
    explained_variance: np.ndarray,
    whiten: bool = True,
    *,
    whitenp: float = 0.25,
    whitenv: int | None = None,
    whitenm: float = 1.0,
) -> np.ndarray:
    """deep-image-retrieval's ``whiten_features`` (``common.py``): PCA, power-scaled whitening, L2.

    ``x``: ``(N, D)`` descriptors -> ``(N, whitenv or D)``. ``(x - mean) @ components[:whitenv].T``,
    divided by ``whitenm * explained_variance[:whitenv] ** whitenp`` when the PCA whitens, then
    each row L2-normalised. Upstream's evaluation uses ``whitenp=0.25``; ``0.5`` is plain PCA whitening.
    """
    y = (np.asarray(x, dtype=np.float64) - mean) @ components[:whitenv].T
    if whiten:
        y = y / (whitenm * np.power(explained_variance[:whitenv], whitenp))
    return y / np.linalg.norm(y, axis=1, keepdims=True)


_GDRIVE = "https://drive.google.com/open?id="


def _gem_ap_info(depth: int, file: str, drive_id: str, source: str, label: str, order: int) -> BackboneInfo:
    return BackboneInfo(
        label=label,
        order=order,
        help=f"GeM-AP ResNet-{depth} (Revaud et al. 2019, {source}): layer4 map; native L2(fc(GeM_p))",
        channels=2048,
        stride=32,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        default_size=1024,
        weights_source=f"naver/deep-image-retrieval {file} ({source}); Google Drive {_GDRIVE}{drive_id}",
        weights_file=file,
        url=None,  # a Google Drive link (a zip for the 101 model), not a plain HTTP download
        sha256=None,
        licence="see naver/deep-image-retrieval (no licence stated in its README)",
        card="gem_ap.md",
    )


GEM_AP_INFO: dict[str, BackboneInfo] = {
    "gem_ap_r101": _gem_ap_info(
        101, "Resnet-101-AP-GeM.pt", "1UWJGDuHtzaQdFhSMojoYVQjmCXhIwVvy", "AP loss, Landmarks-clean", "GeM (AP)", 50
    ),
    "gem_ap_r50": _gem_ap_info(
        50, "Resnet-50-AP-GeM.pt", "1oPtE_go9tnsiDLkWjN4NMpKjh-_md1G5", "AP loss, Landmarks-clean", "GeM (AP) R50", 51
    ),
    "gem_ap_r101_lm18": _gem_ap_info(
        101,
        "Resnet-101-AP-GeM-LM18.pt",
        "1r76NLHtJsH-Ybfda4aLkUIoW3EEsi25I",
        "AP loss, Google Landmarks 2018",
        "GeM (AP) LM18",
        52,
    ),
}
_GEM_AP_DEPTH = {"gem_ap_r101": 101, "gem_ap_r50": 50, "gem_ap_r101_lm18": 101}
_GEM_AP_BY_DEPTH = {101: "gem_ap_r101", 50: "gem_ap_r50"}
_GEM_AP_FMT = "deep-image-retrieval (GeM-AP)"
_GEM_AP_LAYOUT = "{'model_options', 'state_dict', 'pca', ...} (naver/deep-image-retrieval)"
_GEM_AP_OPTIONS = {"arch", "out_dim", "pooling", "gemp", "norm_features", "without_fc", "dropout_p", "center_bias"}


def _pca_arrays(pca: Any, path: Path, key: str) -> dict[str, Any]:
    from sklearn.decomposition import PCA

    if not isinstance(pca, PCA):
        raise CheckpointError(f"{path}: pca[{key!r}] is a {type(pca).__name__}, not a scikit-learn PCA")
    try:
        return {
            "mean": np.asarray(pca.mean_, dtype=np.float64),
            "components": np.asarray(pca.components_, dtype=np.float64),
            "explained_variance": np.asarray(pca.explained_variance_, dtype=np.float64),
            "whiten": bool(pca.whiten),
        }
    except AttributeError as e:
        raise CheckpointError(f"{path}: pca[{key!r}] is not a fitted PCA ({e})") from e


def read_gem_ap(
    path: str | Path, depth: int
) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, dict[str, Any]], dict[str, Any]]:
    """A dirtorch checkpoint: ``(state_dict without 'module.', model_options, {name: PCA arrays}, preprocess)``.

    Raises:
        CheckpointError: refused by the allow-list, another layout, another depth or pooling.
    """
    p = Path(path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Trying to unpickle estimator.*")  # PCA pickled by sklearn 0.20
        obj = read_checkpoint(p, allow=sklearn_pca_globals(), fmt=_GEM_AP_FMT)
    ck = top_level(obj, p, ("model_options", "state_dict"), _GEM_AP_FMT, _GEM_AP_LAYOUT)
    opts = ck["model_options"]
    if not isinstance(opts, Mapping):
        raise CheckpointError(f"{p}: model_options is a {type(opts).__name__}, not a mapping")
    opts = dict(opts)
    arch = str(opts.get("arch", ""))
    if arch.endswith("_ms") or not arch.startswith("resnet") or "_rmac" not in arch:
        raise CheckpointError(f"{p}: model_options arch {arch!r}: only resnet50_rmac / resnet101_rmac are supported")
    check_depth(p, int(arch[len("resnet") : arch.index("_")]), depth, "deep-image-retrieval", _GEM_AP_BY_DEPTH)
    if not str(opts.get("pooling", "gem")).startswith("gem"):
        raise CheckpointError(f"{p}: model_options pooling {opts['pooling']!r}: only GeM networks are supported")
    unknown = sorted(set(opts) - _GEM_AP_OPTIONS)
    if unknown:
        logger.warning("%s: ignoring unknown model_options %s", p, unknown)
    sd = strip_prefix(tensor_mapping(ck["state_dict"], p, "under 'state_dict'"), "module.")
    check_depth(p, resnet_depth(sd), depth, "deep-image-retrieval", _GEM_AP_BY_DEPTH)
    raw_pca = ck.get("pca") or {}
    if not isinstance(raw_pca, Mapping):
        raw_pca = {"pca": raw_pca}
    pcas = {str(k): _pca_arrays(v, p, str(k)) for k, v in raw_pca.items()}
    pre = ck.get("preprocess") if isinstance(ck.get("preprocess"), Mapping) else {}
    return sd, opts, pcas, dict(pre)


def _apply_dirtorch(x: np.ndarray, pca: Mapping[str, Any]) -> np.ndarray:
    return dirtorch_whiten(x, pca["mean"], pca["components"], pca["explained_variance"], pca["whiten"])


def build_gem_ap(name: str, weights: str | Path | None = None, pretrained: bool = True) -> NativeBackbone:
    """GeM-AP ResNet (deep-image-retrieval): layer4 map, and ``native`` = ``L2(fc(GeM_p(layer4)))``.

    Args:
        name: ``gem_ap_r101``, ``gem_ap_r50`` or ``gem_ap_r101_lm18``.
        weights: the published ``.pt`` file; None: the cache directory (no download URL).
        pretrained: False gives a seeded random network with the default options.
    """
    info, depth = GEM_AP_INFO[name], _GEM_AP_DEPTH[name]
    if not pretrained:
        config = {"arch": f"resnet{depth}_rmac", "out_dim": 2048, "pooling": "gem", "gemp": 3}
        return random_native(lambda: DirtorchGeMNet(depth), info, name, weights, config)
    how = (
        f"Download {info.weights_file} from {info.weights_source.split('Google Drive ')[-1]} (unzip it if it comes "
        f"as a .zip), then pass --weights PATH or put it in the cache directory."
    )
    path = resolve_weights(info, weights, how_to_get=how)
    sd, opts, pcas, pre = read_gem_ap(path, depth)
    out_dim = int(sd["fc.weight"].shape[0]) if "fc.weight" in sd else int(opts.get("out_dim", 2048))
    kw = {
        "out_dim": out_dim,
        "gemp": float(opts.get("gemp", 3)),
        "norm_features": bool(opts.get("norm_features", False)),
        "without_fc": bool(opts.get("without_fc", False)),
        "center_bias": float(opts.get("center_bias", 0) or 0),
    }
    net = new_network(lambda: DirtorchGeMNet(depth, **kw), pretrained=True)
    load_into(net, sd, path)
    whitenings = {k: functools.partial(_apply_dirtorch, pca=v) for k, v in pcas.items()}
    info = with_normalisation(info, pre.get("mean"), pre.get("std"), path, "preprocess")
    return finish(
        net, info, name, sha256_file(path), NativeBackbone, shipped_whitening=whitenings, upstream_config=opts
    )


def _factory(name: str) -> Callable[..., NativeBackbone]:
    def factory(weights: str | Path | None = None, pretrained: bool = True) -> NativeBackbone:
        return build_gem_ap(name, weights, pretrained)

    factory.__name__ = factory.__qualname__ = f"build_{name}"
    factory.__doc__ = GEM_AP_INFO[name].help
    return factory


for _name, _aliases in (
    ("gem_ap_r101", ("gem-ap", "gemap", "gem_ap", "resnet101-ap-gem")),
    ("gem_ap_r50", ("resnet50-ap-gem",)),
    ("gem_ap_r101_lm18", ("resnet101-ap-gem-lm18",)),
):
    BACKBONES.register(_name, _factory(_name), aliases=_aliases, info=GEM_AP_INFO[_name])
