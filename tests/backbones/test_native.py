"""retrbench.backbones.native: NativeBackbone's shipped whitenings and the helpers the native families share."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from retrbench.backbones import BackboneInfo, NativeBackbone
from retrbench.backbones.native import check_depth, random_native, with_normalisation
from retrbench.utils.checkpoint import CheckpointError

INFO = BackboneInfo(channels=4, stride=2, mean=(0.5,) * 3, std=(0.25,) * 3, label="Tiny", help="a tiny test net")


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.conv(x)

    def descriptor(self, x: Tensor) -> Tensor:
        return nn.functional.normalize(self.conv(x).mean(dim=(-2, -1)))


def test_forward_is_the_map_and_native_the_descriptor() -> None:
    bb = random_native(_Net, INFO, "tiny", None, {"arch": "tiny"})
    x = torch.rand(2, 3, 8, 10, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert bb(x).shape == (2, 4, 4, 5)
        torch.testing.assert_close(bb.native(x), bb.net.descriptor(x))
    assert bb.weights_id == "random-init" and bb.upstream_config == {"arch": "tiny"} and not bb.training
    again = random_native(_Net, INFO, "tiny", None, {})
    torch.testing.assert_close(again.net.conv.weight, bb.net.conv.weight, rtol=0, atol=0)  # seeded
    with pytest.raises(ValueError, match="pretrained=False"):
        random_native(_Net, INFO, "tiny", "w.pth", {})


def test_whiten_shipped_by_name() -> None:
    bb = NativeBackbone(_Net(), INFO, "tiny", "x", shipped_whitening={"a": lambda d: d * 2, "b": lambda d: d + 1})
    d = np.ones((3, 4))
    np.testing.assert_array_equal(bb.whiten_shipped(d, "a"), 2 * d)
    with pytest.raises(KeyError, match=r"name one of \['a', 'b'\]"):
        bb.whiten_shipped(d)
    with pytest.raises(KeyError, match="no shipped whitening 'c'"):
        bb.whiten_shipped(d, "c")
    one = NativeBackbone(_Net(), INFO, "tiny", "x", shipped_whitening={"b": lambda d: d + 1})
    np.testing.assert_array_equal(one.whiten_shipped(d), d + 1)
    with pytest.raises(KeyError, match="ships no post-hoc whitening"):
        NativeBackbone(_Net(), INFO, "tiny", "x").whiten_shipped(d)


def test_with_normalisation() -> None:
    p = Path("net.pth")
    assert with_normalisation(INFO, None, [1, 1, 1], p, "meta") is INFO
    assert with_normalisation(INFO, [0.5] * 3, [0.25] * 3, p, "meta") is INFO  # the same: unchanged
    other = with_normalisation(INFO, [0.4, 0.5, 0.6], [0.2] * 3, p, "meta")
    assert (other.mean, other.std, other.label) == ((0.4, 0.5, 0.6), (0.2,) * 3, "Tiny")
    with pytest.raises(CheckpointError, match="meta mean / std must have 3 values"):
        with_normalisation(INFO, [0.5], [0.2] * 3, p, "meta")
    with pytest.raises(CheckpointError, match="are not numbers"):
        with_normalisation(INFO, ["a"] * 3, [0.2] * 3, p, "meta")


def test_check_depth() -> None:
    check_depth(Path("f.pt"), None, 101, "X", {})
    check_depth(Path("f.pt"), 101, 101, "X", {})
    with pytest.raises(CheckpointError, match=r"f\.pt: a ResNet-50 X checkpoint, not ResNet-101; use x_r50"):
        check_depth(Path("f.pt"), 50, 101, "X", {50: "x_r50"})
