"""Tidy results: one row per (dataset, split, metric) with the full configuration.

Rows are appended to ``<results_dir>/results.jsonl`` (JSON lines: robust to new config
fields, read back with :func:`load_results` as a pandas DataFrame). The file is strict JSON:
a value that is not a finite number (the mAP of a split where no query has a positive is
NaN) is written as ``null``, with an :class:`EmptyMetricWarning` when the rows are made, and
:func:`load_results` reads a ``null`` value back as NaN.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ._version import __version__
from .config import RunConfig
from .types import Metric
from .utils.render import render as render_frame

__all__ = [
    "EmptyMetricWarning",
    "RunResult",
    "append_results",
    "json_safe",
    "load_results",
    "render",
    "tidy_rows",
    "warn_undefined_metrics",
    "wide_table",
]

log = logging.getLogger(__name__)

RESULTS_FILE = "results.jsonl"
TABLE_INDEX = ("model", "pooling", "whiten", "rerank")
_SPLIT_ORDER = {"easy": 0, "medium": 1, "hard": 2, "all": 3}


class EmptyMetricWarning(UserWarning):
    """A metric has no value (NaN): no query of its split has a positive, or there is no query."""


def warn_undefined_metrics(metrics: Sequence[Metric], dataset: str = "") -> list[Metric]:
    """Warn (:class:`EmptyMetricWarning`) for each metric whose value is not a finite number.

    Returns those metrics. Their value is NaN when no query of the split has a positive (or
    the dataset has no query), and is written as ``null`` to JSON.
    """
    bad = [m for m in metrics if not math.isfinite(float(m.value))]
    where = f"{dataset}: " if dataset else ""
    for m in bad:
        why = "no query of this split has a positive image" if math.isnan(float(m.value)) else f"the value is {m.value}"
        warnings.warn(
            f"{where}split {m.split!r} metric {m.name!r} has no value ({why}); it is written as null",
            EmptyMetricWarning,
            stacklevel=2,
        )
    return bad


def json_safe(obj: Any) -> Any:
    """``obj`` with every float that is not finite (NaN, +-inf) replaced by None, recursively.

    Dicts, lists and tuples are rebuilt; numpy scalars and arrays become Python values, so
    ``json.dumps(json_safe(obj), allow_nan=False)`` always succeeds for plain data.
    """
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "tolist") and callable(obj.tolist) and type(obj).__module__ == "numpy":
        return json_safe(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def tidy_rows(
    config: RunConfig,
    metrics: Sequence[Metric],
    *,
    protocol: str,
    provenance: dict[str, Any],
) -> list[dict[str, Any]]:
    """One dict per metric: config fields, ``split``, ``metric``, ``value`` and provenance.

    A value that is NaN (no query of its split has a positive) stays NaN in the rows and is
    announced with an :class:`EmptyMetricWarning`; :func:`append_results` writes it as null.
    """
    warn_undefined_metrics(metrics, config.dataset)
    base = {**config.to_dict(), "protocol": protocol}
    base.setdefault("retrbench_version", __version__)
    base["date"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    base.update(provenance)
    return [{**base, "split": m.split, "metric": m.name, "value": float(m.value)} for m in metrics]


def check_results_dir(results_dir: str | Path) -> Path:
    """Fail early (before any extraction) when rows could not be appended under ``results_dir``.

    Creates the folder; raises ``NotADirectoryError`` / ``PermissionError`` naming it when it is
    a file or not writable, so a long run never loses its numbers at the last step.
    """
    d = Path(results_dir)
    if d.exists() and not d.is_dir():
        raise NotADirectoryError(f"results directory {d} is a file; pass another --results-dir (or 'none')")
    d.mkdir(parents=True, exist_ok=True)
    target = d / RESULTS_FILE
    if not os.access(d, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise PermissionError(f"cannot write results to {target}: not writable; pass another --results-dir (or 'none')")
    return d


def _json_line(row: dict[str, Any]) -> str:
    """One strict-JSON line: non-finite numbers as null, other non-JSON values as ``str``."""
    return json.dumps(json_safe(row), sort_keys=True, default=str, allow_nan=False) + "\n"


def append_results(rows: Iterable[dict[str, Any]], results_dir: str | Path) -> Path:
    """Append ``rows`` to ``<results_dir>/results.jsonl`` (one write, flushed and fsynced).

    Values that are not finite numbers (NaN, +-inf) are written as ``null``: the file is
    strict JSON, which Python's ``json`` would not guarantee (it writes bare ``NaN``).
    """
    path = Path(results_dir) / RESULTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = "".join(_json_line(r) for r in rows)
    # A write cut short (process killed) leaves a line without its newline: start a new line
    # so that the rows appended now stay readable.
    if path.exists() and path.stat().st_size:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                blob = "\n" + blob
    with open(path, "a", encoding="utf-8") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())
    return path


def load_results(path: str | Path, *, skip_invalid: bool = False) -> pd.DataFrame:
    """Read a results file (or a results directory) into a DataFrame, one row per metric.

    A line that is not a JSON object raises ``ValueError`` naming the file and line, unless
    ``skip_invalid`` (then it is skipped with a warning: e.g. a row cut short by a kill).
    A ``null`` value (a metric without a value) is NaN in the ``value`` column.
    """
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.exists():
        raise FileNotFoundError(f"no results file at {path}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise json.JSONDecodeError("not a JSON object", line, 0)
            except json.JSONDecodeError as e:
                if not skip_invalid:
                    raise ValueError(f"{path}:{n}: not a JSON results row ({e})") from e
                log.warning("%s:%d: skipped, not a JSON results row (%s)", path, n, e)
                continue
            rows.append(row)
    df = pd.DataFrame(rows)
    if "value" in df.columns:
        try:
            df["value"] = pd.to_numeric(df["value"])  # null -> NaN
        except (TypeError, ValueError):
            log.warning("%s: the value column holds non-numbers; left as read", path)
    return df


def _label(value: Any) -> str:
    return "none" if value is None else str(value)


def wide_table(rows: pd.DataFrame, index: Sequence[str] = TABLE_INDEX) -> pd.DataFrame:
    """Pivot tidy rows into methods x (dataset, split, metric) columns."""
    df = rows.copy()
    index = [c for c in index if c in df.columns]
    for c in index:
        df[c] = df[c].map(_label)
    df["_split_order"] = df["split"].map(lambda s: _SPLIT_ORDER.get(s, 9))
    col_order = (
        df[["dataset", "_split_order", "split", "metric"]]
        .drop_duplicates(subset=["dataset", "split", "metric"])
        .sort_values(["dataset", "_split_order"], kind="stable")
    )
    table = df.pivot_table(index=index, columns=["dataset", "split", "metric"], values="value", aggfunc="last", sort=False)
    cols = [tuple(r) for r in col_order[["dataset", "split", "metric"]].itertuples(index=False)]
    table = table.reindex(columns=pd.MultiIndex.from_tuples(cols, names=["dataset", "split", "metric"]))
    table.columns = table.columns.set_names(["dataset", "split", "metric"])
    return table


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """A :func:`wide_table` with one header row: ``"Medium mAP"`` (the dataset named only when
    there are several, the ``all`` split left out); the methods stay the index."""
    flat = table.copy()
    datasets = table.columns.get_level_values("dataset").unique()
    flat.columns = [
        " ".join(p for p in ((d if len(datasets) > 1 else ""), ("" if s == "all" else s.capitalize()), m) if p)
        for d, s, m in table.columns
    ]
    return flat


def render(table: pd.DataFrame, fmt: str = "markdown", precision: int = 2) -> str:
    """Render a :func:`wide_table` as ``markdown``, ``latex`` (booktabs, escaped), ``html`` or ``csv``
    through the one renderer, :func:`retrbench.utils.render.render`."""
    return render_frame(display_table(table), fmt, precision=precision)


@dataclass
class RunResult:
    """What :func:`retrbench.run` returns.

    Attributes:
        config: the resolved configuration.
        rows: tidy result rows (one per metric) with provenance.
        info: timings (seconds), sizes, whitening note, dataset notes.
        result: the final ranking (``SearchResult``, ``(Q, K)``).
    """

    config: RunConfig
    rows: list[dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)
    result: Any = None
    query_ids: tuple[str, ...] = ()
    database_ids: tuple[str, ...] = ()
    query_ap: dict[str, Any] = field(default_factory=dict)

    @property
    def metrics(self) -> pd.DataFrame:
        """Tidy DataFrame, one row per metric: the configuration columns (model, dataset,
        pooling, whiten, rerank, ... and ``config_id``), ``protocol``, ``split``, ``metric`` and
        ``value``, so ``pd.concat`` of several runs keeps which is which."""
        df = pd.DataFrame(self.rows)
        first = [*RunConfig.__dataclass_fields__, "config_id", "protocol", "split", "metric", "value"]
        cols = [c for c in first if c in df.columns]
        return df[cols]

    @property
    def per_query(self) -> pd.DataFrame:
        """Average precision of every query (percent), one row per query and split:
        ``query`` (index in the ground truth), ``image`` (its id), ``split``, ``AP``;
        ``NaN`` where a query has no positive in that split."""
        rows = []
        for split, aps in self.query_ap.items():
            for i, ap in enumerate(aps):
                image = self.query_ids[i] if i < len(self.query_ids) else None
                rows.append({"query": i, "image": image, "split": split, "AP": 100.0 * float(ap)})
        return pd.DataFrame(rows, columns=["query", "image", "split", "AP"])

    def table(self) -> pd.DataFrame:
        return wide_table(pd.DataFrame(self.rows))

    def value(self, metric: str = "mAP", split: str | None = None) -> float:
        """One number, e.g. ``value("mAP", "medium")``."""
        m = self.metrics
        sel = m[(m.metric == metric) & ((m.split == split) if split else True)]
        if len(sel) != 1:
            raise KeyError(f"{len(sel)} rows match metric={metric!r} split={split!r}; have {sorted(set(zip(m.split, m.metric, strict=True)))}")
        return float(sel.value.iloc[0])

    def to_markdown(self, precision: int = 2) -> str:
        return render(self.table(), "markdown", precision)

    def to_latex(self, precision: int = 2) -> str:
        return render(self.table(), "latex", precision)

    def _repr_html_(self) -> str:
        return render(self.table(), "html")

    def _repr_markdown_(self) -> str:
        return self.to_markdown()

    def __repr__(self) -> str:
        return f"RunResult({self.config.model} on {self.config.dataset})\n{self.to_markdown()}"
