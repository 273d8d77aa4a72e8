"""cirtorch (cnnimageretrieval-pytorch): ``{'meta', 'state_dict'}`` network files load with every key and a
numpy-only allow-list; the map equals torchvision's layer4 and ``native`` equals a hand-written
l2n(GeM) (+ l2n(whiten)) reference; a shipped ``Lw`` equals cirtorch's ``whitenapply``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import Tensor, nn

from retrbench.backbones import BACKBONES, NativeBackbone
from retrbench.backbones.cirtorch import CIRTORCH_INFO, cirtorch_whiten
from retrbench.utils.checkpoint import CheckpointError

from ._helpers import CARDS, IMAGENET, Shell, close, gem_ref, l2, old_pickle_names, on_meta


@pytest.mark.parametrize(
    "name, alias, label",
    [
        ("cirtorch_r101_gem", "cirtorch-gem", "cirtorch GeM R101"),
        ("cirtorch_gl18_r101_gem_w", "cirtorch-gl18", "cirtorch GeM R101 (GL18, whitened)"),
    ],
)
def test_registered_with_metadata(name: str, alias: str, label: str) -> None:
    info = CIRTORCH_INFO[name]
    assert BACKBONES.get(name).info == info and BACKBONES.get(alias).name == name and info.label == label
    assert (info.channels, info.stride, info.default_size) == (2048, 32, 1024)
    assert (list(info.mean), list(info.std)) == IMAGENET
    assert (CARDS / info.card).is_file() and info.licence and info.weights_source
    assert info.url.startswith("http://cmp.felk.cvut.cz/cnnimageretrieval/data/networks/")
    assert info.url.endswith("/" + info.weights_file)  # metadata only: URL and file name agree
    assert CIRTORCH_INFO["cirtorch_r101_gem"].weights_file == "retrievalSfM120k-resnet101-gem-b80fb85.pth"


def test_random_init() -> None:
    bb = BACKBONES.create("cirtorch_gl18_r101_gem_w", pretrained=False)
    assert isinstance(bb, NativeBackbone) and bb.weights_id == "random-init"
    assert bb.upstream_config["whitening"] and bb.net.whiten is not None
    with pytest.raises(ValueError, match="pretrained=False"):
        BACKBONES.create("cirtorch_gl18_r101_gem_w", weights="x.pt", pretrained=False)


def write_cirtorch(
    path: Path, trunk: dict[str, Tensor], seed: int, whitening: bool, lw: bool, **meta
) -> dict[str, Tensor]:
    """A cirtorch network file: ``{'meta', 'state_dict'}`` of ``ImageRetrievalNet`` (features = the
    torchvision ResNet's children without avgpool / fc, numbered 0..7), legacy serialisation."""
    g = torch.Generator().manual_seed(seed)
    seq = on_meta(lambda: nn.Sequential(*list(torchvision.models.resnet101().children())[:-2])).state_dict()
    index = {"conv1": 0, "bn1": 1, "layer1": 4, "layer2": 5, "layer3": 6, "layer4": 7}
    features = {}
    for k, v in trunk.items():
        head, rest = k.split(".", 1)
        features[f"features.{index[head]}.{rest}"] = v
    assert set(features) == {f"features.{k}" for k in seq}  # exactly upstream's nn.Sequential names
    sd = {**features, "pool.p": torch.tensor([2.5 + 1.5 * torch.rand(1, generator=g).item()])}
    if whitening:
        sd["whiten.weight"] = torch.randn(2048, 2048, generator=g) * 2048**-0.5
        sd["whiten.bias"] = 0.01 * torch.randn(2048, generator=g)
    m = {
        "architecture": "resnet101", "local_whitening": False, "pooling": "gem", "regional": False,
        "whitening": whitening, "mean": IMAGENET[0], "std": IMAGENET[1], "outputdim": 2048, **meta,
    }  # fmt: skip
    if lw:  # learned post-hoc whitening of test.py (whitenlearn returns float64 numpy arrays)
        rng = np.random.default_rng(seed)
        P = rng.normal(size=(2048, 2048)) / 45
        m["Lw"] = {"retrieval-SfM-120k": {"ss": {"m": rng.normal(size=(2048, 1)) * 0.01, "P": P},
                                          "ms": {"m": rng.normal(size=(2048, 1)) * 0.01, "P": P}}}  # fmt: skip
    torch.save({"meta": m, "state_dict": sd}, path, _use_new_zipfile_serialization=False)
    if lw:
        old_pickle_names(path)
    return sd


def cirtorch_ref(f: Tensor, sd: dict[str, Tensor]) -> Tensor:
    """cirtorch ``ImageRetrievalNet.forward`` by hand (rows): l2n(gem), then l2n(whiten) if any (eps 1e-6)."""
    v = l2(gem_ref(f, sd["pool.p"].item()), 1e-6)
    if "whiten.weight" in sd:
        v = l2(v @ sd["whiten.weight"].T + sd["whiten.bias"], 1e-6)
    return v


@pytest.fixture(scope="module")
def cirtorch_files(tmp_path_factory: pytest.TempPathFactory, trunks) -> dict[str, tuple[Path, dict[str, Tensor]]]:
    root = tmp_path_factory.mktemp("cirtorch")
    return {
        "cirtorch_r101_gem": (
            root / "sfm.pth",
            write_cirtorch(root / "sfm.pth", trunks[101], 1, whitening=False, lw=True),
        ),
        # a file may state its own input normalisation (cirtorch's test.py uses meta mean / std)
        "cirtorch_gl18_r101_gem_w": (
            root / "gl18.pth",
            write_cirtorch(root / "gl18.pth", trunks[101], 2, whitening=True, lw=False, mean=[0.5] * 3, std=[0.25] * 3),
        ),
    }


@pytest.mark.parametrize("name", ["cirtorch_r101_gem", "cirtorch_gl18_r101_gem_w"])
def test_cirtorch_loads_and_matches_reference(cirtorch_files, layer4, x: Tensor, name: str) -> None:
    path, sd = cirtorch_files[name]
    bb = BACKBONES.create(name, weights=path)
    assert set(bb.net.state_dict()) == set(sd)
    with torch.no_grad():
        f, d = bb(x), bb.native(x)
    assert f.shape == (2, 2048, 2, 3)
    close(f, layer4[101])
    close(d, cirtorch_ref(layer4[101], sd))
    assert bb.upstream_config["whitening"] == ("whiten.weight" in sd)
    # the pipeline normalises with backbone.info: the file's own mean / std when it states others
    want = ((0.5,) * 3, (0.25,) * 3) if name.endswith("_w") else (tuple(IMAGENET[0]), tuple(IMAGENET[1]))
    assert (bb.info.mean, bb.info.std) == want
    assert BACKBONES.get(name).info.mean == tuple(IMAGENET[0])  # the registry entry is unchanged


def test_cirtorch_shipped_lw(cirtorch_files, x: Tensor) -> None:
    path, _ = cirtorch_files["cirtorch_r101_gem"]
    bb = BACKBONES.create("cirtorch-gem", weights=path)
    assert sorted(bb.shipped_whitening) == ["retrieval-SfM-120k", "retrieval-SfM-120k/ms"]
    lw = torch.load(path, weights_only=False)["meta"]["Lw"]["retrieval-SfM-120k"]["ss"]  # our own test file
    with torch.no_grad():
        d = bb.native(x).numpy()
    # cirtorch whitenapply on columns: P (X - m), then / (||.|| + 1e-6)
    cols = lw["P"] @ (d.T - lw["m"])
    want = (cols / (np.linalg.norm(cols, axis=0, keepdims=True) + 1e-6)).T
    np.testing.assert_allclose(bb.whiten_shipped(d, "retrieval-SfM-120k"), want, rtol=1e-6, atol=1e-9)
    cols = lw["P"][:16] @ (d.T - lw["m"])  # whitenapply(..., dimensions=16)
    want16 = (cols / (np.linalg.norm(cols, axis=0, keepdims=True) + 1e-6)).T
    np.testing.assert_allclose(cirtorch_whiten(d, lw["m"], lw["P"], 16), want16, rtol=1e-6, atol=1e-9)


def test_cirtorch_wrong_files(tmp_path: Path, trunks) -> None:
    p = tmp_path / "regional.pth"
    torch.save({"meta": {"architecture": "resnet101", "pooling": "gem", "regional": True}, "state_dict": {}}, p)
    with pytest.raises(CheckpointError, match="regional=True is not supported"):
        BACKBONES.create("cirtorch_r101_gem", weights=p)
    p = tmp_path / "vgg.pth"
    torch.save({"meta": {"architecture": "vgg16", "pooling": "gem"}, "state_dict": {}}, p)
    with pytest.raises(CheckpointError, match="architecture 'vgg16'"):
        BACKBONES.create("cirtorch_r101_gem", weights=p)
    p = tmp_path / "evil.pth"
    torch.save({"meta": {"architecture": "resnet101", "Lw": Shell("true")}, "state_dict": {}}, p)
    with pytest.raises(
        CheckpointError,
        match=r"not on the allow-list for cirtorch checkpoints \(allowed beyond tensors and plain containers: numpy",
    ):
        BACKBONES.create("cirtorch_r101_gem", weights=p)
    p = tmp_path / "flat.pth"
    torch.save(trunks[50], p)
    with pytest.raises(CheckpointError, match=r"not a cirtorch checkpoint: expected \{'meta', 'state_dict'\}"):
        BACKBONES.create("cirtorch_r101_gem", weights=p)
    small = tmp_path / "small.pth"
    torch.save({"meta": {"architecture": "resnet101", "pooling": "gem"}, "state_dict": trunks[50]}, small)
    p = tmp_path / "truncated.pth"
    with open(small, "rb") as f:
        p.write_bytes(f.read(small.stat().st_size // 2))
    with pytest.raises(CheckpointError, match="truncated or not a PyTorch checkpoint"):
        BACKBONES.create("cirtorch_gl18_r101_gem_w", weights=p)
