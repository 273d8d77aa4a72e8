"""Pooling: closed forms, the R-MAC grid worked by hand, and a slow loop reference of cirtorch's rmac."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from retrbench.pooling import POOLINGS, Pooling, gem, mac, parse_pooling, rmac, rmac_regions, spoc


def loop_rmac(x: torch.Tensor, levels: int = 3, eps: float = 1e-6) -> torch.Tensor:
    """cirtorch's ``rmac`` (region grid and loop as published) followed by its ``l2n``.

    ``(B, C, H, W) -> (B, C)``. Deliberately does not use ``rmac_regions``.
    """
    ovr = 0.4
    steps = torch.tensor([2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    h, w = x.size(2), x.size(3)
    side = min(h, w)
    b = (max(h, w) - side) / (steps - 1)
    _, idx = torch.min(torch.abs(((side**2 - side * b) / side**2) - ovr), 0)
    wd = idx.item() + 1 if h < w else 0
    hd = idx.item() + 1 if h > w else 0
    v = x.amax(dim=(2, 3))  # cirtorch: max_pool2d over the whole map (same values)
    v = v / (torch.norm(v, p=2, dim=1, keepdim=True) + eps)
    for level in range(1, levels + 1):
        wl = math.floor(2 * side / (level + 1))
        wl2 = math.floor(wl / 2 - 1)
        bw = 0 if level + wd == 1 else (w - wl) / (level + wd - 1)
        cen_w = torch.floor(wl2 + torch.arange(level + wd, dtype=torch.float32) * bw) - wl2
        bh = 0 if level + hd == 1 else (h - wl) / (level + hd - 1)
        cen_h = torch.floor(wl2 + torch.arange(level + hd, dtype=torch.float32) * bh) - wl2
        for i in cen_h.tolist():
            for j in cen_w.tolist():
                if wl == 0:
                    continue
                r = x[:, :, [int(i) + t for t in range(wl)], :]
                r = r[:, :, :, [int(j) + t for t in range(wl)]]
                vt = r.amax(dim=(2, 3))
                v = v + vt / (torch.norm(vt, p=2, dim=1, keepdim=True) + eps)
    return v / (torch.norm(v, p=2, dim=1, keepdim=True) + eps)


@pytest.fixture
def hand_map() -> torch.Tensor:
    # (1, 2, 2, 3): channel 0 positive, channel 1 all negative.
    return torch.tensor(
        [[[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], [[-1.0, -2.0, -3.0], [-4.0, -5.0, -0.5]]]],
        dtype=torch.float32,
    )


def test_mac_spoc_on_hand_made_map(hand_map: torch.Tensor) -> None:
    assert mac(hand_map).tolist() == [[6.0, -0.5]]  # raw maxima: negatives kept
    assert torch.allclose(spoc(hand_map), torch.tensor([[21.0 / 6, -15.5 / 6]]))
    assert mac(hand_map).shape == spoc(hand_map).shape == (1, 2)


def test_gem_clamps_negatives(hand_map: torch.Tensor) -> None:
    out = gem(hand_map, p=3.0, eps=1e-6)
    want0 = ((1 + 8 + 27 + 64 + 125 + 216) / 6) ** (1 / 3)
    assert out[0, 0].item() == pytest.approx(want0, rel=1e-6)
    assert out[0, 1].item() == pytest.approx(1e-6, rel=1e-4)  # every value clamped to eps


def test_gem_p1_is_spoc_on_positive_maps() -> None:
    x = torch.rand(3, 8, 5, 7, generator=torch.Generator().manual_seed(0)) + 0.01
    assert torch.allclose(gem(x, p=1.0), spoc(x), rtol=1e-6, atol=0)


def test_gem_large_p_tends_to_mac() -> None:
    x = torch.rand(2, 6, 4, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
    errs = [(gem(x, p=p) - mac(x)).abs().max().item() for p in (10.0, 100.0, 1000.0)]
    assert errs[0] > errs[1] > errs[2]
    # mean(x^p)^(1/p) >= max * (1/HW)^(1/p): within max * ln(20) / p of MAC.
    assert errs[2] < 2.0 * math.log(20) / 1000


def test_half_precision_is_pooled_in_float32() -> None:
    x = (torch.rand(1, 4, 3, 3) * 100).half()  # 100**3 overflows float16
    out = gem(x, p=3.0)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("fn", [mac, spoc, gem, rmac])
def test_rejects_non_4d(fn) -> None:
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        fn(torch.zeros(2, 3, 4))


def test_rmac_regions_square_by_hand() -> None:
    # H = W = 8: no extra regions (Wd = Hd = 0); side = 8.
    # l=1: wl = floor(16/2) = 8, one region at 0                                  -> (0, 0)
    # l=2: wl = floor(16/3) = 5, wl2 = floor(5/2 - 1) = 1, b = (8-5)/1 = 3,
    #      starts = floor(1 + [0, 1]*3) - 1 = [0, 3]                               -> 2 x 2
    # l=3: wl = floor(16/4) = 4, wl2 = 1, b = (8-4)/2 = 2, starts = [0, 2, 4]     -> 3 x 3
    # 1 (whole map) + 1 + 4 + 9 = 15 regions.
    want = [(0, 0, 8, 8), (0, 0, 8, 8)]
    want += [(y, x, 5, 5) for y in (0, 3) for x in (0, 3)]
    want += [(y, x, 4, 4) for y in (0, 2, 4) for x in (0, 2, 4)]
    assert rmac_regions(8, 8).tolist() == [list(r) for r in want]


def test_rmac_regions_landscape_by_hand() -> None:
    # H = 6, W = 10: side = 6, b = (10-6)/(steps-1) = [4, 2, 1.33, 1, 0.8, 0.67];
    # |(36 - 6b)/36 - 0.4| = [0.067, 0.267, 0.378, 0.433, 0.467, 0.489] -> idx 0, Wd = 1, Hd = 0.
    # l=1: wl = 6, wl2 = 2; columns: 2 regions, b = (10-6)/1 = 4, starts [0, 4]; rows: [0]
    # l=2: wl = 4, wl2 = 1; columns: 3, b = (10-4)/2 = 3, starts [0, 3, 6];
    #      rows: 2, b = (6-4)/1 = 2, starts [0, 2]
    # l=3: wl = 3, wl2 = 0; columns: 4, b = 7/3, starts floor([0, 2.33, 4.67, 7]) = [0, 2, 4, 7];
    #      rows: 3, b = 1.5, starts floor([0, 1.5, 3]) = [0, 1, 3]
    # 1 + 2 + 6 + 12 = 21 regions.
    want = [(0, 0, 6, 10), (0, 0, 6, 6), (0, 4, 6, 6)]
    want += [(y, x, 4, 4) for y in (0, 2) for x in (0, 3, 6)]
    want += [(y, x, 3, 3) for y in (0, 1, 3) for x in (0, 2, 4, 7)]
    assert rmac_regions(6, 10).tolist() == [list(r) for r in want]
    # Portrait is the transpose.
    port = rmac_regions(10, 6)
    assert sorted(port[:, [1, 0, 3, 2]].tolist()) == sorted(rmac_regions(6, 10).tolist())


def test_rmac_regions_typical_map() -> None:
    # (32, 24), the map of a 1024 x 768 image at stride 32: Hd = 1 -> 2 + 6 + 12 regions + whole map.
    regs = rmac_regions(32, 24)
    assert len(regs) == 21
    assert sorted({int(s) for s in regs[1:, 2]}) == [12, 16, 24]


def test_rmac_regions_inside_map() -> None:
    for h in range(1, 33):
        for w in range(1, 33):
            for levels in (3, 6):
                r = rmac_regions(h, w, levels)
                assert (r >= 0).all() and (r[:, 2] > 0).all()
                assert (r[:, 0] + r[:, 2] <= h).all() and (r[:, 1] + r[:, 3] <= w).all(), (h, w, levels)


@pytest.mark.parametrize("levels", [1, 2, 3, 4])
def test_rmac_matches_loop_reference(levels: int) -> None:
    gen = torch.Generator().manual_seed(levels)
    sizes = [(1, 1), (1, 7), (2, 2), (3, 5), (7, 3), (8, 8), (9, 13), (16, 11), (24, 32), (32, 24), (5, 40)]
    for h, w in sizes:
        x = torch.randn(2, 16, h, w, generator=gen)  # signed: raw maxima, no clamping
        got, want = rmac(x, levels), loop_rmac(x, levels)
        assert got.shape == (2, 16)
        assert torch.allclose(got, want, atol=1e-6, rtol=0), (h, w, levels)


def test_rmac_matches_loop_reference_on_all_small_sizes() -> None:
    gen = torch.Generator().manual_seed(7)
    for h in range(1, 9):
        for w in range(1, 9):
            x = torch.randn(1, 8, h, w, generator=gen).relu()
            assert torch.allclose(rmac(x), loop_rmac(x), atol=1e-6, rtol=0), (h, w)


def test_rmac_is_l2_normalised_and_batch_independent() -> None:
    x = torch.rand(3, 64, 12, 9, generator=torch.Generator().manual_seed(3))
    v = rmac(x)
    assert torch.allclose(v.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(rmac(x[1:2]), v[1:2], atol=1e-7)


def test_registry_specs() -> None:
    assert POOLINGS.list() == ["gem", "mac", "native", "rmac", "spoc"]
    assert POOLINGS.create("gem").spec == "gem(p=3.0)"
    assert POOLINGS.create("gem", p=4).spec == "gem(p=4.0)"
    assert POOLINGS.create("rmac").spec == "rmac(levels=3)"
    assert POOLINGS.create("mac").spec == "mac"
    assert POOLINGS.create("avg").spec == "spoc"
    pool = POOLINGS.create("gem", p=2.5)
    assert isinstance(pool, Pooling) and isinstance(pool, torch.nn.Module)
    x = torch.rand(2, 5, 4, 4)
    assert torch.equal(pool(x), gem(x, p=2.5))
    assert torch.equal(POOLINGS.create("rmac", levels=2)(x), rmac(x, levels=2))
    assert pickle.loads(pickle.dumps(pool)).spec == pool.spec


def test_parse_pooling() -> None:
    assert parse_pooling("gem").spec == "gem(p=3.0)"
    assert parse_pooling("gem:p=4").spec == "gem(p=4.0)"
    assert parse_pooling(" GeM : p = 4 ").spec == "gem(p=4.0)"
    assert parse_pooling("rmac:levels=2").spec == "rmac(levels=2)"
    assert parse_pooling("avg").spec == "spoc"
    for spec in ("gem(p=3.0)", "rmac(levels=5)", "mac", "spoc"):
        assert parse_pooling(spec).spec == spec  # specs round-trip


@pytest.mark.parametrize(
    ("spec", "pattern"),
    [
        ("gem:q=4", r"unknown parameter\(s\) q .*allowed: p"),
        ("rmac:p=3", r"unknown parameter\(s\) p .*allowed: levels"),
        ("mac:p=3", r"unknown parameter\(s\) p .*allowed: none"),
        ("gem:p=abc", r"p must be a number"),
        ("gem:p=-1", r"p must be a finite number > 0"),
        ("rmac:levels=2.5", r"levels must be an integer"),
        ("rmac:levels=0", r"levels must be an integer >= 1"),
        ("gem:p", r"not of the form key=value"),
        ("gem:p=1,p=2", r"given twice"),
        ("", r"expected 'name'"),
    ],
)
def test_parse_pooling_errors(spec: str, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        parse_pooling(spec)


def test_parse_pooling_unknown_name() -> None:
    with pytest.raises(KeyError, match="did you mean 'gem'"):
        parse_pooling("gen:p=3")


def test_regions_array_is_a_fresh_copy() -> None:
    a = rmac_regions(8, 8)
    a[:] = -1
    assert (rmac_regions(8, 8) >= 0).all()
    assert isinstance(a, np.ndarray) and a.dtype == np.int64


@pytest.mark.parametrize("name", POOLINGS.list())
def test_every_pooling_entry(name):
    """Registry-wide: every pooling builds with its defaults, maps (B, C, H, W) to finite (B, C),
    round-trips through its spec, and carries a label and help for tables and the CLI."""
    from retrbench.pooling import pooling_label
    from retrbench.specs import parse_step

    entry = POOLINGS.get(name)
    assert entry.label and entry.help and entry.label != entry.help
    pool = POOLINGS.create(name)
    assert parse_pooling(pool.spec).spec == pool.spec
    assert pooling_label(str(parse_step(name))) == entry.label
    x = torch.rand(2, 7, 5, 6, generator=torch.Generator().manual_seed(0)) + 0.01
    if entry.info.native:  # fed the model's own (B, D) descriptor as a (B, D, 1, 1) map
        x = x[:, :, :1, :1]
    out = pool(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    # each image is pooled on its own: batching never changes a descriptor
    assert torch.allclose(pool(x[1:]), out[1:], atol=1e-6)
    for k, default in entry.info.params.items():  # declared parameters are accepted with their defaults
        assert POOLINGS.create(name, **{k: default}).spec == pool.spec


def test_native_refuses_a_feature_map():
    with pytest.raises(ValueError, match=r"native: expected the model's descriptor as a \(B, D, 1, 1\)"):
        POOLINGS.create("native")(torch.rand(1, 4, 3, 3))
