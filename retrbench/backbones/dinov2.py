"""DINOv2 ViT-S/B/L/g 14, with and without 4 registers, from the official ``*_pretrain.pth`` files.

The files (``https://dl.fbaipublicfiles.com/dinov2/dinov2_vit{s,b,l,g}14/dinov2_vit?14[_reg4]_pretrain.pth``,
what facebookresearch/dinov2's ``hubconf.py`` loads) are bare state dicts of
``DinoVisionTransformer`` (``img_size=518``, patch 14, ``block_chunks=0``, ``init_values=1.0``):
``cls_token``, ``pos_embed`` (1 + 37 x 37 positions), ``register_tokens`` (``_reg4`` only),
``mask_token``, ``patch_embed.proj``, ``blocks.N.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp,
ls2.gamma}``, ``norm``; the MLP is ``mlp.fc1`` / ``mlp.fc2`` (GELU, 4x), except ViT-g whose SwiGLU is
``mlp.w12`` (2 x 4096) / ``mlp.w3`` (``hidden = (int(6144 * 2 / 3) + 7) // 8 * 8 = 4096``). The file
must hold exactly these keys and shapes (:func:`dinov2_layout`); ``mask_token`` (used only in training)
is checked and dropped, the rest is renamed by timm's ``checkpoint_filter_fn`` (``register_tokens`` ->
``reg_token``, the class position folded into ``cls_token``, ``w12`` / ``w3`` -> ``fc1`` / ``fc2``) and
loaded, every key, into timm's ``VisionTransformer``.

Map: the patch tokens after the final norm (``x_norm_patchtokens``); native: the class token after
it (``x_norm_clstoken``). Position embeddings: :data:`~retrbench.backbones.vit.DINO_RULE` without
registers, :data:`~retrbench.backbones.vit.SIZE_RULE` with (the hub entries' settings). Inputs: the
resize-to-multiple-of-14 rule of :mod:`retrbench.backbones.vit`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

from torch import Tensor, nn

from ..utils.checkpoint import read_state_dict
from .base import BACKBONES, IMAGENET_MEAN, IMAGENET_STD, BackboneInfo
from .vit import (
    DINO_RULE,
    SIZE_RULE,
    TokenBackbone,
    build_token_backbone,
    check_layout,
    mlp_ratio_for,
    token_info,
    torch_hub_file,
    vit_layout,
)

__all__ = ["DINOV2_INFO", "DINOV2_SPECS", "DinoV2Spec", "build_dinov2", "dinov2_layout", "make_dinov2_vit"]

_URL = "https://dl.fbaipublicfiles.com/dinov2"
_GRID = 37  # 518 / 14: the position-embedding grid of every released file
_PATCH = 14


def swiglu_hidden(hidden: int) -> int:
    """DINOv2's ``SwiGLUFFNFused`` width for a nominal MLP width: ``(int(hidden * 2 / 3) + 7) // 8 * 8``."""
    return (int(hidden * 2 / 3) + 7) // 8 * 8


@dataclass(frozen=True)
class DinoV2Spec:
    """One DINOv2 architecture: ``arch`` in s / b / l / g, width, depth, heads, register tokens."""

    arch: str
    dim: int
    depth: int
    heads: int
    registers: int = 0

    @property
    def name(self) -> str:
        return f"dinov2_vit{self.arch}14" + (f"_reg{self.registers}" if self.registers else "")

    @property
    def swiglu(self) -> bool:
        return self.arch == "g"

    @property
    def mlp_hidden(self) -> int:
        """Hidden width of one MLP branch (ViT-g: of the SwiGLU, whose ``w12`` is twice that)."""
        return swiglu_hidden(4 * self.dim) if self.swiglu else 4 * self.dim

    @property
    def file(self) -> str:
        return f"{self.name}_pretrain.pth"

    @property
    def url(self) -> str:
        return f"{_URL}/dinov2_vit{self.arch}14/{self.file}"


_ARCHS = {"s": (384, 12, 6, "S"), "b": (768, 12, 12, "B"), "l": (1024, 24, 16, "L"), "g": (1536, 40, 24, "g")}
DINOV2_SPECS: dict[str, DinoV2Spec] = {
    s.name: s for a, (d, n, h, _) in _ARCHS.items() for s in (DinoV2Spec(a, d, n, h), DinoV2Spec(a, d, n, h, 4))
}
"""Registry name -> architecture, for the eight released backbones."""


def dinov2_layout(spec: DinoV2Spec) -> dict[str, tuple[int, ...]]:
    """Names and shapes of ``dinov2_vit?14[_reg4]_pretrain.pth`` (see the module docstring)."""
    out = vit_layout(spec.dim, spec.depth, _PATCH, _GRID, spec.mlp_hidden, swiglu=spec.swiglu, layer_scale=True)
    out["mask_token"] = (1, spec.dim)
    if spec.registers:
        out["register_tokens"] = (1, spec.registers, spec.dim)
    return out


