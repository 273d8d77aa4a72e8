"""Models outside the registry: ``timm:NAME``, ``hub:REPO:ENTRY``, and :func:`create_backbone`.

:func:`create_backbone` is the one entry point that turns a ``--model`` string into a
:class:`~retrbench.backbones.base.Backbone`:

* a registry name (``efficientnet_lite0``, ``amdim``, ...): ``BACKBONES.create``;
* ``timm:NAME`` (``timm:resnet50``, ``timm:convnext_tiny.fb_in1k``): ``timm.create_model(NAME,
  num_classes=0)``; weights from ``weights`` (a timm-style state dict as ``.pth`` / ``.pt`` /
  ``.bin`` / ``.safetensors``, flat or under ``state_dict`` / ``model`` / ``state_dict_ema``;
  the classifier named in the model's ``pretrained_cfg`` may be present or not), else timm's
  own download (fails offline with a message saying what to do), or a seeded random init with
  ``pretrained=False``. Mean / std and default size come from the model's ``pretrained_cfg``;
  the map is ``forward_features`` (``num_features`` channels, stride from ``feature_info``).
  Convolutional models only: a model whose ``forward_features`` gives tokens (ViT) is refused
  at its first forward; ``NHWC`` outputs (``output_fmt``) are permuted to ``NCHW``.
* ``hub:REPO:ENTRY`` (``hub:pytorch/vision:v0.10.0:resnet50``, ``hub:/path/to/dir:my_net``):
  ``torch.hub.load(REPO, ENTRY)``, ``source='local'`` when REPO is a directory (its
  ``hubconf.py`` is executed: only name repositories you trust). The feature map is
  ``net.forward_features(x)`` if the net has it; else, for a torchvision-style ResNet
  (``conv1 bn1 relu maxpool layer1..4``), the ``layer4`` output before ``avgpool`` / ``fc``;
  else ``net.features(x)`` (torchvision VGG, MobileNet, EfficientNet; note DenseNet applies its
  last ReLU outside ``features``); else the net's own output, which must be ``(B, C, H, W)``.
  Channels and stride are measured with one forward of a 256x256 input; mean / std are
  ImageNet's unless the net carries a timm ``pretrained_cfg``. ``pretrained`` is passed to the
  entry as ``pretrained=`` or, for torchvision's entries, ``weights="DEFAULT"`` / ``None``.
* a local file (``--model net.pth``) is refused: a state dict holds no architecture, and a
  pickled or TorchScript model can only be run whole (its ``forward`` gives logits, not the
  last-convolution map) and may need arbitrary unpickling. Name the architecture and pass the
  file as weights instead: ``--model timm:resnet50 --weights net.pth``.

Backbone names are ``timm:NAME`` and ``hub:<repo>:ENTRY`` with ``<repo>`` the directory's base
name or ``owner_repo_ref``, free of ``/``; the full origin is in ``weights_id``.
"""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .base import BACKBONES, Backbone, BackboneInfo
from .weights import CheckpointError, load_state_dict, remap_state_dict, sha256_file, strict_load

__all__ = [
    "HubFeatures",
    "TimmFeatures",
    "build_hub",
    "build_timm",
    "create_backbone",
    "parse_hub_spec",
    "read_checkpoint",
    "read_weights",
]

logger = logging.getLogger(__name__)

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_PROBE = 256  # side of the input used to measure a hub net's channels and stride
_NESTED_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema")
_FILE_SUFFIXES = (".pth", ".pt", ".tar", ".ckpt", ".bin", ".safetensors", ".pkl", ".pickle", ".onnx", ".zip", ".jit")


# --------------------------------------------------------------------------------------------
# Reading weight files


def read_checkpoint(path: str | Path) -> Any:
    """The whole object of a PyTorch checkpoint, read once with ``torch.load(weights_only=True)`` on CPU.

    For files whose state dict sits beside other entries (hyperparameters, epoch counters). A
    file that fails to load is handed to :func:`~retrbench.backbones.weights.load_state_dict`,
    which raises the same failure as a ``CheckpointError`` naming the cause (truncated, not a
    checkpoint, needs arbitrary unpickling) or ``FileNotFoundError``.
    """
    p = Path(path)
    if not p.is_file():
        load_state_dict(p)  # raises FileNotFoundError with the usual message
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception:
        try:
            load_state_dict(p)  # re-raises the failure with a clear message
        except (CheckpointError, PermissionError):
            raise
        except OSError as e:  # e.g. "[Errno 22] Invalid argument" from a zip cut before its directory
            raise CheckpointError(f"{p}: truncated or not a PyTorch checkpoint (OSError: {e})") from e
        raise


