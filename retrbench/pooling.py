"""Global pooling of a feature map into one descriptor: MAC, SPoC, GeM and R-MAC.

Every pooling maps a ``(B, C, H, W)`` feature map to ``(B, C)`` descriptors. The functions
follow cirtorch (``cirtorch/layers/functional.py``) and give the same vectors; the
:class:`Pooling` objects built by ``POOLINGS.create`` / :func:`parse_pooling` carry a
``spec`` string that fully determines their output (it keys the feature cache).

Negative activations (maps that were not passed through a ReLU): MAC, R-MAC and SPoC use the
raw values (a channel that is negative everywhere gives a negative maximum / mean); GeM
clamps the map at ``eps`` first, so negative values count as ~0.

Half-precision maps (float16 / bfloat16) are pooled in float32 (``x ** p`` overflows float16
for activations above ~40 when p=3); other dtypes are pooled in their own precision.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .registry import EntryInfo, Registry
from .specs import Step, parse_step
from .utils.linalg import l2n

__all__ = [
    "mac",
    "spoc",
    "gem",
    "rmac",
    "rmac_regions",
    "Pooling",
    "PoolingInfo",
    "POOLINGS",
    "parse_pooling",
    "pooling_label",
]

# cirtorch's R-MAC grid constants (Tolias et al. 2016).
_RMAC_OVERLAP = 0.4  # desired overlap of neighbouring regions
_RMAC_STEPS = (2, 3, 4, 5, 6, 7)  # possible numbers of regions along the longer side


def _check_map(x: Tensor, who: str) -> Tensor:
    """Validate a ``(B, C, H, W)`` map and upcast half precision to float32."""
    if not isinstance(x, Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{who}: expected a (B, C, H, W) tensor, got {shape}")
    if x.shape[-1] == 0 or x.shape[-2] == 0:
        raise ValueError(f"{who}: empty spatial extent {tuple(x.shape)}")
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    return x


def mac(x: Tensor) -> Tensor:
    """Maximum activation of convolutions: per-channel spatial maximum.

    Raw maxima: negative activations are kept (no clamping).

    ``(B, C, H, W) -> (B, C)``
    """
    x = _check_map(x, "mac")
    return x.amax(dim=(-2, -1))


def spoc(x: Tensor) -> Tensor:
    """Sum-pooled convolutional features (average pooling): per-channel spatial mean.

    ``(B, C, H, W) -> (B, C)``
    """
    x = _check_map(x, "spoc")
    return x.mean(dim=(-2, -1))


def gem(x: Tensor, p: float = 3.0, eps: float = 1e-6) -> Tensor:
    """Generalised-mean pooling: ``mean(clamp(x, eps) ** p) ** (1 / p)`` per channel.

    The map is clamped at ``eps`` first (as cirtorch), so negative activations count as ~0.
    ``p=1`` is average pooling (on positive maps); ``p -> inf`` tends to MAC.

    ``(B, C, H, W) -> (B, C)``
    """
    x = _check_map(x, "gem")
    return x.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


@functools.lru_cache(maxsize=1024)
def _rmac_grid(h: int, w: int, levels: int) -> tuple[tuple[int, tuple[int, ...], tuple[int, ...]], ...]:
    """Per level ``(size, row starts, column starts)`` of the square R-MAC regions.

    Computed with the same float32 torch arithmetic as cirtorch's ``rmac`` so that the
    floors land on the same integers. Levels whose region size is 0 are left out.
    """
    if h < 1 or w < 1:
        raise ValueError(f"rmac_regions: map size must be positive, got h={h}, w={w}")
    if levels < 1:
        raise ValueError(f"rmac_regions: levels must be >= 1, got {levels}")
    steps = torch.tensor(_RMAC_STEPS, dtype=torch.float32, device="cpu")
    side = min(h, w)
    b = (max(h, w) - side) / (steps - 1)  # (6,) float32
    # steps[idx] regions along the longer side at level 1: the overlap closest to 0.4.
    _, idx = torch.min(torch.abs(((side**2 - side * b) / side**2) - _RMAC_OVERLAP), 0)
    extra_w = int(idx.item()) + 1 if h < w else 0  # cirtorch's Wd
    extra_h = int(idx.item()) + 1 if h > w else 0  # cirtorch's Hd

    def starts(extent: int, size: int, half: int, count: int) -> tuple[int, ...]:
        step = 0.0 if count == 1 else (extent - size) / (count - 1)
        pos = torch.arange(count, dtype=torch.float32, device="cpu")
        centres = torch.floor(half + pos * step) - half
        return tuple(int(c) for c in centres.tolist())

    grid = []
    for level in range(1, levels + 1):
        size = math.floor(2 * side / (level + 1))
        if size == 0:
            continue
        half = math.floor(size / 2 - 1)
        ys = starts(h, size, half, level + extra_h)
        xs = starts(w, size, half, level + extra_w)
        grid.append((size, ys, xs))
    return tuple(grid)


def rmac_regions(h: int, w: int, levels: int = 3) -> np.ndarray:
    """The R-MAC regions of an ``h x w`` map, as cirtorch's ``rmac`` computes them.

    Row 0 is the whole map (the global MAC term); then, level by level (``l = 1..levels``),
    square regions of side ``floor(2 * min(h, w) / (l + 1))`` on a grid of ``l + Hd`` rows by
    ``l + Wd`` columns (row-major), where the longer side gets ``Wd`` / ``Hd`` extra regions
    chosen so that neighbouring level-1 regions overlap by about 40%. Duplicate regions are
    kept (cirtorch sums them twice).

    Returns an int64 array ``(R, 4)`` of ``(y, x, rh, rw)``: top row, left column, height, width.
    """
    rows = [(0, 0, h, w)]
    for size, ys, xs in _rmac_grid(int(h), int(w), int(levels)):
        rows.extend((y, x, size, size) for y in ys for x in xs)
    return np.asarray(rows, dtype=np.int64)


@dataclass(frozen=True)
class _Plan:
    """Gather indices computing every R-MAC region maximum from blocks of ``2**k`` rows / columns.

    ``2**k`` is at most the smallest region side; a side ``s`` is covered by ``m`` blocks of
    ``2**k`` starting at ``min(i * 2**k, s - 2**k)`` (overlaps are harmless for a maximum),
    padded to the same ``m`` for all regions by repeating the last block.
    """

    k: int
    m: int
    rows: Tensor  # (nb * m,) first row of each block of each row band (one band per region row)
    cols: Tensor  # (nr * m,) flat (band, first column) of each block of each region


@functools.lru_cache(maxsize=1024)
def _rmac_plan(h: int, w: int, levels: int, device: torch.device) -> _Plan:
    """The :class:`_Plan` of an ``h x w`` map (cached per map size, levels and device)."""
    grid = _rmac_grid(h, w, levels)
    k = min(size for size, _, _ in grid).bit_length() - 1
    p = 1 << k
    m = max(-(-size // p) for size, _, _ in grid)

    def blocks(size: int) -> list[int]:
        offs = [min(i * p, size - p) for i in range(-(-size // p))]
        return offs + [offs[-1]] * (m - len(offs))

    width_k = w - p + 1  # columns left after the order-k column maxima
    rows: list[int] = []
    cols: list[int] = []
    for size, ys, xs in grid:
        offs = blocks(size)
        for y in ys:
            band = len(rows) // m
            rows.extend(y + o for o in offs)
            cols.extend(band * width_k + x + o for x in xs for o in offs)

    def as_tensor(v: list[int]) -> Tensor:
        return torch.tensor(v, dtype=torch.long, device=device)

    return _Plan(k, m, as_tensor(rows), as_tensor(cols))


def _running_max(x: Tensor, dim: int, k: int) -> Tensor:
    """Maxima over ``2**k`` consecutive entries along ``dim`` (size shrinks by ``2**k - 1``)."""
    for j in range(k):
        half = 1 << j
        x = torch.maximum(x.narrow(dim, 0, x.shape[dim] - half), x.narrow(dim, half, x.shape[dim] - half))
    return x


def rmac(x: Tensor, levels: int = 3, eps: float = 1e-6) -> Tensor:
    """Regional MAC (Tolias et al. 2016) on the region grid of :func:`rmac_regions`.

    Each region (the whole map included) is max-pooled and L2-normalised, the region vectors
    are summed and the sum is L2-normalised; ``eps`` is added to every norm as cirtorch does.
    Equals cirtorch's ``l2n(rmac(x, L=levels))``. Raw maxima: negative activations are kept.

    No loop over regions: maxima over ``2**k`` consecutive rows (``2**k`` <= the smallest
    region side) are gathered into row bands, which get maxima over ``2**k`` columns; each
    region's maximum is then the maximum of a few overlapping ``2**k x 2**k`` blocks.

    ``(B, C, H, W) -> (B, C)``
    """
    x = _check_map(x, "rmac")
    if levels < 1:
        raise ValueError(f"rmac: levels must be >= 1, got {levels}")
    bsz, chans, h, w = x.shape
    plan = _rmac_plan(h, w, int(levels), x.device)
    m = plan.m

    rows = _running_max(x, 2, plan.k)  # (B, C, H - 2**k + 1, W)
    blocks = rows.index_select(2, plan.rows).view(bsz, chans, -1, m, w)  # (B, C, nb, m, W)
    bands = blocks[:, :, :, 0]
    for i in range(1, m):
        bands = torch.maximum(bands, blocks[:, :, :, i])  # (B, C, nb, W)
    cells = _running_max(bands, 3, plan.k).reshape(bsz, chans, -1)  # (B, C, nb * (W - 2**k + 1))
    regions = cells.index_select(2, plan.cols).view(bsz, chans, -1, m).amax(dim=-1)  # (B, C, nr)
    whole = rows.amax(dim=(-2, -1)).unsqueeze(-1)  # (B, C, 1): the row windows cover every row
    v = l2n(torch.cat([whole, regions], dim=-1), eps, dim=1).sum(dim=-1)  # (B, C)
    return l2n(v, eps, dim=1)


# ----------------------------------------------------------------------------------------
# Pooling objects, registry and spec parsing
# ----------------------------------------------------------------------------------------


class Pooling(nn.Module):
    """A pooling with fixed parameters: ``pool(x)`` maps ``(B, C, H, W) -> (B, C)``.

    ``spec`` (e.g. ``"gem(p=3.0)"``, ``"rmac(levels=3)"``, ``"mac"``) names the pooling and
    every parameter value, so two poolings with the same spec give the same descriptors.
    ``parse_pooling(pool.spec)`` rebuilds an equal pooling. The clamp / norm ``eps`` of GeM
    and R-MAC is fixed at cirtorch's 1e-6.
    """

    def __init__(self, name: str, fn: Callable[..., Tensor], params: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self._name = name
        self._fn = fn
        self._params = dict(params or {})

    @property
    def name(self) -> str:
        return self._name

    @property
    def params(self) -> Mapping[str, Any]:
        return MappingProxyType(self._params)

    @property
    def spec(self) -> str:
        if not self._params:
            return self._name
        inner = ",".join(f"{k}={v!r}" for k, v in sorted(self._params.items()))
        return f"{self._name}({inner})"

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C)
        return self._fn(x, **self._params)

    def extra_repr(self) -> str:
        return self.spec


@dataclass(frozen=True)
class PoolingInfo(EntryInfo):
    """Metadata on a pooling registry entry.

    Attributes:
        params: parameter name -> default value; the default's type (int or float) is the
            type a spec string's value is converted to.
        native: the pooling is the backbone's own learned head (``native``): the pipeline
            feeds it the model's ``(B, D)`` descriptor as a ``(B, D, 1, 1)`` map instead of the
            feature map. Only models with a ``native`` method support it.
    """

    params: Mapping[str, Any] = field(default_factory=dict)
    native: bool = False


POOLINGS: Registry[Pooling] = Registry("pooling", PoolingInfo)


def _positive_float(name: str, value: Any) -> float:
    v = float(value)
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return v


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or int(value) != value:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if int(value) < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


@POOLINGS.register("mac", info=PoolingInfo(label="MAC", order=0))
def make_mac() -> Pooling:
    """per-channel spatial maximum (raw, negatives kept)."""
    return Pooling("mac", mac)


@POOLINGS.register("spoc", aliases=("avg",), info=PoolingInfo(label="SPoC", order=1))
def make_spoc() -> Pooling:
    """per-channel spatial mean (average pooling)."""
    return Pooling("spoc", spoc)


@POOLINGS.register("gem", info=PoolingInfo(label="GeM", order=2, params={"p": 3.0}))
def make_gem(p: float = 3.0) -> Pooling:
    """generalised mean with exponent p (map clamped at 1e-6 first)."""
    return Pooling("gem", gem, {"p": _positive_float("p", p)})


@POOLINGS.register("rmac", info=PoolingInfo(label="R-MAC", order=3, params={"levels": 3}))
def make_rmac(levels: int = 3) -> Pooling:
    """sum of L2-normalised region maxima over a multi-scale grid, L2-normalised."""
    return Pooling("rmac", rmac, {"levels": _positive_int("levels", levels)})


def _flatten_native(x: Tensor) -> Tensor:
    """The backbone's own descriptor, given as a ``(B, D, 1, 1)`` map: ``-> (B, D)``."""
    if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[-2:] != (1, 1):
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"native: expected the model's descriptor as a (B, D, 1, 1) tensor, got {shape}")
    return x.flatten(1)


