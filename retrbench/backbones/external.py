"""Models outside the registry, built by :data:`~retrbench.backbones.BACKBONES` resolvers.

``BACKBONES.create(name, weights=..., pretrained=...)`` sends these names here:

* ``timm:NAME`` (``timm:resnet50``, ``timm:convnext_tiny.fb_in1k``): ``timm.create_model(NAME,
  num_classes=0)``; weights from ``weights`` (a timm-style state dict as ``.pth`` / ``.pt`` /
  ``.bin`` / ``.safetensors``, flat or under ``state_dict`` / ``model`` / ``state_dict_ema``;
  the classifier named in the model's ``pretrained_cfg`` may be present or not), else timm's
  own download (fails offline with a message saying what to do), or a seeded random init with
  ``pretrained=False``. Mean / std and default size come from the model's ``pretrained_cfg``;
  the map is ``forward_features`` (``num_features`` channels, stride from ``feature_info``);
  ``NHWC`` outputs (``output_fmt``) are permuted to ``NCHW``.
  Token models (timm models with a ``patch_embed`` and ``num_prefix_tokens``: ViT, DeiT, EVA,
  SigLIP ...) are built with ``dynamic_img_size=True`` (timm's own position-embedding resampling,
  ``resample_abs_pos_embed``), take inputs by the resize-to-multiple-of-the-patch rule of
  :mod:`retrbench.backbones.vit`, and give their ``forward_features`` tokens as a map: the
  ``num_prefix_tokens`` class / register tokens dropped, the rest reshaped to the patch grid.
  They also have ``native``: timm's ``forward_head(tokens, pre_logits=True)``, the model's pooled
  embedding (the class token after the final norm for ``global_pool='token'``; SigLIP, which has no
  class token, its attention-pool head ``attn_pool``; ``avg`` models the mean patch token, with
  ``fc_norm``). A model whose tokens cannot be laid out so is refused at its first forward.
* ``hf-hub:ORG/REPO`` (``hf-hub:timm/resnet50.a1_in1k``): a timm model published on the
  Hugging Face Hub, ``timm.create_model("hf-hub:ORG/REPO", num_classes=0)``; everything else
  as for ``timm:``. The architecture comes from the repository's ``config.json``, so even
  ``pretrained=False`` or ``weights=`` read the Hub. Files are cached by ``huggingface_hub``
  under its conventions (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
  ``~/.cache/huggingface/hub``); offline, a repository not in that cache fails with a message
  saying how to fetch it elsewhere.
* ``hub:REPO:ENTRY`` (``hub:pytorch/vision:v0.10.0:resnet50``, ``hub:/path/to/dir:my_net``):
  ``torch.hub.load(REPO, ENTRY)`` (``weights`` as for ``timm:``, ``FILE#KEY`` included),
  ``source='local'`` when REPO is a directory (its
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

Weights nested under another top-level key are picked with ``FILE#KEY``: ``--weights
ckpt.pth#teacher`` (``weights="ckpt.pth#teacher"`` in Python) reads the mapping under
``teacher``, for ``timm:``, ``hf-hub:`` and ``hub:`` alike. A path that is an existing file is
read whole, ``#`` and all. ``weights_id`` is the file's sha256, plus ``#KEY`` when one is given.

Backbone names (and table labels) are ``timm:NAME``, ``hf-hub:ORG/REPO`` and
``hub:<repo>:ENTRY`` with ``<repo>`` the directory's base name or ``owner_repo_ref``, free of
``/``; the full origin is in ``weights_id``.
"""

from __future__ import annotations

import difflib
import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..utils.checkpoint import NESTED_KEYS, read_state_dict, weights_digest
from .base import (
    BACKBONES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    INPUT_RESIZE_TO_PATCHES,
    Backbone,
    BackboneInfo,
    refuse_weights_with_random,
    seeded,
)
from .vit import TokenBackbone, fit_to_patches, patch_grid, tokens_to_map
from .weights import strict_load

__all__ = ["HubFeatures", "TimmFeatures", "build_hf_hub", "build_hub", "build_timm", "parse_hub_spec"]

logger = logging.getLogger(__name__)

_PROBE = 256  # side of the input used to measure a hub net's channels and stride
_RESOLVED_ORDER = 1000  # resolved models sort after every registry entry in tables
_FILE_SUFFIXES = (".pth", ".pt", ".tar", ".ckpt", ".bin", ".safetensors", ".pkl", ".pickle", ".onnx", ".zip", ".jit")


