"""Fixtures shared by the ResNet-family backbone tests (tests/backbones is a package, so this
conftest does not shadow the top-level one for ``from conftest import ...``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from ._helpers import on_meta, random_like, tv_resnet


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test gets an empty weights cache (files put there must not leak into other tests)."""
    monkeypatch.setenv("RETRBENCH_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def x() -> Tensor:
    """Two 64x96 inputs: a 2x3 map at stride 32."""
    return torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def trunks() -> dict[int, dict[str, Tensor]]:
    """Random torchvision ResNet-50 / -101 weights without ``fc`` (the layout every family builds on)."""
    out = {}
    for depth in (50, 101):
        sd = on_meta(tv_resnet(depth)).state_dict()
        out[depth] = random_like({k: v for k, v in sd.items() if not k.startswith("fc.")}, seed=depth)
    return out


@pytest.fixture(scope="module")
def layer4(trunks: dict[int, dict[str, Tensor]], x: Tensor) -> dict[int, Tensor]:
    """torchvision's own layer4 map for each trunk (the reference every family must reproduce)."""
    out = {}
    for depth, sd in trunks.items():
        net = on_meta(tv_resnet(depth))
        net.fc = nn.Identity()
        net.load_state_dict(sd, strict=True, assign=True)
        net.eval()
        with torch.no_grad():
            y = net.maxpool(net.relu(net.bn1(net.conv1(x))))
            out[depth] = net.layer4(net.layer3(net.layer2(net.layer1(y))))
    return out


@pytest.fixture(scope="module")
def r50_sd() -> dict[str, Tensor]:
    """Random weights in torchvision ResNet-50's exact layout (320 entries, fc included)."""
    import torchvision

    return random_like(on_meta(torchvision.models.resnet50).state_dict(), seed=1)


@pytest.fixture(scope="module")
def r50_file(tmp_path_factory: pytest.TempPathFactory, r50_sd: dict[str, Tensor]) -> Path:
    """``r50_sd`` saved as a plain torchvision state dict."""
    p = tmp_path_factory.mktemp("r50") / "tv_resnet50.pth"
    torch.save(r50_sd, p)
    return p
