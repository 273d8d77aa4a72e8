"""Independent references for the token backbones: the upstream forwards written out plainly.

Nothing here uses timm or retrbench. The modules carry the upstream attribute names, so their
``state_dict()`` *is* the upstream checkpoint layout:

* :class:`RefViT`: DINOv2's ``DinoVisionTransformer`` (``interp="dinov2"``: its
  ``interpolate_pos_encoding`` with ``interpolate_offset`` / ``interpolate_antialias``; registers,
  ``mask_token``, LayerScale ``ls1`` / ``ls2``, SwiGLU ``w12`` / ``w3``), DINO's ``VisionTransformer``
  (``interp="dino"``: its ``+ 0.1`` scale-factor interpolation) and timm 0.4.9's ``VisionTransformer``
  of MoCo v3 (``interp="size"``: bicubic to size with antialias, timm's rule for other sizes).
* :class:`RefCLIP`: OpenAI CLIP's ``model.py`` (``VisionTransformer`` with ``nn.MultiheadAttention``
  blocks and QuickGELU, the text tower, ``logit_scale``), scriptable to the TorchScript archive
  layout of the published ``ViT-B-16.pt`` / ``ViT-L-14.pt``; other input sizes resample the position
  embeddings as open_clip's ``resize_pos_embed`` does.

Attention is computed as upstream writes it (explicit softmax), not with a fused kernel.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RefAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * (C // self.heads) ** -0.5) @ k.transpose(-2, -1)
        return self.proj((attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, C))


class RefMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class RefSwiGLU(nn.Module):
    """DINOv2's ``SwiGLUFFNFused``: ``hidden = (int(hidden * 2 / 3) + 7) // 8 * 8``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        self.w12, self.w3 = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class RefLayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class RefBlock(nn.Module):
    def __init__(self, dim: int, heads: int, layer_scale: bool, swiglu: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = RefAttention(dim, heads)
        self.ls1 = RefLayerScale(dim) if layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = RefSwiGLU(dim, 4 * dim) if swiglu else RefMlp(dim, 4 * dim)
        self.ls2 = RefLayerScale(dim) if layer_scale else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class RefPatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)


class RefViT(nn.Module):
    """DINOv2 / DINO / MoCo v3 ViT; ``forward(x)`` -> (class token, patch-token map), both after ``norm``."""

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        patch: int,
        grid: int,
        *,
        interp: str,
        layer_scale: bool = False,
        swiglu: bool = False,
        registers: int = 0,
        mask_token: bool = False,
        offset: float = 0.1,
        antialias: bool = False,
    ) -> None:
        super().__init__()
        self.patch, self.interp, self.offset, self.antialias = patch, interp, offset, antialias
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, registers, dim)) if registers else None
        self.mask_token = nn.Parameter(torch.zeros(1, dim)) if mask_token else None
        self.patch_embed = RefPatchEmbed(dim, patch)
        self.blocks = nn.ModuleList(RefBlock(dim, heads, layer_scale, swiglu) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def interpolate_pos_encoding(self, x: Tensor, w: int, h: int) -> Tensor:
        npatch, N = x.shape[1] - 1, self.pos_embed.shape[1] - 1
        if npatch == N and w == h:
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, 0], self.pos_embed[:, 1:]
        dim = x.shape[-1]
        w0, h0 = w // self.patch, h // self.patch
        M = int(math.sqrt(N))
        grid = patch_pos.reshape(1, M, M, dim).permute(0, 3, 1, 2)
        if self.interp == "dino":  # DINO v1: float offset folded into w0, h0
            w0, h0 = w0 + 0.1, h0 + 0.1
            out = F.interpolate(grid, scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)), mode="bicubic")
        elif self.interp == "dinov2":
            grid = grid.float()
            if self.offset:
                sx, sy = float(w0 + self.offset) / M, float(h0 + self.offset) / M
                out = F.interpolate(grid, scale_factor=(sx, sy), mode="bicubic", antialias=self.antialias)
            else:
                out = F.interpolate(grid, size=(w0, h0), mode="bicubic", antialias=self.antialias)
        else:  # timm's resample_abs_pos_embed
            out = F.interpolate(grid, size=(w0, h0), mode="bicubic", antialias=True)
        assert out.shape[-2:] == (int(w0), int(h0))
        out = out.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((cls_pos.unsqueeze(0), out), dim=1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        B, _, w, h = x.shape  # upstream's names: w is the height
        t = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        t = torch.cat((self.cls_token.expand(B, -1, -1), t), dim=1)
        t = t + self.interpolate_pos_encoding(t, w, h)
        r = 0
        if self.register_tokens is not None:
            r = self.register_tokens.shape[1]
            t = torch.cat((t[:, :1], self.register_tokens.expand(B, -1, -1), t[:, 1:]), dim=1)
        for blk in self.blocks:
            t = blk(t)
        t = self.norm(t)
        patches = t[:, 1 + r :].reshape(B, w // self.patch, h // self.patch, -1).permute(0, 3, 1, 2)
        return t[:, 0], patches


# --------------------------------------------------------------------------------------------
# OpenAI CLIP


class QuickGELU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, d_model: int, n_head: int, attn_mask: Tensor | None = None) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, n_head)
        self.ln_1 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            OrderedDict([("c_fc", nn.Linear(d_model, 4 * d_model)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(4 * d_model, d_model))])
        )
        self.ln_2 = nn.LayerNorm(d_model)
        self.attn_mask = attn_mask

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x), self.ln_1(x), self.ln_1(x), need_weights=False, attn_mask=self.attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, attn_mask: Tensor | None = None) -> None:
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads, attn_mask) for _ in range(layers)])

    def forward(self, x: Tensor) -> Tensor:
        return self.resblocks(x)


