"""Layouts of own results (retrbench/reporting/tables.py): pivots, facets, order, rendering."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest

from retrbench.reporting import notes, table, table_frame

from .helpers import PAPER_TABLES, check_latex, frame, paper_csv


def test_table1_of_own_results():
    df = frame()
    t1 = table_frame(df, "table1")
    assert list(t1.columns) == ["G", "G+AQE", "G+DBA+AQE"]
    assert list(dict.fromkeys(t1.index.get_level_values(0))) == ["Oxford 5k", "rOxford 5k (Medium)"]
    # the whitening varies within a model, so it is part of the method's name ...
    methods = list(t1.index.get_level_values(1))
    assert "Baseline / 32-d" in methods and "SimClr2x+SimClr4x / true dim" in methods
    # ... unless filtered
    t1w = table_frame(df, "table1", where={"whiten": 32})
    assert list(t1w.index.get_level_values(1)) == ["Baseline", "SimClr2x+SimClr4x"] * 2
    want = df[(df.model == "resnet50") & (df.dataset == "roxford5k") & (df.whiten == 32) & (df.rerank == "aqe") & (df.split == "medium") & (df.metric == "mAP")]
    assert t1w.loc[("rOxford 5k (Medium)", "Baseline"), "G+AQE"] == want.value.item()


def test_table2_table3_long():
    df = frame()
    t2 = table_frame(df, "table2", where={"rerank": "none", "whiten": "none"})
    assert t2.shape == (2, 9) and list(dict.fromkeys(t2.columns.get_level_values(0))) == ["Easy", "Medium", "Hard"]
    want = df[(df.model == "resnet50") & df.whiten.isna() & (df.rerank == "none") & (df.split == "hard") & (df.metric == "mP@5")]
    assert t2.loc[("rOxford 5k", "Baseline"), ("Hard", "mP@5")] == want.value.item()
    t3 = table_frame(df, "table3", where={"rerank": "none"})
    assert list(t3.columns) == ["32", "64", "True dim"] and t3.shape == (4, 3)
    long = table_frame(df, "long")
    assert len(long) == len(df)
    assert set(long["method"]) == {"Baseline", "SimClr2x+SimClr4x"} and set(long["rerank"]) == {"G", "G+AQE", "G+DBA+AQE"}


def test_table1_columns_follow_the_rerank_registry_order():
    """Rerank variants given in any order come out in the paper's Table 1 order (the registry's
    ``pipeline_order``), labelled by the registry when the rows carry no label."""
    paper_order = list(pd.read_csv(paper_csv("table1_rerank.csv")).columns[2:])
    specs = ["dba+aqe+dfs", "dba", "none", "aqe+dfs", "dfs", "dba+dfs", "aqe", "dba+aqe"]
    rows = [
        {"model": "m", "model_label": "M", "dataset": "d", "dataset_label": "D", "rerank": r, "split": "all", "metric": "mAP", "value": float(i)}
        for i, r in enumerate(specs)
    ]
    t1 = table_frame(pd.DataFrame(rows), "table1")
    assert list(t1.columns) == paper_order
    assert [t1.loc[("D", "M"), c] for c in t1.columns] == [float(specs.index(r)) for r in ("none", "aqe", "dfs", "dba", "aqe+dfs", "dba+aqe", "dba+dfs", "dba+aqe+dfs")]


def test_row_labels_and_name_overrides():
    df = frame()
    df["model_label"] = df["model_label"].where(df.model != "resnet50", "Ours")
    assert set(table_frame(df, "table1", where={"whiten": 32}).index.get_level_values(1)) == {"Ours", "SimClr2x+SimClr4x"}
    t = table_frame(df, "table1", where={"whiten": 32}, names={"resnet-50": "R50", "SimClr2x": "S2", "simclr_4x": "S4"})
    # a user's names win over the rows' labels (matched ignoring case, '-', '_'), part by part for an ensemble
    assert list(t.index.get_level_values(1)) == ["R50", "S2+S4"] * 2
    t = table_frame(df, "table1", where={"whiten": 32}, names={"simclr2x+simclr4x": "Ensemble"})
    assert list(t.index.get_level_values(1)) == ["Ours", "Ensemble"] * 2


def test_notes():
    df = frame()
    assert notes(df) == [f"{m} on {d} (rmac): whitening dim 64 capped to 50: test" for m in ("resnet50", "simclr2x+simclr4x") for d in ("oxford5k", "roxford5k")]
    assert notes(df.drop(columns="whitening")) == []


def test_formats_and_errors():
    df = frame()
    for fmt in ("markdown", "csv", "html", "latex"):
        text = table(df, "long", fmt)
        assert "SimClr2x+SimClr4x" in text and "G+DBA+AQE" in text
    html = table(df, "table3", "html", where={"rerank": "none"})
    assert "<table" in html and "font-weight: bold" in html and html._repr_html_() == html
    csv = pd.read_csv(io.StringIO(table(df, "table3", "csv", where={"rerank": "none"})))
    assert list(csv.columns) == ["dataset", "method", "32", "64", "true_dim"]
    with pytest.raises(ValueError, match="layout"):
        table(df, "table9")
    with pytest.raises(ValueError, match="format"):
        table(df, "table1", "docx")
    with pytest.raises(ValueError, match="revisited"):
        table(df[df.dataset == "oxford5k"], "table2")
    with pytest.raises(ValueError, match="no column 'colour'"):
        table(df, where={"colour": "red"})
    with pytest.raises(ValueError, match="missing"):
        table(df.drop(columns="value"))


def test_missing_cells_show_as_dashes():
    df = frame()
    df = df[~((df.model == "resnet50") & (df.rerank == "aqe"))]
    md = table(df, "table1", "markdown", where={"whiten": 64})
    row = next(ln for ln in md.splitlines() if "| Baseline" in ln)
    assert [c.strip() for c in row.strip("|").split("|")][2:] .count("--") == 1
    tex = table(df, "table1", "latex", where={"whiten": 64})
    assert " -- " in tex


@pytest.mark.parametrize("layout, where", [("table1", None), ("table2", {"whiten": 32}), ("table3", {"rerank": "aqe"})])
def test_latex_of_own_results(layout, where):
    df = frame()
    df.loc[df.model == "resnet50", "model_label"] = "my_model & co"  # needs escaping
    tex = table(df, layout, "latex", where=where)
    check_latex(tex, table_frame(df, layout, where=where))
    assert "my\\_model \\& co" in tex
    wrapped = table(df, layout, "latex", where=where, caption="Results")
    assert "\\begin{table}" in wrapped and "\\caption{Results}" in wrapped
    check_latex(wrapped, table_frame(df, layout, where=where))


@pytest.mark.parametrize("name, layout", PAPER_TABLES)
def test_markdown_bold_marks_the_best_of_each_dataset(name, layout):
    from retrbench.reporting import paper_table

    tidy = paper_table(paper_csv(name))
    wide = table_frame(tidy, layout)
    lines = table(tidy, layout, "markdown").splitlines()[2:]
    bold = np.array([["**" in c for c in ln.strip("|").split("|")[2:]] for ln in lines])
    best = wide.groupby(level=0, sort=False).transform("max")
    np.testing.assert_array_equal(bold, (wide == best).to_numpy())
