"""ResNet backbones: the ImageNet-supervised baseline, SimCLR v1 (1x / 2x / 4x) and MoCo v1 / v2.

Every entry returns the unpooled output of ``layer4`` (stride 32): 2048 channels for the
width-1 networks, ``2048 * w`` for SimCLR of width ``w``.

* ``resnet50`` (the paper's "Baseline"): torchvision's ResNet-50 with the ``IMAGENET1K_V1``
  weights, a plain state dict (``resnet50-0676ba61.pth``, or the older ``resnet50-19c8e357.pth``).
  The classifier is kept: ``backbone.net(x)`` gives the 1000 ImageNet logits.
* ``simclr1x`` / ``simclr2x`` / ``simclr4x``: SimCLR v1 ResNet-50 with every layer widened by
  ``w`` (the stem too: ``64 * w`` channels), as in the official TensorFlow code and in the
  PyTorch conversion of tonylins/simclr-converter (``resnet_wider.py``); not torchvision's
  ``wide_resnet50_2``, which widens only the bottleneck's inner convolutions. The converted file
  is ``{'state_dict': ...}`` with torchvision-style names; its ``fc.*`` classifier is dropped.
  Inputs are RGB in [0, 1] without mean / std normalisation.
* ``mocov1`` / ``mocov2`` / ``mocov2_800ep``: torchvision's ResNet-50 from the official MoCo
  pre-training checkpoints ``{'epoch', 'arch', 'state_dict', 'optimizer'}``: the query encoder
  ``module.encoder_q.*`` is kept (prefix stripped) without its ``fc`` head (a Linear in v1, the
  MLP ``fc.0`` / ``fc.2`` in v2); ``module.encoder_k.*``, ``module.queue`` and
  ``module.queue_ptr`` are ignored.

Also here, shared with :mod:`retrbench.backbones.finetuned`: :func:`load_checkpoint` (a whole
checkpoint read with ``weights_only=True`` and an optional allow-list of extra classes), the
network builders (:class:`TorchvisionResNet`, :class:`SimCLRResNet50`) and the loading steps
(:func:`new_network`, :func:`load_into`, :func:`verify_published_digest`).
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import re
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.resnet import Bottleneck, ResNet

from .base import BACKBONES, Backbone, BackboneInfo
from .weights import CheckpointError, default_cache_dir, load_state_dict, resolve_weights, sha256_file, strict_load

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MOCO_INFO",
    "PUBLISHED_DIGEST_PREFIX",
    "RESNET50",
    "SIMCLR_INFO",
    "SimCLRResNet50",
    "TorchvisionResNet",
    "build_moco",
    "build_resnet50",
    "build_simclr",
    "finish",
    "load_checkpoint",
    "load_into",
    "moco_encoder_state_dict",
    "new_network",
    "resnet_depth",
    "resolve_with_hint",
    "strip_prefix",
    "tensor_mapping",
    "top_level",
    "verify_published_digest",
]

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESNET_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}  # bottleneck blocks per stage
_DEPTH_OF_LAYER3 = {blocks[2]: depth for depth, blocks in RESNET_BLOCKS.items()}

# Checksums that upstream publishes only in part: torchvision's file names embed the first 8 hex
# digits of the sha256 (torch.hub checks them the same way); the MoCo README lists an md5 prefix.
PUBLISHED_DIGEST_PREFIX: dict[str, tuple[str, str]] = {
    "resnet50-0676ba61.pth": ("sha256", "0676ba61"),
    "resnet50-19c8e357.pth": ("sha256", "19c8e357"),
    "moco_v1_200ep_pretrain.pth.tar": ("md5", "b251726a"),
    "moco_v2_200ep_pretrain.pth.tar": ("md5", "59fd9945"),
    "moco_v2_800ep_pretrain.pth.tar": ("md5", "a04e12f8"),
}
"""Published file name -> (hash algorithm, published prefix of its hex digest)."""


# --------------------------------------------------------------------------------------------
# Reading checkpoints


def _global_name(g: Any) -> str:
    if isinstance(g, tuple):
        return g[1]
    return f"{getattr(g, '__module__', '?')}.{getattr(g, '__qualname__', repr(g))}"


def load_checkpoint(path: str | Path, *, allow: Sequence[Any] = (), fmt: str = "PyTorch") -> Any:
    """The whole object of a checkpoint, read on CPU with ``torch.load(weights_only=True)``.

    Args:
        path: checkpoint file.
        allow: extra globals the file may name, as accepted by ``torch.serialization.safe_globals``
            (a class or function, or ``(object, "name.in.the.file")`` for a class pickled under an
            older module path). Only data-holding classes belong here (numpy arrays, an sklearn
            PCA); nothing else in the file can be imported or called.
        fmt: name of the expected format, used in error messages.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file is truncated or not a PyTorch checkpoint, or it asks for a
            global outside the allow-list (the global is named and nothing from it is run).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"weights file not found: {p}" + (" (it is a directory)" if p.is_dir() else ""))
    # Only add what is not already allowed: leaving the context removes the globals it added.
    already = set(torch.serialization.get_safe_globals())
    extra = [g for g in allow if g not in already]
    try:
        with torch.serialization.safe_globals(extra):
            return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        allowed = sorted({_global_name(g) for g in allow})
        allowed_txt = (
            f"allowed beyond tensors and plain containers: {', '.join(allowed)}"
            if allowed
            else "only tensors and plain containers are allowed"
        )
        wanted = re.search(r"GLOBAL ([\w.]+)", msg) or re.search(r"but got <class '([\w.]+)'>", msg)
        wanted = wanted or re.search(r"unrecognized function (\S+)", msg)
        if wanted:
            raise CheckpointError(
                f"{p}: refused: reading it would import or call {wanted.group(1)}, which is not on the "
                f"allow-list for {fmt} checkpoints ({allowed_txt}). Nothing from the file was run. Either it "
                f"is not a {fmt} checkpoint, or it holds objects that need arbitrary unpickling; re-save "
                f"its tensors (torch.save(state_dict, ...)) from a trusted environment."
            ) from e
        raise CheckpointError(f"{p}: truncated or not a PyTorch checkpoint ({_first_line(msg)})") from e
    except (RuntimeError, EOFError, KeyError, ValueError, zipfile.BadZipFile, AttributeError, IndexError) as e:
        raise CheckpointError(f"{p}: truncated or not a PyTorch checkpoint ({type(e).__name__}: {e})") from e


