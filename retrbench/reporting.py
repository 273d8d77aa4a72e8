"""The paper's tables and figures from tidy results.

:func:`table` pivots tidy rows (:func:`retrbench.results.load_results`, :func:`retrbench.sweep`)
into the layouts of Krishna et al. (ICMR 2021), datasets as row groups and methods as rows:

* ``table1``: columns are the rerank variants (G, G+AQE, G+DFS, G+DBA, ...), values mAP;
* ``table2``: Easy / Medium / Hard x mAP, mP@5, mP@10 (revisited protocol);
* ``table3``: PCA-whitening dimensions (32 ... 2048) and the un-whitened true dimension;
* ``long``: one row per configuration and metric.

Formats: ``latex`` (booktabs, multirow dataset groups, best value of each column per dataset in
bold; needs ``\\usepackage{booktabs,multirow}``), ``markdown`` (best in ``**bold**``), ``csv``
(plain numbers, the header of the paper's CSV files) and ``html`` (renders in Jupyter).

Methods are named as in the paper (``resnet50`` -> ``Baseline``, ``simclr2x+simclr4x`` ->
``SimClr2x+SimClr4x``, ``gem_ap_r101`` -> ``GeM (AP)``); settings that vary for one model within
a table (pooling, whitening, rerank, image size ...) are appended to its name, e.g.
``EfficientNet-Lite0 / GeM / 128-d``. Filter with ``where={"whiten": 512}`` to drop them.

:func:`paper_table` reads the paper's tables (``../shared/paper/*.csv``) back into tidy rows, so
the paper and your own runs go through the same code; :func:`plot` draws the dimension sweep and
the rerank comparison (PNG and PDF).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "DATASET_NAMES",
    "LAYOUTS",
    "MODEL_NAMES",
    "RERANK_ORDER",
    "dataset_label",
    "method_label",
    "notes",
    "paper_table",
    "plot",
    "rerank_label",
    "table",
    "table_frame",
]

LAYOUTS = ("table1", "table2", "table3", "long")
FORMATS = ("latex", "markdown", "csv", "html")

# registry name -> the paper's name (aliases of the same model map to the same name)
MODEL_NAMES: dict[str, str] = {
    "resnet50": "Baseline",
    "baseline": "Baseline",
    "resnet50imagenet": "Baseline",
    "simclr1x": "SimClr1x",
    "simclr2x": "SimClr2x",
    "simclr4x": "SimClr4x",
    "mocov1": "MoCov1",
    "mocov1200ep": "MoCov1",
    "mocov2": "MoCov2",
    "mocov2200ep": "MoCov2",
    "mocov2800ep": "MoCov2 (800ep)",
    "amdim": "AmDim",
    "amdimmedium": "AmDim",
    "amdimlarge": "AmDim (large)",
    "gemapr101": "GeM (AP)",
    "gemapr50": "GeM (AP) R50",
    "gemapr101lm18": "GeM (AP) LM18",
    "cirtorchr101gem": "cirtorch GeM R101",
    "cirtorchgl18r101gemw": "cirtorch GeM R101 (GL18, whitened)",
    "insclrr101gldv2": "InsCLR R101 (GLDv2)",
    "insclrr50instre": "InsCLR R50 (INSTRE)",
    "random": "Random",
    "chance": "Random",
    "efficientnetlite0": "EfficientNet-Lite0",
}
# the registry name written back for each paper name (paper_table)
_PAPER_MODELS = {
    "Baseline": "resnet50",
    "SimClr1x": "simclr1x",
    "SimClr2x": "simclr2x",
    "SimClr4x": "simclr4x",
    "MoCov1": "mocov1",
    "MoCov2": "mocov2",
    "AmDim": "amdim",
    "GeM (AP)": "gem_ap_r101",
}
DATASET_NAMES: dict[str, str] = {
    "oxford5k": "Oxford 5k",
    "paris6k": "Paris 6k",
    "instre": "INSTRE",
    "roxford5k": "rOxford 5k",
    "rparis6k": "rParis 6k",
    "roxford5k+1m": "rOxford 5k+1M",
    "rparis6k+1m": "rParis 6k+1M",
    "ukbench": "UKBench",
    "coil20": "COIL-20",
    "gldv2": "GLDv2",
    "demo": "Demo",
}
_PROTOCOLS = {"oxford5k": "classic", "paris6k": "classic", "instre": "map", "roxford5k": "revisited", "rparis6k": "revisited"}
POOLING_NAMES = {"gem": "GeM", "rmac": "R-MAC", "mac": "MAC", "spoc": "SPoC", "native": "native"}
# Table 1 column order: the paper's eight ranking variants
RERANK_ORDER = ("none", "aqe", "dfs", "dba", "aqe+dfs", "dba+aqe", "dba+dfs", "dba+aqe+dfs")
SPLITS = ("easy", "medium", "hard")
TABLE2_METRICS = ("mAP", "mP@5", "mP@10")
TRUE_DIM = "True dim"
# settings that can tell two rows of one model apart (appended to the method name when they do)
FACETS = ("pooling", "whiten", "rerank", "image_size", "query_resize", "whiten_source", "weights", "topk", "dataset_options")


# ----------------------------------------------------------------------------------- names


def _norm(name: str) -> str:
    return re.sub(r"[-_\s]", "", name.strip().lower())


def method_label(model: str, names: Mapping[str, str] | None = None) -> str:
    """Display name of a model spec: ``simclr2x+simclr4x`` -> ``SimClr2x+SimClr4x``.

    ``names`` adds or overrides entries (keys: registry names or specs); unknown parts stay as written.
    """
    extra = {_norm(k): v for k, v in (names or {}).items()}
    if _norm(model) in extra:
        return extra[_norm(model)]
    parts = [p.strip() for p in str(model).split("+")]
    return "+".join(extra.get(_norm(p), MODEL_NAMES.get(_norm(p), p)) for p in parts)


def dataset_label(name: str) -> str:
    """Display name of a dataset: ``roxford5k`` -> ``rOxford 5k``; ``folder:PATH`` -> the folder's name."""
    if name.startswith("folder:"):
        return Path(name.split(":", 1)[1]).name or name
    return DATASET_NAMES.get(name.lower(), name)


