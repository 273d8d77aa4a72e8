"""Retrieval-fine-tuned ResNets whose checkpoint carries its own pooling and head.

Each entry gives, like every backbone, the unpooled ``layer4`` map (``Backbone.forward``), and
also the global descriptor exactly as the upstream code computes it
(:meth:`NativeBackbone.native`, used by ``--pooling native``):

* ``gem_ap_r101`` / ``gem_ap_r50`` / ``gem_ap_r101_lm18`` (the paper's upper bound "GeM (AP)",
  Revaud et al. 2019, naver/deep-image-retrieval): ``L2(fc(GeM_p(layer4)))`` with a learned
  ``p`` (``resnet{50,101}_rmac`` of ``dirtorch``). The published ``Resnet-101-AP-GeM.pt`` is
  ``{'model_options', 'state_dict', 'pca', ...}``; ``pca`` maps a dataset name
  (``'Landmarks_clean'``) to a pickled scikit-learn ``PCA``, so the file is read with an
  allow-list of exactly the numpy and scikit-learn classes that holds (:data:`PCA_GLOBALS`).
* ``cirtorch_r101_gem`` and ``cirtorch_gl18_r101_gem_w`` (Radenović et al., cirtorch):
  ``L2(GeM_p(features))``, then ``L2(whiten(.))`` when the network has a learned whitening layer;
  ``{'meta', 'state_dict'}`` with ``features.*``, ``pool.p``, ``whiten.*``. A post-hoc learned
  whitening stored in ``meta['Lw']`` (numpy arrays) is read with a numpy-only allow-list.
* ``insclr_r101_gldv2`` / ``insclr_r50_instre`` (Deng et al. 2022, InsCLR): ``backbone.*``
  (torchvision names) and ``combiner.pool`` (GeM, p = 3 fixed unless the file has
  ``combiner.pool.p``) + ``combiner.head.fc`` (``norm_linear_norm`` without bias for the GLDv2
  configs, ``linear_norm`` with bias for INSTRE). No weights were published: these load a file
  you trained (``--weights``).

The post-hoc whitenings shipped in a checkpoint (dirtorch's PCA, cirtorch's ``Lw``) are kept on
the backbone as :attr:`NativeBackbone.shipped_whitening` and applied by
:meth:`NativeBackbone.whiten_shipped`, as upstream does after extraction.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import BACKBONES, Backbone, BackboneInfo
from .resnet import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TorchvisionResNet,
    finish,
    load_checkpoint,
    load_into,
    new_network,
    resnet_depth,
    resolve_with_hint,
    strip_prefix,
    tensor_mapping,
    top_level,
)
from .weights import CheckpointError, sha256_file

__all__ = [
    "CIRTORCH_INFO",
    "CirtorchGeMNet",
    "DirtorchGeMNet",
    "GEM_AP_INFO",
    "GeM",
    "INSCLR_INFO",
    "InsCLRNet",
    "NUMPY_GLOBALS",
    "NativeBackbone",
    "PCA_GLOBALS",
    "build_cirtorch",
    "build_gem_ap",
    "build_insclr",
    "cirtorch_whiten",
    "dirtorch_whiten",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Allow-lists for checkpoints that pickle more than tensors


def _numpy_globals() -> list[Any]:
    """numpy arrays and scalars of numeric dtypes, under both numpy 1.x and 2.x module names."""
    core = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray  # numpy 2 / numpy 1
    out: list[Any] = [np.ndarray, np.dtype]
    for fn in ("_reconstruct", "scalar"):
        f = getattr(core, fn)
        out += [(f, f"numpy.core.multiarray.{fn}"), (f, f"numpy._core.multiarray.{fn}")]
    # numpy >= 1.25 gives each dtype its own class, which unpickling must be allowed to build
    out += sorted({type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFDG"} - {np.dtype}, key=str)
    return out


NUMPY_GLOBALS: list[Any] = _numpy_globals()
"""numpy's array / scalar / dtype reconstruction: all an array of numbers needs (no object arrays' contents are code)."""


def _pca_globals() -> list[Any]:
    from sklearn.decomposition import PCA

    # dirtorch's files were pickled with scikit-learn < 0.22, where PCA lived in sklearn.decomposition.pca
    return [*NUMPY_GLOBALS, PCA, (PCA, "sklearn.decomposition.pca.PCA")]


PCA_GLOBALS: Callable[[], list[Any]] = functools.cache(_pca_globals)
"""numpy plus scikit-learn's ``PCA`` (under its current and pre-0.22 module names); built lazily."""


