"""BACKBONES.create through the resolvers of retrbench.backbones.external: timm:NAME with a weights file,
hf-hub:ORG/REPO from the Hugging Face cache, hub:DIR:ENTRY, and clear refusals."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file

from retrbench.backbones import BACKBONES
from retrbench.backbones.external import parse_hub_spec
from retrbench.utils.checkpoint import CheckpointError
from retrbench.utils.io import sha256_file


@pytest.fixture(scope="module")
def resnet18_ref(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """A timm resnet18 with its own random weights (classifier included) saved as a state dict."""
    torch.manual_seed(123)
    ref = timm.create_model("resnet18", pretrained=False).eval()
    path = tmp_path_factory.mktemp("timm") / "resnet18.pth"
    torch.save(ref.state_dict(), path)
    return ref, path


def _x(h: int = 64, w: int = 96) -> torch.Tensor:
    return torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))


def test_timm_with_weights_file_equals_forward_features(resnet18_ref: tuple[torch.nn.Module, Path]) -> None:
    ref, path = resnet18_ref
    bb = BACKBONES.create("timm:resnet18", weights=path)
    assert bb.name == bb.info.label == "timm:resnet18" and bb.weights_id == sha256_file(path)
    assert bb.info.channels == 512 and bb.info.stride == 32
    assert bb.info.mean == (0.485, 0.456, 0.406) and bb.info.default_size == 224
    assert not bb.training and not any(p.requires_grad for p in bb.parameters())
    x = _x()
    with torch.no_grad():
        y, want = bb(x), ref.forward_features(x)
    assert y.shape == (2, 512, 2, 3)
    torch.testing.assert_close(y, want, rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["safetensors", "nested-module-prefix", "headless"])
def test_timm_weight_file_layouts(tmp_path: Path, resnet18_ref: tuple[torch.nn.Module, Path], layout: str) -> None:
    ref, _ = resnet18_ref
    sd = ref.state_dict()
    if layout == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    elif layout == "nested-module-prefix":  # a training checkpoint of an nn.DataParallel model
        path = tmp_path / "w.pth.tar"
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    else:  # saved from a num_classes=0 model: no fc.*
        path = tmp_path / "w.pth"
        torch.save({k: v for k, v in sd.items() if not k.startswith("fc.")}, path)
    bb = BACKBONES.create("timm:resnet18", weights=path)
    x = _x(32, 32)
    with torch.no_grad():
        torch.testing.assert_close(bb(x), ref.forward_features(x), rtol=0, atol=0)


def test_timm_wrong_weights_are_refused(tmp_path: Path, resnet18_ref: tuple[torch.nn.Module, Path]) -> None:
    _, path = resnet18_ref
    with pytest.raises(ValueError, match="missing from the checkpoint"):
        BACKBONES.create("timm:resnet34", weights=path)  # resnet18 weights lack layer*.2+
    odd = tmp_path / "odd.pth"
    torch.save({"epoch": 1, "weights": [1, 2]}, odd)
    with pytest.raises(CheckpointError, match="no state dict found"):
        BACKBONES.create("timm:resnet18", weights=odd)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        BACKBONES.create("timm:resnet18", weights=cut)


def test_timm_nested_weights_from_the_command_line(tmp_path: Path, resnet18_ref: tuple[torch.nn.Module, Path]) -> None:
    # weights under a key outside NESTED_KEYS: the error says how to pick them from the CLI, and
    # --weights FILE#KEY (a RunConfig string, as the CLI builds it) loads them
    from retrbench.config import RunConfig

    ref, _ = resnet18_ref
    path = tmp_path / "distill.pth"
    torch.save({"epoch": 9, "teacher": ref.state_dict(), "student": {"w": torch.ones(1)}}, path)
    with pytest.raises(CheckpointError) as err:
        BACKBONES.create("timm:resnet18", weights=path)
    msg = str(err.value)
    assert '--weights FILE#KEY (weights="FILE#KEY" in Python)' in msg and "'teacher'" in msg and "\n" not in msg
    (model,) = RunConfig(model="timm:resnet18", weights=f"{path}#teacher").models
    bb = BACKBONES.create(model.name, weights=model.weights)
    assert bb.weights_id == sha256_file(path) + "#teacher"  # the key keys the feature cache too
    x = _x(32, 32)
    with torch.no_grad():
        torch.testing.assert_close(bb(x), ref.forward_features(x), rtol=0, atol=0)
    # a '#' that is part of an existing file name is not a key
    hashed = tmp_path / "run#1.pth"
    hashed.write_bytes(path.read_bytes())
    assert BACKBONES.create("timm:resnet18", weights=f"{hashed}#teacher").weights_id == sha256_file(hashed) + "#teacher"
    plain = tmp_path / "flat#2.pth"
    torch.save(ref.state_dict(), plain)
    assert BACKBONES.create("timm:resnet18", weights=plain).weights_id == sha256_file(plain)


def test_timm_random_init_is_seeded() -> None:
    a = BACKBONES.create("timm:resnet18", pretrained=False)
    b = BACKBONES.create("timm:resnet18", pretrained=False)
    assert a.weights_id == "random-init"
    torch.testing.assert_close(a.net.model.conv1.weight, b.net.model.conv1.weight, rtol=0, atol=0)


def test_timm_download_failure_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    real = timm.create_model

    def offline(name: str, pretrained: bool = False, **kw):  # what timm does without network access
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co' to load this file")
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(RuntimeError, match=r"could not fetch the pretrained weights of 'resnet18'.*--weights PATH"):
        BACKBONES.create("timm:resnet18")


def test_timm_unknown_name_suggests() -> None:
    with pytest.raises(KeyError, match=r"unknown timm model 'resnet5O'.*did you mean 'timm:resnet50'"):
        BACKBONES.create("timm:resnet5O")


HUBCONF = textwrap.dedent(
    """
    dependencies = ["torch", "torchvision"]

    import torch
    from torch import nn
    from torchvision.models import resnet18


    def tv_resnet18(weights=None):
        '''torchvision style: weights=, no pretrained='''
        assert weights is None, "no weights can be downloaded in the tests"
        return resnet18(weights=None)


    class WithFeatures(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Conv2d(3, 6, 3, stride=4, padding=1)
            self.head = nn.Linear(6, 2)

        def forward_features(self, x):
            return torch.relu(self.body(x))

        def forward(self, x):
            return self.head(self.forward_features(x).mean((2, 3)))


    def with_features(pretrained=False):
        return WithFeatures()


    def plain_map():
        return nn.Sequential(nn.Conv2d(3, 5, 2, stride=2), nn.ReLU())


    def logits_only(pretrained=False):
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3))
    """
)


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("hubrepo") / "myrepo"
    d.mkdir()
    (d / "hubconf.py").write_text(HUBCONF)
    return d


def test_hub_local_torchvision_resnet_stops_before_avgpool(hub_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(7)
    ref = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)
    bb = BACKBONES.create(f"hub:{hub_dir}:tv_resnet18", weights=path)
    assert bb.name == bb.info.label == "hub:myrepo:tv_resnet18" and bb.net.mode == "resnet"
    assert bb.info.channels == 512 and bb.info.stride == 32 and bb.weights_id == sha256_file(path)
    nested = tmp_path / "nested.pth"
    torch.save({"ema": ref.state_dict()}, nested)
    assert BACKBONES.create(f"hub:{hub_dir}:tv_resnet18", weights=f"{nested}#ema").weights_id == sha256_file(nested) + "#ema"
    trunk = torch.nn.Sequential(*list(ref.children())[:-2])  # everything before avgpool and fc
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(bb(x), trunk(x), rtol=0, atol=0)


def test_hub_local_forward_features_and_plain_map(hub_dir: Path) -> None:
    bb = BACKBONES.create(f"hub:{hub_dir}:with_features", pretrained=False)
    assert bb.net.mode == "forward_features" and bb.info.channels == 6 and bb.info.stride == 4
    assert bb.weights_id.startswith("random-init:hub:") and str(hub_dir) in bb.weights_id
    x = _x(32, 48)
    with torch.no_grad():
        torch.testing.assert_close(bb(x), bb.net.net.forward_features(x))
    plain = BACKBONES.create(f"hub:{hub_dir}:plain_map")
    assert plain.net.mode == "forward" and (plain.info.channels, plain.info.stride) == (5, 2)
    with pytest.raises(ValueError, match=r"not a \(B, C, H, W\) map"):
        BACKBONES.create(f"hub:{hub_dir}:logits_only", pretrained=False)


def test_hub_spec_parsing() -> None:
    assert parse_hub_spec("pytorch/vision:v0.10.0:resnet50") == ("pytorch/vision:v0.10.0", "resnet50")
    assert parse_hub_spec("/data/repo:net") == ("/data/repo", "net")
    with pytest.raises(ValueError, match="expected hub:REPO:ENTRY"):
        BACKBONES.create("hub:resnet50")
    with pytest.raises(FileNotFoundError, match="hub repository directory not found"):
        BACKBONES.create("hub:/no/such/dir:net")


def test_registry_names_dispatch() -> None:
    bb = BACKBONES.create("chance")  # an alias of the registry's 'random' entry
    assert bb.name == "random"


def test_unknown_specs_and_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="unknown backbone 'efficientnet_lite'.*did you mean 'efficientnet_lite0'"):
        BACKBONES.create("efficientnet_lite")
    with pytest.raises(KeyError, match=r"unknown backbone 'tfhub:foo'.*or timm:\.\.\., hf-hub:\.\.\., hub:\.\.\."):
        BACKBONES.create("tfhub:foo")
    f = tmp_path / "mynet.pth"
    torch.save({"w": torch.zeros(1)}, f)
    for spec in (str(f), "weights/other.pt", "net.safetensors"):
        with pytest.raises(ValueError, match=r"is a file: .*--model timm:resnet50 --weights"):
            BACKBONES.create(spec)


# --------------------------------------------------------------------------------------------
# hf-hub: a timm model on the Hugging Face Hub, read from huggingface_hub's cache


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty huggingface_hub cache, offline (nothing here reaches the network)."""
    import huggingface_hub.constants as hf

    root = tmp_path / "hf-hub"
    root.mkdir()
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(root))
    return root


