"""DINOv2: the eight entries load files in the exact layout of ``dinov2_vit?14[_reg4]_pretrain.pth`` with
every key, and give the patch tokens and class token of DINOv2's own forward (written out in
``_vit_refs.RefViT``), at a square and a non-square size.

Layout: at full size (meta tensors) the names and shapes of every entry's file equal those of the
reference ``DinoVisionTransformer``, and timm's filter maps them onto timm's model exactly. Values:
files with random values in that layout; ViT-S at full size, ViT-B / L / g with fewer blocks (every
key pattern and shape rule kept, depth checked by the layout test; full-depth ViT-B under ``-m slow``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from retrbench.backbones import BACKBONES, TokenBackbone
from retrbench.backbones.dinov2 import (
    DINOV2_INFO,
    DINOV2_SPECS,
    DinoV2Spec,
    build_dinov2,
    dinov2_layout,
    make_dinov2_vit,
)
from retrbench.backbones.vit import DINO_RULE, SIZE_RULE
from retrbench.utils.checkpoint import CheckpointError
from retrbench.utils.io import sha256_file

from ._helpers import CARDS, close_rel, fitted, meta_layout, on_meta, random_like, token_inputs
from ._vit_refs import RefViT

FAST_DEPTH = {"s": None, "b": 2, "l": 2, "g": 1}  # None: the full depth


def reference(spec: DinoV2Spec, depth: int | None = None) -> RefViT:
    """DINOv2's DinoVisionTransformer as the hub entries build it (offset / antialias per variant)."""
    return RefViT(
        spec.dim, depth or spec.depth, spec.heads, 14, 37, interp="dinov2", layer_scale=True, swiglu=spec.swiglu,
        registers=spec.registers, mask_token=True, offset=0.0 if spec.registers else 0.1, antialias=bool(spec.registers),
    )  # fmt: skip


@pytest.mark.parametrize("name", sorted(DINOV2_SPECS))
def test_registered_with_metadata(name: str) -> None:
    spec, info = DINOV2_SPECS[name], DINOV2_INFO[name]
    entry = BACKBONES.get(name)
    assert entry.info == info and (info.channels, info.stride, info.patch_size) == (spec.dim, 14, 14)
    assert info.url == f"https://dl.fbaipublicfiles.com/dinov2/dinov2_vit{spec.arch}14/{info.weights_file}"
    assert info.weights_file == f"dinov2_vit{spec.arch}14{'_reg4' if spec.registers else ''}_pretrain.pth"
    assert info.default_size != 224 and info.licence == "Apache-2.0" and (CARDS / info.card).is_file()
    assert "class token" in info.native_descriptor and info.label.startswith("DINOv2 ViT-")
    if spec.registers:
        assert BACKBONES.get(name.replace("_reg4", "_reg")).name == name
    assert {DINOV2_SPECS[n].dim for n in DINOV2_SPECS} == {384, 768, 1024, 1536}


@pytest.mark.parametrize("name", sorted(DINOV2_SPECS))
def test_full_size_layout_is_upstreams_and_maps_onto_timm(name: str) -> None:
    from timm.models.vision_transformer import checkpoint_filter_fn

    spec = DINOV2_SPECS[name]
    upstream = meta_layout(lambda: reference(spec))
    assert dinov2_layout(spec) == upstream
    assert sum(1 for k in upstream if k.endswith(".attn.qkv.weight")) == spec.depth
    if spec.arch == "g":
        assert upstream["blocks.0.mlp.w12.weight"] == (8192, 1536) and upstream["blocks.0.mlp.w3.weight"] == (1536, 4096)
    vit = on_meta(lambda: make_dinov2_vit(spec))
    converted = checkpoint_filter_fn({k: torch.empty(s, device="meta") for k, s in upstream.items()}, vit)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in vit.state_dict().items()}


