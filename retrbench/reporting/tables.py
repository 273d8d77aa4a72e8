"""Tidy result rows pivoted into the paper's table layouts, and rendered.

Layouts (Krishna et al., ICMR 2021), datasets as row groups and methods as rows:

* ``table1``: columns are the rerank variants (G, G+AQE, G+DFS, G+DBA, ...), values mAP;
* ``table2``: Easy / Medium / Hard x mAP, mP@5, mP@10 (revisited protocol);
* ``table3``: PCA-whitening dimensions (32 ... 2048) and the un-whitened true dimension;
* ``long``: one row per configuration and metric.

Methods are the models' display names (:mod:`.labels`); settings that vary for one model
within a table (pooling, whitening, rerank, image size ...) are appended to its name, e.g.
``EfficientNet-Lite0 / GeM / 128-d``. Filter with ``where={"whiten": 512}`` to drop them.
Rendering is :func:`retrbench.utils.render.render`; the CSV header is the paper's
(``dataset,method,G,G+AQE,...`` / ``easy_mAP,...`` / ``32,...,true_dim``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from ..utils.render import FORMATS, render
from .labels import label_column, rerank_sorted

__all__ = ["FACETS", "FORMATS", "LAYOUTS", "SPLITS", "TABLE2_METRICS", "TRUE_DIM", "notes", "table", "table_frame"]

LAYOUTS = ("table1", "table2", "table3", "long")
SPLITS = ("easy", "medium", "hard")
TABLE2_METRICS = ("mAP", "mP@5", "mP@10")
TRUE_DIM = "True dim"
# settings that can tell two rows of one model apart (appended to the method name when they do)
FACETS = ("pooling", "whiten", "rerank", "image_size", "query_resize", "whiten_source", "weights", "topk", "dataset_options")


def whiten_dim(v: Any) -> int | None:
    """A whitening value from a results column (int, float with NaN, None, 'none') as int or None."""
    if v is None:
        return None
    if isinstance(v, str):
        return None if v.strip().lower() in ("none", "", "true_dim", "nan") else int(v)
    if isinstance(v, (float, np.floating)) and math.isnan(v):
        return None
    return int(v)


def _key(v: Any) -> str:
    """A comparable text key of a setting (``where`` filters and facet detection)."""
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v, sort_keys=True, default=str)
    if v is None or (isinstance(v, (float, np.floating)) and math.isnan(v)):
        return "None"
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))  # 256.0 (a column with missing values) is 256
    if isinstance(v, np.integer):
        return str(int(v))
    return str(v)


def first_seen(values: Iterable[Any]) -> list[Any]:
    """The distinct values in order of first appearance."""
    return list(dict.fromkeys(values))


# ------------------------------------------------------------------------------ preparation


def prepare(results: pd.DataFrame, where: Mapping[str, Any] | None, names: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Checked, filtered copy of tidy rows with display names in ``_model``, ``_dataset``,
    ``_pooling`` and ``_rerank`` (see :func:`.labels.label_column`)."""
    if not isinstance(results, pd.DataFrame):
        raise TypeError(f"expected a DataFrame of tidy results (load_results), got {type(results).__name__}")
    missing = sorted({"dataset", "model", "split", "metric", "value"} - set(results.columns))
    if missing:
        raise ValueError(f"not tidy results: columns {missing} are missing (have {sorted(results.columns)})")
    df = results.reset_index(drop=True).copy()
    for col, default in (("pooling", None), ("whiten", None), ("rerank", "none")):
        if col not in df.columns:
            df[col] = default
    df["whiten"] = pd.Series([whiten_dim(v) for v in df["whiten"]], index=df.index, dtype=object)
    df["rerank"] = ["none" if r is None or (isinstance(r, float) and math.isnan(r)) else str(r) for r in df["rerank"]]
    for k, v in (where or {}).items():
        if k not in df.columns:
            raise ValueError(f"where: no column {k!r} in the results")
        wanted = v if isinstance(v, (list, tuple, set)) else [v]
        keys = {_key(whiten_dim(w)) for w in wanted} if k == "whiten" else {_key(w) for w in wanted}
        df = df[df[k].map(_key).isin(keys)]
    if df.empty:
        raise ValueError("no results to show" + (f" (after where={dict(where)})" if where else ""))
    df = df.reset_index(drop=True)
    df["value"] = pd.to_numeric(df["value"], errors="coerce")
    df["_model"] = label_column(df, "model", names)
    for kind in ("dataset", "pooling", "rerank"):
        df[f"_{kind}"] = label_column(df, kind)
    return df


