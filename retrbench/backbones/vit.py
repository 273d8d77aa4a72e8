"""Vision transformers as backbones: the patch tokens as a map, the class token as the native descriptor.

The contract every token model here keeps (registry entries and ``timm:`` / ``open_clip:`` names):

* ``backbone(x)``: ``(B, 3, H, W)`` normalised images -> ``(B, C, h, w)``: the patch tokens after
  the final norm, class and register tokens removed, one cell per patch in row-major order, so
  every pooling (MAC, SPoC, GeM, R-MAC, multi-scale) works on it as on a convolutional map.
* ``backbone.native(x)``: ``(B, D)``, the model's own global descriptor (for DINO, DINOv2 and MoCo v3
  the class token after the final norm; each entry's ``BackboneInfo.native_descriptor`` says which).

**Input rule** (:data:`~retrbench.backbones.base.INPUT_RESIZE_TO_PATCHES`, one rule for every token
model): the normalised batch is resized bilinearly (``align_corners=False``, no antialiasing) so that
each side is the nearest multiple of the patch size, ``p * max(1, floor(n / p + 1/2))``, and left
alone when it already is one. The whole image is kept (no crop, no padding token that pooling would
average in); the aspect ratio changes by less than half a patch per side. Resizing after
normalisation equals normalising after resizing (bilinear weights sum to one). The map has
``max(1, floor(n / p + 1/2))`` cells per side (``BackboneInfo.map_side``).

**Position embeddings** are resampled from the checkpoint's grid to the input's grid by the rule of
each family's own code (:class:`PosEmbedRule`), in float32:

* :data:`DINO_RULE`: DINO's and DINOv2's ``interpolate_pos_encoding`` (``interpolate_offset=0.1``,
  ``interpolate_antialias=False``): bicubic with ``scale_factor=((h + 0.1) / M, (w + 0.1) / M)``;
  the output is ``(h, w)`` but the sampling positions follow the scale factor, so it differs from
  resizing to ``size=(h, w)``.
* :data:`SIZE_RULE`: bicubic to ``size=(h, w)`` with antialiasing: timm's
  ``resample_abs_pos_embed``, open_clip's ``resize_pos_embed``, and DINOv2 *with registers*
  (whose hub entries set ``interpolate_offset=0.0``, ``interpolate_antialias=True``).

The grid is left untouched when the input's grid is the checkpoint's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..utils.checkpoint import CheckpointError, preview_keys, weights_digest
from ..utils.paths import weights_cache_dir
from .base import (
    INPUT_RESIZE_TO_PATCHES,
    Backbone,
    BackboneInfo,
    finish,
    new_network,
    refuse_weights_with_random,
)
from .weights import load_into, resolve_weights

__all__ = [
    "DINO_RULE",
    "SIZE_RULE",
    "PosEmbedRule",
    "TokenBackbone",
    "TokenViT",
    "build_token_backbone",
    "check_layout",
    "fit_to_patches",
    "mlp_ratio_for",
    "patch_grid",
    "random_vit",
    "token_info",
    "tokens_to_map",
    "torch_hub_file",
    "vit_layout",
    "weights_path",
]

_SHOW = 8  # keys listed per category in layout errors


def patch_grid(n: int, patch: int) -> int:
    """Patches along an input side of ``n`` pixels under the input rule: ``max(1, floor(n / patch + 1/2))``."""
    return max(1, (2 * n + patch) // (2 * patch))


def fit_to_patches(x: Tensor, patch: int) -> Tensor:
    """``(B, 3, H, W)`` -> ``(B, 3, p*h, p*w)`` with ``h, w = patch_grid(H), patch_grid(W)`` (bilinear; identity when already so)."""
    H, W = x.shape[-2:]
    size = (patch_grid(H, patch) * patch, patch_grid(W, patch) * patch)
    if size == (H, W):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


@dataclass(frozen=True)
class PosEmbedRule:
    """How a learned ``(M0, M1)`` grid of position embeddings becomes ``(h, w)``: bicubic ``F.interpolate``.

    Attributes:
        offset: > 0: DINO's kludge, ``scale_factor=((h + offset) / M0, (w + offset) / M1)``;
            0: ``size=(h, w)``.
        antialias: ``F.interpolate``'s ``antialias`` (changes only downsampling).
        name: how result rows and model cards name the rule.
    """

    offset: float
    antialias: bool
    name: str

    def resample(self, grid: Tensor, size: tuple[int, int]) -> Tensor:
        """``(1, C, M0, M1)`` -> ``(1, C, h, w)``, computed in float32 and returned in ``grid``'s dtype."""
        if tuple(grid.shape[-2:]) == tuple(size):
            return grid
        m0, m1 = grid.shape[-2:]
        if self.offset:
            kw: dict = {"scale_factor": ((size[0] + self.offset) / m0, (size[1] + self.offset) / m1)}
        else:
            kw = {"size": tuple(size)}
        out = F.interpolate(grid.float(), mode="bicubic", antialias=self.antialias, **kw)
        if tuple(out.shape[-2:]) != tuple(size):
            raise AssertionError(f"position embeddings resampled to {tuple(out.shape[-2:])}, not {tuple(size)}")
        return out.to(grid.dtype)