class VisualTransformer(nn.Module):
    def __init__(self, resolution: int, patch: int, width: int, layers: int, heads: int, output_dim: int) -> None:
        super().__init__()
        self.patch = patch
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros((resolution // patch) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.zeros(width, output_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.embed_and_tokens(x)[0]

    def embed_and_tokens(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(image embedding, patch-token map after ln_post); other grids resample as open_clip does."""
        B, _, H, W = x.shape
        x = self.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        x = torch.cat([self.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype), x], dim=1)
        pos = self.positional_embedding
        h, w = H // self.patch, W // self.patch
        if pos.shape[0] != h * w + 1 or h != w:
            m = int(math.sqrt(pos.shape[0] - 1))
            grid = pos[1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
            pos = torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(h * w, -1)])
        x = self.ln_pre(x + pos)
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        x = self.ln_post(x)
        return x[:, 0] @ self.proj, x[:, 1:].reshape(B, h, w, -1).permute(0, 3, 1, 2)


class RefCLIP(nn.Module):
    """OpenAI's ``CLIP`` (ViT image tower, text tower, ``logit_scale``), plus the three scalar buffers
    ``clip.build_model`` deletes from the state dicts of the published archives."""

    def __init__(self, embed: int, resolution: int, patch: int, width: int, layers: int, context: int = 77,
                 vocab: int = 49408, t_width: int = 512, t_layers: int = 12) -> None:  # fmt: skip
        super().__init__()
        self.visual = VisualTransformer(resolution, patch, width, layers, width // 64, embed)
        mask = torch.empty(context, context).fill_(float("-inf")).triu_(1)
        self.transformer = Transformer(t_width, t_layers, t_width // 64, mask)
        self.token_embedding = nn.Embedding(vocab, t_width)
        self.positional_embedding = nn.Parameter(torch.zeros(context, t_width))
        self.ln_final = nn.LayerNorm(t_width)
        self.text_projection = nn.Parameter(torch.zeros(t_width, embed))
        self.logit_scale = nn.Parameter(torch.ones([]))
        self.register_buffer("input_resolution", torch.tensor(resolution))
        self.register_buffer("context_length", torch.tensor(context))
        self.register_buffer("vocab_size", torch.tensor(vocab))

    def forward(self, image: Tensor) -> Tensor:
        return self.visual(image)


def to_openai_half(model: RefCLIP) -> RefCLIP:
    """``clip.model.convert_weights``: conv / linear / attention weights and the projections in float16."""
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            m.weight.data = m.weight.data.half()
            if m.bias is not None:
                m.bias.data = m.bias.data.half()
        if isinstance(m, nn.MultiheadAttention):
            for name in ("in_proj_weight", "in_proj_bias", "bias_k", "bias_v"):
                t = getattr(m, name)
                if t is not None:
                    t.data = t.data.half()
        for name in ("text_projection", "proj"):
            if hasattr(m, name) and isinstance(getattr(m, name), nn.Parameter):
                getattr(m, name).data = getattr(m, name).data.half()
    return model