def _read_weights(path: str | Path) -> dict[str, Tensor]:
    """A state dict for an architecture named elsewhere: flat, under :data:`NESTED_KEYS` or the ``KEY``
    of a ``FILE#KEY`` path, ``module.`` stripped."""
    return read_state_dict(path, nested=NESTED_KEYS, strip="module.")


def _check_map(y: Tensor, who: str, channels: int | None = None) -> Tensor:
    if y.dim() != 4 or (channels is not None and y.shape[1] != channels):
        want = f"(B, {channels}, H, W)" if channels is not None else "(B, C, H, W)"
        raise ValueError(
            f"{who}: the feature extractor returned shape {tuple(y.shape)}, not a {want} map; supported are "
            f"convolutional models (whose last features are a spatial map) and timm token models (a patch_embed "
            f"and num_prefix_tokens, whose tokens are laid out on the patch grid)"
        )
    return y


@torch.no_grad()
def _probe(feats: nn.Module) -> tuple[int, int]:
    """``(channels, stride)`` of ``feats.forward_features`` measured on one zero ``256x256`` input."""
    param = next(iter(feats.parameters()), None)
    dev = param.device if param is not None else torch.device("cpu")
    y = feats.forward_features(torch.zeros(1, 3, _PROBE, _PROBE, device=dev))
    return int(y.shape[1]), max(1, round(_PROBE / y.shape[-1]))


# --------------------------------------------------------------------------------------------
# timm and hf-hub