@POOLINGS.register("native", info=PoolingInfo(label="native", order=4, native=True))
def make_native() -> Pooling:
    """the model's own learned head (GeM-AP, cirtorch, InsCLR; ViT class token)."""
    return Pooling("native", _flatten_native)


def _convert(name: str, key: str, raw: str, default: Any) -> Any:
    try:
        if isinstance(default, int) and not isinstance(default, bool):
            return int(raw)
        return float(raw)
    except ValueError:
        kind = "an integer" if isinstance(default, int) else "a number"
        raise ValueError(f"pooling {name!r}: {key} must be {kind}, got {raw!r}") from None


def parse_pooling(spec: str | Step) -> Pooling:
    """Build a pooling from a spec: ``"gem"``, ``"gem:p=4"``, ``"rmac:levels=2"`` or a parsed
    :class:`~retrbench.specs.Step`.

    The ``spec`` form of a pooling (``"gem(p=4.0)"``) is accepted too. Unknown names raise
    ``KeyError`` with close matches; unknown or malformed parameters raise ``ValueError``
    naming the parameter and the allowed ones.
    """
    step = parse_step(spec, "pooling spec")
    name, raw = step.name, {k: str(v) for k, v in step.params}
    entry = POOLINGS.get(name)
    allowed: Mapping[str, Any] = entry.info.params if isinstance(entry.info, PoolingInfo) else {}
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        ok = ", ".join(sorted(allowed)) if allowed else "none"
        raise ValueError(f"pooling {entry.name!r}: unknown parameter(s) {', '.join(unknown)} (allowed: {ok})")
    kwargs = {k: _convert(entry.name, k, v, allowed[k]) for k, v in raw.items()}
    return entry.factory(**kwargs)


def pooling_label(spec: str | Step) -> str:
    """Display name of a pooling spec for tables: ``gem`` -> ``GeM``, ``gem:p=4`` -> ``GeM(p=4)``.

    Names the registry does not know are shown as written.
    """
    step = parse_step(spec, "pooling spec")
    params = ",".join(f"{k}={v}" for k, v in step.params)
    return POOLINGS.label(step.name) + (f"({params})" if params else "")
