"""OpenCLIP image towers by name: ``open_clip:ARCH:PRETRAINED`` (optional: ``pip install 'retrbench[clip]'``).

Names (label and backbone name are the name as given):

* ``open_clip:ViT-B-16:laion2b_s34b_b88k``: ``open_clip.create_model(ARCH, pretrained=PRETRAINED)``
  (``open_clip.list_pretrained()`` lists the pairs); open_clip downloads and caches the file.
* ``open_clip:hf-hub:ORG/REPO``: an open_clip model published on the Hugging Face Hub.
* ``open_clip:ARCH`` with ``weights=FILE`` (an open_clip / OpenAI-named state dict; its
  ``visual.*`` keys load, every one, into the image tower; the rest is ignored) or with
  ``pretrained=False`` (seeded random).

Only the image tower is kept. Supported towers:

* open_clip's ``VisionTransformer`` (OpenAI-style CLIP, LAION, DataComp, MetaCLIP ...): the map is
  the last block's patch tokens after ``ln_post`` and native is the image embedding
  (``encode_image``, not normalised), both from open_clip's own ``forward_intermediates``
  (``normalize_intermediates=True``). open_clip has no position-embedding resampling at run time;
  for each input the learned grid is resampled with its ``resize_pos_embed`` rule (bicubic to size,
  antialias: :data:`~retrbench.backbones.vit.SIZE_RULE`) and substituted for the call
  (``torch.func.functional_call``), so the model itself is never modified.
* ``TimmModel`` towers whose trunk is a timm ``VisionTransformer`` (SigLIP ...): the trunk runs as a
  :class:`~retrbench.backbones.vit.TokenViT` (:data:`~retrbench.backbones.vit.SIZE_RULE`); native is
  ``head(trunk.forward_head(tokens))``, what the tower's ``forward`` computes (SigLIP: the
  attention-pool output).

Other towers (ModifiedResNet, ConvNeXt ...) are refused. Inputs follow the resize-to-multiple-of-the-patch
rule of :mod:`retrbench.backbones.vit`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..utils.checkpoint import NESTED_KEYS, read_state_dict, weights_digest
from .base import BACKBONES, IMAGENET_MEAN, IMAGENET_STD, refuse_weights_with_random, seeded
from .vit import SIZE_RULE, TokenBackbone, TokenViT, fit_to_patches, token_info
from .weights import strict_load

__all__ = ["OpenClipTower", "build_open_clip", "parse_open_clip_spec"]

_ORDER = 1000  # resolved models sort after every registry entry


def parse_open_clip_spec(spec: str) -> tuple[str, str | None]:
    """``"ARCH:TAG"`` -> ``(ARCH, TAG)``; ``"ARCH"`` -> ``(ARCH, None)``; ``"hf-hub:ORG/REPO"`` -> ``(it, None)``."""
    if spec.startswith("hf-hub:"):
        return spec, None
    arch, sep, tag = spec.partition(":")
    if not arch or (sep and not tag):
        raise ValueError(f"open_clip model {spec!r}: expected open_clip:ARCH:PRETRAINED, e.g. open_clip:ViT-B-16:laion2b_s34b_b88k")
    return arch, tag or None


class _Intermediates(nn.Module):
    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual

    def forward(self, x: Tensor) -> dict[str, Any]:
        return self.visual.forward_intermediates(x, indices=1, normalize_intermediates=True, output_fmt="NCHW")


class OpenClipTower(nn.Module):
    """An open_clip ``VisionTransformer`` at any input size.

    ``forward_features(x)``: ``(B, 3, H, W) -> (B, width, h, w)``, last-block patch tokens after
    ``ln_post``; ``descriptor(x)`` (also ``forward``): ``(B, embed)`` image embedding.
    """

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        if not hasattr(visual, "forward_intermediates"):
            raise RuntimeError("this open_clip is too old: its VisionTransformer has no forward_intermediates; upgrade open-clip-torch")
        self.visual = visual
        self.call = _Intermediates(visual)
        self.patch = int(visual.conv1.kernel_size[0])
        self.grid = tuple(int(g) for g in visual.grid_size)

    def _run(self, x: Tensor) -> dict[str, Any]:
        x = fit_to_patches(x, self.patch)
        h, w = x.shape[-2] // self.patch, x.shape[-1] // self.patch
        pos = self.visual.positional_embedding  # (1 + M0*M1, C)
        grid = pos[1:].reshape(1, self.grid[0], self.grid[1], -1).permute(0, 3, 1, 2)
        patch_pos = SIZE_RULE.resample(grid, (h, w)).permute(0, 2, 3, 1).reshape(h * w, -1)
        new = torch.cat([pos[:1], patch_pos], dim=0)
        return torch.func.functional_call(self.call, {"visual.positional_embedding": new}, (x,))

    def forward_features(self, x: Tensor) -> Tensor:
        return self._run(x)["image_intermediates"][-1]

    def descriptor(self, x: Tensor) -> Tensor:
        return self._run(x)["image_features"]

    def forward(self, x: Tensor) -> Tensor:
        return self.descriptor(x)


class _TimmTower(nn.Module):
    """An open_clip ``TimmModel`` over a timm ViT: map from :class:`TokenViT`, native through the tower's head."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.tokens = TokenViT(visual.trunk, SIZE_RULE)
        self.head = visual.head

    def forward_features(self, x: Tensor) -> Tensor:
        return self.tokens.forward_features(x)

    def descriptor(self, x: Tensor) -> Tensor:
        return self.head(self.tokens.vit.forward_head(self.tokens.tokens(x)[0]))

    def forward(self, x: Tensor) -> Tensor:
        return self.descriptor(x)