# --------------------------------------------------------------------------------------------
# Layers and networks


class GeM(nn.Module):
    """Generalised mean pooling ``(mean_{H,W} clamp(x, eps)^p)^(1/p)``: ``(B, C, H, W) -> (B, C, 1, 1)``.

    Args:
        p: initial exponent.
        learned: ``p`` is a parameter ``p`` of shape (1,) (dirtorch ``adpool.p``, cirtorch
            ``pool.p``, InsCLR ``combiner.pool.p``); else a plain float (InsCLR's default).
        full_kernel: average with ``avg_pool2d`` over the whole map as cirtorch does; else with
            ``adaptive_avg_pool2d(., 1)`` as dirtorch and InsCLR do (same value up to rounding).
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6, *, learned: bool = True, full_kernel: bool = False) -> None:
        super().__init__()
        if learned:
            self.p = nn.Parameter(torch.ones(1) * p)
        else:
            self.p = float(p)
        self.eps = eps
        self.full_kernel = full_kernel

    def forward(self, x: Tensor) -> Tensor:
        y = x.clamp(min=self.eps).pow(self.p)
        y = F.avg_pool2d(y, (y.size(-2), y.size(-1))) if self.full_kernel else F.adaptive_avg_pool2d(y, 1)
        return y.pow(1.0 / self.p)


def _l2n(x: Tensor, eps: float = 1e-6) -> Tensor:
    """cirtorch's ``l2n``: ``x / (||x||_2 + eps)`` along dim 1."""
    return x / (torch.norm(x, p=2, dim=1, keepdim=True) + eps).expand_as(x)


class DirtorchGeMNet(TorchvisionResNet):
    """deep-image-retrieval's ``resnet{50,101}_rmac`` with GeM: names ``conv1 ... layer4``, ``adpool.p``, ``fc``.

    ``forward_features(x)``: the ``(B, 2048, H/32, W/32)`` layer4 map. ``descriptor(x)`` (also
    ``forward``): upstream's ``ResNet_RMAC.forward`` in eval mode: optional centre bias, GeM with
    the learned ``p``, optional L2 (``norm_features``), ``fc`` unless ``without_fc``, then
    ``F.normalize``: ``(B, out_dim)``.
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
        o = torch.flatten(_l2n(self.pool(self.features(x))), 1)
        if self.whiten is not None:
            o = _l2n(self.whiten(o))
        return o

    forward = descriptor


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
    the learned ``combiner.pool.p``), then the head: ``(B, out_dim)``, L2-normalised.

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


# --------------------------------------------------------------------------------------------
# Post-hoc whitening shipped in checkpoints


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


def cirtorch_whiten(x: np.ndarray, m: np.ndarray, P: np.ndarray, dimensions: int | None = None) -> np.ndarray:
    """cirtorch's ``whitenapply`` on rows: ``(N, D) -> (N, dimensions or D)``, ``P[:d] (x - m)`` then L2 (+1e-6)."""
    y = (np.asarray(x, dtype=np.float64) - np.asarray(m, dtype=np.float64).reshape(1, -1)) @ np.asarray(
        P, dtype=np.float64
    )[:dimensions].T
    return y / (np.linalg.norm(y, ord=2, axis=1, keepdims=True) + 1e-6)


# --------------------------------------------------------------------------------------------
# The backbone