def _is_flat(obj: object) -> bool:
    return isinstance(obj, Mapping) and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def read_weights(path: str | Path) -> dict[str, Tensor]:
    """A flat state dict from a ``.safetensors`` file or a PyTorch checkpoint.

    PyTorch files may hold the mapping at the top level or under one of ``state_dict``,
    ``model``, ``state_dict_ema``, ``model_ema``; a ``module.`` prefix on every key (from
    ``nn.DataParallel``) is stripped.

    Raises:
        FileNotFoundError, CheckpointError: missing, unreadable or wrongly structured file.
    """
    p = Path(path).expanduser()
    if p.suffix == ".safetensors":
        if not p.is_file():
            raise FileNotFoundError(f"weights file not found: {p}")
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            sd: Mapping[str, Tensor] = load_file(str(p), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{p}: truncated or not a safetensors file ({e})") from e
    else:
        obj = read_checkpoint(p)
        if _is_flat(obj):
            sd = obj
        else:
            nested = [k for k in _NESTED_KEYS if isinstance(obj, Mapping) and _is_flat(obj.get(k))]
            if not nested:
                found = f"keys {list(obj)[:10]}" if isinstance(obj, Mapping) else f"a {type(obj).__name__}"
                raise CheckpointError(
                    f"{p}: no state dict found: expected a flat mapping of names to tensors, at the top level or "
                    f"under one of {list(_NESTED_KEYS)}; found {found}"
                )
            sd = obj[nested[0]]
    if sd and all(k.startswith("module.") for k in sd):
        sd = remap_state_dict(sd, [(r"^module\.", "")])
    return dict(sd)


def _seeded(fn, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` with torch's CPU generator seeded to 0, restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return fn(*args, **kwargs)


def _check_map(y: Tensor, who: str, channels: int | None = None) -> Tensor:
    if y.dim() != 4 or (channels is not None and y.shape[1] != channels):
        want = f"(B, {channels}, H, W)" if channels is not None else "(B, C, H, W)"
        raise ValueError(
            f"{who}: the feature extractor returned shape {tuple(y.shape)}, not a {want} map; only "
            f"convolutional models (whose last features are a spatial map) are supported"
        )
    return y


# --------------------------------------------------------------------------------------------
# timm


class TimmFeatures(nn.Module):
    """A timm model (built with ``num_classes=0``) whose ``forward_features`` is checked to be ``(B, C, H, W)``.

    ``forward_features(x)``: ``(B, 3, H, W) -> (B, num_features, H/stride, W/stride)``;
    ``forward(x)``: the model's own pooled embedding ``(B, num_features)``.
    """

    def __init__(self, model: nn.Module, name: str) -> None:
        super().__init__()
        self.model = model
        self.name = name
        self.channels = int(model.num_features)
        self.nhwc = getattr(model, "output_fmt", "NCHW") == "NHWC"

    def forward_features(self, x: Tensor) -> Tensor:
        y = self.model.forward_features(x)
        if self.nhwc and y.dim() == 4:
            y = y.permute(0, 3, 1, 2)
        return _check_map(y, f"timm:{self.name}", self.channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def _timm_classifier_patterns(model: nn.Module) -> tuple[str, ...]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(rf"^{re.escape(n)}\." for n in names)


def build_timm(name: str, weights: str | Path | None = None, pretrained: bool = True) -> Backbone:
    """``timm:NAME`` as a backbone returning ``forward_features``.

    Args:
        name: a timm model name, optionally with a pretrained tag (``resnet50.a1_in1k``).
        weights: a state-dict file for that architecture (classifier keys optional); None with
            ``pretrained``: timm's own download (Hugging Face hub or URL).
        pretrained: False gives a seeded random network (``weights_id="random-init"``).

    Raises:
        KeyError: unknown timm model (closest names suggested).
        RuntimeError: timm's download failed (e.g. offline); the message says to pass weights.
    """
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(repr('timm:' + c) for c in close)}?" if close else ""
        raise KeyError(f"unknown timm model {name!r}{hint} (see timm.list_models())")
    if weights is not None and not pretrained:
        raise ValueError("weights= was given together with pretrained=False; pass one or the other")
    if weights is not None or not pretrained:
        model = _seeded(timm.create_model, name, pretrained=False, num_classes=0)
        if weights is not None:
            path = Path(weights).expanduser()
            strict_load(model, read_weights(path), ignore=_timm_classifier_patterns(model))
            weights_id = sha256_file(path)
        else:
            weights_id = "random-init"
    else:
        try:
            model = timm.create_model(name, pretrained=True, num_classes=0)
        except Exception as e:
            raise RuntimeError(
                f"timm could not fetch the pretrained weights of {name!r} ({type(e).__name__}: {e}). "
                f"Without network access, download them on another machine and pass the file with "
                f"--weights PATH (weights=PATH in Python; a timm state dict as .pth or .safetensors), "
                f"or use pretrained=False for a random network."
            ) from e
        cfg = model.pretrained_cfg or {}
        weights_id = f"timm-pretrained:{cfg.get('hf_hub_id') or cfg.get('url') or name}:{cfg.get('tag') or ''}"
    model.requires_grad_(False).eval()
    cfg = getattr(model, "pretrained_cfg", None) or {}
    feature_info = getattr(model, "feature_info", None)
    if feature_info:
        stride = int(feature_info[-1]["reduction"])
    else:
        stride = _probe(TimmFeatures(model, name))[1]
    info = BackboneInfo(
        channels=int(model.num_features),
        stride=stride,
        mean=tuple(cfg.get("mean", _IMAGENET_MEAN)),
        std=tuple(cfg.get("std", _IMAGENET_STD)),
        default_size=int(max(cfg.get("input_size", (3, 224, 224))[1:])),
        weights_source=f"timm {name}" + (f" ({cfg.get('hf_hub_id')})" if cfg.get("hf_hub_id") else ""),
        licence=str(cfg.get("license", "")),
    )
    return Backbone(TimmFeatures(model, name), info, f"timm:{name}", weights_id).eval()


# --------------------------------------------------------------------------------------------
# torch.hub


def _is_torchvision_resnet(net: nn.Module) -> bool:
    parts = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc")
    return all(isinstance(getattr(net, p, None), nn.Module) for p in parts)


class HubFeatures(nn.Module):
    """A ``torch.hub`` net cut at its last convolutional map (see the module docstring for the rule).

    ``forward_features(x)``: ``(B, 3, H, W) -> (B, C, h, w)``; ``forward(x)``: the net's own output.
    ``mode`` is ``forward_features``, ``resnet``, ``features`` or ``forward``.
    """

    def __init__(self, net: nn.Module, label: str) -> None:
        super().__init__()
        self.net = net
        self.label = label
        if callable(getattr(net, "forward_features", None)):
            self.mode = "forward_features"
        elif _is_torchvision_resnet(net):
            self.mode = "resnet"
        elif isinstance(getattr(net, "features", None), nn.Module):
            self.mode = "features"
        else:
            self.mode = "forward"

    def forward_features(self, x: Tensor) -> Tensor:
        n = self.net
        if self.mode == "forward_features":
            y = n.forward_features(x)
        elif self.mode == "resnet":
            y = n.maxpool(n.relu(n.bn1(n.conv1(x))))
            y = n.layer4(n.layer3(n.layer2(n.layer1(y))))
        elif self.mode == "features":
            y = n.features(x)
        else:
            y = n(x)
        return _check_map(y, self.label)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


def parse_hub_spec(spec: str) -> tuple[str, str]:
    """``"REPO:ENTRY"`` -> ``(REPO, ENTRY)``, splitting at the last colon (REPO may hold ``:ref``)."""
    repo, sep, entry = spec.rpartition(":")
    if not sep or not repo or not entry:
        raise ValueError(
            f"hub model {spec!r}: expected hub:REPO:ENTRY, e.g. hub:pytorch/vision:v0.10.0:resnet50 "
            f"or hub:/path/to/dir:my_entry"
        )
    return repo, entry


def _hub_label(repo: str, local: bool) -> str:
    if local:
        return Path(repo).expanduser().resolve().name or "local"
    return re.sub(r"[^\w.\-]+", "_", repo)


def _hub_call(repo: str, entry: str, source: str, candidates: list[dict[str, Any]]) -> nn.Module:
    """``torch.hub.load`` with the first of ``candidates`` (keyword sets) that the entry accepts."""
    for kwargs in candidates:
        try:
            net = torch.hub.load(repo, entry, source=source, trust_repo=True, verbose=False, **kwargs)
            if not kwargs:
                logger.warning(
                    "hub entry %s:%s takes neither pretrained= nor weights=; its defaults decide", repo, entry
                )
            return net
        except TypeError as e:
            msg = str(e)
            if kwargs and "unexpected keyword argument" in msg and any(repr(k) in msg for k in kwargs):
                continue
            raise
    raise AssertionError("unreachable: the last candidate takes no keyword")


def build_hub(repo: str, entry: str, weights: str | Path | None = None, pretrained: bool = True) -> Backbone:
    """``hub:REPO:ENTRY`` as a backbone returning the net's last convolutional map.

    Args:
        repo: ``owner/name[:ref]`` on GitHub, or a local directory holding ``hubconf.py``.
        entry: the entry point (a function of ``hubconf.py``).
        weights: state-dict file loaded (strictly) into the net the entry builds without weights.
        pretrained: passed to the entry (``pretrained=`` or torchvision's ``weights=``);
            False gives a network built under a fixed seed.
    """
    if weights is not None and not pretrained:
        raise ValueError("weights= was given together with pretrained=False; pass one or the other")
    local = Path(repo).expanduser().is_dir()
    if not local and (repo.startswith(("/", ".", "~")) or "\\" in repo):
        raise FileNotFoundError(f"hub repository directory not found: {repo}")
    source = "local" if local else "github"
    repo_arg = str(Path(repo).expanduser().resolve()) if local else repo
    want = pretrained and weights is None
    candidates = [{"pretrained": want}, {"weights": "DEFAULT" if want else None}, {}]
    try:
        net = _seeded(_hub_call, repo_arg, entry, source, candidates)
    except (OSError, RuntimeError) as e:
        if local:
            raise
        raise RuntimeError(
            f"torch.hub could not load {repo}:{entry} ({type(e).__name__}: {e}). Without network access, "
            f"clone the repository elsewhere and pass its directory: hub:/path/to/clone:{entry}"
        ) from e
    if not isinstance(net, nn.Module):
        raise TypeError(f"hub entry {repo}:{entry} returned a {type(net).__name__}, not an nn.Module")
    origin = f"hub:{repo_arg}:{entry}"
    if weights is not None:
        path = Path(weights).expanduser()
        strict_load(net, read_weights(path))
        weights_id = sha256_file(path)
    else:
        weights_id = f"{'hub-pretrained' if pretrained else 'random-init'}:{origin}"
    net.requires_grad_(False).eval()
    label = f"hub:{_hub_label(repo, local)}:{entry}"
    feats = HubFeatures(net, label)
    channels, stride = _probe(feats)
    cfg = getattr(net, "pretrained_cfg", None) or {}
    info = BackboneInfo(
        channels=channels,
        stride=stride,
        mean=tuple(cfg.get("mean", _IMAGENET_MEAN)),
        std=tuple(cfg.get("std", _IMAGENET_STD)),
        default_size=1024,
        weights_source=origin,
    )
    return Backbone(feats, info, label, weights_id).eval()


@torch.no_grad()
def _probe(feats: nn.Module) -> tuple[int, int]:
    """``(channels, stride)`` of ``feats.forward_features`` measured on one zero ``256x256`` input."""
    param = next(iter(feats.parameters()), None)
    dev = param.device if param is not None else torch.device("cpu")
    y = feats.forward_features(torch.zeros(1, 3, _PROBE, _PROBE, device=dev))
    return int(y.shape[1]), max(1, round(_PROBE / y.shape[-1]))


# --------------------------------------------------------------------------------------------
# Dispatch


def _looks_like_file(spec: str) -> bool:
    return spec.lower().endswith(_FILE_SUFFIXES) or Path(spec).expanduser().is_file()


def create_backbone(name: str, weights: str | Path | None = None, pretrained: bool = True) -> Backbone:
    """Build the backbone named by a ``--model`` string.

    ``name`` is a registry name or alias (``BACKBONES.list()``), ``timm:NAME`` or
    ``hub:REPO:ENTRY``; ``weights`` overrides where the weights come from; ``pretrained=False``
    gives a seeded random network. The result is in eval mode with gradients off.

    Raises:
        KeyError: unknown registry or timm name (closest names suggested).
        ValueError: a file path or an unknown ``prefix:`` (the message says what to write instead).
    """
    spec = name.strip()
    prefix, sep, rest = spec.partition(":")
    if sep and prefix.lower() == "timm":
        return build_timm(rest, weights, pretrained)
    if sep and prefix.lower() == "hub":
        repo, entry = parse_hub_spec(rest)
        return build_hub(repo, entry, weights, pretrained)
    if spec in BACKBONES:
        return BACKBONES.create(spec, weights=weights, pretrained=pretrained)
    if _looks_like_file(spec):
        raise ValueError(
            f"--model {spec!r} is a file: a weights file does not say which architecture it belongs to "
            f"(a state dict holds only tensors; a pickled or TorchScript model runs only whole, giving "
            f"logits rather than its last-convolution map). Name the architecture and pass the file as "
            f"weights, e.g. --model timm:resnet50 --weights {spec} (or a registry name such as "
            f"'resnet50', or hub:REPO:ENTRY)."
        )
    if sep:
        raise ValueError(
            f"unknown model source {prefix!r} in {spec!r}: use a registry name "
            f"({', '.join(BACKBONES.list())}), timm:NAME or hub:REPO:ENTRY"
        )
    return BACKBONES.create(spec, weights=weights, pretrained=pretrained)
