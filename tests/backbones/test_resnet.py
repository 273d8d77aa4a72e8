"""resnet50 / SimCLR / MoCo: checkpoints written in each upstream layout load with every key, and the
feature map equals an independent torchvision reference built from the same weights."""

from __future__ import annotations

import hashlib
import http.server
import re
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import Bottleneck

from retrbench.backbones import BACKBONES, local_weights
from retrbench.backbones import resnet as rn
from retrbench.backbones.resnet import (
    MOCO_INFO,
    PUBLISHED_DIGEST_PREFIX,
    RESNET50,
    SIMCLR_INFO,
    SimCLRResNet50,
    build_moco,
    build_resnet50,
    build_simclr,
)
from retrbench.backbones.weights import CheckpointError, sha256_file

CARDS = Path(__file__).resolve().parents[2] / "models"



@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test gets an empty weights cache (files put there must not leak into other tests)."""
    monkeypatch.setenv("RETRBENCH_CACHE", str(tmp_path / "cache"))


# --------------------------------------------------------------------------------------------
# Helpers: upstream-shaped random weights and independent references


def random_like(sd: dict[str, Tensor], seed: int) -> dict[str, Tensor]:
    """Random values for a state dict's names and shapes (meta tensors welcome), keeping activations finite.

    Convolutions / linears: He-normal; BatchNorm: weight in [0.3, 0.6], small bias and mean,
    variance in [0.8, 1.2], so a deep residual stack neither explodes nor dies.
    """
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
        elif k.endswith("weight") and len(shape) == 1:  # BatchNorm scale
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


def loaded(make, sd: dict[str, Tensor]) -> nn.Module:
    """A reference module built on meta and given ``sd`` (strict, every key)."""
    net = on_meta(make)
    net.load_state_dict(sd, strict=True, assign=True)
    return net.eval()


def tv_layer4(net: torchvision.models.ResNet, x: Tensor) -> Tensor:
    """torchvision ResNet up to layer4, written out."""
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    return net.layer4(net.layer3(net.layer2(net.layer1(x))))


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


@pytest.fixture(scope="module")
def r50_sd() -> dict[str, Tensor]:
    """Random weights in torchvision ResNet-50's exact layout (320 entries, fc included)."""
    return random_like(on_meta(torchvision.models.resnet50).state_dict(), seed=1)


@pytest.fixture(scope="module")
def r50_file(tmp_path_factory: pytest.TempPathFactory, r50_sd: dict[str, Tensor]) -> Path:
    p = tmp_path_factory.mktemp("r50") / "tv_resnet50.pth"
    torch.save(r50_sd, p)
    return p


@pytest.fixture(scope="module")
def x() -> Tensor:
    return torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))


def _assert_same(a: Tensor, b: Tensor) -> None:
    assert torch.isfinite(a).all() and a.abs().max() > 0
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Registry and metadata


