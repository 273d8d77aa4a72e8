"""The network being trained: default trainable parameters, gradients on/off, modes, the embedding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from retrbench.backbones import Backbone, BackboneInfo
from retrbench.train.network import Net, Normalise, default_trainable, embed, embed_plain, set_trainable, train_mode

from .helpers import tiny


def wrap(net: nn.Module, name: str = "x") -> Backbone:
    return Backbone(net, BackboneInfo(1, 1, (0.0,) * 3, (1.0,) * 3), name, "init")


def test_default_trainable():
    assert default_trainable(tiny()) == "."
    assert default_trainable(wrap(nn.Module(), "efficientnet_lite0")) == r"^(blocks\.[56]\.|conv_head\.|bn2\.)"
    resnet_like = nn.Module()
    resnet_like.layer3, resnet_like.layer4 = nn.Linear(1, 1), nn.Linear(1, 1)
    assert default_trainable(wrap(resnet_like)) == r"^layer4\."
    timm_like = nn.Module()
    timm_like.blocks = nn.Sequential(*[nn.Linear(1, 1) for _ in range(4)])
    assert default_trainable(wrap(timm_like)) == r"^(blocks\.(2|3)\.|conv_head\.|bn2\.)"


def test_set_trainable_switches_gradients_and_skips_classifier_heads():
    net = nn.Module()
    net.conv1, net.conv2, net.fc = nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2)
    bb = wrap(net)
    params = set_trainable(bb, r"conv2|fc")
    assert [n for n, p in net.named_parameters() if p.requires_grad] == ["conv2.weight", "conv2.bias"]
    assert params == [net.conv2.weight, net.conv2.bias]
    with pytest.raises(ValueError, match="selects no parameter"):
        set_trainable(bb, r"^nothing")


def test_train_mode_puts_only_trainable_batchnorm_in_training():
    bb = tiny()
    set_trainable(bb, r"^bn1\.")
    train_mode(bb, bn_eval=True)
    assert not any(m.training for m in bb.modules())
    train_mode(bb, bn_eval=False)
    assert bb.net.bn1.training and not bb.net.conv1.training and not bb.training
    set_trainable(bb, r"^conv2\.")
    train_mode(bb, bn_eval=False)
    assert not bb.net.bn1.training  # its parameters are frozen


def test_embed_is_l2_of_gem():
    x = torch.rand(2, 3, 5, 7) + 0.1
    e = embed(nn.Identity(), x, gem_p=1.0)  # GeM with p = 1 is average pooling
    want = x.mean(dim=(2, 3))
    torch.testing.assert_close(e, want / want.norm(dim=1, keepdim=True))
    e3 = embed(nn.Identity(), x, gem_p=3.0)
    want3 = x.pow(3).mean(dim=(2, 3)).pow(1 / 3)
    torch.testing.assert_close(e3, want3 / want3.norm(dim=1, keepdim=True))
    assert e.dtype == torch.float32 and e.shape == (2, 3)


def test_normalise_and_net_call():
    norm = Normalise((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), torch.device("cpu"))
    x = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(1, 3, 1, 2)
    torch.testing.assert_close(norm(x)[0, :, 0, :], torch.tensor([[-2.0, 2.0]] * 3))
    bb = tiny()
    net = Net(bb, set_trainable(bb, "."), Normalise(bb.info.mean, bb.info.std, torch.device("cpu")), 3.0, False)
    v = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    torch.testing.assert_close(net(v), embed(bb, net.norm(v), 3.0))


def test_embed_plain_groups_sizes_and_keeps_the_order():
    bb = tiny().eval()
    net = Net(bb, set_trainable(bb, "."), Normalise(bb.info.mean, bb.info.std, torch.device("cpu")), 3.0, False)
    g = torch.Generator().manual_seed(0)
    views = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in [(16, 12), (12, 16), (16, 12)]]
    got = embed_plain(net, views)
    one_by_one = torch.cat([net(v[None]) for v in views])
    torch.testing.assert_close(got, one_by_one)
    assert not got.requires_grad
