"""MoCo v3 ViT-B/16: a checkpoint written as ``main_moco.py`` saves ``vit-b-300ep.pth.tar`` loads its base
encoder with every key (momentum encoder, projection and prediction MLPs dropped) and gives the class
token and patch tokens of timm 0.4.9's ViT forward (``_vit_refs.RefViT``), at a square and a
non-square size. The base encoder has 2 blocks here (full depth under ``-m slow``; the full layout
is checked on meta); the MLP heads are written at their full upstream shapes as strided views of one
small random storage, which keeps the file small.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from retrbench.backbones import BACKBONES
from retrbench.backbones.mocov3 import MOCOV3_VITB, build_mocov3
from retrbench.backbones.vit import SIZE_RULE, vit_layout
from retrbench.utils.checkpoint import CheckpointError
from retrbench.utils.io import sha256_file

from ._helpers import CARDS, close_rel, fitted, meta_layout, on_meta, random_like, token_inputs
from ._vit_refs import RefViT

_POOL = torch.randn(20_000, generator=torch.Generator().manual_seed(3))


def _strided(shape: tuple[int, ...], offset: int) -> torch.Tensor:
    """A tensor of ``shape`` viewing ``_POOL`` with unit strides (element = pool[offset + sum of indices])."""
    return _POOL.as_strided(shape, (1,) * len(shape), offset)


def _mlp(prefix: str, dims: list[int], last_bn: bool, offset: int) -> dict[str, torch.Tensor]:
    """MoCo v3's ``_build_mlp`` state dict: Linear(no bias) / BatchNorm1d / ReLU, last BN without affine."""
    out, i = {}, 0
    for layer, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        out[f"{prefix}{i}.weight"] = _strided((b, a), offset + layer)
        last = layer == len(dims) - 2
        if not last or last_bn:
            bn = f"{prefix}{i + 1}."
            if not last:
                out[bn + "weight"], out[bn + "bias"] = _strided((b,), offset + 1), _strided((b,), offset + 2)
            out[bn + "running_mean"], out[bn + "running_var"] = _strided((b,), offset + 3), _strided((b,), offset).abs() + 0.5
            out[bn + "num_batches_tracked"] = torch.tensor(1000)
        i += 3
    return out


def mocov3_checkpoint(path: Path, base: dict[str, torch.Tensor], linear: bool = False, arch: str = "vit_base") -> None:
    """``vit-b-300ep.pth.tar`` as main_moco.py saves it (DDP-wrapped MoCo_ViT), around the ViT weights ``base``."""
    momentum = {k: _strided(tuple(v.shape), 7) for k, v in base.items()}
    sd = {f"module.base_encoder.{k}": v for k, v in base.items()}
    sd.update({f"module.base_encoder.{k}": v for k, v in _mlp("head.", [768, 4096, 4096, 256], True, 11).items()})
    sd.update({f"module.momentum_encoder.{k}": v for k, v in momentum.items()})
    sd.update({f"module.momentum_encoder.{k}": v for k, v in _mlp("head.", [768, 4096, 4096, 256], True, 13).items()})
    sd.update({f"module.predictor.{k}": v for k, v in _mlp("", [256, 4096, 256], True, 17).items()})
    if linear:  # main_lincls.py: the ViT with its trained linear classifier, no base_encoder
        sd = {f"module.{k}": v for k, v in base.items()}
        sd.update({"module.head.weight": _strided((1000, 768), 1), "module.head.bias": _strided((1000,), 2)})
    adamw = {"lr": 2.4e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1, "amsgrad": False, "maximize": False,
             "foreach": None, "capturable": False, "differentiable": False, "fused": None, "params": list(range(10))}  # fmt: skip
    scaler = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000, "_growth_tracker": 17}
    torch.save({"epoch": 300, "arch": arch, "state_dict": sd, "optimizer": {"state": {}, "param_groups": [adamw]}, "scaler": scaler}, path)


def reference(depth: int = 12) -> RefViT:
    return RefViT(768, depth, 12, 16, 14, interp="size")


