"""BatchNorm re-calibration: running statistics equal the cumulative average of the batch statistics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from retrbench.backbones.amdim import AMDIMConfig, AMDIMEncoder
from retrbench.backbones.bn import recalibrate_bn, recalibrate_on_images, recalibration_specs
from retrbench.utils.images import ImageSpec


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.bn1 = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.conv2 = nn.Conv2d(4, 5, 3)
        self.bn2 = nn.BatchNorm2d(5)
        self.unused = nn.BatchNorm2d(5)  # never called by forward: must keep its statistics

    def forward(self, x: Tensor) -> Tensor:
        return self.bn2(self.conv2(self.drop(F.relu(self.bn1(self.conv1(x))))))


def _net() -> Net:
    torch.manual_seed(0)
    net = Net()
    for bn in (net.bn1, net.bn2, net.unused):  # trained-looking statistics and affine parameters
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.num_batches_tracked.fill_(500)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    return net.eval()


def _batches(sizes: tuple[int, ...] = (4, 4, 4), hw: tuple[int, int] = (10, 12)) -> list[Tensor]:
    g = torch.Generator().manual_seed(1)
    return [2 + 3 * torch.randn(b, 3, *hw, generator=g) for b in sizes]


def _recording(net: nn.Module, names: tuple[str, ...]) -> tuple[dict[str, list[Tensor]], list]:
    seen: dict[str, list[Tensor]] = {n: [] for n in names}
    hooks = [
        getattr(net, n).register_forward_pre_hook(lambda m, inp, n=n: seen[n].append(inp[0].detach().clone()))
        for n in names
    ]
    return seen, hooks


def _cumulative(inputs: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Mean over batches of the per-batch channel means and unbiased variances."""
    means = torch.stack([x.double().mean(dim=(0, 2, 3)) for x in inputs])
    varis = torch.stack([x.double().var(dim=(0, 2, 3), unbiased=True) for x in inputs])
    return means.mean(0), varis.mean(0)


