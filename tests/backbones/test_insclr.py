"""InsCLR: ``Checkpointer`` files (wrapped or flat, learned or fixed p, with or without the attention
branch) load with every key; the map equals torchvision's layer4 and ``native`` equals a hand-written
GeM + head reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torch import Tensor

from retrbench.backbones import BACKBONES, NativeBackbone
from retrbench.backbones.insclr import INSCLR_INFO, InsCLRNet
from retrbench.utils.checkpoint import CheckpointError

from ._helpers import CARDS, IMAGENET, close, gem_ref, l2, on_meta


@pytest.mark.parametrize(
    "name, alias, label",
    [("insclr_r101_gldv2", "insclr", "InsCLR R101 (GLDv2)"), ("insclr_r50_instre", "insclr-instre", "InsCLR R50 (INSTRE)")],
)
def test_registered_with_metadata(name: str, alias: str, label: str) -> None:
    info = INSCLR_INFO[name]
    assert BACKBONES.get(name).info == info and BACKBONES.get(alias).name == name and info.label == label
    assert (info.channels, info.stride, info.default_size) == (2048, 32, 1024)
    assert (list(info.mean), list(info.std)) == IMAGENET
    assert (CARDS / info.card).is_file() and info.licence and info.weights_source
    assert info.url is None and info.weights_file is None  # never published


def test_random_init() -> None:
    bb = BACKBONES.create("insclr_r50_instre", pretrained=False)
    assert isinstance(bb, NativeBackbone) and bb.weights_id == "random-init"
    with torch.no_grad():
        d = bb.native(torch.rand(2, 3, 64, 64))
    assert d.shape == (2, 256)
    torch.testing.assert_close(d.norm(dim=1), torch.ones(2))
    with pytest.raises(ValueError, match="pretrained=False"):
        BACKBONES.create("insclr_r101_gldv2", weights="x.pt", pretrained=False)


def test_resnet101_layout_on_meta() -> None:
    """Cheap check of the full-size files the slow tests load: InsCLR's ResNet-101 layout (names and shapes)
    is exactly our network's state dict."""
    tv = {
        k: tuple(v.shape)
        for k, v in on_meta(torchvision.models.resnet101).state_dict().items()
        if not k.startswith("fc.")
    }
    insclr = {**{f"backbone.{k}": s for k, s in tv.items()}, "combiner.head.fc.weight": (2048, 2048)}
    assert {k: tuple(v.shape) for k, v in on_meta(InsCLRNet).state_dict().items()} == insclr


def write_insclr(path: Path, trunk: dict[str, Tensor], head: str, out_dim: int, seed: int, *, wrapped: bool = True,
                 learned_p: float | None = None, attention: bool = False) -> dict[str, Tensor]:  # fmt: skip
    """An InsCLR ``Checkpointer.save`` file: ``{'model': state_dict}`` of ``Sequential(backbone, combiner)``,
    trained with ``nn.DataParallel`` (``module.`` prefix) when ``wrapped``."""
    g = torch.Generator().manual_seed(seed)
    sd = {f"backbone.{k}": v for k, v in trunk.items()}
    sd["combiner.head.fc.weight"] = torch.randn(out_dim, 2048, generator=g) * 2048**-0.5
    if head == "linear_norm":
        sd["combiner.head.fc.bias"] = 0.01 * torch.randn(out_dim, generator=g)
    if learned_p is not None:
        sd["combiner.pool.p"] = torch.tensor([learned_p])
    if attention:  # the optional 128-d local branch (ATTENTION.ENABLE), not part of the global descriptor
        sd["combiner.spatial_attention.conv.weight"] = torch.randn(128, 2048, 1, 1, generator=g)
        sd["combiner.attention_head.fc.weight"] = torch.randn(128, 128, generator=g)
    stored = {f"module.{k}": v for k, v in sd.items()} if wrapped else sd
    torch.save({"model": stored} if wrapped else stored, path)
    return sd