DINO_RULE = PosEmbedRule(0.1, False, "bicubic, scale (n + 0.1) / M, no antialias (DINO / DINOv2)")
SIZE_RULE = PosEmbedRule(0.0, True, "bicubic to size, antialias (timm, open_clip, DINOv2 with registers)")


def tokens_to_map(tokens: Tensor, h: int, w: int) -> Tensor:
    """``(B, h*w, C)`` patch tokens -> ``(B, C, h, w)`` (row-major patches)."""
    B, n, C = tokens.shape
    if n != h * w:
        raise ValueError(f"{n} patch tokens do not make a {h}x{w} grid")
    return tokens.transpose(1, 2).reshape(B, C, h, w)


class TokenViT(nn.Module):
    """A timm ``VisionTransformer`` run at any input size with its family's position-embedding rule.

    The embedding step is written here (patch projection, class / register tokens, resampled
    position embeddings, in timm's token order and with timm's ``no_embed_class`` convention);
    everything after it is the timm model's own modules (``pos_drop``, ``patch_drop``,
    ``norm_pre``, ``blocks``, ``norm``, ``forward_head``).

    ``forward_features(x)``: ``(B, 3, H, W) -> (B, C, h, w)``; ``descriptor(x)`` (also ``forward``):
    ``(B, D)``, timm's ``forward_head`` of the tokens (the class token for ``global_pool='token'``,
    through ``head`` when the model has one, e.g. CLIP's projection).
    """

    def __init__(self, vit: nn.Module, rule: PosEmbedRule) -> None:
        super().__init__()
        if getattr(vit, "pos_embed", None) is None or not hasattr(vit, "num_prefix_tokens"):
            raise TypeError(f"{type(vit).__name__} is not a timm VisionTransformer with learned position embeddings")
        self.vit = vit
        self.rule = rule
        self.patch = int(vit.patch_embed.patch_size[0])
        self.grid = tuple(int(g) for g in vit.patch_embed.grid_size)  # the checkpoint's grid of position embeddings
        self.embedded_prefix = 0 if vit.no_embed_class else int(vit.num_prefix_tokens)

    def tokens(self, x: Tensor) -> tuple[Tensor, int, int]:
        """All tokens after the final norm ``(B, prefix + h*w, C)``, and the patch grid ``(h, w)``."""
        m = self.vit
        x = fit_to_patches(x, self.patch)
        y = m.patch_embed.proj(x)  # (B, C, h, w)
        B, C, h, w = y.shape
        y = m.patch_embed.norm(y.flatten(2).transpose(1, 2))  # (B, h*w, C)
        n = self.embedded_prefix
        pos = m.pos_embed  # (1, n + M0*M1, C)
        grid = pos[:, n:].reshape(1, self.grid[0], self.grid[1], C).permute(0, 3, 1, 2)
        patch_pos = self.rule.resample(grid, (h, w)).permute(0, 2, 3, 1).reshape(1, h * w, C)
        prefix = [t.expand(B, -1, -1) for t in (m.cls_token, m.reg_token) if t is not None]
        if m.no_embed_class:  # prefix tokens carry no position embedding
            y = torch.cat([*prefix, y + patch_pos], dim=1)
        else:
            y = torch.cat([*prefix, y], dim=1) + torch.cat([pos[:, :n], patch_pos], dim=1)
        y = m.norm_pre(m.patch_drop(m.pos_drop(y)))
        return m.norm(m.blocks(y)), h, w

    def forward_features(self, x: Tensor) -> Tensor:
        y, h, w = self.tokens(x)
        return tokens_to_map(y[:, self.vit.num_prefix_tokens :], h, w)

    def descriptor(self, x: Tensor) -> Tensor:
        return self.vit.forward_head(self.tokens(x)[0])

    def forward(self, x: Tensor) -> Tensor:
        return self.descriptor(x)

    def extra_repr(self) -> str:
        return f"patch={self.patch}, grid={self.grid}, rule={self.rule.name!r}"


