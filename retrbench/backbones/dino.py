"""DINO ViT-S/16 and ViT-B/16 (Caron et al. 2021), from the official backbone files.

The files (``https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth``
and ``.../dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth``, what facebookresearch/dino's
``hubconf.py`` loads with ``strict=True``) are bare state dicts of DINO's ``VisionTransformer``
(``num_classes=0``, patch 16, ``qkv_bias=True``, LayerNorm eps 1e-6, no layer scale): ``cls_token``,
``pos_embed`` (1 + 14 x 14), ``patch_embed.proj``, ``blocks.N.{norm1, attn.qkv, attn.proj, norm2,
mlp.fc1, mlp.fc2}``, ``norm``, the names of timm's ``VisionTransformer``, which they load into with
every key (after the exact layout check of :func:`~retrbench.backbones.vit.vit_layout`).

Map: the patch tokens after the final norm; native: the class token after it (what DINO's
``VisionTransformer.forward`` returns and its retrieval evaluation uses). Position embeddings:
DINO's own ``interpolate_pos_encoding`` (:data:`~retrbench.backbones.vit.DINO_RULE`, +0.1 offset).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from torch import Tensor, nn

from ..utils.checkpoint import read_state_dict
from .base import BACKBONES, IMAGENET_MEAN, IMAGENET_STD, BackboneInfo
from .vit import DINO_RULE, TokenBackbone, build_token_backbone, check_layout, token_info, torch_hub_file, vit_layout

__all__ = ["DINO_ARCH", "DINO_INFO", "build_dino", "dino_layout", "make_dino_vit"]

_PATCH, _GRID = 16, 14

DINO_ARCH: dict[str, tuple[int, int, int, str, str]] = {
    # name: (width, depth, heads, upstream tag, label)
    "dino_vits16": (384, 12, 6, "dino_deitsmall16", "ViT-S/16"),
    "dino_vitb16": (768, 12, 12, "dino_vitbase16", "ViT-B/16"),
}


def dino_layout(dim: int, depth: int) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a DINO backbone file (``*16_pretrain.pth``)."""
    return vit_layout(dim, depth, _PATCH, _GRID, 4 * dim)


def make_dino_vit(dim: int, depth: int, heads: int) -> nn.Module:
    """timm's ``VisionTransformer`` configured as DINO's ``vit_small`` / ``vit_base`` (patch 16)."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=_GRID * _PATCH,
        patch_size=_PATCH,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        mlp_ratio=4.0,
        qkv_bias=True,
        num_classes=0,
        global_pool="token",
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        act_layer=nn.GELU,
    )


def _info(name: str) -> BackboneInfo:
    dim, _, _, tag, arch = DINO_ARCH[name]
    file = f"{tag}_pretrain.pth"
    return token_info(
        label=f"DINO {arch}",
        order=82 + (dim > 384),
        help=f"DINO {arch} (ImageNet-1k, self-supervised): patch tokens ({dim} channels, patch 16), native = class token",
        channels=dim,
        patch=_PATCH,
        native="class token after the final LayerNorm (DINO's VisionTransformer.forward)",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        weights_source=f"facebookresearch/dino {file} (teacher backbone)",
        weights_file=file,
        url=f"https://dl.fbaipublicfiles.com/dino/{tag}_pretrain/{file}",
        sha256=None,  # not published
        licence="Apache-2.0",
        card="dino.md",
        find_local=torch_hub_file(file),
    )


DINO_INFO: dict[str, BackboneInfo] = {name: _info(name) for name in DINO_ARCH}


def build_dino(name: str, weights: str | Path | None = None, pretrained: bool = True, *, depth: int | None = None) -> TokenBackbone:
    """A DINO backbone (``dino_vits16`` / ``dino_vitb16``): map = patch tokens, native = class token.

    ``depth`` overrides the number of blocks (tests only). ``weights``: the backbone file; None:
    torch.hub's cache, the weights cache, then the published URL.
    """
    dim, full_depth, heads, _, _ = DINO_ARCH[name]
    depth = depth or full_depth

    def read(path: Path, vit: nn.Module) -> dict[str, Tensor]:
        sd = read_state_dict(path, fmt="DINO")
        others = [n for n, (d, *_) in DINO_ARCH.items() if n != name and "cls_token" in sd and sd["cls_token"].shape[-1] == d]
        hint = (
            f"the file looks like {DINO_INFO[others[0]].weights_file}: use the entry {others[0]}"
            if others
            else f"expected {DINO_INFO[name].weights_file}, a bare state dict of DINO's backbone"
        )
        check_layout(sd, dino_layout(dim, depth), path, f"DINO {name}", hint=hint)
        return sd

    return build_token_backbone(name, DINO_INFO[name], lambda: make_dino_vit(dim, depth, heads), DINO_RULE, read, weights, pretrained)


def _register(name: str) -> None:
    @BACKBONES.register(name, info=DINO_INFO[name])
    def factory(weights: str | Path | None = None, pretrained: bool = True) -> TokenBackbone:
        return build_dino(name, weights, pretrained)


for _name in DINO_ARCH:
    _register(_name)
