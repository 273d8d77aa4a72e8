"""amdim: a checkpoint in the upstream structure loads key for key and gives the reference maps.

The checkpoint is written here from the upstream layout (amdim-public ``model.py`` /
``checkpoint.py``), independently of retrbench's module, with random values; the reference is
a plain ``torch.nn.functional`` re-implementation of the upstream forward that reads the
checkpoint's own tensors by their upstream names.
"""

from __future__ import annotations

import math
import re
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from retrbench.backbones import BACKBONES
from retrbench.backbones.amdim import (
    AMDIM,
    IGNORED_KEYS,
    AMDIMConfig,
    AMDIMEncoder,
    config_from_state_dict,
    load_amdim_checkpoint,
    trunk_size,
)
from retrbench.utils.checkpoint import CheckpointError
from retrbench.utils.io import sha256_file

NDF, N_RKHS, DEPTH, N_CLASSES = 4, 40, 2, 10
# (layer index, n_in, n_out, kernel, stride) of the ConvResBlocks of the 128-pixel encoder
BLOCKS = [(2, 1, 2, 4, 2), (3, 2, 4, 4, 2), (4, 4, 8, 2, 2), (6, 8, 8, 3, 1), (7, 8, 8, 3, 1)]



def _upstream_model_state(ndf: int, n_rkhs: int, depth: int, n_classes: int, seed: int = 0) -> OrderedDict:
    """``Model.state_dict()`` of amdim-public for the 128-pixel encoder, with random values."""
    g = torch.Generator().manual_seed(seed)
    sd: OrderedDict[str, Tensor] = OrderedDict()

    def conv(key: str, n_out: int, n_in: int, k: int, bias: bool = False) -> None:
        sd[key + ".weight"] = torch.randn(n_out, n_in, k, k, generator=g) / math.sqrt(n_in * k * k)
        if bias:
            sd[key + ".bias"] = 0.1 * torch.randn(n_out, generator=g)

    def bn(key: str, n: int) -> None:
        sd[key + ".weight"] = 1 + 0.1 * torch.randn(n, generator=g)
        sd[key + ".bias"] = 0.1 * torch.randn(n, generator=g)
        sd[key + ".running_mean"] = 0.1 * torch.randn(n, generator=g)
        sd[key + ".running_var"] = 0.5 + torch.rand(n, generator=g)
        sd[key + ".num_batches_tracked"] = torch.tensor(1000)

    enc = "encoder.module."
    conv(enc + "layer_list.0.conv", ndf, 3, 5, bias=True)
    conv(enc + "layer_list.1.conv", ndf, ndf, 3, bias=True)
    for i, a, b, k, _ in BLOCKS:
        for u in range(depth):
            p = f"{enc}layer_list.{i}.layer_list.{u}"
            conv(p + ".conv1", b * ndf, (a if u == 0 else b) * ndf, k if u == 0 else 1)
            conv(p + ".conv2", b * ndf, b * ndf, 1)
            bn(p + ".bn1.bn", b * ndf)
        if i == 4:
            bn(enc + "layer_list.5.bn", 8 * ndf)
    conv(enc + "layer_list.8.conv1", n_rkhs, 8 * ndf, 3)
    conv(enc + "layer_list.8.conv2", n_rkhs, n_rkhs, 1)
    bn(enc + "layer_list.8.bn1.bn", n_rkhs)
    bn(enc + "layer_list.9.bn", n_rkhs)
    for r in (5, 7):  # FakeRKHSConvNet on the 5x5 and 7x7 maps (both 8*ndf wide)
        p = f"{enc}rkhs_block_{r}"
        conv(p + ".conv1", n_rkhs, 8 * ndf, 1)
        conv(p + ".conv2", n_rkhs, n_rkhs, 1)
        bn(p + ".bn_hid.bn", n_rkhs)
        bn(p + ".bn_out.bn", n_rkhs)
        conv(p + ".shortcut", n_rkhs, 8 * ndf, 1, bias=True)
    sd["g2l_loss.masks_r5"] = torch.eye(25, dtype=torch.uint8).reshape(25, 1, 5, 5)
    mlp = "evaluator.block_glb_mlp.block_forward."
    sd[mlp + "2.weight"] = torch.randn(1024, n_rkhs, generator=g)
    bn(mlp + "3", 1024)
    sd[mlp + "6.weight"] = torch.randn(n_classes, 1024, generator=g)
    sd[mlp + "6.bias"] = torch.randn(n_classes, generator=g)
    sd["evaluator.block_glb_lin.block_forward.2.weight"] = torch.randn(n_classes, n_rkhs, generator=g)
    sd["evaluator.block_glb_lin.block_forward.2.bias"] = torch.randn(n_classes, generator=g)
    return sd