_FILES: dict[tuple[str, int | None], tuple[Path, RefViT]] = {}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory):
    """(name, depth) -> (file in the upstream layout with random values, the reference given them), written on first use."""
    root = tmp_path_factory.mktemp("dinov2")

    def get(name: str, depth: int | None) -> tuple[Path, RefViT]:
        if (name, depth) not in _FILES:
            spec = DINOV2_SPECS[name]
            ref = on_meta(lambda: reference(spec, depth))
            sd = random_like(ref.state_dict(), seed=len(_FILES))
            ref.load_state_dict(sd, strict=True, assign=True)
            path = root / f"{name}-{depth}" / spec.file
            path.parent.mkdir()
            torch.save(sd, path)
            _FILES[name, depth] = (path, ref.eval())
        return _FILES[name, depth]

    yield get
    _FILES.clear()


def _check_equals_reference(name: str, depth: int | None, files) -> None:
    spec = DINOV2_SPECS[name]
    path, ref = files(name, depth)
    bb = build_dinov2(DinoV2Spec(spec.arch, spec.dim, depth or spec.depth, spec.heads, spec.registers), weights=path)
    assert isinstance(bb, TokenBackbone) and bb.weights_id == sha256_file(path) and bb.name == name
    assert bb.net.rule == (SIZE_RULE if spec.registers else DINO_RULE)
    for x in token_inputs():
        with torch.no_grad():
            cls, patches = ref(fitted(x, 14))
            y, d = bb(x), bb.native(x)
        assert y.shape == (2, spec.dim, bb.info.map_side(x.shape[-2]), bb.info.map_side(x.shape[-1]))
        close_rel(y, patches)
        close_rel(d, cls)


@pytest.mark.parametrize("name", sorted(DINOV2_SPECS))
def test_equals_dinov2_forward(name: str, files) -> None:
    _check_equals_reference(name, FAST_DEPTH[DINOV2_SPECS[name].arch], files)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dinov2_vitb14", "dinov2_vitb14_reg4"])
def test_full_depth_vitb_equals_dinov2_forward(name: str, files) -> None:
    _check_equals_reference(name, None, files)


def test_registry_builds_from_the_file_and_refuses_wrong_ones(files, tmp_path: Path) -> None:
    path, ref = files("dinov2_vits14", None)
    bb = BACKBONES.create("dinov2_vits14", weights=path)
    x = token_inputs()[1]
    with torch.no_grad():
        close_rel(bb(x), ref(fitted(x, 14))[1])
    reg_path, _ = files("dinov2_vits14_reg4", None)
    with pytest.raises(CheckpointError, match=r"not a DINOv2 dinov2_vits14 checkpoint: 0 missing, 1 unexpected(.|\n)*'register_tokens'(.|\n)*use the entry dinov2_vits14_reg4"):
        BACKBONES.create("dinov2_vits14", weights=reg_path)
    with pytest.raises(CheckpointError, match=r"not a DINOv2 dinov2_vitb14 checkpoint: (.|\n)*looks like dinov2_vits14_pretrain\.pth: use the entry dinov2_vits14"):
        BACKBONES.create("dinov2_vitb14", weights=path)
    no_mask = tmp_path / "no_mask.pth"
    torch.save({k: v for k, v in torch.load(path).items() if k != "mask_token"}, no_mask)
    with pytest.raises(CheckpointError, match=r"1 missing, 0 unexpected(.|\n)*'mask_token'"):
        BACKBONES.create("dinov2_vits14", weights=no_mask)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[: 1 << 20])
    with pytest.raises(CheckpointError, match="truncated or not a PyTorch checkpoint"):
        BACKBONES.create("dinov2_vits14", weights=truncated)
    with pytest.raises(CheckpointError, match=r"#teacher would pick a nested state dict"):
        BACKBONES.create("dinov2_vits14", weights=f"{path}#teacher")
    with pytest.raises(ValueError, match="pretrained=False"):
        BACKBONES.create("dinov2_vits14", weights=path, pretrained=False)


def test_finds_torch_hubs_copy(files, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from retrbench.backbones import local_weights

    path, _ = files("dinov2_vits14", None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert local_weights("dinov2_vits14") is None
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / path.name).symlink_to(path)
    assert local_weights("dinov2_vits14") == hub / path.name
    assert BACKBONES.create("dinov2_vits14").weights_id == sha256_file(path)