def choose_metric(df: pd.DataFrame, metric: str | None, split: str | None) -> pd.DataFrame:
    """Per dataset, keep one (split, metric): ``all`` or else ``medium``; ``mAP`` or else
    ``mAP@100``. ``_ds`` gets the dataset's name plus the split / metric when not the default."""
    keep = []
    for ds, g in df.groupby("dataset", sort=False):
        metrics = list(dict.fromkeys(g["metric"]))
        m = metric or next((c for c in ("mAP", "mAP@100") if c in metrics), None)
        if m is None or m not in metrics:
            raise ValueError(f"dataset {ds!r} has no metric {metric or 'mAP'!r} (has {metrics})")
        splits = list(dict.fromkeys(g.loc[g["metric"] == m, "split"]))
        s = split or next((c for c in ("all", "medium") if c in splits), splits[0])
        if s not in splits:
            raise ValueError(f"dataset {ds!r} has no split {s!r} for {m} (has {splits})")
        sel = g[(g["metric"] == m) & (g["split"] == s)].copy()
        suffix = [] if s == "all" else [s.capitalize()]
        if m != "mAP":
            suffix.append(m)
        sel["_ds"] = sel["_dataset"] + (f" ({' '.join(suffix)})" if suffix else "")
        keep.append(sel)
    return pd.concat(keep, ignore_index=True)


def _facet_text(df: pd.DataFrame, col: str) -> pd.Series:
    if col in ("pooling", "rerank"):
        return df[f"_{col}"]
    if col == "whiten":
        return df[col].map(lambda v: "true dim" if v is None else f"{v}-d")
    if col == "image_size":
        return df[col].map(lambda v: "default size" if _key(v) == "None" else f"{_key(v)}px")
    return df[col].map(lambda v: f"{col}={v}")


def methods(df: pd.DataFrame, axis: str | None) -> pd.Series:
    """Method labels: the model's display name plus the settings (other than ``axis``) that
    vary within one model and dataset."""
    facets = []
    for col in FACETS:
        if col == axis or col not in df.columns:
            continue
        keys = df[col].map(_key)
        if (keys.groupby([df["dataset"], df["model"]]).nunique() > 1).any():
            facets.append(col)
    parts = [df["_model"].astype(str), *(_facet_text(df, c).astype(str) for c in facets)]
    return pd.Series([" / ".join(p) for p in zip(*parts, strict=True)], index=df.index, dtype=object)


def rerank_columns(df: pd.DataFrame) -> list[str]:
    """The rerank labels of ``df`` in Table 1's order (see :func:`.labels.rerank_sorted`)."""
    return rerank_sorted(list(df["rerank"]), list(df["_rerank"]))


# ---------------------------------------------------------------------------------- layouts


def _long(df: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "dataset": df["_dataset"],
            "method": df["_model"],
            "pooling": df["_pooling"],
            "whiten": df["whiten"].map(lambda v: "none" if v is None else str(v)),
            "rerank": df["_rerank"],
            "split": df["split"],
            "metric": df["metric"],
            "value": df["value"],
        }
    ).drop_duplicates(subset=["dataset", "method", "pooling", "whiten", "rerank", "split", "metric"], keep="last")