def _write_checkpoint(
    path: Path, use_bn: bool = False, half: bool = False, legacy: bool = False, **hp_override
) -> OrderedDict:
    sd = _upstream_model_state(NDF, N_RKHS, DEPTH, N_CLASSES)
    if half:
        sd = OrderedDict((k, v.half() if v.is_floating_point() else v) for k, v in sd.items())
    hp = dict(ndf=NDF, n_classes=N_CLASSES, n_rkhs=N_RKHS, tclip=20.0, n_depth=DEPTH, encoder_size=128, use_bn=use_bn)
    hp.update(hp_override)
    cursor = {"info_epoch": 150, "info_step": 0, "classifier_epoch": 0, "classifier_step": 0}
    # the published files date from 2019 (PyTorch 1.1): the legacy, non-zip serialisation
    torch.save({"model": sd, "hyperparams": hp, "cursor": cursor}, path, _use_new_zipfile_serialization=not legacy)
    return sd


def _reference(sd: dict[str, Tensor], x: Tensor, use_bn: bool, upto: str) -> Tensor:
    """The upstream forward, written out with torch.nn.functional on the checkpoint's tensors."""
    w = {k.removeprefix("encoder.module."): v.float() for k, v in sd.items()}

    def bnorm(h: Tensor, p: str) -> Tensor:
        return F.batch_norm(
            h, w[p + ".running_mean"], w[p + ".running_var"], w[p + ".weight"], w[p + ".bias"], False, 0.0, 1e-5
        )

    def unit(h: Tensor, p: str, k: int, s: int) -> Tensor:
        r = F.conv2d(h, w[p + ".conv1.weight"], stride=s)
        if use_bn:
            r = bnorm(r, p + ".bn1.bn")
        r = F.conv2d(F.relu(r), w[p + ".conv2.weight"])
        short = F.avg_pool2d(h, k, s)
        grow = r.shape[1] - h.shape[1]
        if grow:
            short = torch.cat([short, short.new_zeros(short.shape[0], grow, *short.shape[2:])], dim=1)
        return r + short

    h = F.pad(x, (2, 2, 2, 2), mode="reflect")
    h = F.relu(F.conv2d(h, w["layer_list.0.conv.weight"], w["layer_list.0.conv.bias"], stride=2))
    h = F.relu(F.conv2d(h, w["layer_list.1.conv.weight"], w["layer_list.1.conv.bias"]))
    for i, _, _, k, s in BLOCKS:
        for u in range(DEPTH):
            h = unit(h, f"layer_list.{i}.layer_list.{u}", k if u == 0 else 1, s if u == 0 else 1)
        if i == 4 and use_bn:
            h = bnorm(h, "layer_list.5.bn")
    if upto == "trunk":
        return h
    h = unit(h, "layer_list.8", 3, 1)
    return bnorm(h, "layer_list.9.bn")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, OrderedDict]:
    path = tmp_path_factory.mktemp("amdim") / "amdim_ndf4_rkhs40_rd2.pth"
    return path, _write_checkpoint(path)