def _tower(visual: nn.Module, name: str) -> tuple[nn.Module, int, int]:
    """``(tower, channels, patch)`` for an open_clip image tower; ``ValueError`` for unsupported ones."""
    from open_clip.transformer import VisionTransformer as OpenClipViT

    if isinstance(visual, OpenClipViT):
        t = OpenClipTower(visual)
        return t, int(visual.conv1.out_channels), t.patch
    trunk = getattr(visual, "trunk", None)
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(trunk, VisionTransformer) and getattr(trunk, "pos_embed", None) is not None:
        t = _TimmTower(visual)
        return t, int(trunk.num_features), t.tokens.patch
    raise ValueError(
        f"{name}: its image tower is a {type(visual).__name__}{f' over {type(trunk).__name__}' if trunk is not None else ''}; "
        f"only vision transformers (open_clip's VisionTransformer, or a timm VisionTransformer trunk) are supported"
    )


def build_open_clip(spec: str, weights: str | Path | None = None, pretrained: bool = True) -> TokenBackbone:
    """``open_clip:ARCH[:PRETRAINED]`` (``spec`` is the part after ``open_clip:``) as a token backbone.

    Raises:
        ImportError: open_clip is not installed (the message says how to install it).
        ValueError: a malformed name, no pretrained tag with ``pretrained=True`` and no weights,
            or an unsupported tower.
        RuntimeError: open_clip could not fetch the weights (offline); the message says to pass them.
    """
    try:
        import open_clip
    except ImportError as e:
        raise ImportError(
            "open_clip: models need the optional package open-clip-torch: pip install 'retrbench[clip]' "
            "(or pip install open-clip-torch)"
        ) from e
    arch, tag = parse_open_clip_spec(spec)
    name = f"open_clip:{spec}"
    if not pretrained:
        refuse_weights_with_random(weights)
    hub = arch.startswith("hf-hub:")
    fetch = pretrained and weights is None
    if fetch and tag is None and not hub:
        tags = [t for a, t in open_clip.list_pretrained() if a == arch]
        raise ValueError(f"{name}: name the pretrained weights, open_clip:{arch}:TAG (TAG one of {tags or 'none known'}), or pass weights=")
    try:
        if hub and not fetch:
            model = seeded(lambda: open_clip.create_model(arch, pretrained=None, load_weights=False))
        else:
            model = seeded(lambda: open_clip.create_model(arch, pretrained=tag if fetch else None))
    except RuntimeError as e:
        raise RuntimeError(
            f"{name}: open_clip could not build or fetch the model ({e}). Without network access, download the "
            f"weights elsewhere and pass the file with --weights PATH (open_clip:{arch} --weights FILE)."
        ) from e
    visual = model.visual
    if weights is not None:
        sd = read_state_dict(weights, nested=NESTED_KEYS, strip="module.")
        if any(k.startswith("visual.") for k in sd):
            sd = {k[len("visual.") :]: v for k, v in sd.items() if k.startswith("visual.")}
        strict_load(visual, sd)
        weights_id = weights_digest(weights)
    else:
        weights_id = f"open_clip-pretrained:{arch}:{tag or ''}" if pretrained else "random-init"
    tower, channels, patch = _tower(visual, name)
    cfg = getattr(visual, "preprocess_cfg", None) or {}
    mean = tuple(cfg.get("mean") or getattr(visual, "image_mean", None) or IMAGENET_MEAN)
    std = tuple(cfg.get("std") or getattr(visual, "image_std", None) or IMAGENET_STD)
    info = token_info(
        label=name,
        order=_ORDER,
        help=f"open_clip model {spec}",
        channels=channels,
        patch=patch,
        native="image embedding (encode_image, not normalised)",
        mean=mean,
        std=std,
        weights_source=f"open_clip {spec}",
    )
    tower.requires_grad_(False)
    return TokenBackbone(tower, info, name, weights_id).eval()


@BACKBONES.resolver("open_clip:", help="an OpenCLIP image tower: open_clip:ARCH:PRETRAINED or open_clip:hf-hub:ORG/REPO (needs open-clip-torch)")
def _resolve(spec: str, weights: str | Path | None = None, pretrained: bool = True) -> TokenBackbone:
    return build_open_clip(spec, weights, pretrained)