class TokenBackbone(Backbone):
    """A :class:`Backbone` over a token model: ``forward`` gives the patch-token map, ``native`` the
    model's own descriptor (``net.descriptor``; not L2-normalised here)."""

    def native(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W) -> (B, D)``: the descriptor named by ``info.native_descriptor``."""
        return self.net.descriptor(x)


def token_info(
    *, label: str, order: int, help: str, channels: int, patch: int, native: str, **kw: object
) -> BackboneInfo:
    """The :class:`BackboneInfo` of a token model: stride = patch, the input rule, the map side rule."""
    return BackboneInfo(
        label=label,
        order=order,
        help=help,
        channels=channels,
        stride=patch,
        patch_size=patch,
        input_rule=INPUT_RESIZE_TO_PATCHES,
        native_descriptor=native,
        feature_size=lambda n, p=patch: patch_grid(n, p),
        **kw,  # type: ignore[arg-type]
    )


# --------------------------------------------------------------------------------------------
# Checkpoint layouts


def vit_layout(
    dim: int,
    depth: int,
    patch: int,
    grid: int,
    mlp_hidden: int,
    *,
    swiglu: bool = False,
    layer_scale: bool = False,
) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a timm-style ViT trunk (the names DINO, DINOv2 and MoCo v3 checkpoints use).

    ``cls_token``, ``pos_embed`` (``1 + grid**2`` positions), ``patch_embed.proj``, per block
    ``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, the MLP (``mlp.fc1`` / ``mlp.fc2`` of
    ``mlp_hidden``, or with ``swiglu`` DINOv2's ``mlp.w12`` of ``2 * mlp_hidden`` / ``mlp.w3``),
    ``ls1.gamma`` / ``ls2.gamma`` with ``layer_scale``, and the final ``norm``.
    """
    out: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, 1 + grid * grid, dim),
        "patch_embed.proj.weight": (dim, 3, patch, patch),
        "patch_embed.proj.bias": (dim,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        out.update({b + "norm1.weight": (dim,), b + "norm1.bias": (dim,)})
        out.update({b + "attn.qkv.weight": (3 * dim, dim), b + "attn.qkv.bias": (3 * dim,)})
        out.update({b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,)})
        if layer_scale:
            out[b + "ls1.gamma"] = (dim,)
        out.update({b + "norm2.weight": (dim,), b + "norm2.bias": (dim,)})
        if swiglu:
            out.update({b + "mlp.w12.weight": (2 * mlp_hidden, dim), b + "mlp.w12.bias": (2 * mlp_hidden,)})
            out.update({b + "mlp.w3.weight": (dim, mlp_hidden), b + "mlp.w3.bias": (dim,)})
        else:
            out.update({b + "mlp.fc1.weight": (mlp_hidden, dim), b + "mlp.fc1.bias": (mlp_hidden,)})
            out.update({b + "mlp.fc2.weight": (dim, mlp_hidden), b + "mlp.fc2.bias": (dim,)})
        if layer_scale:
            out[b + "ls2.gamma"] = (dim,)
    out.update({"norm.weight": (dim,), "norm.bias": (dim,)})
    return out


def check_layout(
    sd: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]], path: str | Path, what: str, hint: str = ""
) -> None:
    """Every key of ``expected`` in ``sd`` with its shape, and nothing else; else a CheckpointError.

    The message counts and lists missing, unexpected and reshaped keys, and ends with ``hint``
    (e.g. which entry a file of another size belongs to).
    """
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    reshaped = [k for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k])]
    if not (missing or unexpected or reshaped):
        return
    lines = [
        f"{path}: not a {what} checkpoint: {len(missing)} missing, {len(unexpected)} unexpected, "
        f"{len(reshaped)} with another shape (of {len(expected)} expected keys)"
    ]
    if missing:
        lines.append(f"  missing: {preview_keys(missing)}")
    if unexpected:
        lines.append(f"  unexpected: {preview_keys(unexpected)}")
    if reshaped:
        shapes = [f"{k}: {tuple(sd[k].shape)}, expected {tuple(expected[k])}" for k in reshaped[:_SHOW]]
        lines.append("  shapes: " + "; ".join(shapes) + (f" ... ({len(reshaped) - _SHOW} more)" if len(reshaped) > _SHOW else ""))
    if hint:
        lines.append(f"  {hint}")
    raise CheckpointError("\n".join(lines))