def rerank_label(spec: Any) -> str:
    """Column label of a rerank spec: ``none`` -> ``G``, ``dba+aqe`` -> ``G+DBA+AQE``, ``aqe:k=5`` -> ``G+AQE(k=5)``."""
    spec = "none" if spec is None or (isinstance(spec, float) and math.isnan(spec)) else str(spec).strip()
    if spec.lower() in ("", "none", "g"):
        return "G"
    steps = []
    for step in spec.split("+"):
        name, _, params = step.strip().partition(":")
        if name.lower() == "g":
            continue
        steps.append(name.upper() + (f"({params})" if params else ""))
    return "+".join(["G", *steps])


def _rerank_from_label(label: str) -> str:
    steps = [s for s in label.strip().split("+") if s.upper() != "G"]
    return "+".join(s.lower() for s in steps) or "none"


def _pooling_label(spec: Any) -> str:
    if spec is None or (isinstance(spec, float) and math.isnan(spec)):
        return "?"
    name, _, params = str(spec).partition(":")
    return POOLING_NAMES.get(name.lower(), name) + (f"({params})" if params else "")


def _dim(v: Any) -> int | None:
    """A whitening value from a results column (int, float with NaN, None, 'none') as int or None."""
    if v is None:
        return None
    if isinstance(v, str):
        return None if v.strip().lower() in ("none", "", "true_dim", "nan") else int(v)
    if isinstance(v, (float, np.floating)) and math.isnan(v):
        return None
    return int(v)


def _facet_text(col: str, v: Any) -> str:
    if col == "pooling":
        return _pooling_label(v)
    if col == "whiten":
        return "true dim" if v is None else f"{v}-d"
    if col == "rerank":
        return rerank_label(v)
    if col == "image_size":
        return "default size" if v is None else f"{v}px"
    return f"{col}={v}"


def _key(v: Any) -> str:
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v, sort_keys=True, default=str)
    if v is None or (isinstance(v, (float, np.floating)) and math.isnan(v)):
        return "None"
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))  # 256.0 (a column with missing values) is 256
    if isinstance(v, np.integer):
        return str(int(v))
    return str(v)


# ------------------------------------------------------------------------------ preparation


