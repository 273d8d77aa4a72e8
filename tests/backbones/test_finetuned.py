"""GeM-AP, cirtorch and InsCLR: checkpoints written in each upstream layout load with every key; the
feature map equals torchvision's, and ``native`` equals a hand-written GeM + head + L2 reference."""

from __future__ import annotations

import argparse
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from sklearn.decomposition import PCA
from torch import Tensor, nn

from retrbench.backbones import BACKBONES
from retrbench.backbones.finetuned import (
    CIRTORCH_INFO,
    GEM_AP_INFO,
    INSCLR_INFO,
    NativeBackbone,
    cirtorch_whiten,
    dirtorch_whiten,
)
from retrbench.backbones.weights import CheckpointError, sha256_file

CARDS = Path(__file__).resolve().parents[2] / "models"
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])



@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RETRBENCH_CACHE", str(tmp_path / "cache"))


# --------------------------------------------------------------------------------------------
# Helpers (as in test_resnet.py): upstream-shaped random weights and references


def random_like(sd: dict[str, Tensor], seed: int) -> dict[str, Tensor]:
    """Random values for the names and shapes of ``sd`` that keep a deep residual stack finite."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in sd.items():
        shape = tuple(v.shape)
        if k.endswith("num_batches_tracked"):
            out[k] = torch.randint(1, 10_000, (), generator=g)
        elif k.endswith("running_var"):
            out[k] = 0.8 + 0.4 * torch.rand(shape, generator=g)
        elif k.endswith(("running_mean", "bias")):
            out[k] = 0.05 * torch.randn(shape, generator=g)
        elif k.endswith("weight") and len(shape) == 1:
            out[k] = 0.3 + 0.3 * torch.rand(shape, generator=g)
        elif k.endswith("weight"):
            fan_in = int(torch.tensor(shape[1:]).prod())
            out[k] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
        else:
            out[k] = torch.randn(shape, generator=g)
    return out


def on_meta(make):
    with torch.device("meta"):
        return make()


def tv_resnet(depth: int):
    return {50: torchvision.models.resnet50, 101: torchvision.models.resnet101}[depth]


@pytest.fixture(scope="module")
def trunks() -> dict[int, dict[str, Tensor]]:
    """Random torchvision ResNet-50 / -101 weights without ``fc`` (the layout every family builds on)."""
    out = {}
    for depth in (50, 101):
        sd = on_meta(tv_resnet(depth)).state_dict()
        out[depth] = random_like({k: v for k, v in sd.items() if not k.startswith("fc.")}, seed=depth)
    return out


@pytest.fixture(scope="module")
def x() -> Tensor:
    return torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))


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


def gem_ref(f: Tensor, p: float) -> Tensor:
    """GeM by hand: ``(mean over H, W of max(f, 1e-6)^p)^(1/p)``, ``(B, C, H, W) -> (B, C)``."""
    return f.clamp(min=1e-6).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


def l2(v: Tensor, eps: float = 0.0) -> Tensor:
    return v / (v.norm(dim=1, keepdim=True) + eps)


def close(a: Tensor, b: Tensor) -> None:
    assert torch.isfinite(a).all() and a.abs().max() > 0
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def old_pickle_names(path: Path) -> None:
    """Rename, in a legacy (non-zip) torch file, the modules numpy 2 / scikit-learn >= 0.22 pickle under
    to those of the 2018-2019 files (``numpy.core.multiarray``, ``sklearn.decomposition.pca``)."""
    data = path.read_bytes()
    new = data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    new = new.replace(b"sklearn.decomposition._pca\n", b"sklearn.decomposition.pca\n")
    assert new != data
    path.write_bytes(new)


class _Shell:
    """Pickles as a call to ``os.system``: what a malicious checkpoint would hold."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_registered_with_metadata() -> None:
    infos = {**GEM_AP_INFO, **CIRTORCH_INFO, **INSCLR_INFO}
    assert set(infos) == {
        "gem_ap_r101", "gem_ap_r50", "gem_ap_r101_lm18", "cirtorch_r101_gem", "cirtorch_gl18_r101_gem_w",
        "insclr_r101_gldv2", "insclr_r50_instre",
    }  # fmt: skip
    for name, info in infos.items():
        assert BACKBONES.get(name).info is info
        assert (info.channels, info.stride, info.default_size) == (2048, 32, 1024)
        assert (list(info.mean), list(info.std)) == IMAGENET
        assert (CARDS / info.card).is_file(), info.card
        assert info.licence and info.weights_source
    for alias, name in (
        ("gem-ap", "gem_ap_r101"),
        ("cirtorch-gem", "cirtorch_r101_gem"),
        ("insclr", "insclr_r101_gldv2"),
    ):
        assert BACKBONES.get(alias).name == name
    for info in CIRTORCH_INFO.values():  # metadata only: URL and file name agree
        assert info.url.startswith("http://cmp.felk.cvut.cz/cnnimageretrieval/data/networks/")
        assert info.url.endswith("/" + info.weights_file)
    assert CIRTORCH_INFO["cirtorch_r101_gem"].weights_file == "retrievalSfM120k-resnet101-gem-b80fb85.pth"
    assert GEM_AP_INFO["gem_ap_r101"].weights_file == "Resnet-101-AP-GeM.pt" and GEM_AP_INFO["gem_ap_r101"].url is None
    assert all(i.url is None and i.weights_file is None for i in INSCLR_INFO.values())  # never published


def test_random_init() -> None:
    bb = BACKBONES.create("insclr_r50_instre", pretrained=False)
    assert isinstance(bb, NativeBackbone) and bb.weights_id == "random-init"
    with torch.no_grad():
        d = bb.native(torch.rand(2, 3, 64, 64))
    assert d.shape == (2, 256)
    torch.testing.assert_close(d.norm(dim=1), torch.ones(2))
    for name in ("gem_ap_r50", "cirtorch_gl18_r101_gem_w", "insclr_r101_gldv2"):
        with pytest.raises(ValueError, match="pretrained=False"):
            BACKBONES.create(name, weights="x.pt", pretrained=False)


# --------------------------------------------------------------------------------------------
# GeM-AP (naver/deep-image-retrieval)


def test_resnet101_layouts_on_meta() -> None:
    """Cheap check of the full-size files the slow tests load: the upstream ResNet-101 layouts of GeM-AP
    and InsCLR (names and shapes) are exactly our networks' state dicts."""
    from retrbench.backbones.finetuned import DirtorchGeMNet, InsCLRNet

    tv = {
        k: tuple(v.shape)
        for k, v in on_meta(torchvision.models.resnet101).state_dict().items()
        if not k.startswith("fc.")
    }
    dirtorch = {**tv, "adpool.p": (1,), "fc.weight": (2048, 2048), "fc.bias": (2048,)}
    assert {k: tuple(v.shape) for k, v in on_meta(DirtorchGeMNet).state_dict().items()} == dirtorch
    insclr = {**{f"backbone.{k}": s for k, s in tv.items()}, "combiner.head.fc.weight": (2048, 2048)}
    assert {k: tuple(v.shape) for k, v in on_meta(InsCLRNet).state_dict().items()} == insclr


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
        {"model_options": {"arch": "resnet101_rmac"}, "state_dict": {}, "pca": {"x": _Shell(f"touch {marker}")}}, p
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


# --------------------------------------------------------------------------------------------
# cirtorch (cnnimageretrieval-pytorch)


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
    torch.save({"meta": {"architecture": "resnet101", "Lw": _Shell("true")}, "state_dict": {}}, p)
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


# --------------------------------------------------------------------------------------------
# InsCLR


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
