"""resnet50 (the baseline) and TorchvisionResNet: torchvision-layout checkpoints load with every key, and
the feature map equals torchvision's own ResNet-50 built from the same weights."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torchvision
from torch import Tensor

from retrbench.backbones import BACKBONES, local_weights
from retrbench.backbones.resnet import RESNET50, TorchvisionResNet, build_resnet50, resnet_depth
from retrbench.backbones.weights import PUBLISHED_DIGEST_PREFIX
from retrbench.utils.checkpoint import CheckpointError
from retrbench.utils.io import sha256_file

from ._helpers import CARDS, close, loaded, on_meta, tv_layer4


@pytest.mark.parametrize("name", ["resnet50", "baseline", "resnet50-imagenet", "resnet50_imagenet"])
def test_registered_with_metadata(name: str) -> None:
    entry = BACKBONES.get(name)
    assert entry.name == "resnet50" and entry.info == RESNET50
    assert (RESNET50.channels, RESNET50.stride, RESNET50.default_size) == (2048, 32, 1024)
    assert RESNET50.licence and RESNET50.weights_source and RESNET50.weights_file
    assert (CARDS / RESNET50.card).is_file(), RESNET50.card
    assert (RESNET50.mean, RESNET50.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert entry.label == "Baseline"  # the paper's name, written in result tables


def test_published_names_and_urls_agree() -> None:
    """Metadata only: the URL ends in the file name; torchvision names embed their sha256 prefix."""
    assert RESNET50.url == "https://download.pytorch.org/models/resnet50-0676ba61.pth"
    assert RESNET50.url.endswith("/" + RESNET50.weights_file) and RESNET50.sha256 is None
    for file in (RESNET50.weights_file, "resnet50-19c8e357.pth"):
        prefix = re.search(r"-([0-9a-f]{8})\.pth$", file).group(1)
        assert PUBLISHED_DIGEST_PREFIX[file] == ("sha256", prefix)


def test_random_init_is_seeded() -> None:
    a, b = BACKBONES.create("resnet50", pretrained=False), BACKBONES.create("baseline", pretrained=False)
    assert a.weights_id == "random-init" and not a.training
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    with pytest.raises(ValueError, match="pretrained=False"):
        BACKBONES.create("resnet50", weights="x.pth", pretrained=False)


@pytest.mark.parametrize("depth", [50, 101, 152])
def test_resnet_depth_from_layer3(depth: int) -> None:
    sd = on_meta(lambda: TorchvisionResNet(depth)).state_dict()
    assert resnet_depth(sd) == depth
    assert resnet_depth({f"backbone.{k}": v for k, v in sd.items()}, "backbone.") == depth
    assert resnet_depth({"conv1.weight": sd["conv1.weight"]}) is None


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
        close(feats, tv_layer4(ref, x))
        close(bb.net(x), ref(x))  # classifier kept: ImageNet logits
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
