"""GeM-AP (naver/deep-image-retrieval): checkpoints written in the 2019 layout (legacy serialisation,
``module.`` names, a scikit-learn < 0.22 PCA) load with every key and an allow-list; the map equals
torchvision's layer4 and ``native`` equals a hand-written GeM + fc + L2 reference."""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from sklearn.decomposition import PCA
from torch import Tensor

from retrbench.backbones import BACKBONES, NativeBackbone
from retrbench.backbones.gem_ap import GEM_AP_INFO, DirtorchGeMNet, dirtorch_whiten
from retrbench.utils.checkpoint import CheckpointError
from retrbench.utils.io import sha256_file

from ._helpers import CARDS, IMAGENET, Shell, close, gem_ref, l2, old_pickle_names, on_meta


@pytest.mark.parametrize(
    "name, aliases, label",
    [
        ("gem_ap_r101", ("gem-ap", "gemap", "gem_ap", "resnet101-ap-gem"), "GeM (AP)"),
        ("gem_ap_r50", ("resnet50-ap-gem",), "GeM (AP) R50"),
        ("gem_ap_r101_lm18", ("resnet101-ap-gem-lm18",), "GeM (AP) LM18"),
    ],
)
def test_registered_with_metadata(name: str, aliases: tuple[str, ...], label: str) -> None:
    info = GEM_AP_INFO[name]
    assert BACKBONES.get(name).info == info and info.label == label
    assert all(BACKBONES.get(a).name == name for a in aliases)
    assert (info.channels, info.stride, info.default_size) == (2048, 32, 1024)
    assert (list(info.mean), list(info.std)) == IMAGENET
    assert (CARDS / info.card).is_file(), info.card
    assert info.licence and info.weights_source
    assert info.url is None  # a Google Drive link, not a plain download
    assert GEM_AP_INFO["gem_ap_r101"].weights_file == "Resnet-101-AP-GeM.pt"


def test_random_init() -> None:
    bb = BACKBONES.create("gem_ap_r50", pretrained=False)
    assert isinstance(bb, NativeBackbone) and bb.weights_id == "random-init"
    assert bb.upstream_config["arch"] == "resnet50_rmac"
    with pytest.raises(ValueError, match="pretrained=False"):
        BACKBONES.create("gem_ap_r50", weights="x.pt", pretrained=False)


def test_resnet101_layout_on_meta() -> None:
    """Cheap check of the full-size files the slow tests load: the upstream ResNet-101 layout (names and
    shapes) is exactly our network's state dict."""
    tv = {
        k: tuple(v.shape)
        for k, v in on_meta(torchvision.models.resnet101).state_dict().items()
        if not k.startswith("fc.")
    }
    dirtorch = {**tv, "adpool.p": (1,), "fc.weight": (2048, 2048), "fc.bias": (2048,)}
    assert {k: tuple(v.shape) for k, v in on_meta(DirtorchGeMNet).state_dict().items()} == dirtorch


