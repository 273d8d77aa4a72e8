"""Exact kNN lists of a database (``knn=exact`` in :mod:`.graphs`): every pair scored, the
float32 top-``k`` of each row, equal similarities by increasing index.

Up to 50,000 vectors, :func:`_screened_top_k`: blocked products over the upper triangle of
``x @ x.T`` (symmetric: about half the work) screened in bfloat16 where the CPU multiplies it
natively (AVX512-BF16 / AMX: 2-3x faster than float32), the few pairs that a proven error bound
cannot rule out rescored in float32. Above, :func:`_blocked_top_k`: float32 blocks and running
top-``k`` lists. Blocks run on two Python threads, torch single-threaded inside each.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..utils.linalg import from_orderable_uint32, orderable_uint32
from .base import progress_bar

_SCREEN_MAX_N = 50000  # screened products (a few survivors per row) up to this N
_SCREEN_BLOCK = 1280  # rows per block of the screened products
_U_BF16 = 2.0**-8  # unit roundoff of bfloat16


@functools.lru_cache(maxsize=1)
def _native_bf16() -> bool:
    """Whether the CPU multiplies bfloat16 natively (then the bf16 screen is 2-3x faster than float32)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def _merge_top(run_v: Any, run_i: Any, rows: slice, v: Any, i: Any, m: int) -> None:
    """Merge candidate values / ids ``(r, c)`` into the running top-``m`` of ``rows`` (torch, in place)."""
    import torch

    cv = torch.cat([run_v[rows], v], dim=1)
    ci = torch.cat([run_i[rows], i], dim=1)
    top_v, at = torch.topk(cv, min(m, cv.shape[1]), dim=1)
    run_v[rows, : top_v.shape[1]] = top_v
    run_i[rows, : top_v.shape[1]] = torch.gather(ci, 1, at)