def _x(h: int, w: int, b: int = 2, seed: int = 1) -> Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_upstream_checkpoint_loads_every_key(ckpt: tuple[Path, OrderedDict]) -> None:
    path, upstream = ckpt
    sd, hp = load_amdim_checkpoint(path)
    assert hp["ndf"] == NDF and hp["encoder_size"] == 128
    cfg = config_from_state_dict(sd, hp)
    assert cfg == AMDIMConfig(ndf=NDF, n_rkhs=N_RKHS, n_depth=DEPTH, use_bn=False)
    net = AMDIMEncoder(cfg)
    own = set(net.state_dict())
    kept = {k for k in sd if not any(re.search(p, k) for p in IGNORED_KEYS)}
    assert own == kept  # zero missing, zero unexpected
    dropped = set(sd) - kept
    assert all(k.startswith(("rkhs_block_5.", "rkhs_block_7.", "evaluator.", "g2l_loss.")) for k in dropped)
    assert len(own) + len(dropped) == len(upstream)


def test_trunk_map_equals_reference(ckpt: tuple[Path, OrderedDict]) -> None:
    path, upstream = ckpt
    bb = BACKBONES.create("amdim", weights=path)
    assert bb.name == "amdim" and bb.weights_id == sha256_file(path)
    assert bb.info.channels == 8 * NDF and bb.info.stride == 16
    assert bb.info.mean == (0.485, 0.456, 0.406) and bb.info.std == (0.229, 0.224, 0.225)
    x = _x(128, 176)
    with torch.no_grad():
        y = bb(x)
    assert y.shape == (2, 8 * NDF, trunk_size(128), trunk_size(176)) == (2, 32, 3, 6)
    assert (bb.info.map_side(128), bb.info.map_side(176)) == (3, 6)  # the entry states its unpadded geometry
    torch.testing.assert_close(y, _reference(upstream, x, use_bn=False, upto="trunk"), rtol=1e-5, atol=1e-5)
    assert (y < 0).any()  # signed activations: no ReLU after the residual sum


def test_rkhs_map_equals_reference(ckpt: tuple[Path, OrderedDict]) -> None:
    path, upstream = ckpt
    bb = BACKBONES.create("amdim", weights=path, feature="rkhs")
    assert bb.name == "amdim-rkhs" and bb.info.channels == N_RKHS
    x = _x(128, 128)
    with torch.no_grad():
        y = bb(x)
        full = bb.net(x)  # forward(): the rkhs map whatever the chosen feature
    assert y.shape == (2, N_RKHS, 1, 1)  # AMDIM's global embedding at the training size
    assert bb.info.map_side(128) == 1 and bb.info.label == "AmDim rkhs"
    torch.testing.assert_close(y, _reference(upstream, x, use_bn=False, upto="rkhs"), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full, y)


def test_use_bn_checkpoint_runs_the_optional_batchnorms(tmp_path: Path) -> None:
    path = tmp_path / "bn.pth"
    upstream = _write_checkpoint(path, use_bn=True)
    bb = BACKBONES.create("amdim", weights=path)
    assert bb.net.config.use_bn
    x = _x(112, 100)
    with torch.no_grad():
        y = bb(x)
    ref = _reference(upstream, x, use_bn=True, upto="trunk")
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y, _reference(upstream, x, use_bn=False, upto="trunk"))


def test_legacy_half_precision_checkpoint_is_cast_to_float(tmp_path: Path) -> None:
    path = tmp_path / "fp16.pth"
    upstream = _write_checkpoint(path, half=True, legacy=True)
    assert not zipfile.is_zipfile(path)
    bb = BACKBONES.create("amdim_large", weights=path)  # the large entry reads its shape from the file too
    assert next(bb.parameters()).dtype == torch.float32
    x = _x(128, 128, b=1)
    with torch.no_grad():
        torch.testing.assert_close(bb(x), _reference(upstream, x, False, "trunk"), rtol=1e-5, atol=1e-5)