def table_frame(
    results: pd.DataFrame,
    layout: str = "table1",
    *,
    metric: str | None = None,
    split: str | None = None,
    where: Mapping[str, Any] | None = None,
    names: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """The numbers of a layout: rows ``(Dataset, Method)``, columns as the paper's table.

    Args:
        results: tidy rows (one per configuration and metric).
        layout: ``table1`` (rerank variants), ``table2`` (Easy/Medium/Hard x mAP, mP@5, mP@10),
            ``table3`` (whitening dimensions and ``True dim``) or ``long``.
        metric, split: the value shown by ``table1`` / ``table3`` (default ``mAP``, split
            ``all`` where the protocol has it, else ``medium``; the split is added to the
            dataset's name).
        where: keep rows whose column equals the value (or one of a list), e.g.
            ``{"whiten": 512, "pooling": "rmac"}``.
        names: model display names overriding the registry's and the rows', ``{"my_model": "Mine"}``.

    Returns:
        float DataFrame (NaN where a cell was not run); ``long`` returns a flat frame instead.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose {', '.join(LAYOUTS)}")
    df = prepare(results, where, names)
    if layout == "long":
        return _long(df)
    if layout == "table2":
        df = df[df["split"].isin(SPLITS) & df["metric"].isin(TABLE2_METRICS)].copy()
        if df.empty:
            raise ValueError("table2 needs revisited-protocol results (Easy/Medium/Hard x mAP, mP@5, mP@10: rOxford5k, rParis6k, demo)")
        df["_ds"] = df["_dataset"]
        df["_col"] = list(zip(df["split"].str.capitalize(), df["metric"], strict=True))
        present = set(df["_col"])
        cols: list[Any] = [(s.capitalize(), m) for s in SPLITS for m in TABLE2_METRICS if (s.capitalize(), m) in present]
        axis = None
    else:
        df = choose_metric(df, metric, split)
        if layout == "table1":
            df["_col"] = df["_rerank"]
            cols = rerank_columns(df)
            axis = "rerank"
        else:
            df["_col"] = df["whiten"].map(lambda v: TRUE_DIM if v is None else str(v))
            dims = sorted({v for v in df["whiten"] if v is not None})
            cols = [str(d) for d in dims] + ([TRUE_DIM] if (df["whiten"].map(lambda v: v is None)).any() else [])
            axis = "whiten"
    df["_method"] = methods(df, axis)
    rows = first_seen(zip(df["_ds"], df["_method"], strict=True))
    # methods keep their first-appearance order across datasets
    method_rank = {m: i for i, m in enumerate(first_seen(df["_method"]))}
    ds_rank = {d: i for i, d in enumerate(first_seen(df["_ds"]))}
    rows.sort(key=lambda r: (ds_rank[r[0]], method_rank[r[1]]))
    wide: dict[tuple[str, str], dict[Any, float]] = {r: {} for r in rows}
    for ds, m, c, v in zip(df["_ds"], df["_method"], df["_col"], df["value"], strict=True):
        wide[(ds, m)][c] = v  # the last row of a configuration wins
    out = pd.DataFrame.from_dict(wide, orient="index").reindex(columns=cols)
    out.index = pd.MultiIndex.from_tuples(rows, names=["Dataset", "Method"])
    if layout == "table2":
        out.columns = pd.MultiIndex.from_tuples(cols, names=["split", "metric"])
    else:
        out.columns = pd.Index(cols, name="rerank" if layout == "table1" else "dim")
    return out.astype(float)


# -------------------------------------------------------------------------------- rendering


def _paper_csv(frame: pd.DataFrame) -> pd.DataFrame:
    """A wide frame under the paper's CSV header: ``dataset,method,...``, ``easy_mAP``, ``true_dim``."""
    flat = frame.copy()
    if isinstance(frame.columns, pd.MultiIndex):
        flat.columns = [f"{s.lower()}_{m}" for s, m in frame.columns]
    else:
        flat.columns = ["true_dim" if c == TRUE_DIM else str(c) for c in frame.columns]
    flat.index = flat.index.set_names(["dataset", "method"])
    return flat


def table(
    results: pd.DataFrame,
    layout: str = "table1",
    fmt: str = "markdown",
    *,
    precision: int = 2,
    metric: str | None = None,
    split: str | None = None,
    where: Mapping[str, Any] | None = None,
    names: Mapping[str, str] | None = None,
    caption: str | None = None,
) -> str:
    """Render tidy results in one of the paper's layouts (see :func:`table_frame`).

    ``fmt``: ``latex`` (booktabs; ``\\usepackage{booktabs,multirow}``), ``markdown``, ``csv``
    (the paper's CSV header: ``dataset,method,G,G+AQE,...`` / ``easy_mAP,...`` / ``32,...,true_dim``)
    or ``html`` (a string that Jupyter renders). The best value of each column within each
    dataset is bold (LaTeX, Markdown, HTML). ``caption`` wraps the LaTeX in a ``table``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown table format {fmt!r}; choose {', '.join(FORMATS)}")
    frame = table_frame(results, layout, metric=metric, split=split, where=where, names=names)
    if layout == "long":
        return render(frame, fmt, precision=precision, caption=caption)
    if fmt == "csv":
        return render(_paper_csv(frame), fmt, precision=precision)
    return render(frame, fmt, precision=precision, caption=caption, bold="group")


def notes(results: pd.DataFrame) -> list[str]:
    """The distinct whitening notes (capped dimensions) of the rows, as ``model on dataset (pooling): note``."""
    if "whitening" not in results.columns:
        return []
    out: list[str] = []
    for r in results.itertuples(index=False):
        w = getattr(r, "whitening", None)
        note = w.get("note") if isinstance(w, dict) else None
        if note:
            text = f"{r.model} on {r.dataset} ({getattr(r, 'pooling', '?')}): {note}"
            if text not in out:
                out.append(text)
    return out