def _as_torch(x: np.ndarray) -> Any:
    import torch

    with warnings.catch_warnings():  # read-only arrays (the cache's) are only read here
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def _blocked_top_k(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` of every row of ``x @ x.T`` by float32 products over the upper triangle
    of blocks (each block feeds its rows and, transposed, its columns) and a running top-``k``
    per row (``torch.topk``); equal similarities by increasing index (which of several tied at
    the ``k``-th place is kept is not specified). For databases too large for :func:`_screened_top_k`."""
    import torch

    n = x.shape[0]
    t = _as_torch(x)
    block = max(256, min(n, 2896))  # (block, block) float32 products of ~32 MiB
    run_v = torch.full((n, k), -math.inf, dtype=torch.float32)
    run_i = torch.full((n, k), -1, dtype=torch.int64)
    starts = list(range(0, n, block))
    with progress_bar(total=len(starts) * (len(starts) + 1) // 2, desc=f"exact kNN graph (k={k})", unit="block") as bar:
        for a in starts:
            ra = slice(a, min(a + block, n))
            for b in starts[starts.index(a) :]:
                rb = slice(b, min(b + block, n))
                s = torch.mm(t[ra], t[rb].T)  # (|I|, |J|)
                v, i = torch.topk(s, min(k, s.shape[1]), dim=1)
                _merge_top(run_v, run_i, ra, v, i + b, k)
                if b != a:
                    v, i = torch.topk(s.T, min(k, s.shape[0]), dim=1)
                    _merge_top(run_v, run_i, rb, v, i + a, k)
                bar.update(1)
    sims, ids = run_v.numpy(), run_i.numpy()
    order = np.lexsort((ids, -sims), axis=-1)
    return np.take_along_axis(sims, order, axis=1), np.take_along_axis(ids, order, axis=1)


@contextlib.contextmanager
def _parallel_blocks() -> Iterator[Callable[..., None]]:
    """``run(fn, items, bar)``: ``fn`` over ``items`` on up to 2 Python threads, each running
    torch single-threaded (torch releases the GIL in its kernels). Independent block products
    in parallel beat one product on two intra-op threads: on a shared 2-core machine the
    threads of one ``torch.mm`` wait on each other (10-16 ms against 7.5 ms on one thread for
    1250 x 1250 x 512 in bfloat16)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    workers = max(1, min(2, os.cpu_count() or 1))
    lock = threading.Lock()
    try:
        with ThreadPoolExecutor(workers) as pool:

            def run(fn: Callable[[Any], None], items: list, bar: Any) -> None:
                def one(item: Any) -> None:
                    fn(item)
                    with lock:
                        bar.update(1)

                list(pool.map(one, items))

            yield run
    finally:
        torch.set_num_threads(before)


def _screen_thresholds(limit: np.ndarray, bf16: bool) -> np.ndarray:
    """``limit`` (float64) rounded down into the screen's type, as comparable bits: int16 bit
    patterns of bfloat16 (ordered like the values where positive), or float32 values."""
    if not bf16:
        lim = limit.astype(np.float32)
        return np.where(lim > limit, np.nextafter(lim, np.float32(-np.inf)), lim)
    import torch

    b = torch.from_numpy(limit.astype(np.float32)).to(torch.bfloat16)  # nearest
    bits = b.view(torch.int16).numpy().copy()
    up = b.float().double().numpy() > limit
    bits[up & (bits > 0)] -= 1  # one bfloat16 step down (positive values)
    bits[up & (bits <= 0)] = np.int16(-32768)  # (not used: non-positive bounds are compared as floats)
    return bits


def _screened_values(v: np.ndarray, bf16: bool) -> np.ndarray:
    """Screened products as float64: from bfloat16 bit patterns (int16) or float32 values."""
    if not bf16:
        return v.astype(np.float64)
    return (v.astype(np.int32) << 16).astype(np.uint32).view(np.float32).astype(np.float64)


def _screened_top_k(x: np.ndarray, k: int, bf16: bool) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` of every row of ``x @ x.T`` (float32 values, equal ones by increasing index):
    screen every pair with cheap products, rescore the few survivors in float32.

    The screening products (bfloat16 when ``bf16``: 2-3x faster where the CPU has native
    bfloat16) are within ``delta_i = c |x_i| max_j |x_j|`` of the float32 ones (``c = 3 u +
    4 u^2 + 2.2 D 2^-24``, ``u = 2^-8``: inputs rounded, float32 accumulation, output rounded;
    float32 only: ``c = 2.2 D 2^-24``); measured bf16 errors stay below ``1.3 u``. Diagonal blocks ``(I, I)`` come first: the ``k``-th largest screened value
    of row ``i`` there, minus ``2 delta_i``, is a bound ``L_i`` below which no float32 top-``k``
    item of ``i`` can screen (its ``k``-th largest over all columns is at least as large, and an
    item screening ``2 delta`` below it is smaller in float32 than ``k`` others). Then the upper
    triangle of blocks, each product used for its rows and (transposed) its columns; pairs at
    or above the bound survive (a few per row; compared as int16 bit patterns, 20x faster than
    a bfloat16 comparison in torch) and are rescored in float32.
    """
    import torch

    n, d = x.shape
    t = _as_torch(x)
    ts = t.to(torch.bfloat16) if bf16 else t
    norms = np.linalg.norm(x, axis=1).astype(np.float64)
    # |screen - float32| <= (3u + 4u^2) |x||y| (inputs rounded to bfloat16: 2u + u^2; float32
    # accumulation; the bfloat16 output: u) + D 2^-24 |x||y| for each side's accumulation
    c = (3 * _U_BF16 + 4 * _U_BF16**2 if bf16 else 0.0) + 2.2 * d * 2.0**-24
    delta = c * norms * norms.max() * 1.01 + 1e-30  # (N,)
    nb = max(1, math.ceil(n / _SCREEN_BLOCK))
    edges = np.linspace(0, n, nb + 1).astype(np.int64)
    blocks = list(zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True))
    limit = np.empty(n, np.float64)
    thr = np.empty(n, np.int16 if bf16 else np.float32)
    pairs: list[np.ndarray] = []
    screened: list[np.ndarray] = []

    def survivors(prod: Any, alo: int, ahi: int, blo: int, bhi: int, rows_side: bool) -> None:
        """Pairs of block ``(A, B)`` at or above the bound of their row (``rows_side``) or of
        their column (then the pair's row is the column's vector), with their screened values."""
        vals = prod.view(torch.int16).numpy() if bf16 else prod.numpy()
        lim = thr[alo:ahi, None] if rows_side else thr[None, blo:bhi]
        flat = np.flatnonzero(vals >= lim)
        if bf16:  # int16 order is value order for positive bounds; the others: compare as floats
            side = limit[alo:ahi] if rows_side else limit[blo:bhi]
            neg = np.flatnonzero(side <= 0)
            if neg.size:
                f = prod.float().numpy()
                sub = f[neg] if rows_side else f[:, neg].T
                rr, cc = np.nonzero(sub >= side[neg][:, None])
                extra = neg[rr] * (bhi - blo) + cc if rows_side else cc * (bhi - blo) + neg[rr]
                r0, c0 = np.divmod(flat, bhi - blo)
                flat = np.concatenate([flat[side[r0 if rows_side else c0] > 0], extra])
        r, cc = np.divmod(flat, bhi - blo)
        v = vals.reshape(-1)[flat]
        screened.append(_screened_values(v, bf16))
        if rows_side:
            pairs.append((alo + r) * n + (blo + cc))
        else:
            pairs.append((blo + cc) * n + (alo + r))

    def diagonal(block: tuple[int, int]) -> None:  # the bounds, and the block's own survivors
        lo, hi = block
        prod = torch.mm(ts[lo:hi], ts[lo:hi].T)
        kth = torch.topk(prod, min(k, hi - lo), dim=1).values[:, -1].double().numpy()
        limit[lo:hi] = kth - 2 * delta[lo:hi]
        thr[lo:hi] = _screen_thresholds(limit[lo:hi], bf16)
        survivors(prod, lo, hi, lo, hi, True)

    def off_diagonal(pair: tuple[tuple[int, int], tuple[int, int]]) -> None:
        (alo, ahi), (blo, bhi) = pair
        prod = torch.mm(ts[alo:ahi], ts[blo:bhi].T)
        survivors(prod, alo, ahi, blo, bhi, True)
        survivors(prod, alo, ahi, blo, bhi, False)

    upper = [(a, b) for i, a in enumerate(blocks) for b in blocks[i + 1 :]]
    with (
        progress_bar(total=len(blocks) + len(upper), desc=f"exact kNN graph (k={k})", unit="block") as bar,
        _parallel_blocks() as run,
    ):
        run(diagonal, blocks, bar)  # every bound first: the off-diagonal blocks use both sides'
        run(off_diagonal, upper, bar)
    rows, cols = np.divmod(np.concatenate(pairs), n)
    approx = np.concatenate(screened)
    # the k-th largest screened value of each row over all its survivors is the true one (every
    # pair above the bound survived); only pairs within 2 delta of it can be in the top k
    keys = (orderable_uint32(approx) ^ np.uint32(0xFFFFFFFF)).astype(np.uint64)  # larger value -> smaller key
    keys |= rows.astype(np.uint64) << np.uint64(32)
    keys.sort()  # by row, then screened value descending
    first = np.searchsorted(keys >> np.uint64(32), np.arange(n, dtype=np.uint64))
    kth = from_orderable_uint32((keys[first + k - 1] & np.uint64(0xFFFFFFFF)).astype(np.uint32) ^ np.uint32(0xFFFFFFFF))
    kth = kth.astype(np.float64)  # (N,) the k-th largest screened value of each row
    need = approx >= kth[rows] - 2 * delta[rows]
    rows, cols = rows[need], cols[need]
    # float32 rescoring, each unordered pair once (x_i . x_j and x_j . x_i are the same bits)
    pair, back = np.unique(np.minimum(rows, cols) * n + np.maximum(rows, cols), return_inverse=True)
    a, b = np.divmod(pair, n)
    values = np.empty(pair.size, np.float32)
    step = 1 << 14
    for lo in range(0, pair.size, step):
        values[lo : lo + step] = np.einsum("pd,pd->p", x[a[lo : lo + step]], x[b[lo : lo + step]])
    exact = values[back]
    order = np.lexsort((cols, -exact, rows))  # by row, similarity descending, index ascending
    rows, cols, exact = rows[order], cols[order], exact[order]
    first = np.searchsorted(rows, np.arange(n))  # every row has >= k survivors (its diagonal-block top k)
    take = first[:, None] + np.arange(k)  # (N, k)
    return exact[take], cols[take]


def _exact_graph(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` of every row of ``x @ x.T`` (itself included), float32 similarities,
    equal similarities by increasing index: :func:`_screened_top_k` up to 50,000 vectors
    (bfloat16 screen on CPUs that multiply it natively), :func:`_blocked_top_k` above."""
    n = x.shape[0]
    if n <= _SCREEN_MAX_N:
        return _screened_top_k(x, k, bf16=_native_bf16() and n > 2048)
    return _blocked_top_k(x, k)