def test_stride_and_border() -> None:
    # Every 16 more pixels add one cell; unpadded convolutions drop a border of about 5 cells.
    assert all(trunk_size(h + 16) == trunk_size(h) + 1 for h in range(95, 1100))
    assert trunk_size(1024) == 59 and trunk_size(128) == 3 and trunk_size(224) == 9
    net = AMDIMEncoder(AMDIMConfig(ndf=2, n_rkhs=16, n_depth=1)).eval()
    for h, w in ((95, 95), (111, 143), (200, 130)):
        with torch.no_grad():
            assert net.forward_features(torch.zeros(1, 3, h, w)).shape[-2:] == (trunk_size(h), trunk_size(w))
    with pytest.raises(ValueError, match="at least 95x95"):
        net.forward_features(torch.zeros(1, 3, 94, 200))
    with pytest.raises(ValueError, match="at least 127x127"):
        net(torch.zeros(1, 3, 126, 200))


def test_entries_metadata() -> None:
    assert AMDIM.channels == 2048 and AMDIM.stride == 16
    assert BACKBONES.get("amdim_large").info.channels == 2560
    assert BACKBONES.get("amdim").info.url.endswith("amdim_ndf256_rkhs2048_rd10.pth")
    assert BACKBONES.get("amdim_large").info.weights_file == "amdim_ndf320_rkhs2560_rd10.pth"


def test_hyperparams_contradicting_weights_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "lie.pth"
    _write_checkpoint(path, n_rkhs=2048)
    with pytest.raises(CheckpointError, match=r"hyperparams\['n_rkhs'\] = 2048 but the weights have n_rkhs = 40"):
        BACKBONES.create("amdim", weights=path)
    _write_checkpoint(path, encoder_size=64)
    with pytest.raises(CheckpointError, match="only the 128-pixel"):
        BACKBONES.create("amdim", weights=path)


def test_wrong_format_and_truncated_files(tmp_path: Path, ckpt: tuple[Path, OrderedDict]) -> None:
    moco = tmp_path / "moco.pth"
    torch.save(
        {"epoch": 200, "arch": "resnet50", "state_dict": {"module.encoder_q.conv1.weight": torch.zeros(1)}}, moco
    )
    with pytest.raises(CheckpointError, match=r"\{'model', 'hyperparams', 'cursor'\}"):
        BACKBONES.create("amdim", weights=moco)
    other = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, other)
    with pytest.raises(CheckpointError, match="not an AMDIM encoder state dict"):
        BACKBONES.create("amdim", weights=other)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(ckpt[0].read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated or not a PyTorch checkpoint"):
        BACKBONES.create("amdim", weights=cut)
    # a missing encoder tensor is reported by name
    sd = _upstream_model_state(NDF, N_RKHS, DEPTH, N_CLASSES)
    del sd["encoder.module.layer_list.7.layer_list.1.conv2.weight"]
    partial = tmp_path / "partial.pth"
    torch.save({"model": sd, "hyperparams": {}, "cursor": {}}, partial)
    with pytest.raises(
        ValueError, match=r"missing from the checkpoint \(1\): 'layer_list.7.layer_list.1.conv2.weight'"
    ):
        BACKBONES.create("amdim", weights=partial)


def test_bare_encoder_state_dict_loads(tmp_path: Path, ckpt: tuple[Path, OrderedDict]) -> None:
    _, upstream = ckpt
    bare = OrderedDict((k.removeprefix("encoder.module."), v) for k, v in upstream.items() if k.startswith("encoder."))
    path = tmp_path / "encoder.pth"
    torch.save(bare, path)
    bb = BACKBONES.create("amdim", weights=path)
    x = _x(100, 100, b=1)
    with torch.no_grad():
        torch.testing.assert_close(bb(x), _reference(upstream, x, False, "trunk"), rtol=1e-5, atol=1e-5)