def _cache_repo(root: Path, repo: str, model: torch.nn.Module, architecture: str, classifier: str = "fc") -> None:
    """Put a timm repository in the cache as huggingface_hub lays it out (refs/main -> snapshots/<commit>/)."""
    folder = root / ("models--" + repo.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snap = folder / "snapshots" / commit
    snap.mkdir(parents=True)
    cfg = {"mean": [0.5] * 3, "std": [0.25] * 3, "input_size": [3, 160, 160], "classifier": classifier, "license": "apache-2.0"}
    (snap / "config.json").write_text(json.dumps({"architecture": architecture, "num_classes": 1000, "pretrained_cfg": cfg}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(snap / "model.safetensors"))


def test_hf_hub_from_the_cache_equals_the_model(hf_cache: Path, resnet18_ref: tuple[torch.nn.Module, Path]) -> None:
    ref, path = resnet18_ref
    _cache_repo(hf_cache, "acme/tiny-resnet", ref, "resnet18")
    bb = BACKBONES.create("hf-hub:acme/tiny-resnet")
    assert bb.name == bb.info.label == "hf-hub:acme/tiny-resnet"
    assert bb.weights_id == "timm-pretrained:acme/tiny-resnet:"
    assert (bb.info.mean, bb.info.std, bb.info.default_size) == ((0.5,) * 3, (0.25,) * 3, 160)
    assert bb.info.licence == "apache-2.0" and (bb.info.channels, bb.info.stride) == (512, 32)
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(bb(x), ref.forward_features(x), rtol=0, atol=0)
    # the timm: path logic applies: a weights file, or a seeded random network
    assert BACKBONES.create("hf-hub:acme/tiny-resnet", weights=path).weights_id == sha256_file(path)
    a = BACKBONES.create("hf-hub:acme/tiny-resnet", pretrained=False)
    b = BACKBONES.create("timm:resnet18", pretrained=False)
    assert a.weights_id == "random-init"
    torch.testing.assert_close(a.net.model.conv1.weight, b.net.model.conv1.weight, rtol=0, atol=0)


def test_hf_hub_offline_not_cached_is_explained(hf_cache: Path) -> None:
    for kw in ({}, {"pretrained": False}):
        with pytest.raises(RuntimeError) as err:
            BACKBONES.create("hf-hub:timm/resnet18.a1_in1k", **kw)
        msg = str(err.value)
        assert msg.startswith("hf-hub:timm/resnet18.a1_in1k: could not fetch")
        assert "HF_HOME" in msg and "hf download timm/resnet18.a1_in1k" in msg and "--weights PATH" in msg
    with pytest.raises(ValueError, match="expected hf-hub:ORG/REPO"):
        BACKBONES.create("hf-hub:resnet18")


# --------------------------------------------------------------------------------------------
# timm token models (ViT, SigLIP): patch tokens as the map, timm's pooled features as native


def _token_map(model: torch.nn.Module, x: torch.Tensor, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's own tokens for ``x`` fitted to the patch (the input rule, written out): (map, native)."""
    H, W = x.shape[-2:]
    xf = torch.nn.functional.interpolate(x, size=(round(H / patch) * patch, round(W / patch) * patch), mode="bilinear", align_corners=False)
    t = model.forward_features(xf)
    h, w = xf.shape[-2] // patch, xf.shape[-1] // patch
    grid = t[:, model.num_prefix_tokens :].reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2)
    return grid, model.forward_head(t, pre_logits=True)


@pytest.fixture(scope="module")
def vit_ref(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """A timm vit_tiny_patch16_224 (dynamic size) with its own random weights, saved as a state dict."""
    torch.manual_seed(7)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, dynamic_img_size=True).eval()
    path = tmp_path_factory.mktemp("timm_vit") / "vit_tiny.pth"
    torch.save(ref.state_dict(), path)
    return ref, path


def test_timm_vit_gives_patch_tokens_and_class_token(vit_ref: tuple[torch.nn.Module, Path]) -> None:
    from retrbench.backbones import TokenBackbone
    from retrbench.backbones.base import INPUT_RESIZE_TO_PATCHES

    ref, path = vit_ref
    bb = BACKBONES.create("timm:vit_tiny_patch16_224", weights=path)
    assert isinstance(bb, TokenBackbone) and bb.weights_id == sha256_file(path)
    info = bb.info
    assert (info.channels, info.stride, info.patch_size, info.input_rule) == (192, 16, 16, INPUT_RESIZE_TO_PATCHES)
    assert "global_pool='token'" in info.native_descriptor and info.map_side(101) == 6
    for h, w in ((224, 224), (101, 150)):  # the pretrained grid, and a resized non-square input
        x = _x(h, w)
        with torch.no_grad():
            want_map, want_cls = _token_map(ref, x, 16)
            torch.testing.assert_close(bb(x), want_map, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(bb.native(x), want_cls, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(bb.native(x), ref.forward_features(torch.nn.functional.interpolate(
                x, size=(96 if h == 101 else h, 144 if w == 150 else w), mode="bilinear", align_corners=False))[:, 0], rtol=1e-5, atol=1e-5)  # fmt: skip


def test_timm_siglip_has_no_class_token_and_pools_with_its_head() -> None:
    bb = BACKBONES.create("timm:vit_base_patch16_siglip_224", pretrained=False)
    model = bb.net.model
    assert model.num_prefix_tokens == 0 and model.global_pool == "map" and model.attn_pool is not None
    assert "attention-pool" in bb.info.native_descriptor
    x = _x(101, 150)
    with torch.no_grad():
        want_map, want = _token_map(model, x, 16)
        y, d = bb(x), bb.native(x)
    assert y.shape == (2, 768, 6, 9) and d.shape == (2, 768)
    torch.testing.assert_close(y, want_map, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        tokens = model.forward_features(torch.nn.functional.interpolate(x, size=(96, 144), mode="bilinear", align_corners=False))
        torch.testing.assert_close(d, model.attn_pool(tokens), rtol=1e-5, atol=1e-5)  # MAP head, fc_norm is Identity


def test_hf_hub_token_model_from_the_cache(hf_cache: Path, vit_ref: tuple[torch.nn.Module, Path]) -> None:
    ref, _ = vit_ref
    _cache_repo(hf_cache, "acme/tiny-vit", ref, "vit_tiny_patch16_224", classifier="head")
    bb = BACKBONES.create("hf-hub:acme/tiny-vit")
    assert bb.info.patch_size == 16 and callable(bb.native)
    x = _x(80, 112)
    with torch.no_grad():
        want_map, want_cls = _token_map(ref, x, 16)
        torch.testing.assert_close(bb(x), want_map, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bb.native(x), want_cls, rtol=1e-5, atol=1e-5)


def test_convolutional_timm_models_have_no_patch_rule(resnet18_ref: tuple[torch.nn.Module, Path]) -> None:
    from retrbench.backbones.base import INPUT_ANY

    bb = BACKBONES.create("timm:resnet18", weights=resnet18_ref[1])
    assert bb.info.patch_size is None and bb.info.input_rule == INPUT_ANY and not hasattr(bb, "native")