def _first_line(msg: str) -> str:
    detail = re.search(r"WeightsUnpickler error:\s*(.+?)(\n\n|$)", msg, re.S)
    return (detail.group(1) if detail else msg).strip().splitlines()[0][:300]


def _preview(keys: Sequence[object], n: int = 10) -> str:
    keys = list(keys)
    return ", ".join(repr(k) for k in keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def top_level(obj: Any, path: str | Path, required: Sequence[str], fmt: str, layout: str) -> Mapping[str, Any]:
    """``obj`` as a mapping holding every key of ``required``; else a CheckpointError describing both layouts."""
    if not isinstance(obj, Mapping) or any(k not in obj for k in required):
        found = f"keys {_preview(list(obj))}" if isinstance(obj, Mapping) else f"a {type(obj).__name__}"
        raise CheckpointError(f"{path}: not a {fmt} checkpoint: expected {layout}; found {found}")
    return obj


def tensor_mapping(obj: Any, path: str | Path, where: str) -> dict[str, Tensor]:
    """``obj`` as a flat ``{name: tensor}`` dict; else a CheckpointError naming ``where`` and what was found."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path}: expected a mapping of parameter names to tensors {where}; found a {type(obj).__name__}"
        )
    bad = [k for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, Tensor))]
    if bad:
        raise CheckpointError(
            f"{path}: expected a flat mapping of parameter names to tensors {where}; "
            f"{len(bad)} entries are not str -> tensor ({_preview(bad, 5)})"
        )
    return dict(obj)


def strip_prefix(sd: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Remove ``prefix`` from every key when all keys carry it (``nn.DataParallel``'s ``module.``)."""
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix) :]: v for k, v in sd.items()}
    return dict(sd)


