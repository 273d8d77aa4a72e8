"""Display names of models, datasets, poolings and rerank pipelines in tables and plots.

Display names live on the registry entries (``entry.info.label``), and every result row
written by a run carries them in ``model_label``, ``dataset_label``, ``pooling_label`` and
``rerank_label``. A row's own label wins; a row without one (older results files) is named
by the registry, looked up here on first use, so rendering labelled rows never imports a
stage (nor torch). Names a registry does not know are shown as written; an ensemble
``a+b`` is named part by part (``SimClr2x+SimClr4x``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import pandas as pd

__all__ = [
    "LABEL_COLUMNS",
    "dataset_label",
    "label_column",
    "model_label",
    "pooling_label",
    "rerank_label",
    "rerank_sorted",
]

# result column -> the column holding its display name
LABEL_COLUMNS: dict[str, str] = {
    "model": "model_label",
    "dataset": "dataset_label",
    "pooling": "pooling_label",
    "rerank": "rerank_label",
}


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip())


def _norm(name: str) -> str:
    """Key of a user override: case, ``-``, ``_`` and spaces ignored (``moco_v2`` = ``MoCo-v2``)."""
    return re.sub(r"[-_\s]", "", str(name).strip().lower())


def model_label(model: str, names: Mapping[str, str] | None = None) -> str:
    """Display name of a model spec: ``simclr2x+simclr4x`` -> ``SimClr2x+SimClr4x``.

    ``names`` overrides the registry's labels (keys: a whole spec or one of its parts, matched
    ignoring case, ``-``, ``_`` and spaces); parts nobody knows stay as written.
    """
    extra = {_norm(k): v for k, v in (names or {}).items()}
    if _norm(model) in extra:
        return extra[_norm(model)]
    parts = [p.strip() for p in str(model).split("+")]
    return "+".join(extra.get(_norm(p)) or _backbone_label(p) for p in parts)


def _backbone_label(name: str) -> str:
    from ..backbones import BACKBONES

    return BACKBONES.label(name)


def dataset_label(name: str) -> str:
    """Display name of a dataset: ``roxford5k`` -> ``rOxford 5k``, ``folder:PATH`` -> the folder's
    name, else the name itself (:func:`retrbench.datasets.dataset_label`)."""
    from ..datasets import dataset_label as label

    return label(str(name))


def pooling_label(spec: Any) -> str:
    """Display name of a pooling spec: ``gem:p=4`` -> ``GeM(p=4)``; ``?`` when missing."""
    if _missing(spec):
        return "?"
    from ..pooling import pooling_label as label

    try:
        return label(str(spec))
    except ValueError:
        return str(spec)


def rerank_label(spec: Any) -> str:
    """Column label of a rerank pipeline: ``none`` -> ``G``, ``dba+aqe`` -> ``G+DBA+AQE``
    (:func:`retrbench.rerank.pipeline_label`); a spec that does not parse is shown as written."""
    from ..rerank import pipeline_label

    spec = "none" if _missing(spec) else str(spec)
    try:
        return pipeline_label(spec)
    except (KeyError, ValueError):
        return spec


def rerank_sorted(specs: Sequence[Any], labels: Sequence[str]) -> list[str]:
    """The distinct ``labels`` in Table 1's column order: by :func:`retrbench.rerank.pipeline_order`
    of their specs (G, G+AQE, G+DFS, G+DBA, G+AQE+DFS, ...), then labels whose spec does not
    parse, in order of appearance."""
    from ..rerank import pipeline_order

    keys: dict[str, Any] = {}
    for spec, label in zip(specs, labels, strict=True):
        if label in keys:
            continue
        try:
            keys[label] = pipeline_order("none" if _missing(spec) else str(spec))
        except (KeyError, ValueError):
            keys[label] = None
    known = sorted((lab for lab, k in keys.items() if k is not None), key=lambda lab: keys[lab])  # stable
    return known + [lab for lab, k in keys.items() if k is None]


_FALLBACK: dict[str, Callable[[Any], str]] = {
    "dataset": dataset_label,
    "pooling": pooling_label,
    "rerank": rerank_label,
}


def label_column(df: pd.DataFrame, kind: str, names: Mapping[str, str] | None = None) -> pd.Series:
    """Display names of column ``kind`` (``model``, ``dataset``, ``pooling``, ``rerank``), one per row.

    A row's ``<kind>_label`` wins when present and non-empty; otherwise the registry names the
    value (each distinct value looked up once). For ``model``, ``names`` (see :func:`model_label`)
    overrides both.
    """
    if kind not in LABEL_COLUMNS:
        raise ValueError(f"no display names for column {kind!r}; choose {', '.join(LABEL_COLUMNS)}")
    given = df[LABEL_COLUMNS[kind]] if LABEL_COLUMNS[kind] in df.columns else pd.Series(None, index=df.index, dtype=object)
    extra = {_norm(k) for k in (names or {})}
    cache: dict[Hashable, str] = {}
    out = []
    for value, label in zip(df[kind], given, strict=True):
        key = value if isinstance(value, Hashable) else repr(value)
        overridden = kind == "model" and bool(extra) and (_norm(value) in extra or any(_norm(p) in extra for p in str(value).split("+")))
        if not _missing(label) and not overridden:
            out.append(str(label))
            continue
        if key not in cache:
            cache[key] = model_label(str(value), names) if kind == "model" else _FALLBACK[kind](value)
        out.append(cache[key])
    return pd.Series(out, index=df.index)