def _prepare(results: pd.DataFrame, where: Mapping[str, Any] | None) -> pd.DataFrame:
    if not isinstance(results, pd.DataFrame):
        raise TypeError(f"expected a DataFrame of tidy results (load_results), got {type(results).__name__}")
    missing = sorted({"dataset", "model", "split", "metric", "value"} - set(results.columns))
    if missing:
        raise ValueError(f"not tidy results: columns {missing} are missing (have {sorted(results.columns)})")
    df = results.reset_index(drop=True).copy()
    for col, default in (("pooling", None), ("whiten", None), ("rerank", "none")):
        if col not in df.columns:
            df[col] = default
    df["whiten"] = pd.Series([_dim(v) for v in df["whiten"]], index=df.index, dtype=object)
    df["rerank"] = ["none" if r is None or (isinstance(r, float) and math.isnan(r)) else str(r) for r in df["rerank"]]
    for k, v in (where or {}).items():
        if k not in df.columns:
            raise ValueError(f"where: no column {k!r} in the results")
        wanted = v if isinstance(v, (list, tuple, set)) else [v]
        if k == "whiten":
            keys = {_key(_dim(w)) for w in wanted}
        else:
            keys = {_key(w) for w in wanted}
        df = df[df[k].map(_key).isin(keys)]
    if df.empty:
        raise ValueError("no results to show" + (f" (after where={dict(where)})" if where else ""))
    df["value"] = pd.to_numeric(df["value"], errors="coerce")
    return df.reset_index(drop=True)


def _choose_metric(df: pd.DataFrame, metric: str | None, split: str | None) -> pd.DataFrame:
    """Per dataset, keep one (split, metric): ``all`` or else ``medium``; ``mAP`` or else ``mAP@100``."""
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
        sel["_ds"] = dataset_label(str(ds)) + (f" ({' '.join(suffix)})" if suffix else "")
        keep.append(sel)
    return pd.concat(keep, ignore_index=True)


def _methods(df: pd.DataFrame, axis: str | None, names: Mapping[str, str] | None) -> pd.Series:
    """Method labels: display model name plus the settings that vary within one model."""
    facets = []
    for col in FACETS:
        if col == axis or col not in df.columns:
            continue
        keys = df[col].map(_key)
        if (keys.groupby([df["dataset"], df["model"]]).nunique() > 1).any():
            facets.append(col)
    labels = []
    for _, r in df.iterrows():
        parts = [_facet_text(c, r[c]) for c in facets]
        labels.append(" / ".join([method_label(str(r["model"]), names), *parts]))
    return pd.Series(labels, index=df.index)


def _order(values: Sequence[Any]) -> list[Any]:
    return list(dict.fromkeys(values))


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
        names: extra model display names, ``{"my_model": "Mine"}``.

    Returns:
        float DataFrame (NaN where a cell was not run); ``long`` returns a flat frame instead.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose {', '.join(LAYOUTS)}")
    df = _prepare(results, where)
    if layout == "long":
        return pd.DataFrame(
            {
                "dataset": df["dataset"].map(lambda d: dataset_label(str(d))),
                "method": df["model"].map(lambda m: method_label(str(m), names)),
                "pooling": df["pooling"].map(_pooling_label),
                "whiten": df["whiten"].map(lambda v: "none" if v is None else str(v)),
                "rerank": df["rerank"].map(rerank_label),
                "split": df["split"],
                "metric": df["metric"],
                "value": df["value"],
            }
        ).drop_duplicates(subset=["dataset", "method", "pooling", "whiten", "rerank", "split", "metric"], keep="last")

    if layout == "table2":
        df = df[df["split"].isin(SPLITS) & df["metric"].isin(TABLE2_METRICS)].copy()
        if df.empty:
            raise ValueError("table2 needs revisited-protocol results (Easy/Medium/Hard x mAP, mP@5, mP@10: rOxford5k, rParis6k, demo)")
        df["_ds"] = df["dataset"].map(lambda d: dataset_label(str(d)))
        df["_col"] = list(zip(df["split"].str.capitalize(), df["metric"], strict=True))
        cols = [(s.capitalize(), m) for s in SPLITS for m in TABLE2_METRICS if (s.capitalize(), m) in set(df["_col"])]
        axis = None
    else:
        df = _choose_metric(df, metric, split)
        if layout == "table1":
            df["_col"] = df["rerank"].map(rerank_label)
            present = _order(df["_col"])
            canon = [rerank_label(r) for r in RERANK_ORDER]
            cols = [c for c in canon if c in present] + [c for c in present if c not in canon]
            axis = "rerank"
        else:
            df["_col"] = df["whiten"].map(lambda v: TRUE_DIM if v is None else str(v))
            dims = sorted({v for v in df["whiten"] if v is not None})
            cols = [str(d) for d in dims] + ([TRUE_DIM] if (df["whiten"].map(lambda v: v is None)).any() else [])
            axis = "whiten"
    df["_method"] = _methods(df, axis, names)
    rows = _order(zip(df["_ds"], df["_method"], strict=True))
    # methods keep their first-appearance order across datasets
    method_rank = {m: i for i, m in enumerate(_order(df["_method"]))}
    ds_rank = {d: i for i, d in enumerate(_order(df["_ds"]))}
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