def insclr_ref(f: Tensor, sd: dict[str, Tensor]) -> Tensor:
    """InsCLR's Combiner in test mode by hand: GeM (p = 3 unless learned), then the head."""
    g = gem_ref(f, sd["combiner.pool.p"].item() if "combiner.pool.p" in sd else 3.0)
    w = sd["combiner.head.fc.weight"]
    if "combiner.head.fc.bias" in sd:  # linear_norm
        return l2(g @ w.T + sd["combiner.head.fc.bias"], 1e-12)
    return l2(l2(g, 1e-12) @ w.T, 1e-12)  # norm_linear_norm


@pytest.mark.parametrize(
    "name, depth, head, out_dim",
    [
        pytest.param("insclr_r101_gldv2", 101, "norm_linear_norm", 2048, marks=pytest.mark.slow),
        ("insclr_r50_instre", 50, "linear_norm", 256),
    ],
)
def test_insclr_loads_and_matches_reference(
    tmp_path: Path, trunks, layer4, x: Tensor, name, depth, head, out_dim
) -> None:
    p = tmp_path / "model_final.pth"
    sd = write_insclr(p, trunks[depth], head, out_dim, seed=depth)
    bb = BACKBONES.create(name, weights=p)
    assert set(bb.net.state_dict()) == set(sd)
    assert bb.upstream_config == {
        "backbone": f"resnet{depth}",
        "pool": "gem",
        "learned_p": False,
        "head": head,
        "out_dim": out_dim,
    }
    with torch.no_grad():
        f, d = bb(x), bb.native(x)
    assert f.shape == (2, 2048, 2, 3) and d.shape == (2, out_dim)
    close(f, layer4[depth])
    close(d, insclr_ref(layer4[depth], sd))


def test_insclr_variants(tmp_path: Path, trunks, layer4, x: Tensor) -> None:
    """Flat, unwrapped file; learned p; the attention branch present (and ignored)."""
    p = tmp_path / "variant.pth"
    sd = write_insclr(p, trunks[50], "norm_linear_norm", 512, seed=11, wrapped=False, learned_p=4.5, attention=True)
    bb = BACKBONES.create("insclr_r50_instre", weights=p)
    assert bb.upstream_config["learned_p"] and bb.upstream_config["head"] == "norm_linear_norm"
    assert "combiner.spatial_attention.conv.weight" not in bb.net.state_dict()
    with torch.no_grad():
        close(bb.native(x), insclr_ref(layer4[50], sd))


def test_insclr_errors(tmp_path: Path, trunks) -> None:
    with pytest.raises(FileNotFoundError, match="no InsCLR weights were published.*--weights"):
        BACKBONES.create("insclr_r101_gldv2")
    p = tmp_path / "r50.pth"  # only what the depth check reads: six layer3 blocks
    layer3 = {f"module.backbone.layer3.{i}.conv1.weight": torch.zeros(1) for i in range(6)}
    torch.save({"model": {**layer3, "module.combiner.head.fc.weight": torch.zeros(256, 2048)}}, p)
    with pytest.raises(CheckpointError, match="a ResNet-50 InsCLR checkpoint, not ResNet-101; use insclr_r50_instre"):
        BACKBONES.create("insclr_r101_gldv2", weights=p)
    p = tmp_path / "tv.pth"
    torch.save(dict(list(trunks[50].items())[:20]), p)
    with pytest.raises(
        CheckpointError, match=r"not an InsCLR checkpoint: expected \{'model': state_dict\} with keys backbone"
    ):
        BACKBONES.create("insclr_r50_instre", weights=p)
    p = tmp_path / "extra.pth"
    torch.save({"model": {"backbone.conv1.weight": torch.zeros(64, 3, 7, 7), "combiner.head.fc.weight": torch.zeros(256, 2048),
                          "combiner.extra.weight": torch.zeros(1)}}, p)  # fmt: skip
    with pytest.raises(CheckpointError, match=r"unexpected in the checkpoint \(1\): 'combiner\.extra\.weight'"):
        BACKBONES.create("insclr_r50_instre", weights=p)