class TimmFeatures(nn.Module):
    """A timm model (built with ``num_classes=0``) whose ``forward_features`` is given as ``(B, C, H, W)``.

    ``forward_features(x)``: ``(B, 3, H, W) -> (B, num_features, h, w)``: the model's map, or for a
    token model (``patch`` set) its patch tokens laid out on the patch grid after the input is
    fitted to the patch size; ``descriptor(x)``: ``(B, num_features)``, timm's pooled pre-logits
    features; ``forward(x)``: the model's own output.
    """

    def __init__(self, model: nn.Module, name: str) -> None:
        super().__init__()
        self.model = model
        self.name = name
        self.channels = int(model.num_features)
        self.nhwc = getattr(model, "output_fmt", "NCHW") == "NHWC"
        self.patch = _token_patch(model)

    def _fit(self, x: Tensor) -> Tensor:
        return fit_to_patches(x, self.patch) if self.patch is not None else x

    def _map(self, y: Tensor, x: Tensor) -> Tensor:
        if self.nhwc and y.dim() == 4:
            y = y.permute(0, 3, 1, 2)
        if y.dim() == 3 and self.patch is not None:
            pe = self.model.patch_embed
            size = tuple(x.shape[-2:])
            h, w = pe.dynamic_feat_size(size) if hasattr(pe, "dynamic_feat_size") else (size[0] // self.patch, size[1] // self.patch)
            try:
                y = tokens_to_map(y[:, int(self.model.num_prefix_tokens) :], int(h), int(w))
            except ValueError as e:
                raise ValueError(f"{self.name}: {e} (after {self.model.num_prefix_tokens} prefix tokens)") from e
        return _check_map(y, self.name, self.channels)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self._fit(x)
        return self._map(self.model.forward_features(x), x)

    def descriptor(self, x: Tensor) -> Tensor:
        return self.model.forward_head(self.model.forward_features(self._fit(x)), pre_logits=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def _token_patch(model: nn.Module) -> int | None:
    """The input multiple of a timm token model (its total reduction, the patch size for a ViT), or None."""
    pe = getattr(model, "patch_embed", None)
    if not isinstance(pe, nn.Module) or getattr(model, "num_prefix_tokens", None) is None:
        return None
    info = getattr(model, "feature_info", None)
    if info:
        return int(info[-1]["reduction"])
    size = getattr(pe, "patch_size", None)
    return int(size[0] if isinstance(size, (tuple, list)) else size) if size else None


def _create_timm(model_id: str, **kw: Any) -> nn.Module:
    """``timm.create_model(model_id, dynamic_img_size=True, **kw)``, or without ``dynamic_img_size``
    for models that do not take it (convolutional ones)."""
    import timm

    try:
        return timm.create_model(model_id, dynamic_img_size=True, **kw)
    except TypeError as e:
        if "dynamic_img_size" not in str(e):
            raise
        return timm.create_model(model_id, **kw)


def _timm_classifier_patterns(model: nn.Module) -> tuple[str, ...]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(rf"^{re.escape(n)}\." for n in names)


def _hf_hub_failure(repo: str, what: str, e: Exception) -> RuntimeError:
    return RuntimeError(
        f"hf-hub:{repo}: could not fetch {what} from the Hugging Face Hub ({type(e).__name__}: {e}). "
        f"Hub files are cached by huggingface_hub ($HF_HUB_CACHE, else $HF_HOME/hub, else "
        f"~/.cache/huggingface/hub). Without network access, fetch the repository on a machine that has it "
        f"(hf download {repo}, or huggingface-cli download with older huggingface_hub) and copy that cache here (set HF_HUB_OFFLINE=1 to use it without "
        f"trying the network), or name the architecture with timm:ARCH and pass the weights file with "
        f"--weights PATH (weights=PATH in Python)."
    )


def _timm_backbone(model_id: str, name: str, weights: str | Path | None, pretrained: bool) -> Backbone:
    """The backbone of ``timm.create_model(model_id, num_classes=0)`` named ``name`` (also its label)."""

    hf_repo = model_id.removeprefix("hf-hub:") if model_id.startswith("hf-hub:") else None
    if not pretrained:
        refuse_weights_with_random(weights)
    if weights is not None or not pretrained:
        try:
            model = seeded(lambda: _create_timm(model_id, pretrained=False, num_classes=0))
        except Exception as e:
            if hf_repo is None:
                raise
            raise _hf_hub_failure(hf_repo, "the model's config.json", e) from e
        if weights is not None:
            strict_load(model, _read_weights(weights), ignore=_timm_classifier_patterns(model))
            weights_id = weights_digest(weights)
        else:
            weights_id = "random-init"
    else:
        try:
            model = _create_timm(model_id, pretrained=True, num_classes=0)
        except Exception as e:
            if hf_repo is not None:
                raise _hf_hub_failure(hf_repo, "the model's config and weights", e) from e
            raise RuntimeError(
                f"timm could not fetch the pretrained weights of {model_id!r} ({type(e).__name__}: {e}). "
                f"Without network access, download them on another machine and pass the file with "
                f"--weights PATH (weights=PATH in Python; a timm state dict as .pth or .safetensors, "
                f"PATH#KEY when it is nested under KEY), "
                f"or use pretrained=False for a random network."
            ) from e
        cfg = model.pretrained_cfg or {}
        weights_id = f"timm-pretrained:{cfg.get('hf_hub_id') or cfg.get('url') or model_id}:{cfg.get('tag') or ''}"
    model.requires_grad_(False).eval()
    cfg = getattr(model, "pretrained_cfg", None) or {}
    feature_info = getattr(model, "feature_info", None)
    if feature_info:
        stride = int(feature_info[-1]["reduction"])
    else:
        stride = _probe(TimmFeatures(model, name))[1]
    source = "timm hf-hub" if hf_repo is not None else "timm"
    feats = TimmFeatures(model, name)
    tokens = {}
    if feats.patch is not None:
        stride = feats.patch
        pool = getattr(model, "global_pool", "")
        tokens = dict(
            patch_size=feats.patch,
            input_rule=INPUT_RESIZE_TO_PATCHES,
            native_descriptor=f"timm forward_head(pre_logits=True) with global_pool={pool!r}"
            + (" (attention-pool head)" if pool == "map" else " (class token after the final norm)" if pool == "token" else ""),
            feature_size=lambda n, p=feats.patch: patch_grid(n, p),
        )
    info = BackboneInfo(
        label=name,
        order=_RESOLVED_ORDER,
        help=f"{source} model {model_id.removeprefix('hf-hub:')}",
        channels=int(model.num_features),
        stride=stride,
        mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(cfg.get("std", IMAGENET_STD)),
        default_size=int(max(cfg.get("input_size", (3, 224, 224))[1:])),
        weights_source=f"timm {model_id.removeprefix('hf-hub:')}"
        + (f" ({cfg.get('hf_hub_id')})" if cfg.get("hf_hub_id") else ""),
        licence=str(cfg.get("license", "")),
        **tokens,
    )
    cls = TokenBackbone if feats.patch is not None else Backbone
    return cls(feats, info, name, weights_id).eval()


@BACKBONES.resolver("timm:", help="any timm model by name (timm.list_models()), e.g. timm:resnet50.a1_in1k, timm:vit_base_patch16_siglip_224.webli")
def build_timm(name: str, weights: str | Path | None = None, pretrained: bool = True) -> Backbone:
    """``timm:NAME`` as a backbone returning ``forward_features`` as a map (token models: their patch tokens).

    Args:
        name: a timm model name, optionally with a pretrained tag (``resnet50.a1_in1k``).
        weights: a state-dict file for that architecture (classifier keys optional), or
            ``FILE#KEY`` for the mapping under ``KEY``; None with ``pretrained``: timm's own
            download (Hugging Face hub or URL).
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
    return _timm_backbone(name, f"timm:{name}", weights, pretrained)


@BACKBONES.resolver("hf-hub:", help="a timm model on the Hugging Face Hub, e.g. hf-hub:timm/resnet50.a1_in1k")
def build_hf_hub(repo: str, weights: str | Path | None = None, pretrained: bool = True) -> Backbone:
    """``hf-hub:ORG/REPO``: a timm model published on the Hugging Face Hub, as for ``timm:`` otherwise.

    Args:
        repo: ``ORG/REPO`` (optionally ``@revision``), a repository holding a timm ``config.json``.
        weights, pretrained: as for :func:`build_timm`; the config is read from the Hub (or its
            cache) in every case.

    Raises:
        ValueError: ``repo`` is not ``ORG/REPO``.
        RuntimeError: the Hub could not be reached and the repository is not cached; the message
            says how to fetch it on another machine or to use ``timm:ARCH --weights FILE``.
    """
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ValueError(f"hf-hub model {repo!r}: expected hf-hub:ORG/REPO, e.g. hf-hub:timm/resnet50.a1_in1k")
    return _timm_backbone(f"hf-hub:{repo}", f"hf-hub:{repo}", weights, pretrained)


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
        weights: state-dict file (or ``FILE#KEY``) loaded (strictly) into the net the entry
            builds without weights.
        pretrained: passed to the entry (``pretrained=`` or torchvision's ``weights=``);
            False gives a network built under a fixed seed.
    """
    if not pretrained:
        refuse_weights_with_random(weights)
    local = Path(repo).expanduser().is_dir()
    if not local and (repo.startswith(("/", ".", "~")) or "\\" in repo):
        raise FileNotFoundError(f"hub repository directory not found: {repo}")
    source = "local" if local else "github"
    repo_arg = str(Path(repo).expanduser().resolve()) if local else repo
    want = pretrained and weights is None
    candidates = [{"pretrained": want}, {"weights": "DEFAULT" if want else None}, {}]
    try:
        net = seeded(lambda: _hub_call(repo_arg, entry, source, candidates))
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
        strict_load(net, _read_weights(weights))
        weights_id = weights_digest(weights)
    else:
        weights_id = f"{'hub-pretrained' if pretrained else 'random-init'}:{origin}"
    net.requires_grad_(False).eval()
    label = f"hub:{_hub_label(repo, local)}:{entry}"
    feats = HubFeatures(net, label)
    channels, stride = _probe(feats)
    cfg = getattr(net, "pretrained_cfg", None) or {}
    info = BackboneInfo(
        label=label,
        order=_RESOLVED_ORDER,
        help=f"torch.hub entry {entry} of {repo}",
        channels=channels,
        stride=stride,
        mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(cfg.get("std", IMAGENET_STD)),
        default_size=1024,
        weights_source=origin,
    )
    return Backbone(feats, info, label, weights_id).eval()


@BACKBONES.resolver("hub:", help="a torch.hub entry point: hub:OWNER/REPO[:REF]:ENTRY or hub:/local/dir:ENTRY")
def build_hub_spec(spec: str, weights: str | Path | None = None, pretrained: bool = True) -> Backbone:
    """``hub:REPO:ENTRY`` (``spec`` is ``REPO:ENTRY``): see :func:`build_hub`."""
    repo, entry = parse_hub_spec(spec)
    return build_hub(repo, entry, weights, pretrained)


# --------------------------------------------------------------------------------------------
# Files are not models


def _looks_like_file(spec: str) -> bool:
    return spec.lower().endswith(_FILE_SUFFIXES) or Path(spec).expanduser().is_file()


@BACKBONES.resolver(
    match=_looks_like_file,
    help="a weights file (net.pth) is not a model: name the architecture and pass the file with --weights",
)
def refuse_file(spec: str, **_: Any) -> Backbone:
    """A ``--model`` that is a file: refused with what to write instead (always raises ``ValueError``)."""
    raise ValueError(
        f"--model {spec!r} is a file: a weights file does not say which architecture it belongs to "
        f"(a state dict holds only tensors; a pickled or TorchScript model runs only whole, giving "
        f"logits rather than its last-convolution map). Name the architecture and pass the file as "
        f"weights, e.g. --model timm:resnet50 --weights {spec} (or a registry name such as "
        f"'resnet50', or hub:REPO:ENTRY)."
    )
