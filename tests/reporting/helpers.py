"""Shared by the reporting tests: hand-built tidy rows, the paper's CSV tables, a LaTeX checker."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

PAPER = Path(__file__).resolve().parents[2].parent / "shared" / "paper"
PAPER_TABLES = [("table1_rerank.csv", "table1"), ("table2_revisited.csv", "table2"), ("table3_dimensions.csv", "table3")]

# display names as a run writes them into its rows (the registries' labels)
LABELS = {
    "resnet50": "Baseline",
    "simclr2x+simclr4x": "SimClr2x+SimClr4x",
    "oxford5k": "Oxford 5k",
    "roxford5k": "rOxford 5k",
    "rmac": "R-MAC",
    "none": "G",
    "aqe": "G+AQE",
    "dba+aqe": "G+DBA+AQE",
}


def paper_csv(name: str) -> Path:
    p = PAPER / name
    if not p.exists():
        pytest.skip(f"the paper's tables are not available: {p} is absent")
    return p


def synthetic_rows(seed: int = 0, labels: bool = True) -> list[dict]:
    """Tidy rows of two models x two datasets (classic and revisited) x whitening x rerank,
    with the ``*_label`` columns a run writes (``labels``) or without them (older files)."""
    rng = np.random.default_rng(seed)
    rows = []
    for model in ("resnet50", "simclr2x+simclr4x"):
        for dataset, protocol in (("oxford5k", "classic"), ("roxford5k", "revisited")):
            for whiten in (32, 64, None):
                for rerank in ("none", "aqe", "dba+aqe"):
                    splits = ["all"] if protocol == "classic" else ["easy", "medium", "hard"]
                    note = "whitening dim 64 capped to 50: test" if whiten == 64 else ""
                    base = {
                        "model": model,
                        "dataset": dataset,
                        "pooling": "rmac",
                        "whiten": whiten,
                        "rerank": rerank,
                        "protocol": protocol,
                        "dim": 2048 if whiten is None else min(whiten, 50),
                        "whitening": {"requested_dim": whiten, "dim": 50, "capped": bool(note), "note": note},
                    }
                    if labels:
                        base.update({f"{k}_label": LABELS[base[k]] for k in ("model", "dataset", "pooling", "rerank")})
                    rows += [
                        {**base, "split": s, "metric": m, "value": float(rng.uniform(10, 90))}
                        for s in splits
                        for m in ("mAP", "mP@5", "mP@10")
                    ]
    return rows


def frame(**kw) -> pd.DataFrame:
    return pd.DataFrame(synthetic_rows(**kw))


def split_row(row: str) -> list[str]:
    """The cells of a LaTeX table row (an escaped ``\\&`` is text, not a separator)."""
    return re.split(r"(?<!\\)&", row.strip().removesuffix("\\\\"))


def _cells(row: str) -> int:
    """Number of columns a LaTeX table row spans (``\\multicolumn{n}`` counts n)."""
    n = 0
    for cell in split_row(row):
        m = re.search(r"\\multicolumn\{(\d+)\}", cell)
        n += int(m.group(1)) if m else 1
    return n


def check_latex(tex: str, wide: pd.DataFrame) -> None:
    """``tex`` is a well-formed booktabs table of the (Dataset, Method) frame ``wide``, with the
    best value of each column within each dataset in bold."""
    for env in set(re.findall(r"\\begin\{(\w+)\}", tex)):
        assert tex.count(f"\\begin{{{env}}}") == tex.count(f"\\end{{{env}}}")
    assert tex.count("\\toprule") == 1 and tex.count("\\bottomrule") == 1
    assert tex.index("\\toprule") < tex.index("\\midrule") < tex.index("\\bottomrule")
    assert "\\cline" not in tex  # booktabs rules only
    spec = re.search(r"\\begin\{tabular\}\{([lcr]+)\}", tex).group(1)
    assert len(spec) == 2 + wide.shape[1]
    body = tex[tex.index("\\toprule") : tex.index("\\bottomrule")]
    rows = [ln for ln in body.splitlines() if ln.strip().endswith("\\\\")]
    assert all(_cells(r) == len(spec) for r in rows), [r for r in rows if _cells(r) != len(spec)]
    assert rows[len(rows) - len(wide) - 1].startswith("Dataset & Method")
    data = rows[-len(wide) :]
    assert sum("\\multirow" in r for r in data) == wide.index.get_level_values(0).nunique()
    # one \midrule between dataset groups
    assert body.count("\\midrule") == 1 + wide.index.get_level_values(0).nunique() - 1
    # bold exactly on the best value of each column within each dataset group
    bold = np.array([[("\\textbf{" in c) for c in split_row(r)[2:]] for r in data])
    values = wide.to_numpy(float)
    groups = wide.index.get_level_values(0)
    for g in groups.unique():
        sel = np.asarray(groups == g)
        best = np.nanmax(values[sel], axis=0)
        want = np.isclose(values[sel], best) & ~np.isnan(values[sel])
        np.testing.assert_array_equal(bold[sel], want)