def torch_hub_file(name: str) -> Callable[[], Path | None]:
    """A ``find_local`` for a file that ``torch.hub.load_state_dict_from_url`` caches
    (``<torch.hub.get_dir()>/checkpoints/<name>``, i.e. ``$TORCH_HOME/hub/checkpoints``)."""

    def find() -> Path | None:
        p = Path(torch.hub.get_dir()) / "checkpoints" / name
        return p if p.is_file() else None

    return find


def mlp_ratio_for(dim: int, hidden: int) -> float:
    """An ``mlp_ratio`` for which timm's ``int(dim * mlp_ratio)`` is exactly ``hidden``."""
    ratio = (hidden + 0.5) / dim
    assert int(dim * ratio) == hidden and math.isfinite(ratio)
    return ratio


# --------------------------------------------------------------------------------------------
# Building a registry entry


def weights_path(info: BackboneInfo, weights: str | Path | None, how_to_get: str = "") -> Path:
    """The file to load: ``weights``; else the entry's ``find_local`` (another tool's cache); else
    :func:`~retrbench.backbones.weights.resolve_weights` (the weights cache, then the published URL)."""
    if weights is None and info.find_local is not None:
        found = info.find_local()
        if found is not None:
            return found
    try:
        return resolve_weights(info, weights, how_to_get=how_to_get)
    except OSError as e:
        if weights is not None or not info.url or isinstance(e, FileNotFoundError):
            raise
        raise RuntimeError(
            f"could not download {info.url} ({type(e).__name__}: {e}). Without network access, download it on "
            f"another machine and put it at {weights_cache_dir() / (info.weights_file or '')} (or set RETRBENCH_CACHE), "
            f"or pass its path with --weights PATH (weights=PATH in Python)."
        ) from e


def random_vit(make_vit: Callable[[], nn.Module], std: float = 0.02) -> nn.Module:
    """``make_vit()`` with seeded random values, the same every time, without timm's (slow) init.

    Built on the meta device, then filled from a generator seeded to 0: LayerNorm weights 1 and
    biases 0, LayerScale ``gamma`` 1, other biases 0, every other tensor (linear and patch
    weights, class / register tokens, position embeddings) ``N(0, std^2)``, timm's scale. Seconds
    for ViT-L where timm's truncated-normal init takes ~10 s on CPU.
    """
    if torch.empty(0).is_meta:  # built under torch.device("meta") (e.g. to count parameters): nothing to fill
        return make_vit()
    net = new_network(make_vit, pretrained=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in net.modules():
            for pname, p in module.named_parameters(recurse=False):
                if isinstance(module, nn.LayerNorm) or pname == "gamma":
                    p.fill_(1.0 if pname in ("weight", "gamma") else 0.0)
                elif pname == "bias":
                    p.zero_()
                else:
                    p.normal_(0.0, std, generator=g)
    return net


def build_token_backbone(
    name: str,
    info: BackboneInfo,
    make_vit: Callable[[], nn.Module],
    rule: PosEmbedRule,
    read: Callable[[Path, nn.Module], Mapping[str, Tensor]],
    weights: str | Path | None,
    pretrained: bool,
    how_to_get: str = "",
) -> TokenBackbone:
    """A :class:`TokenBackbone` over ``make_vit()``: seeded random (``pretrained=False``) or loaded.

    ``read(path, vit)`` reads the file, checks it is the family's upstream layout and returns it
    under the timm model's names; every key must then load (:func:`~retrbench.backbones.weights.load_into`).
    ``weights_id`` is the file's sha256.
    """
    if not pretrained:
        refuse_weights_with_random(weights)
        return finish(TokenViT(random_vit(make_vit), rule), info, name, "random-init", cls=TokenBackbone)
    path = weights_path(info, weights, how_to_get)
    vit = new_network(make_vit, pretrained=True)
    load_into(vit, read(path, vit), path)
    return finish(TokenViT(vit, rule), info, name, weights_digest(path), cls=TokenBackbone)