# --------------------------------------------------------------------------------- rendering


class HTMLTable(str):
    """An HTML string that Jupyter renders as a table."""

    def _repr_html_(self) -> str:
        return str(self)


def _csv_columns(frame: pd.DataFrame) -> list[str]:
    if isinstance(frame.columns, pd.MultiIndex):
        return [f"{s.lower()}_{m}" for s, m in frame.columns]
    return ["true_dim" if c == TRUE_DIM else str(c) for c in frame.columns]


def _display_columns(frame: pd.DataFrame) -> list[str]:
    if isinstance(frame.columns, pd.MultiIndex):
        return [f"{s} {m}" for s, m in frame.columns]
    return [str(c) for c in frame.columns]


def _best_mask(frame: pd.DataFrame) -> pd.DataFrame:
    """True where a value is the largest of its column within its dataset group (ties all)."""
    best = frame.groupby(level=0, sort=False).transform("max")
    return (frame == best) & frame.notna()


def _fmt(v: float, precision: int) -> str:
    return "" if pd.isna(v) else f"{v:.{precision}f}"


def _latex(frame: pd.DataFrame, precision: int, caption: str | None) -> str:
    f = frame.copy()
    f.index = f.index.set_names([None, None])
    f.columns = f.columns.set_names([None] * f.columns.nlevels)
    mask = _best_mask(frame)
    mask.index, mask.columns = f.index, f.columns
    st = f.style.format(precision=precision, na_rep="--").format_index(escape="latex", axis=0).format_index(escape="latex", axis=1)
    st = st.apply(lambda _: np.where(mask.to_numpy(), "textbf:--rwrap;", ""), axis=None)
    n_cols = 2 + f.shape[1]
    tex = st.to_latex(
        hrules=True,
        clines="skip-last;data",
        multirow_align="t",
        multicol_align="c",
        column_format="ll" + "r" * f.shape[1],
        caption=caption,
        position_float="centering" if caption else None,
    )
    lines = tex.splitlines()
    # the header's last row names the index columns
    mid = lines.index("\\midrule")
    lines[mid - 1] = re.sub(r"^\s*&\s*&", "Dataset & Method &", lines[mid - 1])
    # booktabs rules between dataset groups instead of \cline, none before \bottomrule
    out: list[str] = []
    for i, line in enumerate(lines):
        if line.strip() == f"\\cline{{1-{n_cols}}}":
            if i + 1 < len(lines) and lines[i + 1].strip() == "\\bottomrule":
                continue
            line = "\\midrule"
        out.append(line)
    return "\n".join(out) + "\n"


