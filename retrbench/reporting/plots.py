"""The paper's figures from tidy results: the dimension sweep and the rerank comparison.

matplotlib is imported when a plot is drawn (``Figure`` directly, no pyplot state), so the
tables never pay for it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .tables import choose_metric, first_seen, methods, prepare, rerank_columns

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["PLOT_KINDS", "plot"]

PLOT_KINDS = ("dims", "rerank")


def _plot_dims(df: pd.DataFrame) -> Figure:
    """One panel per dataset: value against the whitened dimension, one line per method."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    df = choose_metric(df, None, None)
    df["_method"] = methods(df, "whiten")
    datasets = first_seen(df["_ds"])
    fig = Figure(figsize=(5.0 * len(datasets), 4.2), constrained_layout=True)
    axes = fig.subplots(1, len(datasets), squeeze=False)[0]
    colours = {m: f"C{i % 10}" for i, m in enumerate(first_seen(df["_method"]))}
    all_dims: set[int] = set()
    for ax, ds in zip(axes, datasets, strict=True):
        g = df[df["_ds"] == ds]
        for m in first_seen(g["_method"]):
            gm = g[g["_method"] == m]
            white = gm[gm["whiten"].map(lambda v: v is not None)]
            # x: the dimension used (a capped request sits at its cap)
            if "dim" in white.columns:
                xs = [int(d) if pd.notna(d) else int(w) for d, w in zip(white["dim"], white["whiten"], strict=True)]
            else:
                xs = [int(w) for w in white["whiten"]]
            pts = sorted(dict(zip(xs, white["value"], strict=True)).items())
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=4, color=colours[m], label=m)
                all_dims.update(p[0] for p in pts)
            true = gm[gm["whiten"].map(lambda v: v is None)]
            if len(true):
                y = float(true["value"].iloc[-1])
                ax.axhline(y, ls="--", lw=1, color=colours[m], alpha=0.8)
                if "dim" in true.columns and pd.notna(true["dim"].iloc[-1]):
                    x = int(true["dim"].iloc[-1])
                    ax.plot([x], [y], marker="*", ms=11, color=colours[m], ls="none")
                    all_dims.add(x)
        ax.set_xscale("log", base=2)
        ax.set_title(ds)
        ax.set_xlabel("PCA-whitened dimension")
        ax.set_ylabel(f"{g['metric'].iloc[0]} (%)")
        ax.grid(True, alpha=0.3)
    ticks = sorted(all_dims)
    for ax in axes:
        if ticks:
            ax.set_xticks(ticks)
            ax.set_xticklabels([str(t) for t in ticks], rotation=45 if len(ticks) > 6 else 0)
            ax.minorticks_off()
    handles, labels = axes[0].get_legend_handles_labels()
    seen = dict(zip(labels, handles, strict=True))
    for ax in axes[1:]:
        h, lab = ax.get_legend_handles_labels()
        for hh, ll in zip(h, lab, strict=True):
            seen.setdefault(ll, hh)
    extra = [Line2D([], [], ls="--", marker="*", color="grey", label="true dim (no whitening)")]
    fig.legend(list(seen.values()) + extra, list(seen) + ["true dim (no whitening)"], loc="outside right upper", fontsize="small")
    return fig


def _plot_rerank(df: pd.DataFrame) -> Figure:
    """One panel per dataset: grouped bars of the rerank variants per method."""
    from matplotlib.figure import Figure

    df = choose_metric(df, None, None)
    df["_method"] = methods(df, "rerank")
    variants = rerank_columns(df)
    datasets = first_seen(df["_ds"])
    methods_all = first_seen(df["_method"])
    width_in = min(40.0, max(6.0, 0.18 * len(variants) * len(methods_all) + 2))
    fig = Figure(figsize=(width_in, 3.6 * len(datasets)), constrained_layout=True)
    axes = fig.subplots(len(datasets), 1, squeeze=False)[:, 0]
    bar_w = 0.8 / len(variants)
    for ax, ds in zip(axes, datasets, strict=True):
        g = df[df["_ds"] == ds]
        shown = [m for m in methods_all if m in set(g["_method"])]
        vals = {(m, v): y for m, v, y in zip(g["_method"], g["_rerank"], g["value"], strict=True)}
        x = np.arange(len(shown))
        for j, v in enumerate(variants):
            ys = [vals.get((m, v), np.nan) for m in shown]
            ax.bar(x - 0.4 + bar_w * (j + 0.5), ys, bar_w, label=v, color=f"C{j % 10}")
        ax.set_xticks(x)
        ax.set_xticklabels(shown, rotation=30, ha="right", fontsize="small")
        ax.set_title(ds)
        ax.set_ylabel(f"{g['metric'].iloc[0]} (%)")
        ax.grid(True, axis="y", alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside upper center", ncols=len(variants), fontsize="small")
    return fig


def plot(
    results: pd.DataFrame,
    kind: str = "dims",
    out: str | Path = "plots",
    *,
    where: Mapping[str, Any] | None = None,
    names: Mapping[str, str] | None = None,
    formats: Sequence[str] = ("png", "pdf"),
    dpi: int = 150,
) -> list[Path]:
    """Draw the results and save ``<out>/<kind>.png`` and ``.pdf``; return the paths.

    ``dims``: mAP against the PCA-whitened dimension (log2 axis), one panel per dataset and one
    line per method; the un-whitened descriptor ("true dim") is a dashed line and a star at its
    dimension. ``rerank``: grouped bars of the rerank variants per method, one panel per dataset.
    Revisited datasets show Medium mAP. ``where`` and ``names`` work as in :func:`.table`.
    """
    if kind not in PLOT_KINDS:
        raise ValueError(f"unknown plot kind {kind!r}; choose {', '.join(PLOT_KINDS)}")
    df = prepare(results, where, names)
    if kind == "dims" and not df["whiten"].map(lambda v: v is not None).any():
        raise ValueError("plot dims needs results with PCA-whitening dimensions (whiten: 32 ... 2048)")
    fig = _plot_dims(df) if kind == "dims" else _plot_rerank(df)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in formats:
        p = out / f"{kind}.{ext}"
        fig.savefig(p, dpi=dpi)
        paths.append(p)
    return paths