def fitted_pca(seed: int) -> PCA:
    """A real fitted scikit-learn PCA (with whitening) of 2048-d descriptors, as dirtorch's learn_pca makes."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(seed)
    descs = rng.normal(size=(256, 2048)).astype(np.float32) * np.linspace(2, 0.1, 2048, dtype=np.float32)
    with threadpool_limits(1):  # a multi-threaded SVD crawls on a loaded machine
        return PCA(n_components=128, svd_solver="full", whiten=True).fit(
            descs / np.linalg.norm(descs, axis=1, keepdims=True)
        )


def write_gem_ap(path: Path, depth: int, trunk: dict[str, Tensor], seed: int, **options) -> dict[str, Tensor]:
    """``Resnet-{depth}-AP-GeM.pt`` as dirtorch saved it (2019: legacy serialisation, DataParallel
    ``module.`` names, a scikit-learn < 0.22 PCA under ``pca['Landmarks_clean']``)."""
    g = torch.Generator().manual_seed(seed)
    sd = {
        **trunk,
        "adpool.p": torch.tensor([2.5 + 1.5 * torch.rand(1, generator=g).item()]),
        "fc.weight": torch.randn(2048, 2048, generator=g) * 2048**-0.5,
        "fc.bias": 0.01 * torch.randn(2048, generator=g),
    }
    opts = {"arch": f"resnet{depth}_rmac", "out_dim": 2048, "pooling": "gem", "gemp": 3, **options}
    ck = {
        "model_options": opts,
        "state_dict": {f"module.{k}": v for k, v in sd.items()},
        "pca": {"Landmarks_clean": fitted_pca(seed)},
    }
    torch.save(ck, path, _use_new_zipfile_serialization=False)
    old_pickle_names(path)
    return sd


class _Files(dict):
    """depth -> (path, state dict), each file written on first use (the ResNet-101 ones only by slow tests)."""

    def __init__(self, root: Path, write) -> None:
        super().__init__()
        self.root, self.write = root, write

    def __missing__(self, depth: int) -> tuple[Path, dict[str, Tensor]]:
        self[depth] = self.write(self.root, depth)
        return self[depth]


@pytest.fixture(scope="module")
def gem_ap_files(tmp_path_factory: pytest.TempPathFactory, trunks) -> dict[int, tuple[Path, dict[str, Tensor]]]:
    def write(root: Path, depth: int) -> tuple[Path, dict[str, Tensor]]:
        return root / f"Resnet-{depth}-AP-GeM.pt", write_gem_ap(
            root / f"Resnet-{depth}-AP-GeM.pt", depth, trunks[depth], seed=depth
        )

    return _Files(tmp_path_factory.mktemp("gem_ap"), write)


def gem_ap_ref(f: Tensor, sd: dict[str, Tensor]) -> Tensor:
    """dirtorch ``ResNet_RMAC.forward`` in eval mode, by hand: GeM(p), fc, L2."""
    return l2(gem_ref(f, sd["adpool.p"].item()) @ sd["fc.weight"].T + sd["fc.bias"])


@pytest.mark.parametrize(
    "name, depth",
    [
        ("gem_ap_r50", 50),
        pytest.param("gem_ap_r101", 101, marks=pytest.mark.slow),
        pytest.param("gem_ap_r101_lm18", 101, marks=pytest.mark.slow),
    ],
)
def test_gem_ap_loads_and_matches_reference(gem_ap_files, layer4, x: Tensor, name: str, depth: int) -> None:
    path, sd = gem_ap_files[depth]
    bb = BACKBONES.create(name, weights=path)
    assert isinstance(bb, NativeBackbone) and bb.weights_id == sha256_file(path)
    assert set(bb.net.state_dict()) == set(sd)  # zero missing, zero unexpected (module. stripped)
    with torch.no_grad():
        f, d = bb(x), bb.native(x)
    assert f.shape == (2, 2048, 2, 3)
    close(f, layer4[depth])
    assert d.shape == (2, 2048)
    close(d, gem_ap_ref(layer4[depth], sd))
    assert bb.upstream_config["arch"] == f"resnet{depth}_rmac"


def test_gem_ap_shipped_pca(gem_ap_files, x: Tensor) -> None:
    path, _ = gem_ap_files[50]
    with pytest.raises(pickle.UnpicklingError, match="sklearn.decomposition.pca.PCA"):
        torch.load(path, weights_only=True)  # why the allow-list: plain weights_only refuses the published layout
    bb = BACKBONES.create("gem_ap_r50", weights=path)
    pca = fitted_pca(50)
    with torch.no_grad():
        d = bb.native(x).numpy()
    # upstream's test_dir.py default: whitenp = 0.25 (computed here in float64, as whiten_shipped does)
    mean, comp, var = (a.astype(np.float64) for a in (pca.mean_, pca.components_, pca.explained_variance_))
    want = (d.astype(np.float64) - mean) @ comp.T / var**0.25
    np.testing.assert_allclose(
        bb.whiten_shipped(d, "Landmarks_clean"),
        want / np.linalg.norm(want, axis=1, keepdims=True),
        rtol=1e-6,
        atol=1e-9,
    )
    np.testing.assert_allclose(bb.whiten_shipped(d), bb.whiten_shipped(d, "Landmarks_clean"))
    # whitenp = 0.5 is plain PCA whitening: scikit-learn's own transform is the oracle
    sk = pca.transform(d)
    got = dirtorch_whiten(d, pca.mean_, pca.components_, pca.explained_variance_, True, whitenp=0.5)
    np.testing.assert_allclose(got, sk / np.linalg.norm(sk, axis=1, keepdims=True), rtol=1e-5, atol=1e-7)
    with pytest.raises(KeyError, match="Landmarks_clean"):
        bb.whiten_shipped(d, "Oxford")


def test_gem_ap_options_are_honoured(tmp_path: Path, trunks, layer4, x: Tensor) -> None:
    """``without_fc`` / ``norm_features`` from model_options change the descriptor as in dirtorch."""
    p = tmp_path / "nofc.pt"
    sd = write_gem_ap(p, 50, trunks[50], seed=9, without_fc=True, norm_features=True)
    bb = BACKBONES.create("gem_ap_r50", weights=p)
    with torch.no_grad():
        close(bb.native(x), l2(gem_ref(layer4[50], sd["adpool.p"].item())))


def test_gem_ap_refuses_code_in_the_file(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.pt"
    torch.save(
        {"model_options": {"arch": "resnet101_rmac"}, "state_dict": {}, "pca": {"x": Shell(f"touch {marker}")}}, p
    )
    with pytest.raises(CheckpointError) as err:
        BACKBONES.create("gem_ap_r101", weights=p)
    msg = str(err.value)
    assert "refused" in msg and ("posix.system" in msg or "os.system" in msg or "nt.system" in msg), msg
    assert "not on the allow-list for deep-image-retrieval (GeM-AP) checkpoints" in msg
    assert "sklearn.decomposition._pca.PCA" in msg and "Nothing from the file was run" in msg
    assert not marker.exists()
    p2 = tmp_path / "namespace.pt"
    torch.save({"model_options": {}, "state_dict": {}, "args": argparse.Namespace(lr=0.1)}, p2)
    with pytest.raises(CheckpointError, match=r"would import or call argparse\.Namespace"):
        BACKBONES.create("gem_ap_r101", weights=p2)


def test_gem_ap_wrong_files(tmp_path: Path, gem_ap_files, trunks) -> None:
    path50, sd50 = gem_ap_files[50]
    with pytest.raises(
        CheckpointError, match=r"a ResNet-50 deep-image-retrieval checkpoint, not ResNet-101; use gem_ap_r50"
    ):
        BACKBONES.create("gem_ap_r101", weights=path50)
    p = tmp_path / "cirtorch.pth"
    torch.save({"meta": {"architecture": "resnet50"}, "state_dict": {}}, p)
    with pytest.raises(
        CheckpointError,
        match=r"not a deep-image-retrieval \(GeM-AP\) checkpoint: expected .*found keys 'meta', 'state_dict'",
    ):
        BACKBONES.create("gem_ap_r50", weights=p)
    p = tmp_path / "missing.pt"
    opts = {"arch": "resnet50_rmac", "out_dim": 2048, "pooling": "gem", "gemp": 3}
    torch.save({"model_options": opts, "state_dict": {k: v for k, v in sd50.items() if k != "fc.bias"}}, p)
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint \(1\): 'fc\.bias'"):
        BACKBONES.create("gem_ap_r50", weights=p)
    p = tmp_path / "mac.pt"
    torch.save({"model_options": {**opts, "pooling": "max"}, "state_dict": {}}, p)
    with pytest.raises(CheckpointError, match="only GeM networks"):
        BACKBONES.create("gem_ap_r50", weights=p)
    p = tmp_path / "truncated.pt"
    with open(path50, "rb") as f:
        p.write_bytes(f.read(50_000))
    with pytest.raises(CheckpointError, match="truncated or not a PyTorch checkpoint"):
        BACKBONES.create("gem_ap_r50", weights=p)
    with pytest.raises(FileNotFoundError, match=r"Resnet-101-AP-GeM\.pt.*drive\.google\.com"):
        BACKBONES.create("gem_ap_r101")