def _render_wide(frame: pd.DataFrame, fmt: str, precision: int, caption: str | None) -> str:
    if fmt == "latex":
        return _latex(frame, precision, caption)
    if fmt == "html":
        mask = _best_mask(frame)
        st = frame.style.format(precision=precision, na_rep="--")
        st = st.apply(lambda _: np.where(mask.to_numpy(), "font-weight: bold;", ""), axis=None)
        if caption:
            st = st.set_caption(caption)
        return HTMLTable(st.to_html())
    datasets = frame.index.get_level_values(0)
    if fmt == "csv":
        flat = pd.DataFrame(frame.to_numpy(), columns=_csv_columns(frame))
        flat.insert(0, "method", frame.index.get_level_values(1))
        flat.insert(0, "dataset", datasets)
        return flat.to_csv(index=False, float_format=f"%.{precision}f", lineterminator="\n")
    if fmt == "markdown":
        mask = _best_mask(frame).to_numpy()
        cells = [[(f"**{_fmt(v, precision)}**" if b else _fmt(v, precision)) or "--" for v, b in zip(row, brow, strict=True)] for row, brow in zip(frame.to_numpy(), mask, strict=True)]
        first = [i == 0 or datasets[i] != datasets[i - 1] for i in range(len(datasets))]
        flat = pd.DataFrame(cells, columns=_display_columns(frame))
        flat.insert(0, "Method", frame.index.get_level_values(1))
        flat.insert(0, "Dataset", [d if f else "" for d, f in zip(datasets, first, strict=True)])
        return flat.to_markdown(index=False, colalign=["left", "left"] + ["right"] * frame.shape[1])
    raise ValueError(f"unknown table format {fmt!r}; choose {', '.join(FORMATS)}")


def _render_long(frame: pd.DataFrame, fmt: str, precision: int, caption: str | None) -> str:
    if fmt == "markdown":
        return frame.to_markdown(index=False, floatfmt=f".{precision}f")
    if fmt == "csv":
        return frame.to_csv(index=False, float_format=f"%.{precision}f", lineterminator="\n")
    st = frame.style.format(precision=precision, subset=["value"]).hide(axis="index")
    if fmt == "latex":
        st = st.format(escape="latex", subset=[c for c in frame.columns if c != "value"]).format_index(escape="latex", axis=1)
        return st.to_latex(hrules=True, column_format="l" * (frame.shape[1] - 1) + "r", caption=caption, position_float="centering" if caption else None)
    if fmt == "html":
        return HTMLTable((st.set_caption(caption) if caption else st).to_html())
    raise ValueError(f"unknown table format {fmt!r}; choose {', '.join(FORMATS)}")


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
        return _render_long(frame, fmt, precision, caption)
    return _render_wide(frame, fmt, precision, caption)


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


# ----------------------------------------------------------------------------- paper tables


def paper_table(csv_path: str | Path) -> pd.DataFrame:
    """Tidy rows from one of the paper's tables (``../shared/paper/table*.csv``).

    The layout is read from the header: rerank variants (``G``, ``G+AQE`` ... Table 1),
    ``<split>_<metric>`` (Table 2) or dimensions and ``true_dim`` (Table 3). Methods and
    datasets get their registry names (``SimClr2x+SimClr4x`` -> ``simclr2x+simclr4x``), with
    R-MAC pooling (GeM for ``GeM (AP)``), 512-d whitening unless the column says otherwise,
    and ``source`` naming the file.
    """
    path = Path(csv_path)
    raw = pd.read_csv(path, dtype={"dataset": str, "method": str})
    if list(raw.columns[:2]) != ["dataset", "method"]:
        raise ValueError(f"{path}: expected the columns dataset, method, ... (got {list(raw.columns)})")
    value_cols = list(raw.columns[2:])
    by_display = {v: k for k, v in DATASET_NAMES.items()}

    def parse_column(col: str) -> dict[str, Any]:
        if col.upper() == "G" or col.upper().startswith("G+"):
            return {"rerank": _rerank_from_label(col), "whiten": 512, "split": None}
        if col == "true_dim":
            return {"rerank": "none", "whiten": None, "split": None}
        if col.isdigit():
            return {"rerank": "none", "whiten": int(col), "split": None}
        s, _, m = col.partition("_")
        if s in SPLITS and m:
            return {"rerank": "none", "whiten": 512, "split": s, "metric": m}
        raise ValueError(f"{path}: cannot read column {col!r} (expected G+..., 32..2048 / true_dim or easy_mAP ...)")

    columns = {c: parse_column(c) for c in value_cols}
    rows = []
    for rec in raw.to_dict("records"):
        ds = by_display.get(rec["dataset"].strip())
        if ds is None:
            raise ValueError(f"{path}: unknown dataset {rec['dataset']!r} (known: {sorted(by_display)})")
        parts = []
        for p in rec["method"].split("+"):
            if p.strip() not in _PAPER_MODELS:
                raise ValueError(f"{path}: unknown method {p!r} in {rec['method']!r} (known: {sorted(_PAPER_MODELS)})")
            parts.append(_PAPER_MODELS[p.strip()])
        model = "+".join(parts)
        for col, c in columns.items():
            v = rec[col]
            if pd.isna(v):
                continue
            split = c["split"] or ("all" if _PROTOCOLS.get(ds) != "revisited" else "medium")
            rows.append(
                {
                    "model": model,
                    "dataset": ds,
                    "pooling": "gem" if model == "gem_ap_r101" else "rmac",
                    "whiten": c["whiten"],
                    "rerank": c["rerank"],
                    "protocol": _PROTOCOLS.get(ds, "map"),
                    "split": split,
                    "metric": c.get("metric", "mAP"),
                    "value": float(v),
                    "source": f"paper:{path.name}",
                }
            )
    df = pd.DataFrame(rows)
    df["whiten"] = pd.Series([_dim(v) for v in df["whiten"]], index=df.index, dtype=object)
    return df