class NativeBackbone(Backbone):
    """A :class:`Backbone` whose network also computes its own (upstream) global descriptor.

    ``forward(x)``: the ``(B, C, H', W')`` last-convolution map, like every backbone.
    ``native(x)``: ``(B, 3, H, W)`` normalised images -> ``(B, D)`` descriptors, L2-normalised
    as upstream does (``net.descriptor``).

    Attributes:
        shipped_whitening: post-hoc whitenings stored in the checkpoint, by name (dirtorch:
            the PCA's dataset, e.g. ``'Landmarks_clean'``; cirtorch: ``'<dataset>'`` for
            single-scale and ``'<dataset>/ms'`` for multi-scale ``Lw``); each maps ``(N, D)``
            numpy descriptors to whitened, L2-normalised ones with upstream's default settings.
        upstream_config: the checkpoint's own description of the network (dirtorch
            ``model_options``, cirtorch ``meta`` without ``Lw``, InsCLR's inferred head).
    """

    def __init__(
        self,
        net: nn.Module,
        info: BackboneInfo,
        name: str,
        weights_id: str,
        *,
        shipped_whitening: Mapping[str, Callable[[np.ndarray], np.ndarray]] | None = None,
        upstream_config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(net, info, name, weights_id)
        self.shipped_whitening = dict(shipped_whitening or {})
        self.upstream_config = dict(upstream_config or {})

    def native(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W) -> (B, D)``: the network's own global descriptor, L2-normalised as upstream."""
        return self.net.descriptor(x)

    def whiten_shipped(self, descriptors: np.ndarray, name: str | None = None) -> np.ndarray:
        """Apply the checkpoint's post-hoc whitening ``name`` (the only one if None) to ``(N, D)`` descriptors."""
        if not self.shipped_whitening:
            raise KeyError(f"{self.name}: this checkpoint ships no post-hoc whitening")
        if name is None:
            if len(self.shipped_whitening) > 1:
                raise KeyError(f"{self.name}: name one of {sorted(self.shipped_whitening)}")
            name = next(iter(self.shipped_whitening))
        if name not in self.shipped_whitening:
            raise KeyError(f"{self.name}: no shipped whitening {name!r}; available: {sorted(self.shipped_whitening)}")
        return self.shipped_whitening[name](descriptors)


def _random_native(
    make: Callable[[], nn.Module], info: BackboneInfo, name: str, weights: Any, config: dict
) -> NativeBackbone:
    if weights is not None:
        raise ValueError("weights= was given together with pretrained=False; pass one or the other")
    return finish(
        new_network(make, pretrained=False), info, name, "random-init", NativeBackbone, upstream_config=config
    )


def _with_normalisation(info: BackboneInfo, mean: Any, std: Any, path: Path, where: str) -> BackboneInfo:
    """``info`` with the checkpoint's own input normalisation, when it states one that differs."""
    if mean is None or std is None:
        return info
    try:
        m, s = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {where} mean / std are not numbers: {mean!r}, {std!r}") from e
    if len(m) != 3 or len(s) != 3:
        raise CheckpointError(f"{path}: {where} mean / std must have 3 values: {mean!r}, {std!r}")
    if np.allclose(m, info.mean, atol=1e-6) and np.allclose(s, info.std, atol=1e-6):
        return info
    logger.info("%s: using the checkpoint's input normalisation mean=%s std=%s", path, m, s)
    return dataclasses.replace(info, mean=m, std=s)


def _depth_mismatch(path: Path, found: int | None, depth: int, family: str, by_depth: Mapping[int, str]) -> None:
    if found is not None and found != depth:
        other = f"; use {by_depth[found]}" if found in by_depth else ""
        raise CheckpointError(f"{path}: a ResNet-{found} {family} checkpoint, not ResNet-{depth}{other}")


# --------------------------------------------------------------------------------------------
# GeM-AP (deep-image-retrieval / dirtorch)

_GDRIVE = "https://drive.google.com/open?id="


def _gem_ap_info(depth: int, file: str, drive_id: str, source: str) -> BackboneInfo:
    return BackboneInfo(
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
        101, "Resnet-101-AP-GeM.pt", "1UWJGDuHtzaQdFhSMojoYVQjmCXhIwVvy", "AP loss, Landmarks-clean"
    ),
    "gem_ap_r50": _gem_ap_info(
        50, "Resnet-50-AP-GeM.pt", "1oPtE_go9tnsiDLkWjN4NMpKjh-_md1G5", "AP loss, Landmarks-clean"
    ),
    "gem_ap_r101_lm18": _gem_ap_info(
        101, "Resnet-101-AP-GeM-LM18.pt", "1r76NLHtJsH-Ybfda4aLkUIoW3EEsi25I", "AP loss, Google Landmarks 2018"
    ),
}
_GEM_AP_DEPTH = {"gem_ap_r101": 101, "gem_ap_r50": 50, "gem_ap_r101_lm18": 101}
_GEM_AP_BY_DEPTH = {101: "gem_ap_r101", 50: "gem_ap_r50"}
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
    import warnings

    p = Path(path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Trying to unpickle estimator.*")  # PCA pickled by sklearn 0.20
        obj = load_checkpoint(p, allow=PCA_GLOBALS(), fmt="deep-image-retrieval (GeM-AP)")
    ck = top_level(obj, p, ("model_options", "state_dict"), "deep-image-retrieval (GeM-AP)", _GEM_AP_LAYOUT)
    opts = ck["model_options"]
    if not isinstance(opts, Mapping):
        raise CheckpointError(f"{p}: model_options is a {type(opts).__name__}, not a mapping")
    opts = dict(opts)
    arch = str(opts.get("arch", ""))
    if arch.endswith("_ms") or not arch.startswith("resnet") or "_rmac" not in arch:
        raise CheckpointError(f"{p}: model_options arch {arch!r}: only resnet50_rmac / resnet101_rmac are supported")
    _depth_mismatch(p, int(arch[len("resnet") : arch.index("_")]), depth, "deep-image-retrieval", _GEM_AP_BY_DEPTH)
    if not str(opts.get("pooling", "gem")).startswith("gem"):
        raise CheckpointError(f"{p}: model_options pooling {opts['pooling']!r}: only GeM networks are supported")
    unknown = sorted(set(opts) - _GEM_AP_OPTIONS)
    if unknown:
        logger.warning("%s: ignoring unknown model_options %s", p, unknown)
    sd = strip_prefix(tensor_mapping(ck["state_dict"], p, "under 'state_dict'"), "module.")
    _depth_mismatch(p, resnet_depth(sd), depth, "deep-image-retrieval", _GEM_AP_BY_DEPTH)
    raw_pca = ck.get("pca") or {}
    if not isinstance(raw_pca, Mapping):
        raw_pca = {"pca": raw_pca}
    pcas = {str(k): _pca_arrays(v, p, str(k)) for k, v in raw_pca.items()}
    pre = ck.get("preprocess") if isinstance(ck.get("preprocess"), Mapping) else {}
    return sd, opts, pcas, dict(pre)


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
        return _random_native(lambda: DirtorchGeMNet(depth), info, name, weights, config)
    how = (
        f"Download {info.weights_file} from {info.weights_source.split('Google Drive ')[-1]} (unzip it if it comes "
        f"as a .zip), then pass --weights PATH or put it in the cache directory."
    )
    path = resolve_with_hint(info, weights, how)
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
    info = _with_normalisation(info, pre.get("mean"), pre.get("std"), path, "preprocess")
    return finish(
        net, info, name, sha256_file(path), NativeBackbone, shipped_whitening=whitenings, upstream_config=opts
    )


def _apply_dirtorch(x: np.ndarray, pca: Mapping[str, Any]) -> np.ndarray:
    return dirtorch_whiten(x, pca["mean"], pca["components"], pca["explained_variance"], pca["whiten"])


# --------------------------------------------------------------------------------------------
# cirtorch (cnnimageretrieval-pytorch)

_CIRTORCH_NETS = "http://cmp.felk.cvut.cz/cnnimageretrieval/data/networks"


def _cirtorch_info(file: str, folder: str, source: str) -> BackboneInfo:
    return BackboneInfo(
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
    ),
    "cirtorch_gl18_r101_gem_w": _cirtorch_info(
        "gl18-tl-resnet101-gem-w-a4d43db.pth",
        "gl18",
        "ResNet-101 GeM + learned whitening, triplet loss on Google Landmarks 2018",
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
    obj = load_checkpoint(p, allow=NUMPY_GLOBALS, fmt="cirtorch")
    ck = top_level(obj, p, ("meta", "state_dict"), "cirtorch", _CIRTORCH_LAYOUT)
    meta = ck["meta"]
    if not isinstance(meta, Mapping):
        raise CheckpointError(f"{p}: meta is a {type(meta).__name__}, not a mapping")
    meta = dict(meta)
    arch = str(meta.get("architecture", ""))
    if not arch.startswith("resnet") or not arch[len("resnet") :].isdigit():
        raise CheckpointError(f"{p}: meta architecture {arch!r}: only ResNet networks are supported by this entry")
    _depth_mismatch(p, int(arch[len("resnet") :]), depth, "cirtorch", _CIRTORCH_BY_DEPTH)
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
        return _random_native(lambda: CirtorchGeMNet(101, whitening=has_w), info, name, weights, config)
    path = resolve_with_hint(info, weights, "")
    sd, meta = read_cirtorch(path, 101)
    whitening = bool(meta.get("whitening", False))
    lw = _lw_whitenings(meta.pop("Lw"), path) if meta.get("Lw") is not None else {}
    net = new_network(lambda: CirtorchGeMNet(101, whitening=whitening), pretrained=True)
    agree = ("whiten.weight" in sd) == whitening
    hint = "" if agree else f"meta says whitening={whitening}, but the state dict does not agree"
    load_into(net, sd, path, hint=hint)
    info = _with_normalisation(info, meta.get("mean"), meta.get("std"), path, "meta")
    return finish(net, info, name, sha256_file(path), NativeBackbone, shipped_whitening=lw, upstream_config=meta)


# --------------------------------------------------------------------------------------------
# InsCLR


def _insclr_info(depth: int, dataset: str, config: str, head: str, out_dim: int) -> BackboneInfo:
    return BackboneInfo(
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
    "insclr_r101_gldv2": _insclr_info(101, "gldv2", "configs/gldv2/*.yaml", "norm_linear_norm", 2048),
    "insclr_r50_instre": _insclr_info(50, "instre", "configs/instre/*.yaml", "linear_norm", 256),
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
    obj = load_checkpoint(p, fmt="InsCLR")
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
    _depth_mismatch(p, resnet_depth(sd, "backbone."), depth, "InsCLR", _INSCLR_BY_DEPTH)
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
        return _random_native(lambda: InsCLRNet(depth, head, out_dim), info, name, weights, config)
    if weights is None:
        raise FileNotFoundError(
            f"{name}: no InsCLR weights were published. Train them with the InsCLR code "
            f"(https://github.com/zeludeng/insclr, {'configs/gldv2' if depth == 101 else 'configs/instre'}) and pass "
            f"the checkpoint with --weights PATH (weights=PATH in Python)."
        )
    path = resolve_with_hint(info, weights, "")
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


# --------------------------------------------------------------------------------------------
# Registration


def _factory(build: Callable[..., NativeBackbone], name: str, doc: str) -> Callable[..., NativeBackbone]:
    def factory(weights: str | Path | None = None, pretrained: bool = True) -> NativeBackbone:
        return build(name, weights, pretrained)

    factory.__name__ = factory.__qualname__ = f"build_{name}"
    factory.__doc__ = doc
    return factory


_ENTRIES: list[tuple[str, tuple[str, ...], Callable[..., NativeBackbone], BackboneInfo, str]] = [
    (
        "gem_ap_r101",
        ("gem-ap", "gemap", "gem_ap", "resnet101-ap-gem"),
        build_gem_ap,
        GEM_AP_INFO["gem_ap_r101"],
        "GeM-AP ResNet-101 (Revaud et al. 2019): layer4 map; native L2(fc(GeM_p)).",
    ),
    (
        "gem_ap_r50",
        ("resnet50-ap-gem",),
        build_gem_ap,
        GEM_AP_INFO["gem_ap_r50"],
        "GeM-AP ResNet-50 (Revaud et al. 2019): layer4 map; native L2(fc(GeM_p)).",
    ),
    (
        "gem_ap_r101_lm18",
        ("resnet101-ap-gem-lm18",),
        build_gem_ap,
        GEM_AP_INFO["gem_ap_r101_lm18"],
        "GeM-AP ResNet-101 trained on Google Landmarks 2018: layer4 map; native L2(fc(GeM_p)).",
    ),
    (
        "cirtorch_r101_gem",
        ("cirtorch-gem", "retrievalsfm120k-resnet101-gem"),
        build_cirtorch,
        CIRTORCH_INFO["cirtorch_r101_gem"],
        "cirtorch ResNet-101 GeM (retrieval-SfM-120k): layer4 map; native l2n(GeM_p).",
    ),
    (
        "cirtorch_gl18_r101_gem_w",
        ("gl18-tl-resnet101-gem-w", "cirtorch-gl18"),
        build_cirtorch,
        CIRTORCH_INFO["cirtorch_gl18_r101_gem_w"],
        "cirtorch ResNet-101 GeM + whitening (GLDv1 2018): layer4 map; native l2n(whiten(l2n(GeM_p))).",
    ),
    (
        "insclr_r101_gldv2",
        ("insclr", "insclr-gldv2"),
        build_insclr,
        INSCLR_INFO["insclr_r101_gldv2"],
        "InsCLR ResNet-101 (GLDv2 configs, your own weights): layer4 map; native norm_linear_norm(GeM).",
    ),
    (
        "insclr_r50_instre",
        ("insclr-instre",),
        build_insclr,
        INSCLR_INFO["insclr_r50_instre"],
        "InsCLR ResNet-50 (INSTRE configs, your own weights): layer4 map; native linear_norm(GeM).",
    ),
]

for _name, _aliases, _build, _info, _doc in _ENTRIES:
    BACKBONES.register(_name, _factory(_build, _name, _doc), aliases=_aliases, info=_info)
