"""retrbench.backbones.base: BackboneInfo (an EntryInfo), its geometry, and the building helpers."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

from retrbench.backbones import BACKBONES, Backbone, BackboneInfo, local_weights
from retrbench.backbones.base import finish, new_network, seeded
from retrbench.registry import EntryInfo


def test_info_is_an_entry_info_built_positionally() -> None:
    info = BackboneInfo(16, 4, (0.5,) * 3, (0.5,) * 3)  # as the training tests build it
    assert isinstance(info, EntryInfo) and (info.channels, info.stride, info.label, info.order) == (16, 4, "", 0)
    assert [info.map_side(n) for n in (1, 4, 5, 64, 66)] == [1, 1, 2, 16, 17]  # ceil(n / stride)
    fixed = dataclasses.replace(info, feature_size=lambda n: 2)
    assert fixed.map_side(1000) == 2 and fixed == info  # the geometry function is not compared


def test_backbone_forward_prefers_forward_features() -> None:
    class Net(nn.Module):
        def forward_features(self, x):
            return x * 2

        def forward(self, x):
            return x * 3

    x = torch.ones(1, 3, 2, 2)
    info = BackboneInfo(3, 1, (0.0,) * 3, (1.0,) * 3)
    assert torch.equal(Backbone(Net(), info, "n", "w")(x), x * 2)
    assert torch.equal(Backbone(nn.Identity(), info, "n", "w")(x), x)
    bb = finish(nn.Linear(2, 2), info, "lin", "w")
    assert not bb.training and not any(p.requires_grad for p in bb.parameters())


def test_seeded_and_new_network() -> None:
    state = torch.get_rng_state()
    a, b = seeded(lambda: torch.rand(3)), seeded(lambda: torch.rand(3))
    assert torch.equal(a, b) and torch.equal(torch.get_rng_state(), state)  # the caller's generator is untouched
    r1, r2 = new_network(lambda: nn.Linear(4, 4), pretrained=False), new_network(lambda: nn.Linear(4, 4), pretrained=False)
    assert torch.equal(r1.weight, r2.weight)
    empty = new_network(lambda: nn.Linear(4, 4), pretrained=True)  # not initialised: to be loaded
    assert empty.weight.device.type == "cpu" and empty.weight.shape == (4, 4)


def test_local_weights_looks_in_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RETRBENCH_CACHE", str(tmp_path))
    file = BACKBONES.get("mocov1").info.weights_file
    assert local_weights("mocov1") is None
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / file).write_bytes(b"x")
    assert local_weights("moco-v1") == tmp_path / "weights" / file
    assert local_weights("random") is None  # no weights file at all


def test_token_fields_default_to_a_convolutional_network() -> None:
    from retrbench.backbones.base import INPUT_ANY, INPUT_RESIZE_TO_PATCHES

    info = BackboneInfo(16, 4, (0.5,) * 3, (0.5,) * 3)
    assert (info.patch_size, info.input_rule, info.native_descriptor) == (None, INPUT_ANY, "")
    vit = dataclasses.replace(info, patch_size=14, input_rule=INPUT_RESIZE_TO_PATCHES, native_descriptor="class token")
    assert vit != info and vit.patch_size == 14
    for name in BACKBONES.list():  # registry entries state their rule; token models say what native gives
        e = BACKBONES.get(name).info
        assert e.input_rule in (INPUT_ANY, INPUT_RESIZE_TO_PATCHES)
        assert (e.patch_size is None) == (e.input_rule == INPUT_ANY)
        assert e.patch_size is None or (e.native_descriptor and e.stride == e.patch_size)