def make_dinov2_vit(spec: DinoV2Spec) -> nn.Module:
    """timm's ``VisionTransformer`` configured as ``DinoVisionTransformer`` (the ``vit_*_patch14[_reg4]_dinov2`` models)."""
    from timm.layers import SwiGLUPacked
    from timm.models.vision_transformer import VisionTransformer

    kw: dict = dict(
        img_size=_GRID * _PATCH,
        patch_size=_PATCH,
        embed_dim=spec.dim,
        depth=spec.depth,
        num_heads=spec.heads,
        mlp_ratio=4.0,
        qkv_bias=True,
        init_values=1.0,  # LayerScale, initialised as the hub entries do (the file overwrites it)
        num_classes=0,
        global_pool="token",
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        act_layer=nn.GELU,
    )
    if spec.swiglu:  # packed [w1; w2] -> silu(x1) * x2 -> w3, timm's SwiGLUPacked with fc1 of 2 * hidden
        kw.update(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU, mlp_ratio=mlp_ratio_for(spec.dim, 2 * spec.mlp_hidden))
    if spec.registers:  # timm folds the class position into cls_token; registers carry no position
        kw.update(reg_tokens=spec.registers, no_embed_class=True)
    return VisionTransformer(**kw)


def _which(sd: dict[str, Tensor]) -> str:
    """A hint naming the entry whose layout a DINOv2-like file has, when it is another one."""
    cls = sd.get("cls_token")
    if cls is None or cls.dim() != 3:
        return "expected a DINOv2 backbone file (dinov2_vit?14[_reg4]_pretrain.pth, a bare state dict)"
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    regs = sd["register_tokens"].shape[1] if "register_tokens" in sd and sd["register_tokens"].dim() == 3 else 0
    for spec in DINOV2_SPECS.values():
        if (spec.dim, spec.depth, spec.registers) == (cls.shape[-1], depth, regs):
            return f"the file looks like {spec.file}: use the entry {spec.name}"
    return f"the file has width {cls.shape[-1]}, {depth} blocks and {regs} register tokens, which no DINOv2 entry has"


def _reader(spec: DinoV2Spec):
    def read(path: Path, vit: nn.Module) -> dict[str, Tensor]:
        from timm.models.vision_transformer import checkpoint_filter_fn

        sd = read_state_dict(path, fmt="DINOv2")
        check_layout(sd, dinov2_layout(spec), path, f"DINOv2 {spec.name}", hint=_which(sd))
        return checkpoint_filter_fn(dict(sd), vit)  # (a copy: the filter pops keys)

    return read


def _info(spec: DinoV2Spec, order: int) -> BackboneInfo:
    arch = f"ViT-{_ARCHS[spec.arch][3]}/14"
    reg = f" reg{spec.registers}" if spec.registers else ""
    return token_info(
        label=f"DINOv2 {arch}{reg}",
        order=order,
        help=f"DINOv2 {arch}{' with 4 registers' if spec.registers else ''} (LVD-142M, self-supervised): "
        f"patch tokens ({spec.dim} channels, patch 14), native = class token",
        channels=spec.dim,
        patch=_PATCH,
        native="class token after the final LayerNorm (x_norm_clstoken)",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        weights_source=f"facebookresearch/dinov2 {spec.file}",
        weights_file=spec.file,
        url=spec.url,
        sha256=None,  # not published
        licence="Apache-2.0",
        card="dinov2.md",
        find_local=torch_hub_file(spec.file),
    )


DINOV2_INFO: dict[str, BackboneInfo] = {
    name: _info(spec, 84 + "sblg".index(spec.arch)) for name, spec in DINOV2_SPECS.items()
}


def build_dinov2(
    spec: DinoV2Spec, weights: str | Path | None = None, pretrained: bool = True, *, info: BackboneInfo | None = None
) -> TokenBackbone:
    """A DINOv2 backbone for ``spec`` (any depth, for tests): map = patch tokens, native = class token.

    Args:
        weights: a ``dinov2_vit?14[_reg4]_pretrain.pth`` file; None: torch.hub's cache, the
            weights cache, then the published URL.
        pretrained: False gives a seeded random network (``weights_id="random-init"``).

    Raises:
        CheckpointError: the file is not this entry's layout (the message names the entry it fits).
    """
    rule = SIZE_RULE if spec.registers else DINO_RULE
    info = info or DINOV2_INFO.get(spec.name) or _info(spec, 84)
    return build_token_backbone(spec.name, info, lambda: make_dinov2_vit(spec), rule, _reader(spec), weights, pretrained)


def _register(name: str) -> None:
    spec = DINOV2_SPECS[name]
    aliases = (name.replace("_reg4", "_reg"),) if spec.registers else ()

    @BACKBONES.register(name, aliases=aliases, info=DINOV2_INFO[name])
    def factory(weights: str | Path | None = None, pretrained: bool = True) -> TokenBackbone:
        return build_dinov2(spec, weights, pretrained)


for _name in DINOV2_SPECS:
    _register(_name)