@pytest.mark.parametrize(
    "name, canonical, channels",
    [
        ("resnet50", "resnet50", 2048),
        ("baseline", "resnet50", 2048),
        ("resnet50-imagenet", "resnet50", 2048),
        ("simclr1x", "simclr1x", 2048),
        ("simclr2x", "simclr2x", 4096),
        ("simclr4x", "simclr4x", 8192),
        ("mocov1", "mocov1", 2048),
        ("mocov2", "mocov2", 2048),
        ("mocov2_200ep", "mocov2", 2048),
        ("mocov2_800ep", "mocov2_800ep", 2048),
    ],
)
def test_registered_with_metadata(name: str, canonical: str, channels: int) -> None:
    entry = BACKBONES.get(name)
    assert entry.name == canonical
    info = entry.info
    assert (info.channels, info.stride, info.default_size) == (channels, 32, 1024)
    assert info.licence and info.weights_source and info.weights_file
    assert (CARDS / info.card).is_file(), info.card
    if canonical.startswith("simclr"):
        assert (info.mean, info.std) == ((0.0,) * 3, (1.0,) * 3)  # SimCLR v1: inputs in [0, 1]
    else:
        assert (info.mean, info.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_published_names_and_urls_agree() -> None:
    """Metadata only: URLs end in the file name; torchvision names embed their sha256 prefix."""
    assert RESNET50.url == "https://download.pytorch.org/models/resnet50-0676ba61.pth"
    assert RESNET50.url.endswith("/" + RESNET50.weights_file) and RESNET50.sha256 is None
    for file in (RESNET50.weights_file, "resnet50-19c8e357.pth"):
        prefix = re.search(r"-([0-9a-f]{8})\.pth$", file).group(1)
        assert PUBLISHED_DIGEST_PREFIX[file] == ("sha256", prefix)
    md5 = {"mocov1": "b251726a", "mocov2": "59fd9945", "mocov2_800ep": "a04e12f8"}  # facebookresearch/moco README
    for name, info in MOCO_INFO.items():
        tag = info.weights_file.removesuffix("_pretrain.pth.tar")
        assert info.url == f"https://dl.fbaipublicfiles.com/moco/moco_checkpoints/{tag}/{info.weights_file}"
        assert PUBLISHED_DIGEST_PREFIX[info.weights_file] == ("md5", md5[name])
    for w, info in SIMCLR_INFO.items():
        assert info.url is None and info.weights_file == f"resnet50-{w}x.pth"  # the converter's README names


def test_random_init_is_seeded() -> None:
    a, b = BACKBONES.create("resnet50", pretrained=False), BACKBONES.create("baseline", pretrained=False)
    assert a.weights_id == "random-init" and not a.training
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    with torch.no_grad():
        assert BACKBONES.create("mocov1", pretrained=False)(torch.rand(1, 3, 64, 64)).shape == (1, 2048, 2, 2)
    for name in ("resnet50", "simclr4x", "mocov2_800ep"):
        with pytest.raises(ValueError, match="pretrained=False"):
            BACKBONES.create(name, weights="x.pth", pretrained=False)


# --------------------------------------------------------------------------------------------
# resnet50 (baseline)


@pytest.mark.parametrize("legacy", [False, True], ids=["IMAGENET1K_V1-zip", "19c8e357-legacy-no-bn-counters"])
def test_resnet50_equals_torchvision(
    tmp_path: Path, r50_sd: dict[str, Tensor], r50_file: Path, x: Tensor, legacy: bool
) -> None:
    sd, p = dict(r50_sd), r50_file
    if legacy:  # the 2017 file: old serialisation, saved before BatchNorm had num_batches_tracked
        sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
        p = tmp_path / "tv_resnet50_legacy.pth"
        torch.save(sd, p, _use_new_zipfile_serialization=False)
    assert len(sd) == (267 if legacy else 320)
    bb = build_resnet50(weights=p)
    assert set(bb.net.state_dict()) == set(r50_sd)  # nothing missing, nothing extra
    assert bb.weights_id == sha256_file(p) and not bb.training
    ref = loaded(torchvision.models.resnet50, sd)
    with torch.no_grad():
        feats = bb(x)
        assert feats.shape == (2, 2048, 2, 3)  # stride 32
        _assert_same(feats, tv_layer4(ref, x))
        _assert_same(bb.net(x), ref(x))  # classifier kept: ImageNet logits
        assert bb(torch.rand(1, 3, 65, 97)).shape == (1, 2048, 3, 4)


def test_resnet50_cache_and_digest(tmp_path: Path) -> None:
    """The older published name is found in the cache; its content must match the hash in its name."""
    cache = tmp_path / "cache" / "weights"
    cache.mkdir(parents=True)
    (cache / "resnet50-19c8e357.pth").write_bytes(b"not the published file")
    assert local_weights("baseline") == cache / "resnet50-19c8e357.pth"  # 'retrbench models' sees it too
    with pytest.raises(CheckpointError, match=r"not the published resnet50-19c8e357\.pth.*starts with 19c8e357"):
        build_resnet50()


def test_resnet50_wrong_files(tmp_path: Path, r50_sd: dict[str, Tensor], r50_file: Path) -> None:
    p = tmp_path / "missing_and_extra_key.pth"
    torch.save({**{k: v for k, v in r50_sd.items() if k != "layer2.0.conv1.weight"}, "head.weight": torch.zeros(3)}, p)
    with pytest.raises(CheckpointError) as err:
        build_resnet50(weights=p)
    assert "missing from the checkpoint (1): 'layer2.0.conv1.weight'" in str(err.value)
    assert "unexpected in the checkpoint (1): 'head.weight'" in str(err.value)
    p = tmp_path / "moco.pth"
    torch.save({"epoch": 200, "state_dict": {"module.encoder_q.conv1.weight": torch.zeros(1)}}, p)
    with pytest.raises(CheckpointError, match="MoCo pre-training checkpoint: use mocov1"):
        build_resnet50(weights=p)
    p = tmp_path / "truncated.pth"
    with open(r50_file, "rb") as f:
        p.write_bytes(f.read(r50_file.stat().st_size // 3))
    with pytest.raises(CheckpointError, match="truncated or not a PyTorch checkpoint"):
        build_resnet50(weights=p)
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        build_resnet50(weights=tmp_path / "absent.pth")


# --------------------------------------------------------------------------------------------
# SimCLR


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
        _assert_same(feats, tv_layer4(ref, x[:1]))


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


# --------------------------------------------------------------------------------------------
# MoCo


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
        _assert_same(feats, tv_layer4(ref, x))


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
    monkeypatch.setitem(rn.MOCO_INFO, "mocov1", replace(info, url=f"{url}/{info.weights_file}"))
    with pytest.raises(CheckpointError, match=r"md5 is [0-9a-f]{32}, but the published one starts with b251726a"):
        BACKBONES.create("mocov1")
    cached = tmp_path / "cache" / "weights" / info.weights_file
    assert cached.read_bytes() == served.read_bytes()  # it was downloaded, then refused before being read
    assert not hashlib.md5(cached.read_bytes()).hexdigest().startswith("b251726a")