def resnet_depth(sd: Mapping[str, Tensor], prefix: str = "") -> int | None:
    """Depth (50, 101, 152) of the bottleneck ResNet whose ``layer3`` blocks are in ``sd`` under ``prefix``."""
    pat = re.compile(rf"^{re.escape(prefix)}layer3\.(\d+)\.")
    blocks = {int(m.group(1)) for k in sd if (m := pat.match(k))}
    return _DEPTH_OF_LAYER3.get(len(blocks)) if blocks else None


def _hexdigest(path: Path, algo: str) -> str:
    if algo == "sha256":
        return sha256_file(path)
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def verify_published_digest(path: str | Path) -> None:
    """Check a file named as a published checkpoint against the digest prefix upstream publishes.

    Only files whose name is in :data:`PUBLISHED_DIGEST_PREFIX` are checked; a mismatch means a
    corrupt or partial download, or another file under the published name.

    Raises:
        CheckpointError: naming the expected prefix and the actual digest.
    """
    p = Path(path)
    if p.name not in PUBLISHED_DIGEST_PREFIX:
        return
    algo, prefix = PUBLISHED_DIGEST_PREFIX[p.name]
    digest = _hexdigest(p, algo)
    if not digest.startswith(prefix):
        raise CheckpointError(
            f"{p}: not the published {p.name}: its {algo} is {digest}, but the published one starts with "
            f"{prefix}. A corrupt or partial download? Delete the file and try again (or rename it if it is "
            f"your own checkpoint)."
        )


# --------------------------------------------------------------------------------------------
# Networks


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


def new_network(make: Callable[[], nn.Module], *, pretrained: bool) -> nn.Module:
    """Build a network: seeded random init (``pretrained=False``), or uninitialised CPU memory to be loaded.

    With ``pretrained=True`` the module is built on the ``meta`` device and given empty CPU
    storage (no random init: SimCLR 4x has 375M parameters); :func:`load_into` then overwrites
    every parameter and buffer, which ``strict_load`` guarantees.
    """
    if not pretrained:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return make()
    with torch.device("meta"):
        net = make()
    return net.to_empty(device="cpu")


def load_into(
    net: nn.Module, sd: Mapping[str, Tensor], path: str | Path, *, ignore: tuple[str, ...] = (), hint: str = ""
) -> None:
    """``strict_load`` with BatchNorm counters filled in and errors naming the file.

    Checkpoints saved before PyTorch 0.4.1 (e.g. torchvision's ``resnet50-19c8e357.pth``) have
    no ``num_batches_tracked`` buffers; those absent are set to 0 (they only matter for BatchNorm
    in training mode with ``momentum=None``). Every other key must match in name and shape,
    except the checkpoint-side keys matched by ``ignore``.

    Raises:
        CheckpointError: listing missing, unexpected and reshaped keys, followed by ``hint``.
    """
    sd = dict(sd)
    for k, v in net.state_dict().items():
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = torch.zeros((), dtype=v.dtype)
    try:
        strict_load(net, sd, ignore=ignore)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}" + (f"\n  {hint}" if hint else "")) from e


def finish(
    net: nn.Module, info: BackboneInfo, name: str, weights_id: str, cls: type[Backbone] = Backbone, **kw: Any
) -> Backbone:
    """Wrap ``net`` as an eval-mode backbone with gradients off."""
    net.requires_grad_(False)
    return cls(net, info, name, weights_id, **kw).eval()


def _no_weights_with_random(weights: str | Path | None) -> None:
    if weights is not None:
        raise ValueError("weights= was given together with pretrained=False; pass one or the other")


def resolve_with_hint(
    info: BackboneInfo, weights: str | Path | None, how_to_get: str, alternatives: Sequence[str] = ()
) -> Path:
    """``resolve_weights`` after looking for ``alternatives`` (other published names) in the cache, with a hint."""
    if weights is None:
        for name in alternatives:
            cached = default_cache_dir() / name
            if cached.is_file():
                return cached
    try:
        return resolve_weights(info, weights)
    except FileNotFoundError as e:
        if weights is not None or not how_to_get:
            raise
        raise FileNotFoundError(f"{e}\n  {how_to_get}") from e


# --------------------------------------------------------------------------------------------
# resnet50: the ImageNet-supervised baseline

_RESNET50_LEGACY = "resnet50-19c8e357.pth"


