"""SimCLR v1 1x / 2x / 4x: the converter's checkpoints load with every key (fc dropped), and the feature map
equals torchvision's ResNet-50 (1x) or a ResNet-50 widened by hand from torchvision's own blocks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import Bottleneck

from retrbench.backbones import BACKBONES
from retrbench.backbones.simclr import SIMCLR_INFO, SimCLRResNet50, build_simclr
from retrbench.utils.checkpoint import CheckpointError

from ._helpers import CARDS, close, loaded, on_meta, random_like, tv_layer4


def hand_widened_resnet50(width: int) -> torchvision.models.ResNet:
    """SimCLR's resnet_wider ResNet-50 (stem 64w, planes 64w..512w) built from torchvision's own blocks.

    torchvision's ``_make_layer`` with ``planes * width`` gives bottleneck inner width ``planes * width``
    (``base_width`` stays 64) and output ``4 * planes * width``: the converter's architecture.
    """
    net = torchvision.models.resnet50()
    net.inplanes = 64 * width
    net.conv1 = nn.Conv2d(3, 64 * width, 7, stride=2, padding=3, bias=False)
    net.bn1 = nn.BatchNorm2d(64 * width)
    net.layer1 = net._make_layer(Bottleneck, 64 * width, 3)
    net.layer2 = net._make_layer(Bottleneck, 128 * width, 4, stride=2)
    net.layer3 = net._make_layer(Bottleneck, 256 * width, 6, stride=2)
    net.layer4 = net._make_layer(Bottleneck, 512 * width, 3, stride=2)
    net.fc = nn.Linear(2048 * width, 1000)
    return net


@pytest.mark.parametrize("width", [1, 2, 4])
def test_registered_with_metadata(width: int) -> None:
    info = SIMCLR_INFO[width]
    for name in (f"simclr{width}x", f"simclr_{width}x", f"simclr-r50-{width}x"):
        assert BACKBONES.get(name).name == f"simclr{width}x" and BACKBONES.get(name).info == info
    assert (info.channels, info.stride, info.default_size) == (2048 * width, 32, 1024)
    assert (info.mean, info.std) == ((0.0,) * 3, (1.0,) * 3)  # SimCLR v1: inputs in [0, 1]
    assert info.url is None and info.weights_file == f"resnet50-{width}x.pth"  # the converter's README names
    assert info.licence and info.weights_source and (CARDS / info.card).is_file()
    assert info.label == f"SimClr{width}x"


def test_random_init_refuses_weights() -> None:
    with pytest.raises(ValueError, match="pretrained=False"):
        BACKBONES.create("simclr4x", weights="x.pth", pretrained=False)


def simclr_file(tmp_path: Path, width: int, seed: int) -> tuple[Path, dict[str, Tensor]]:
    """``{'state_dict': ...}`` as tonylins/simclr-converter writes it (resnet_wider names, fc included)."""
    sd = random_like(on_meta(lambda: hand_widened_resnet50(width)).state_dict(), seed)
    p = tmp_path / f"resnet50-{width}x.pth"
    torch.save({"state_dict": sd}, p)
    return p, sd


@pytest.mark.parametrize("width", [1, 4])
def test_simclr_architecture_matches_converter(width: int) -> None:
    """Names and shapes equal the hand-widened torchvision net (minus fc); sizes as published (24M / 375M)."""
    ours = on_meta(lambda: SimCLRResNet50(width)).state_dict()
    ref = on_meta(lambda: hand_widened_resnet50(width)).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {
        k: tuple(v.shape) for k, v in ref.items() if not k.startswith("fc.")
    }
    assert ours["conv1.weight"].shape == (64 * width, 3, 7, 7)  # the stem is widened too
    n_params = sum(v.numel() for k, v in ours.items() if not k.endswith(("running_mean", "running_var", "tracked")))
    assert round(n_params / 1e6) == {1: 24, 4: 375}[width]  # SimCLR paper / README parameter counts
    with torch.no_grad():
        out = on_meta(lambda: SimCLRResNet50(width)).forward_features(torch.empty(1, 3, 64, 96, device="meta"))
    assert out.shape == (1, 2048 * width, 2, 3)


@pytest.fixture(scope="module")
def simclr1x(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Tensor]]:
    return simclr_file(tmp_path_factory.mktemp("simclr"), 1, seed=3)


def test_simclr1x_equals_torchvision_resnet50(simclr1x: tuple[Path, dict[str, Tensor]], x: Tensor) -> None:
    p, sd = simclr1x
    bb = build_simclr(1, weights=p)
    assert set(bb.net.state_dict()) == {k for k in sd if not k.startswith("fc.")}  # fc.* is the dropped head
    assert bb.info.channels == 2048 and bb.name == "simclr1x"
    ref = loaded(torchvision.models.resnet50, sd)
    with torch.no_grad():
        feats = bb(x)
        assert feats.shape == (2, 2048, 2, 3)
        torch.testing.assert_close(feats, tv_layer4(ref, x), rtol=0, atol=0)  # same ops, same order: bit-identical
        torch.testing.assert_close(bb.net(x), torch.flatten(ref.avgpool(tv_layer4(ref, x)), 1), rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("width", [2, 4])
def test_simclr_wide_equals_hand_widened_torchvision(tmp_path: Path, x: Tensor, width: int) -> None:
    """Full-size 2x (94M) and 4x (375M parameters, a 1.5 GB file) checkpoints."""
    p, sd = simclr_file(tmp_path, width, seed=4)
    bb = BACKBONES.create(f"simclr{width}x", weights=p)
    ref = loaded(lambda: hand_widened_resnet50(width), sd)
    with torch.no_grad():
        feats = bb(x[:1])
        assert feats.shape == (1, 2048 * width, 2, 3)
        close(feats, tv_layer4(ref, x[:1]))


def test_simclr_wrong_width_and_missing_file(tmp_path: Path, simclr1x: tuple[Path, dict[str, Tensor]]) -> None:
    p, _ = simclr1x
    with pytest.raises(CheckpointError, match=r"width 1x .*use simclr1x"):
        BACKBONES.create("simclr2x", weights=p)
    with pytest.raises(FileNotFoundError, match="simclr-converter"):
        BACKBONES.create("simclr4x")
    q = tmp_path / "flat.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, q)
    with pytest.raises(CheckpointError, match="expected the top-level key 'state_dict'"):
        build_simclr(1, weights=q)
