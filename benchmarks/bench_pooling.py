"""Time R-MAC (and GeM for scale) on one (1, 2048, 32, 24) feature map against loop references.

Two references run in the same process, on the same seeded map:

* ``cirtorch-loop``: cirtorch's ``rmac`` algorithm as published (a Python loop over regions,
  each region gathered with list indexing), followed by the final L2 normalisation;
* ``slice-loop``: the same loop over regions with tensor views instead of list indexing (the
  cheapest straightforward loop).

Prints median / best times (the functions run round-robin, so a noisy machine slows all
alike) and the speed-up of ``retrbench.pooling.rmac`` over each, and
asserts the vectors are identical (allclose, atol 1e-6).

Usage: ``python benchmarks/bench_pooling.py [--repeat 50] [--threads N] [--shape 1 2048 32 24]``
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from retrbench.pooling import gem, rmac, rmac_regions


def cirtorch_loop_rmac(x: torch.Tensor, levels: int = 3, eps: float = 1e-6) -> torch.Tensor:
    """cirtorch's R-MAC loop, region by region, then L2: ``(B, C, H, W) -> (B, C)``."""
    ovr = 0.4
    steps = torch.tensor([2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    h, w = x.size(2), x.size(3)
    side = min(h, w)
    b = (max(h, w) - side) / (steps - 1)
    _, idx = torch.min(torch.abs(((side**2 - side * b) / side**2) - ovr), 0)
    wd = idx.item() + 1 if h < w else 0
    hd = idx.item() + 1 if h > w else 0
    v = F.max_pool2d(x, (h, w))
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
                vt = F.max_pool2d(r, (wl, wl))
                v = v + vt / (torch.norm(vt, p=2, dim=1, keepdim=True) + eps)
    v = v.flatten(1)
    return v / (torch.norm(v, p=2, dim=1, keepdim=True) + eps)


def slice_loop_rmac(x: torch.Tensor, levels: int = 3, eps: float = 1e-6) -> torch.Tensor:
    """Loop over ``rmac_regions`` with tensor views: ``(B, C, H, W) -> (B, C)``."""
    v = torch.zeros(x.shape[:2], dtype=x.dtype)
    for y, x0, rh, rw in rmac_regions(x.shape[2], x.shape[3], levels).tolist():
        r = x[:, :, y : y + rh, x0 : x0 + rw].amax(dim=(2, 3))
        v = v + r / (r.norm(dim=1, keepdim=True) + eps)
    return v / (v.norm(dim=1, keepdim=True) + eps)


def time_interleaved(fns: dict[str, Callable[[], object]], repeat: int) -> dict[str, tuple[float, float]]:
    """Median and best wall time (ms) of each ``fn()``, run round-robin so that all see the same load."""
    for fn in fns.values():  # warm-up (plan caches, allocator)
        fn()
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--shape", type=int, nargs=4, default=(1, 2048, 32, 24), metavar=("B", "C", "H", "W"))
    ap.add_argument("--levels", type=int, default=3)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*args.shape, generator=gen).relu_()
    n_regions = len(rmac_regions(args.shape[2], args.shape[3], args.levels))
    print(
        f"map {tuple(x.shape)}, levels={args.levels} ({n_regions} regions incl. the whole map), "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), repeat {args.repeat}"
    )

    fast = rmac(x, args.levels)
    for name, ref in (("cirtorch-loop", cirtorch_loop_rmac), ("slice-loop", slice_loop_rmac)):
        want = ref(x, args.levels)
        err = (fast - want).abs().max().item()
        assert torch.allclose(fast, want, atol=1e-6, rtol=0), f"rmac differs from {name}: max |diff| {err:.2e}"
        print(f"  identical to {name}: max |diff| = {err:.1e}")

    fns = {
        "rmac (retrbench)": lambda: rmac(x, args.levels),
        "rmac cirtorch-loop": lambda: cirtorch_loop_rmac(x, args.levels),
        "rmac slice-loop": lambda: slice_loop_rmac(x, args.levels),
        "gem p=3 (retrbench)": lambda: gem(x, 3.0),
    }
    with torch.inference_mode():
        res = time_interleaved(fns, args.repeat)
    for name, (med, best) in res.items():
        print(f"  {name:22s} median {med:8.3f} ms   best {best:8.3f} ms")
    med, best = res["rmac (retrbench)"]
    for ref in ("rmac cirtorch-loop", "rmac slice-loop"):
        print(f"  speed-up over {ref:18s}: {res[ref][0] / med:6.1f}x median, {res[ref][1] / best:6.1f}x best")


if __name__ == "__main__":
    main()