def _cached_legacy_resnet50() -> Path | None:
    """torchvision's older published ResNet-50 file, if it is in the weights cache (found by ``local_weights``)."""
    p = default_cache_dir() / _RESNET50_LEGACY
    return p if p.is_file() else None


RESNET50 = BackboneInfo(
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
        _no_weights_with_random(weights)
        return finish(new_network(TorchvisionResNet, pretrained=False), RESNET50, "resnet50", "random-init")
    path = resolve_with_hint(RESNET50, weights, "", alternatives=(RESNET50.weights_file, _RESNET50_LEGACY))
    verify_published_digest(path)
    obj = load_checkpoint(path, fmt="torchvision")
    if isinstance(obj, Mapping) and obj and not all(isinstance(v, Tensor) for v in obj.values()):
        inner = obj.get("state_dict")
        moco = isinstance(inner, Mapping) and any(str(k).startswith(("module.encoder_q.", "encoder_q.")) for k in inner)
        hint = " It is a MoCo pre-training checkpoint: use mocov1 / mocov2 / mocov2_800ep." if moco else ""
        raise CheckpointError(
            f"{path}: not a torchvision state dict (a flat mapping of parameter names to tensors): it has "
            f"top-level keys {_preview(list(obj))}.{hint}"
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


# --------------------------------------------------------------------------------------------
# SimCLR v1


def _simclr_info(width: int) -> BackboneInfo:
    return BackboneInfo(
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
        _no_weights_with_random(weights)
        return finish(new_network(lambda: SimCLRResNet50(width), pretrained=False), info, name, "random-init")
    path = resolve_with_hint(info, weights, _SIMCLR_HOW.format(w=width))
    sd = load_state_dict(path, key="state_dict")
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
    build.__doc__ = f"SimCLR v1 ResNet-50 ({width}x, every layer widened) returning its ({2048 * width}-channel, stride 32) layer4 map."
    return build


for _w in (1, 2, 4):
    BACKBONES.register(
        f"simclr{_w}x",
        _simclr_factory(_w),
        aliases=(f"simclr_{_w}x", f"simclr-{_w}x", f"simclr-r50-{_w}x"),
        info=SIMCLR_INFO[_w],
    )


# --------------------------------------------------------------------------------------------
# MoCo v1 / v2


def _moco_info(version: int, epochs: int, card_note: str) -> BackboneInfo:
    tag = f"moco_v{version}_{epochs}ep"
    return BackboneInfo(
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
    "mocov1": _moco_info(1, 200, ""),
    "mocov2": _moco_info(2, 200, "(mlp, aug+, cos)"),
    "mocov2_800ep": _moco_info(2, 800, "(mlp, aug+, cos)"),
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
    ck = top_level(load_checkpoint(path, fmt="MoCo"), path, ("state_dict",), "MoCo pre-training", _MOCO_LAYOUT)
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
            f"found state_dict keys {_preview(list(sd))}). A main_lincls.py checkpoint (module.conv1... + a "
            f"1000-way fc) is not supported here."
        )
    known = re.compile(rf"^{re.escape(pre)}(encoder_q\.|encoder_k\.|queue$|queue_ptr$)")
    other = [k for k in sd if not known.match(k)]
    if other:
        raise CheckpointError(f"{path}: unexpected keys in a MoCo checkpoint: {_preview(other)}")
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
        _no_weights_with_random(weights)
        return finish(new_network(make, pretrained=False), info, name, "random-init")
    path = resolve_with_hint(info, weights, "")
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
    build.__doc__ = (
        f"MoCo v{_MOCO_VERSION[name]} ResNet-50 ({_MOCO_EPOCHS[name]} epochs, query encoder) returning its "
        "(2048-channel, stride 32) layer4 map."
    )
    return build


for _name, _aliases in (
    ("mocov1", ("moco_v1", "moco-v1", "mocov1_200ep")),
    ("mocov2", ("moco_v2", "moco-v2", "mocov2_200ep")),
    ("mocov2_800ep", ("moco_v2_800ep", "moco-v2-800ep")),
):
    BACKBONES.register(_name, _moco_factory(_name), aliases=_aliases, info=MOCO_INFO[_name])
