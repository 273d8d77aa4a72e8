"""The token-model machinery: the input rule, the position-embedding rules, TokenViT against timm, layout errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from retrbench.backbones.base import INPUT_ANY, INPUT_RESIZE_TO_PATCHES, BackboneInfo
from retrbench.backbones.vit import (
    DINO_RULE,
    SIZE_RULE,
    PosEmbedRule,
    TokenViT,
    check_layout,
    fit_to_patches,
    mlp_ratio_for,
    patch_grid,
    token_info,
    torch_hub_file,
    vit_layout,
)
from retrbench.utils.checkpoint import CheckpointError


@pytest.mark.parametrize("n, p, cells", [(224, 14, 16), (230, 14, 16), (231, 14, 17), (6, 14, 1), (0, 16, 1), (101, 16, 6), (150, 16, 9), (1024, 14, 73)])
def test_patch_grid_rounds_to_the_nearest_multiple(n: int, p: int, cells: int) -> None:
    assert patch_grid(n, p) == cells == max(1, math.floor(n / p + 0.5))


def test_fit_to_patches_resizes_bilinearly_and_keeps_multiples() -> None:
    x = torch.rand(2, 3, 101, 150, generator=torch.Generator().manual_seed(0))
    y = fit_to_patches(x, 16)
    assert y.shape == (2, 3, 96, 144)
    torch.testing.assert_close(y, F.interpolate(x, size=(96, 144), mode="bilinear", align_corners=False))
    same = x[..., :96, :144]
    assert fit_to_patches(same, 16) is same
    # resizing the normalised batch == normalising the resized batch (bilinear weights sum to one)
    mean, std = torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1), torch.tensor([0.2, 0.3, 0.25]).view(1, 3, 1, 1)
    torch.testing.assert_close(fit_to_patches((x - mean) / std, 16), (y - mean) / std, rtol=1e-5, atol=1e-5)


def test_dino_rule_is_the_scale_factor_interpolation() -> None:
    grid = torch.randn(1, 8, 37, 37, generator=torch.Generator().manual_seed(1))
    out = DINO_RULE.resample(grid, (7, 11))
    ref = F.interpolate(grid, scale_factor=((7 + 0.1) / 37, (11 + 0.1) / 37), mode="bicubic")
    assert out.shape == (1, 8, 7, 11)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    # ... which is not resizing to the size: the offset moves the sampling positions
    assert not torch.allclose(out, F.interpolate(grid, size=(7, 11), mode="bicubic"), atol=1e-3)
    assert DINO_RULE.resample(grid, (37, 37)) is grid


def test_size_rule_is_timms_resample() -> None:
    from timm.layers import resample_abs_pos_embed

    pos = torch.randn(1, 1 + 14 * 14, 8, generator=torch.Generator().manual_seed(2))
    grid = pos[:, 1:].reshape(1, 14, 14, 8).permute(0, 3, 1, 2)
    for size in ((6, 9), (20, 17)):
        out = SIZE_RULE.resample(grid, size).permute(0, 2, 3, 1).reshape(1, -1, 8)
        torch.testing.assert_close(out, resample_abs_pos_embed(pos, list(size), (14, 14), num_prefix_tokens=1)[:, 1:], rtol=0, atol=0)
    assert PosEmbedRule(0.0, False, "x").resample(grid, (14, 14)) is grid


@pytest.mark.parametrize("reg", [0, 4])
def test_token_vit_with_timms_rule_equals_timms_dynamic_forward(reg: int) -> None:
    """TokenViT's own embedding step reproduces timm's ``dynamic_img_size`` forward (the same rule)."""
    from timm.models.vision_transformer import VisionTransformer

    kw = dict(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=0, reg_tokens=reg, no_embed_class=bool(reg))
    torch.manual_seed(0)
    vit = VisionTransformer(dynamic_img_size=True, **kw).eval()
    with torch.no_grad():
        vit.pos_embed.normal_()
        net = TokenViT(vit, SIZE_RULE)
        for h, w in ((64, 64), (48, 80), (101, 150)):
            x = torch.randn(2, 3, h, w)
            xf = fit_to_patches(x, 16)
            ref = vit.forward_features(xf)
            hh, ww = xf.shape[-2] // 16, xf.shape[-1] // 16
            ref_map = ref[:, vit.num_prefix_tokens :].reshape(2, hh, ww, 32).permute(0, 3, 1, 2)
            torch.testing.assert_close(net.forward_features(x), ref_map, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(net.descriptor(x), vit.forward_head(ref), rtol=1e-5, atol=1e-5)


def test_vit_layout_and_check_layout() -> None:
    lay = vit_layout(8, 2, 4, 3, 32, layer_scale=True)
    assert lay["pos_embed"] == (1, 10, 8) and lay["blocks.1.ls2.gamma"] == (8,) and lay["blocks.0.mlp.fc1.weight"] == (32, 8)
    glu = vit_layout(8, 1, 4, 3, 16, swiglu=True)
    assert glu["blocks.0.mlp.w12.weight"] == (32, 8) and glu["blocks.0.mlp.w3.weight"] == (8, 16) and "blocks.0.mlp.fc1.weight" not in glu
    sd = {k: torch.zeros(s) for k, s in lay.items()}
    check_layout(sd, lay, "f.pth", "test")
    bad = dict(sd)
    del bad["norm.bias"]
    bad["extra"] = torch.zeros(1)
    bad["cls_token"] = torch.zeros(1, 1, 9)
    with pytest.raises(CheckpointError, match=r"f\.pth: not a test checkpoint: 1 missing, 1 unexpected, 1 with another shape(.|\n)*'norm\.bias'(.|\n)*'extra'(.|\n)*cls_token: \(1, 1, 9\), expected \(1, 1, 8\)(.|\n)*a hint"):
        check_layout(bad, lay, "f.pth", "test", hint="a hint")


def test_mlp_ratio_for_gives_the_exact_width() -> None:
    for dim, hidden in ((1536, 8192), (384, 1536), (1024, 4096), (768, 3072)):
        assert int(dim * mlp_ratio_for(dim, hidden)) == hidden


def test_token_info_and_defaults() -> None:
    info = token_info(label="x", order=1, help="h", channels=8, patch=14, native="cls", mean=(0.5,) * 3, std=(0.5,) * 3)
    assert (info.stride, info.patch_size, info.input_rule, info.native_descriptor) == (14, 14, INPUT_RESIZE_TO_PATCHES, "cls")
    assert info.map_side(230) == 16 and info.map_side(231) == 17 and info.map_side(3) == 1
    conv = BackboneInfo(channels=8, stride=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert (conv.patch_size, conv.input_rule, conv.native_descriptor) == (None, INPUT_ANY, "")


def test_torch_hub_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    find = torch_hub_file("dinov2_vits14_pretrain.pth")
    assert find() is None
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / "dinov2_vits14_pretrain.pth").write_bytes(b"x")
    assert find() == tmp_path / "hub" / "checkpoints" / "dinov2_vits14_pretrain.pth"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_token_backbone_under_autocast_on_gpu(dtype: torch.dtype) -> None:
    """Half-precision autocast (the pipeline's --dtype) stays close to float32; the embedding step and the
    position-embedding resampling stay in float32; channels-last (what extraction sets) changes nothing."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from retrbench.backbones import BACKBONES

    bb = BACKBONES.create("dinov2_vits14_reg4", pretrained=False).cuda().to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 101, 150, device="cuda")
    with torch.no_grad():
        ref_map, ref_cls = bb(x), bb.native(x)
        with torch.autocast("cuda", dtype=dtype):
            y, d = bb(x), bb.native(x)
    assert y.shape == ref_map.shape and d.shape == ref_cls.shape
    cos = F.cosine_similarity(d.float(), ref_cls, dim=1)
    assert cos.min() > 0.99, cos
    assert F.cosine_similarity(y.float().flatten(2), ref_map.flatten(2), dim=1).min() > 0.98


def test_offline_download_failure_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.error

    from retrbench.backbones import BACKBONES, weights

    def offline(url, dest, sha256=None):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(weights, "download", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(RuntimeError, match=r"could not download https://dl\.fbaipublicfiles\.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain\.pth(.|\n)*dino_deitsmall16_pretrain\.pth(.|\n)*--weights PATH"):
        BACKBONES.create("dino_vits16")