def test_running_stats_are_the_cumulative_batch_statistics() -> None:
    net = _net()
    params = {k: v.clone() for k, v in net.named_parameters()}
    unused = {k: v.clone() for k, v in net.unused.state_dict().items()}
    batches = _batches()
    seen, hooks = _recording(net, ("bn1", "bn2"))
    out = recalibrate_bn(net, batches)
    for h in hooks:
        h.remove()
    assert out is net
    for name in ("bn1", "bn2"):
        bn = getattr(net, name)
        mean, var = _cumulative(seen[name])
        torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-5, atol=1e-6)
        assert int(bn.num_batches_tracked) == len(batches)
        assert bn.momentum == 0.1  # restored

    # bn1's input does not depend on any BatchNorm: an independent pass gives the same statistics,
    # and for equal-size batches the cumulative mean is the mean over all the images.
    with torch.no_grad():
        first = [net.conv1(x) for x in batches]
    mean1, var1 = _cumulative(first)
    torch.testing.assert_close(net.bn1.running_mean.double(), mean1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(net.bn1.running_var.double(), var1, rtol=1e-5, atol=1e-6)
    all_mean = torch.cat(first).double().mean(dim=(0, 2, 3))
    torch.testing.assert_close(net.bn1.running_mean.double(), all_mean, rtol=1e-5, atol=1e-6)

    # Dropout stayed off: bn2 saw conv2(relu(batch-normalised conv1)) with nothing dropped.
    with torch.no_grad():
        for x, got in zip(batches, seen["bn2"], strict=True):
            h = F.batch_norm(net.conv1(x), None, None, net.bn1.weight, net.bn1.bias, training=True)
            torch.testing.assert_close(got, net.conv2(F.relu(h)), rtol=1e-5, atol=1e-5)

    assert not any(m.training for m in net.modules())  # back in eval mode
    for k, v in net.named_parameters():
        torch.testing.assert_close(v, params[k], rtol=0, atol=0)
    for k, v in net.unused.state_dict().items():
        torch.testing.assert_close(v, unused[k], rtol=0, atol=0)


def test_unequal_batches_weigh_equally_and_momentum_can_be_given() -> None:
    net = _net()
    batches = _batches(sizes=(6, 1, 3))
    seen, hooks = _recording(net, ("bn1",))
    recalibrate_bn(net, batches)
    hooks[0].remove()
    mean, var = _cumulative(seen["bn1"])  # each batch weighs 1/3, whatever its size
    torch.testing.assert_close(net.bn1.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(net.bn1.running_var.double(), var, rtol=1e-5, atol=1e-6)
    pooled = torch.cat(seen["bn1"]).double().mean(dim=(0, 2, 3))
    assert not torch.allclose(net.bn1.running_mean.double(), pooled, atol=1e-4)

    ema = _net()
    recalibrate_bn(ema, batches[:1], momentum=1.0)  # momentum 1: the last batch's statistics
    with torch.no_grad():
        h = ema.conv1(batches[0])
    torch.testing.assert_close(ema.bn1.running_mean, h.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    assert ema.bn1.momentum == 0.1


def test_no_batches_changes_nothing() -> None:
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match="no batches"):
        recalibrate_bn(net, [])
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert not net.training


def test_amdim_trunk_without_use_bn_keeps_every_statistic() -> None:
    # The published AMDIM encoders train with use_bn=0: the trunk runs no BatchNorm, so re-calibration
    # is a no-op for the default map; only the final BatchNorm (layer 9) of the rkhs map is re-estimated.
    torch.manual_seed(0)
    cfg = AMDIMConfig(ndf=2, n_rkhs=16, n_depth=1)
    trunk = AMDIMEncoder(cfg, "trunk").eval()
    before = {k: v.clone() for k, v in trunk.state_dict().items()}
    x = [torch.randn(2, 3, 100, 100)]
    trunk.forward = trunk.forward_features  # what Backbone calls
    recalibrate_bn(trunk, x)
    for k, v in trunk.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    rkhs = AMDIMEncoder(cfg, "rkhs").eval()
    rkhs.load_state_dict(before)
    recalibrate_bn(rkhs, [torch.randn(2, 3, 128, 128)])
    assert int(rkhs.layer_list[9].bn.num_batches_tracked) == 1
    assert int(rkhs.layer_list[8].bn1.bn.num_batches_tracked) == 0  # inactive (use_bn=0): untouched


def test_recalibration_specs_are_seeded_whole_images() -> None:
    paths = [f"img{i:03d}.jpg" for i in range(50)]
    a = recalibration_specs(paths, 10, seed=3, size=256, root="/data")
    assert a == recalibration_specs(paths, 10, seed=3, size=256, root="/data")
    assert a != recalibration_specs(paths, 10, seed=4, size=256, root="/data")
    assert len({s.path for s in a}) == 10 and all(s.bbox is None and s.size == 256 for s in a)
    assert all(s.path.parent == Path("/data") for s in a)
    everything = recalibration_specs(paths, 80, seed=0, size=64)
    assert sorted(str(s.path) for s in everything) == paths
    with pytest.raises(ValueError, match="positive"):
        recalibration_specs(paths, 0, size=64)


def test_recalibrate_on_images_batches_equal_sizes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    specs = []
    for i, (w, h) in enumerate([(40, 30), (30, 40), (40, 30), (40, 30), (30, 40)]):
        p = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        specs.append(ImageSpec(p, None, 40))
    net = _net()
    seen, hooks = _recording(net, ("conv1", "bn1"))
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    recalibrate_on_images(net, specs, mean, std, batch_size=2, device="cpu")
    for h in hooks:
        h.remove()
    shapes = [tuple(x.shape) for x in seen["conv1"]]
    assert sorted(shapes) == sorted([(2, 3, 30, 40), (1, 3, 30, 40), (2, 3, 40, 30)])
    # the inputs are the normalised images: undoing the normalisation gives integers / 255 in [0, 1]
    for x in seen["conv1"]:
        raw = x * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
        torch.testing.assert_close(raw * 255, (raw * 255).round(), rtol=0, atol=1e-3)
    m, v = _cumulative(seen["bn1"])
    torch.testing.assert_close(net.bn1.running_mean.double(), m, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(net.bn1.running_var.double(), v, rtol=1e-5, atol=1e-6)
    assert not any(mod.training for mod in net.modules())
