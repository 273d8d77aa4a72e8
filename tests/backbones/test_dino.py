"""DINO ViT-S/16 and ViT-B/16: files in the exact layout of ``dino_deitsmall16_pretrain.pth`` /
``dino_vitbase16_pretrain.pth`` load with every key and give DINO's own class token and patch tokens
(``_vit_refs.RefViT`` with DINO's ``+ 0.1`` interpolation) at a square and a non-square size.
ViT-S at full size, ViT-B with 2 blocks (full depth under ``-m slow``; the full layout is checked on meta).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from retrbench.backbones import BACKBONES, TokenBackbone
from retrbench.backbones.dino import DINO_ARCH, DINO_INFO, build_dino, dino_layout, make_dino_vit
from retrbench.backbones.vit import DINO_RULE
from retrbench.utils.checkpoint import CheckpointError
from retrbench.utils.io import sha256_file

from ._helpers import CARDS, close_rel, fitted, meta_layout, on_meta, random_like, token_inputs
from ._vit_refs import RefViT


def reference(name: str, depth: int | None = None) -> RefViT:
    dim, full, heads, _, _ = DINO_ARCH[name]
    return RefViT(dim, depth or full, heads, 16, 14, interp="dino")


@pytest.mark.parametrize("name, tag", [("dino_vits16", "dino_deitsmall16"), ("dino_vitb16", "dino_vitbase16")])
def test_registered_with_metadata(name: str, tag: str) -> None:
    info = BACKBONES.get(name).info
    assert info == DINO_INFO[name] and info.stride == info.patch_size == 16 and info.channels == DINO_ARCH[name][0]
    assert info.url == f"https://dl.fbaipublicfiles.com/dino/{tag}_pretrain/{tag}_pretrain.pth"
    assert info.weights_file == f"{tag}_pretrain.pth" and info.licence == "Apache-2.0" and (CARDS / info.card).is_file()


@pytest.mark.parametrize("name", sorted(DINO_ARCH))
def test_full_size_layout_is_upstreams(name: str) -> None:
    dim, depth, _, _, _ = DINO_ARCH[name]
    upstream = meta_layout(lambda: reference(name))
    assert dino_layout(dim, depth) == upstream
    vit = meta_layout(lambda: make_dino_vit(dim, depth, DINO_ARCH[name][2]))
    assert vit == upstream  # the same names in timm: loaded as they are


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, RefViT, int | None]]:
    out = {}
    for i, (name, depth) in enumerate([("dino_vits16", None), ("dino_vitb16", 2)]):
        ref = on_meta(lambda n=name, d=depth: reference(n, d))
        sd = random_like(ref.state_dict(), seed=10 + i)
        ref.load_state_dict(sd, strict=True, assign=True)
        path = tmp_path_factory.mktemp(name) / DINO_INFO[name].weights_file
        torch.save(sd, path)
        out[name] = (path, ref.eval(), depth)
    return out


def _check(bb: TokenBackbone, ref: RefViT, dim: int) -> None:
    for x in token_inputs(1):
        with torch.no_grad():
            cls, patches = ref(fitted(x, 16))
            y, d = bb(x), bb.native(x)
        assert y.shape == (2, dim, bb.info.map_side(x.shape[-2]), bb.info.map_side(x.shape[-1]))
        close_rel(y, patches)
        close_rel(d, cls)


@pytest.mark.parametrize("name", sorted(DINO_ARCH))
def test_equals_dino_forward(name: str, files) -> None:
    path, ref, depth = files[name]
    bb = build_dino(name, weights=path, depth=depth)
    assert bb.weights_id == sha256_file(path) and bb.net.rule == DINO_RULE
    _check(bb, ref, DINO_ARCH[name][0])


@pytest.mark.slow
def test_full_depth_vitb_equals_dino_forward(tmp_path: Path) -> None:
    ref = on_meta(lambda: reference("dino_vitb16"))
    sd = random_like(ref.state_dict(), seed=12)
    ref.load_state_dict(sd, strict=True, assign=True)
    torch.save(sd, tmp_path / "dino_vitbase16_pretrain.pth")
    _check(BACKBONES.create("dino_vitb16", weights=tmp_path / "dino_vitbase16_pretrain.pth"), ref.eval(), 768)


def test_wrong_and_truncated_files_are_refused(files, tmp_path: Path) -> None:
    small, ref, _ = files["dino_vits16"]
    with torch.no_grad():
        x = token_inputs()[0]
        close_rel(BACKBONES.create("dino_vits16", weights=small).native(x), ref(fitted(x, 16))[0])
    with pytest.raises(CheckpointError, match=r"not a DINO dino_vitb16 checkpoint(.|\n)*dino_deitsmall16_pretrain\.pth: use the entry dino_vits16"):
        BACKBONES.create("dino_vitb16", weights=small)
    full = tmp_path / "checkpoint.pth"  # a training checkpoint, not the backbone file
    torch.save({"teacher": {f"backbone.{k}": v for k, v in torch.load(small).items()}}, full)
    with pytest.raises(CheckpointError, match=r"no state dict found|not a flat mapping|expected a (flat )?mapping"):
        BACKBONES.create("dino_vits16", weights=full)
    truncated = tmp_path / "t.pth"
    truncated.write_bytes(small.read_bytes()[:4096])
    with pytest.raises(CheckpointError, match="truncated or not a PyTorch checkpoint"):
        BACKBONES.create("dino_vits16", weights=truncated)
