"""MoCo v3 ViT-B/16 (Chen, Xie and He 2021), from the official pre-training checkpoint.

``https://dl.fbaipublicfiles.com/moco-v3/vit-b-300ep/vit-b-300ep.pth.tar`` (facebookresearch/moco-v3
CONFIG.md; no checksum published) is what ``main_moco.py`` saves: ``{'epoch', 'arch': 'vit_base',
'state_dict', 'optimizer', 'scaler'}`` with the ``DistributedDataParallel``-wrapped ``MoCo_ViT``'s
weights: ``module.base_encoder.*`` (the query ViT), ``module.momentum_encoder.*`` (the key ViT) and
``module.predictor.*``. The base encoder is timm 0.4.9's ``VisionTransformer`` (patch 16, 768 wide,
12 blocks, 12 heads, ``qkv_bias=True``, LayerNorm eps 1e-6) with a fixed 2-D sin-cos ``pos_embed``
(stored in the file) and its ``head`` replaced by the 3-layer projection MLP (``head.{0,1,3,4,6,7}``).

retrbench keeps ``module.base_encoder.*`` minus ``head.*``, which must be exactly the ViT layout
(:func:`~retrbench.backbones.vit.vit_layout`); the momentum encoder, the projection and prediction
MLPs are dropped, anything else is refused (``main_lincls.py``'s ``linear-vit-b-300ep.pth.tar``
included: it holds no ``base_encoder``). The weights load, every key, into timm's ``VisionTransformer``.

Map: the patch tokens after the final norm; native: the class token after it (timm 0.4.9's
``forward_features``, what MoCo v3's linear evaluation reads). Position embeddings: upstream runs at
224 only; other sizes resample the stored grid with timm's ``resample_abs_pos_embed``
(:data:`~retrbench.backbones.vit.SIZE_RULE`), what timm does for this network at any other size.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from torch import Tensor, nn

from ..utils.checkpoint import CheckpointError, read_checkpoint, tensor_mapping
from .base import BACKBONES, IMAGENET_MEAN, IMAGENET_STD
from .dino import make_dino_vit
from .vit import SIZE_RULE, TokenBackbone, build_token_backbone, check_layout, token_info, vit_layout

__all__ = ["MOCOV3_VITB", "build_mocov3", "mocov3_backbone_state_dict"]

_DIM, _DEPTH, _HEADS, _PATCH, _GRID = 768, 12, 12, 16, 14
_FILE = "vit-b-300ep.pth.tar"
_DROPPED = ("momentum_encoder.", "predictor.", "base_encoder.head.")

MOCOV3_VITB = token_info(
    label="MoCo v3 ViT-B/16",
    order=81,
    help="MoCo v3 ViT-B/16 (ImageNet-1k, self-supervised, 300 epochs): patch tokens (768 channels, patch 16), native = class token",
    channels=_DIM,
    patch=_PATCH,
    native="class token after the final LayerNorm (base encoder, before the projection MLP)",
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    weights_source=f"facebookresearch/moco-v3 {_FILE} (base encoder)",
    weights_file=_FILE,
    url=f"https://dl.fbaipublicfiles.com/moco-v3/vit-b-300ep/{_FILE}",
    sha256=None,  # not published
    licence="CC-BY-NC-4.0",
    card="mocov3.md",
)


def mocov3_backbone_state_dict(obj: object, path: str | Path, depth: int = _DEPTH) -> dict[str, Tensor]:
    """The base encoder's ViT weights (no ``head``) of a ``main_moco.py`` checkpoint object, layout-checked.

    Raises:
        CheckpointError: no ``state_dict``, another ``arch``, no ``base_encoder``, keys outside the
            groups above, or a ViT layout other than ViT-B/16's.
    """
    if not isinstance(obj, Mapping) or "state_dict" not in obj:
        found = f"keys {sorted(obj)[:8]}" if isinstance(obj, Mapping) else f"a {type(obj).__name__}"
        raise CheckpointError(
            f"{path}: not a MoCo v3 pre-training checkpoint: expected {{'epoch', 'arch', 'state_dict', ...}} "
            f"as main_moco.py saves it; found {found}"
        )
    arch = obj.get("arch")
    if arch is not None and arch != "vit_base":
        raise CheckpointError(f"{path}: a MoCo v3 checkpoint of arch {arch!r}; mocov3_vitb needs 'vit_base' ({_FILE})")
    sd = tensor_mapping(obj["state_dict"], path, "under 'state_dict'")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    if not any(k.startswith("base_encoder.") for k in sd):
        raise CheckpointError(
            f"{path}: no module.base_encoder.* keys: not a MoCo v3 pre-training checkpoint (a main_lincls.py "
            f"checkpoint such as linear-vit-b-300ep.pth.tar? use the pre-training file {_FILE})"
        )
    stray = [k for k in sd if not k.startswith(("base_encoder.", *_DROPPED))]
    if stray:
        raise CheckpointError(
            f"{path}: {len(stray)} keys outside module.base_encoder / momentum_encoder / predictor, which a MoCo v3 "
            f"pre-training checkpoint does not have: {', '.join(repr(k) for k in stray[:8])}"
        )
    backbone = {k[len("base_encoder.") :]: v for k, v in sd.items() if k.startswith("base_encoder.") and not k.startswith(_DROPPED[2])}
    check_layout(backbone, vit_layout(_DIM, depth, _PATCH, _GRID, 4 * _DIM), path, "MoCo v3 ViT-B/16 base encoder")
    return backbone


def build_mocov3(weights: str | Path | None = None, pretrained: bool = True, *, depth: int = _DEPTH) -> TokenBackbone:
    """MoCo v3 ViT-B/16: map = patch tokens, native = class token (``depth``: tests only).

    ``weights``: ``vit-b-300ep.pth.tar`` (None: the weights cache, then the published URL).
    """

    def read(path: Path, vit: nn.Module) -> dict[str, Tensor]:
        return mocov3_backbone_state_dict(read_checkpoint(path, fmt="MoCo v3"), path, depth)

    make = lambda: make_dino_vit(_DIM, depth, _HEADS)  # noqa: E731  (timm 0.4.9's vit_base: DINO's configuration)
    return build_token_backbone("mocov3_vitb", MOCOV3_VITB, make, SIZE_RULE, read, weights, pretrained)


@BACKBONES.register("mocov3_vitb", aliases=("mocov3", "moco_v3_vitb", "mocov3_vitb16"), info=MOCOV3_VITB)
def _factory(weights: str | Path | None = None, pretrained: bool = True) -> TokenBackbone:
    return build_mocov3(weights, pretrained)
