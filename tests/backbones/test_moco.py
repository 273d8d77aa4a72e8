"""MoCo v1 / v2: the official pre-training checkpoints load their query encoder with every key (head,
key encoder and queue dropped), and the feature map equals torchvision's ResNet-50 given those weights."""

from __future__ import annotations

import hashlib
import http.server
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torchvision
from torch import Tensor, nn

from retrbench.backbones import BACKBONES, moco
from retrbench.backbones.moco import MOCO_INFO, build_moco
from retrbench.backbones.weights import PUBLISHED_DIGEST_PREFIX
from retrbench.utils.checkpoint import CheckpointError

from ._helpers import CARDS, close, loaded, tv_layer4


@pytest.mark.parametrize(
    "name, canonical, label",
    [
        ("mocov1", "mocov1", "MoCov1"),
        ("moco-v1", "mocov1", "MoCov1"),
        ("mocov2", "mocov2", "MoCov2"),
        ("mocov2_200ep", "mocov2", "MoCov2"),
        ("mocov2_800ep", "mocov2_800ep", "MoCov2 (800ep)"),
    ],
)
def test_registered_with_metadata(name: str, canonical: str, label: str) -> None:
    entry = BACKBONES.get(name)
    info = MOCO_INFO[canonical]
    assert entry.name == canonical and entry.info == info and entry.label == label
    assert (info.channels, info.stride, info.default_size) == (2048, 32, 1024)
    assert (info.mean, info.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert info.licence and info.weights_source and (CARDS / info.card).is_file()


def test_published_names_and_urls_agree() -> None:
    md5 = {"mocov1": "b251726a", "mocov2": "59fd9945", "mocov2_800ep": "a04e12f8"}  # facebookresearch/moco README
    for name, info in MOCO_INFO.items():
        tag = info.weights_file.removesuffix("_pretrain.pth.tar")
        assert info.url == f"https://dl.fbaipublicfiles.com/moco/moco_checkpoints/{tag}/{info.weights_file}"
        assert PUBLISHED_DIGEST_PREFIX[info.weights_file] == ("md5", md5[name])


def test_random_init() -> None:
    with torch.no_grad():
        assert BACKBONES.create("mocov1", pretrained=False)(torch.rand(1, 3, 64, 64)).shape == (1, 2048, 2, 2)
    with pytest.raises(ValueError, match="pretrained=False"):
        BACKBONES.create("mocov2_800ep", weights="x.pth", pretrained=False)


def moco_file(path: Path, version: int, trunk: dict[str, Tensor], seed: int, legacy: bool = True) -> dict[str, Tensor]:
    """A ``*_pretrain.pth.tar`` of facebookresearch/moco (main_moco.py's save_checkpoint, DDP-wrapped).

    encoder_q: ``trunk`` + the head (v1: ``fc`` Linear 2048 -> 128; v2: ``fc.0`` 2048 -> 2048,
    ``fc.2`` 2048 -> 128). encoder_k: the same names and shapes with other values (views of one
    shared random storage, to keep the file small). queue (128, 65536) and queue_ptr as upstream.
    The optimizer is SGD's state before its first step (no momentum buffers yet).
    Returns encoder_q's own state dict (torchvision names, head included).
    """
    g = torch.Generator().manual_seed(seed)
    head = (
        {"fc.weight": torch.randn(128, 2048, generator=g) * 0.02, "fc.bias": torch.zeros(128)}
        if version == 1
        else {
            "fc.0.weight": torch.randn(2048, 2048, generator=g) * 0.02,
            "fc.0.bias": torch.zeros(2048),
            "fc.2.weight": torch.randn(128, 2048, generator=g) * 0.02,
            "fc.2.bias": torch.zeros(128),
        }
    )
    q = {**{k: v for k, v in trunk.items() if not k.startswith("fc.")}, **head}
    pool = torch.randn(max(v.numel() for v in q.values()), generator=g)
    k_enc = {
        k: pool[: v.numel()].view(v.shape).to(v.dtype) if v.is_floating_point() else v.clone() for k, v in q.items()
    }
    sd = {f"module.encoder_q.{k}": v for k, v in q.items()}
    sd.update({f"module.encoder_k.{k}": v for k, v in k_enc.items()})
    sd["module.queue"] = nn.functional.normalize(torch.randn(128, 65536, generator=g), dim=0)
    sd["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    n_params = len([k for k in q if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))])
    optimizer = {
        "state": {},
        "param_groups": [
            {
                "lr": 0.03,
                "momentum": 0.9,
                "dampening": 0,
                "weight_decay": 1e-4,
                "nesterov": False,
                "params": list(range(n_params)),
            }
        ],
    }
    torch.save(
        {"epoch": 200, "arch": "resnet50", "state_dict": sd, "optimizer": optimizer},
        path,
        _use_new_zipfile_serialization=not legacy,
    )
    return q


def moco_reference(q: dict[str, Tensor], version: int) -> nn.Module:
    """torchvision ResNet-50 with MoCo's encoder head (builder.py), given encoder_q's weights."""

    def make() -> nn.Module:
        net = torchvision.models.resnet50(num_classes=128)
        if version == 2:
            net.fc = nn.Sequential(nn.Linear(2048, 2048), nn.ReLU(), net.fc)
        return net

    return loaded(make, q)


@pytest.fixture(scope="module")
def moco_files(tmp_path_factory: pytest.TempPathFactory, r50_sd: dict[str, Tensor]) -> dict[int, tuple[Path, dict]]:
    """One MoCo v1 and one v2 file (legacy serialisation, as in early 2020) with their encoder_q weights."""
    root = tmp_path_factory.mktemp("moco")
    return {v: (root / f"moco_v{v}.pth.tar", moco_file(root / f"moco_v{v}.pth.tar", v, r50_sd, seed=v)) for v in (1, 2)}


@pytest.mark.parametrize("version, name", [(1, "mocov1"), (2, "mocov2"), (2, "mocov2_800ep")])
def test_moco_query_encoder_equals_torchvision(
    moco_files: dict[int, tuple[Path, dict]], x: Tensor, version: int, name: str
) -> None:
    p, q = moco_files[version]
    bb = BACKBONES.create(name, weights=p)
    own = bb.net.state_dict()
    assert set(own) == {k for k in q if not k.startswith("fc.")}  # encoder_q minus its head: nothing else
    for k, v in own.items():
        assert torch.equal(v, q[k]), k  # query encoder, not the key encoder
    ref = moco_reference(q, version)
    with torch.no_grad():
        feats = bb(x)
        assert feats.shape == (2, 2048, 2, 3)
        close(feats, tv_layer4(ref, x))


def test_moco_version_and_format_errors(
    tmp_path: Path, r50_sd: dict[str, Tensor], r50_file: Path, moco_files: dict[int, tuple[Path, dict]]
) -> None:
    v2 = moco_files[2][0]
    with pytest.raises(CheckpointError, match=r"MoCo v2 checkpoint .*use mocov2 / mocov2_800ep"):
        build_moco("mocov1", weights=v2)
    with pytest.raises(
        CheckpointError, match=r"not a MoCo pre-training checkpoint: expected \{'epoch', 'arch', 'state_dict'"
    ):
        build_moco("mocov2", weights=r50_file)
    lincls = tmp_path / "lincls.pth.tar"
    lin = {f"module.{k}": v for k, v in list(r50_sd.items())[:5]}
    torch.save({"epoch": 100, "arch": "resnet50", "state_dict": lin, "best_acc1": 60.6, "optimizer": {}}, lincls)
    with pytest.raises(CheckpointError, match="no module.encoder_q.. keys"):
        build_moco("mocov2", weights=lincls)
    other = tmp_path / "r18.pth.tar"
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": {}}, other)
    with pytest.raises(CheckpointError, match="arch 'resnet18'"):
        build_moco("mocov1", weights=other)
    truncated = tmp_path / "truncated.pth.tar"
    with open(v2, "rb") as f:
        truncated.write_bytes(f.read(100_000))
    with pytest.raises(CheckpointError, match="truncated or not a PyTorch checkpoint"):
        build_moco("mocov2", weights=truncated)


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(root), **kw)

        def log_message(self, *a) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()
    thread.join()


def test_moco_download_is_checked_against_published_md5(
    tmp_path: Path, http_root: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Downloaded under its published name, a file whose md5 does not start with the README's prefix is refused."""
    url, root = http_root
    info = MOCO_INFO["mocov1"]
    served = root / info.weights_file
    served.write_bytes(b"a corrupt download" * 1000)
    monkeypatch.setitem(moco.MOCO_INFO, "mocov1", replace(info, url=f"{url}/{info.weights_file}"))
    with pytest.raises(CheckpointError, match=r"md5 is [0-9a-f]{32}, but the published one starts with b251726a"):
        BACKBONES.create("mocov1")
    cached = tmp_path / "cache" / "weights" / info.weights_file
    assert cached.read_bytes() == served.read_bytes()  # it was downloaded, then refused before being read
    assert not hashlib.md5(cached.read_bytes()).hexdigest().startswith("b251726a")