# -------------------------------------------------------------------------------------- plots

PLOT_KINDS = ("dims", "rerank")


def _plot_dims(df: pd.DataFrame, names: Mapping[str, str] | None):
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    df = _choose_metric(df, None, None)
    df["_method"] = _methods(df, "whiten", names)
    datasets = _order(df["_ds"])
    fig = Figure(figsize=(5.0 * len(datasets), 4.2), constrained_layout=True)
    axes = fig.subplots(1, len(datasets), squeeze=False)[0]
    colours = {m: f"C{i % 10}" for i, m in enumerate(_order(df["_method"]))}
    all_dims: set[int] = set()
    for ax, ds in zip(axes, datasets, strict=True):
        g = df[df["_ds"] == ds]
        for m in _order(g["_method"]):
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


def _plot_rerank(df: pd.DataFrame, names: Mapping[str, str] | None):
    from matplotlib.figure import Figure

    df = _choose_metric(df, None, None)
    df["_method"] = _methods(df, "rerank", names)
    df["_variant"] = df["rerank"].map(rerank_label)
    present = _order(df["_variant"])
    canon = [rerank_label(r) for r in RERANK_ORDER]
    variants = [c for c in canon if c in present] + [c for c in present if c not in canon]
    datasets = _order(df["_ds"])
    methods_all = _order(df["_method"])
    width_in = min(40.0, max(6.0, 0.18 * len(variants) * len(methods_all) + 2))
    fig = Figure(figsize=(width_in, 3.6 * len(datasets)), constrained_layout=True)
    axes = fig.subplots(len(datasets), 1, squeeze=False)[:, 0]
    bar_w = 0.8 / len(variants)
    for ax, ds in zip(axes, datasets, strict=True):
        g = df[df["_ds"] == ds]
        methods = [m for m in methods_all if m in set(g["_method"])]
        vals = {(m, v): y for m, v, y in zip(g["_method"], g["_variant"], g["value"], strict=True)}
        x = np.arange(len(methods))
        for j, v in enumerate(variants):
            ys = [vals.get((m, v), np.nan) for m in methods]
            ax.bar(x - 0.4 + bar_w * (j + 0.5), ys, bar_w, label=v, color=f"C{j % 10}")
        ax.set_xticks(x)
        ax.set_xticklabels(methods, rotation=30, ha="right", fontsize="small")
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
    Revisited datasets show Medium mAP. ``where`` filters rows as in :func:`table`.
    """
    if kind not in PLOT_KINDS:
        raise ValueError(f"unknown plot kind {kind!r}; choose {', '.join(PLOT_KINDS)}")
    df = _prepare(results, where)
    if kind == "dims" and not df["whiten"].map(lambda v: v is not None).any():
        raise ValueError("plot dims needs results with PCA-whitening dimensions (whiten: 32 ... 2048)")
    fig = _plot_dims(df, names) if kind == "dims" else _plot_rerank(df, names)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in formats:
        p = out / f"{kind}.{ext}"
        fig.savefig(p, dpi=dpi)
        paths.append(p)
    return paths
