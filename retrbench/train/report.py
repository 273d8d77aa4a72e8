"""What an InsCLR run reports about itself: the per-step log, its plot, per-stage summaries, and
the true labels that measure mining quality (never used for training).

Files (in the run directory): ``log.csv`` (:data:`LOG_COLUMNS`, one row per step, appended as
the run goes and cut back to the checkpoint on resume), ``training.png`` (:func:`plot_log`),
``stages.csv`` and ``summary.json`` (:func:`stage_rows`, :func:`write_stage_summary`).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from ..types import RetrievalDataset
from ..utils.io import atomic_write_text

__all__ = ["LOG_COLUMNS", "StepLog", "plot_log", "stage_rows", "true_labels", "truncate_log", "write_stage_summary"]

LOG_COLUMNS = (
    "stage", "step", "global_step", "lr", "loss", "batch_loss", "memory_loss",
    "batch_pos_pairs", "batch_neg_pairs", "memory_pos_pairs", "memory_neg_pairs", "memory_entries",
    "tuples", "images", "member_sim", "tuple_size", "kept_frac", "pool", "mined",
    "true_before", "n_before", "true_after", "n_after", "true_mined", "n_mined",
    "step_s", "images_per_s",
)  # fmt: skip
"""Columns of ``log.csv``. ``member_sim``: mean bank similarity of tuple members to their anchor (it
drifts if training shifts the similarity scale against the fixed thresholds); ``tuple_size``: mean
images per tuple after selection (anchor included);
``kept_frac``: fraction of non-anchor members kept; ``pool``: mean tuple candidate-set size;
``mined``: mean mined positives per anchor; ``true_*`` / ``n_*``: with measurement labels, members
sharing the anchor's true label / members, before selection, after it, and among the mined."""


class StepLog:
    """``log.csv`` open for appending: a header when the file is new, then one row per :meth:`write`.

    A context manager; :meth:`flush` before a checkpoint, so the file holds every row the
    checkpoint covers.
    """

    def __init__(self, path: Path) -> None:
        new = not path.is_file()
        self.path = path
        self._file = open(path, "a", newline="")  # noqa: SIM115 (closed by close / __exit__)
        self._writer = csv.DictWriter(self._file, fieldnames=LOG_COLUMNS)
        if new:
            self._writer.writeheader()

    def write(self, row: Mapping[str, Any]) -> None:
        """Append one row (missing columns empty, extra keys ignored)."""
        self._writer.writerow({c: row.get(c, "") for c in LOG_COLUMNS})

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> StepLog:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def truncate_log(path: Path, global_step: int) -> None:
    """Drop rows after ``global_step`` (written after the checkpoint a run resumes from)."""
    if not path.is_file():
        return
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    keep = [r for r in rows if int(r["global_step"]) <= global_step]
    if len(keep) == len(rows):
        return
    lines = [",".join(LOG_COLUMNS)] + [",".join(r.get(c, "") for c in LOG_COLUMNS) for r in keep]
    atomic_write_text(path, "\n".join(lines) + "\n")