def test_registered_with_metadata() -> None:
    info = BACKBONES.get("mocov3").info
    assert info == MOCOV3_VITB and (info.channels, info.stride, info.patch_size) == (768, 16, 16)
    assert info.url == "https://dl.fbaipublicfiles.com/moco-v3/vit-b-300ep/vit-b-300ep.pth.tar"
    assert info.licence == "CC-BY-NC-4.0" and (CARDS / info.card).is_file() and info.sha256 is None


def test_full_size_layout_is_upstreams() -> None:
    assert meta_layout(reference) == vit_layout(768, 12, 16, 14, 3072)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RefViT]:
    ref = on_meta(lambda: reference(2))
    sd = random_like(ref.state_dict(), seed=20)
    ref.load_state_dict(sd, strict=True, assign=True)
    path = tmp_path_factory.mktemp("mocov3") / "vit-b-300ep.pth.tar"
    mocov3_checkpoint(path, sd)
    return path, ref.eval()


def _check(bb, ref: RefViT) -> None:
    for x in token_inputs(2):
        with torch.no_grad():
            cls, patches = ref(fitted(x, 16))
            y, d = bb(x), bb.native(x)
        close_rel(y, patches)
        close_rel(d, cls)


def test_base_encoder_equals_the_vit_forward(base: tuple[Path, RefViT]) -> None:
    path, ref = base
    assert path.stat().st_size < 70e6  # the heads (76M values) are views of one small storage
    bb = build_mocov3(weights=path, depth=2)
    assert bb.weights_id == sha256_file(path) and bb.net.rule == SIZE_RULE
    own = bb.net.vit.state_dict()
    for k, v in ref.state_dict().items():
        assert torch.equal(own[k], v), k  # the base encoder, not the momentum encoder
    _check(bb, ref)


@pytest.mark.slow
def test_full_depth_equals_the_vit_forward(tmp_path: Path) -> None:
    ref = on_meta(reference)
    sd = random_like(ref.state_dict(), seed=21)
    ref.load_state_dict(sd, strict=True, assign=True)
    mocov3_checkpoint(tmp_path / "vit-b-300ep.pth.tar", sd)
    _check(BACKBONES.create("mocov3_vitb", weights=tmp_path / "vit-b-300ep.pth.tar"), ref.eval())


def test_wrong_files_are_refused(base: tuple[Path, RefViT], tmp_path: Path) -> None:
    path, ref = base
    sd = ref.state_dict()
    with pytest.raises(CheckpointError, match=r"not a MoCo v3 ViT-B/16 base encoder checkpoint: 120 missing"):
        BACKBONES.create("mocov3_vitb", weights=path)  # 2 blocks where the entry expects 12
    lin = tmp_path / "linear-vit-b-300ep.pth.tar"
    mocov3_checkpoint(lin, sd, linear=True)
    with pytest.raises(CheckpointError, match=r"no module\.base_encoder\.\* keys(.|\n)*main_lincls\.py"):
        build_mocov3(weights=lin, depth=2)
    small = tmp_path / "vit-s.pth.tar"
    mocov3_checkpoint(small, sd, arch="vit_small")
    with pytest.raises(CheckpointError, match=r"arch 'vit_small'; mocov3_vitb needs 'vit_base'"):
        build_mocov3(weights=small, depth=2)
    torch.save(sd, tmp_path / "bare.pth")
    with pytest.raises(CheckpointError, match=r"not a MoCo v3 pre-training checkpoint: expected"):
        build_mocov3(weights=tmp_path / "bare.pth", depth=2)
    obj = torch.load(path)
    obj["state_dict"]["module.queue"] = torch.zeros(3)
    torch.save(obj, tmp_path / "stray.pth.tar")
    with pytest.raises(CheckpointError, match=r"1 keys outside module\.base_encoder(.|\n)*'queue'"):
        build_mocov3(weights=tmp_path / "stray.pth.tar", depth=2)
    truncated = tmp_path / "truncated.pth.tar"
    truncated.write_bytes(path.read_bytes()[: 1 << 20])
    with pytest.raises(CheckpointError, match="truncated or not a PyTorch checkpoint"):
        build_mocov3(weights=truncated, depth=2)
