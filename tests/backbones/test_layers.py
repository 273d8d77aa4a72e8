"""retrbench.backbones.layers.GeM: closed forms and the two upstream averaging variants."""

from __future__ import annotations

import torch
from torch import nn

from retrbench.backbones.layers import GeM

from ._helpers import gem_ref


def _maps() -> torch.Tensor:
    return torch.rand(2, 5, 3, 4, generator=torch.Generator().manual_seed(0)) + 0.1  # positive: no clamping


def test_p1_is_average_pooling_and_constant_maps_are_fixed_points() -> None:
    x = _maps()
    torch.testing.assert_close(GeM(1.0, learned=False)(x), x.mean(dim=(-2, -1), keepdim=True))
    c = torch.full((1, 3, 4, 4), 0.7)
    torch.testing.assert_close(GeM(5.0)(c), torch.full((1, 3, 1, 1), 0.7))


def test_large_p_tends_to_max_and_matches_the_hand_formula() -> None:
    x = _maps()
    big = GeM(64.0, learned=False)(x).flatten(1)
    assert (big <= x.amax(dim=(-2, -1)) + 1e-6).all() and (big > 0.9 * x.amax(dim=(-2, -1))).all()
    torch.testing.assert_close(GeM(3.0)(x).flatten(1), gem_ref(x, 3.0))


def test_full_kernel_equals_adaptive_and_eps_clamps() -> None:
    x = _maps() - 0.5  # some negatives: clamped to eps before the power
    a, b = GeM(2.5, full_kernel=True)(x), GeM(2.5, full_kernel=False)(x)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a.flatten(1), gem_ref(x, 2.5))


def test_learned_p_is_a_parameter_named_p() -> None:
    learned, fixed = GeM(3.0), GeM(3.0, learned=False)
    assert isinstance(learned.p, nn.Parameter) and learned.p.shape == (1,)
    assert list(learned.state_dict()) == ["p"] and list(fixed.state_dict()) == []  # upstream's checkpoint names
    learned.p.data.fill_(1.0)
    x = _maps()
    torch.testing.assert_close(learned(x), x.mean(dim=(-2, -1), keepdim=True))
    assert "learned" in repr(learned) and "p=3" in repr(fixed)