def plot_log(log_csv: str | Path, png: str | Path) -> Path:
    """Plot ``log.csv``: losses, tuple size after selection, mined positives per anchor, and
    (when measured) the true precision of tuples and mined positives; stages as vertical lines."""
    import pandas as pd
    from matplotlib.figure import Figure  # no pyplot: the caller's backend and figures are left alone

    df = pd.read_csv(log_csv)
    png = Path(png)
    measured = df["n_before"].sum() > 0 if len(df) else False
    n_ax = 4 if measured else 3
    fig = Figure(figsize=(7, 2.3 * n_ax))
    axes = fig.subplots(n_ax, 1, sharex=True)
    w = max(1, len(df) // 25)

    def smooth(s: pd.Series) -> pd.Series:
        return s.rolling(w, min_periods=1).mean()

    x = df["global_step"]
    for col in ("loss", "batch_loss", "memory_loss"):
        axes[0].plot(x, smooth(df[col]), label=col)
    axes[0].set_ylabel("loss")
    axes[0].legend(fontsize=7)
    axes[1].plot(x, smooth(df["tuple_size"]), label="tuple size after selection (with anchor)")
    axes[1].plot(x, smooth(df["mined"]), label="mined positives per anchor")
    axes[1].set_ylabel("images")
    axes[1].legend(fontsize=7)
    axes[2].plot(x, smooth(df["kept_frac"]), label="fraction of tuple members kept")
    axes[2].plot(x, smooth(df["member_sim"]), label="member-anchor similarity (bank)")
    axes[2].set_ylim(0, 1.02)
    axes[2].legend(fontsize=7)
    if measured:
        for name in ("before", "after", "mined"):
            prec = df[f"true_{name}"].rolling(w, min_periods=1).sum() / df[f"n_{name}"].rolling(w, min_periods=1).sum()
            axes[3].plot(x, prec, label={"before": "tuple precision (sampled)", "after": "tuple precision (selected)", "mined": "mined precision"}[name])
        axes[3].set_ylim(0, 1.02)
        axes[3].set_ylabel("true precision")
        axes[3].legend(fontsize=7)
    if len(df):
        for b in df.groupby("stage")["global_step"].min().iloc[1:]:
            for ax in axes:
                ax.axvline(b - 0.5, color="grey", ls=":", lw=1)
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    return png


def stage_rows(log_csv: Path, cand_prec: Mapping[int, float]) -> list[dict[str, Any]]:
    """One summary row per stage of ``log.csv``; ``cand_prec``: candidate top-k precision measured per stage."""
    import pandas as pd

    if not log_csv.is_file():
        return []
    df = pd.read_csv(log_csv)
    rows = []
    for s, g in df.groupby("stage"):
        row: dict[str, Any] = {
            "stage": int(s),
            "steps": len(g),
            "loss_first": float(g["loss"].iloc[: max(1, len(g) // 10)].mean()),
            "loss_last": float(g["loss"].iloc[-max(1, len(g) // 10) :].mean()),
            "tuple_size": float(g["tuple_size"].mean()),
            "kept_frac": float(g["kept_frac"].mean()),
            "mined_per_anchor": float(g["mined"].mean()),
            "images_per_s": float(g["images"].sum() / g["step_s"].sum()),
        }
        if g["n_before"].sum() > 0:
            for name in ("before", "after", "mined"):
                n = g[f"n_{name}"].sum()
                row[f"precision_{name}"] = float(g[f"true_{name}"].sum() / n) if n else float("nan")
        if int(s) in cand_prec:
            row["candidate_topk_precision"] = cand_prec[int(s)]
        rows.append(row)
    return rows


def write_stage_summary(out: Path, stages: list[dict[str, Any]]) -> None:
    """``summary.json`` and ``stages.csv``; keeps the candidate precision an earlier (interrupted) call measured."""
    import pandas as pd

    prev = {}
    p = out / "summary.json"
    if p.is_file():  # candidate-set precision measured by an earlier (interrupted) call
        try:
            prev = {r["stage"]: r for r in json.loads(p.read_text()).get("stages", [])}
        except (ValueError, KeyError, TypeError):
            prev = {}
    for r in stages:
        if "candidate_topk_precision" not in r and "candidate_topk_precision" in prev.get(r["stage"], {}):
            r["candidate_topk_precision"] = prev[r["stage"]]["candidate_topk_precision"]
    atomic_write_text(p, json.dumps({"stages": stages}, indent=1))
    if stages:
        atomic_write_text(out / "stages.csv", pd.DataFrame(stages).to_csv(index=False))


def true_labels(ds: RetrievalDataset) -> np.ndarray:
    """A true instance label per database image, from the dataset's ground truth (measurement only).

    Images listed together for one query (easy + hard + junk, or ok + junk) share a label; lists
    that overlap are merged. Images listed for no query (distractors) get ``-1``.
    """
    n = len(ds.images)
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return int(i)

    listed = np.zeros(n, dtype=bool)
    for g in ds.gnd:
        members = np.unique(np.concatenate([np.asarray(v, dtype=np.int64).reshape(-1) for k, v in g.items() if k != "bbx"] or [np.empty(0, np.int64)]))
        members = members[(members >= 0) & (members < n)]
        if members.size == 0:
            continue
        listed[members] = True
        r0 = find(int(members[0]))
        for m in members[1:]:
            r = find(int(m))
            if r != r0:
                parent[r] = r0
    roots = np.array([find(i) for i in range(n)])
    _, labels = np.unique(roots, return_inverse=True)
    return np.where(listed, labels, -1).astype(np.int64)
