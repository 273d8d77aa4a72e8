"""The paper's own tables (``../shared/paper/table*.csv``) read back into tidy rows.

Krishna et al. (ICMR 2021) print methods and datasets under their own names; the mappings
below to retrbench's registry names are data of the paper, not display names (those live on
the registry entries). The rows :func:`paper_table` returns carry the printed names in the
``*_label`` columns, so the paper and your own runs go through the same :func:`.table`
code and the paper's tables come back cell for cell.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from ..specs import parse_pipeline
from .tables import SPLITS, whiten_dim

__all__ = ["PAPER_DATASETS", "PAPER_MODELS", "paper_table"]

# the paper's printed method name -> registry name of the model
PAPER_MODELS: dict[str, str] = {
    "Baseline": "resnet50",
    "SimClr1x": "simclr1x",
    "SimClr2x": "simclr2x",
    "SimClr4x": "simclr4x",
    "MoCov1": "mocov1",
    "MoCov2": "mocov2",
    "AmDim": "amdim",
    "GeM (AP)": "gem_ap_r101",
}
# the paper's printed dataset name -> (registry name, evaluation protocol)
PAPER_DATASETS: dict[str, tuple[str, str]] = {
    "Oxford 5k": ("oxford5k", "classic"),
    "Paris 6k": ("paris6k", "classic"),
    "INSTRE": ("instre", "map"),
    "rOxford 5k": ("roxford5k", "revisited"),
    "rParis 6k": ("rparis6k", "revisited"),
}
# the paper's setting: R-MAC pooling, except GeM (AP), evaluated with its own GeM head
_POOLING = {"gem_ap_r101": ("gem", "GeM")}
_DEFAULT_POOLING = ("rmac", "R-MAC")
_PAPER_WHITEN = 512  # Tables 1 and 2: 512-d PCA whitening


def _dataset(printed: str, path: Path) -> tuple[str, str, str]:
    """``(registry name, protocol, label)`` of a printed dataset name; names outside the paper
    are looked up among the dataset registry's labels."""
    name = printed.strip()
    if name in PAPER_DATASETS:
        return (*PAPER_DATASETS[name], name)
    from ..datasets import DATASETS

    for entry in DATASETS:
        if entry.label == name:
            return entry.name, getattr(entry.info, "protocol", "map"), name
    known = sorted({*PAPER_DATASETS, *(e.label for e in DATASETS)})
    raise ValueError(f"{path}: unknown dataset {printed!r} (known: {known})")


def _column(col: str, path: Path) -> dict[str, Any]:
    """The setting a column header of the paper's CSV stands for."""
    if col.upper() == "G" or col.upper().startswith("G+"):
        return {"rerank": str(parse_pipeline(col.lower(), "rerank column")), "rerank_label": col, "whiten": _PAPER_WHITEN, "split": None}
    if col == "true_dim":
        return {"rerank": "none", "whiten": None, "split": None}
    if col.isdigit():
        return {"rerank": "none", "whiten": int(col), "split": None}
    s, _, m = col.partition("_")
    if s in SPLITS and m:
        return {"rerank": "none", "whiten": _PAPER_WHITEN, "split": s, "metric": m}
    raise ValueError(f"{path}: cannot read column {col!r} (expected G+..., 32..2048 / true_dim or easy_mAP ...)")


def paper_table(csv_path: str | Path) -> pd.DataFrame:
    """Tidy rows from one of the paper's tables (``../shared/paper/table*.csv``).

    The layout is read from the header: rerank variants (``G``, ``G+AQE`` ... Table 1),
    ``<split>_<metric>`` (Table 2) or dimensions and ``true_dim`` (Table 3). Methods and
    datasets get their registry names (``SimClr2x+SimClr4x`` -> ``simclr2x+simclr4x``) and
    keep the printed ones in ``model_label`` / ``dataset_label``, with R-MAC pooling (GeM for
    ``GeM (AP)``), 512-d whitening unless the column says otherwise, and ``source`` naming the
    file.
    """
    path = Path(csv_path)
    raw = pd.read_csv(path, dtype={"dataset": str, "method": str})
    if list(raw.columns[:2]) != ["dataset", "method"]:
        raise ValueError(f"{path}: expected the columns dataset, method, ... (got {list(raw.columns)})")
    columns = {c: _column(c, path) for c in raw.columns[2:]}
    datasets: dict[str, tuple[str, str, str]] = {}
    rows = []
    for rec in raw.to_dict("records"):
        printed = rec["dataset"].strip()
        if printed not in datasets:
            datasets[printed] = _dataset(printed, path)
        ds, protocol, ds_label = datasets[printed]
        parts = []
        for p in rec["method"].split("+"):
            if p.strip() not in PAPER_MODELS:
                raise ValueError(f"{path}: unknown method {p!r} in {rec['method']!r} (known: {sorted(PAPER_MODELS)})")
            parts.append(PAPER_MODELS[p.strip()])
        model = "+".join(parts)
        pooling, pooling_label = _POOLING.get(model, _DEFAULT_POOLING)
        for col, c in columns.items():
            v = rec[col]
            if pd.isna(v):
                continue
            rows.append(
                {
                    "model": model,
                    "dataset": ds,
                    "pooling": pooling,
                    "whiten": c["whiten"],
                    "rerank": c["rerank"],
                    "protocol": protocol,
                    "split": c["split"] or ("all" if protocol != "revisited" else "medium"),
                    "metric": c.get("metric", "mAP"),
                    "value": float(v),
                    "source": f"paper:{path.name}",
                    "model_label": rec["method"].strip(),
                    "dataset_label": ds_label,
                    "pooling_label": pooling_label,
                    "rerank_label": c.get("rerank_label", "G"),
                }
            )
    df = pd.DataFrame(rows)
    df["whiten"] = pd.Series([whiten_dim(v) for v in df["whiten"]], index=df.index, dtype=object)
    return df
