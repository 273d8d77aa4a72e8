"""The paper's CSV tables read back (retrbench/reporting/paper.py) and rendered as printed."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest

from retrbench.reporting import PAPER_DATASETS, PAPER_MODELS, paper_table, table, table_frame

from .helpers import PAPER_TABLES, check_latex, paper_csv


@pytest.mark.parametrize("name, layout", PAPER_TABLES)
def test_paper_tables_round_trip(name, layout):
    """paper CSV -> tidy rows -> table -> parse back: the same table."""
    original = pd.read_csv(paper_csv(name))
    tidy = paper_table(paper_csv(name))
    assert {"model", "dataset", "pooling", "whiten", "rerank", "split", "metric", "value"} <= set(tidy.columns)
    assert len(tidy) == original.shape[0] * (original.shape[1] - 2)
    back = pd.read_csv(io.StringIO(table(tidy, layout, "csv")))
    assert list(back.columns) == list(original.columns)
    assert back[["dataset", "method"]].equals(original[["dataset", "method"]])
    np.testing.assert_allclose(back.iloc[:, 2:].to_numpy(float), original.iloc[:, 2:].to_numpy(float), atol=0.005 + 1e-9)
    md = table(tidy, layout, "markdown")
    for v in original.iloc[:, 2:].to_numpy(float).ravel():
        assert f"{v:.2f}" in md


def test_table2_csv_is_the_papers_file_line_for_line():
    path = paper_csv("table2_revisited.csv")
    assert table(paper_table(path), "table2", "csv").strip().splitlines() == path.read_text().strip().splitlines()


def test_paper_table_names_and_settings():
    t1 = paper_table(paper_csv("table1_rerank.csv"))
    row = t1[(t1.model == "simclr2x+simclr4x") & (t1.dataset == "oxford5k") & (t1.rerank == "dba+aqe+dfs")]
    assert row.value.item() == 81.99 and row.pooling.item() == "rmac" and row.whiten.item() == 512
    assert row.model_label.item() == "SimClr2x+SimClr4x" and row.rerank_label.item() == "G+DBA+AQE+DFS"
    assert set(t1[t1.model == "gem_ap_r101"].pooling) == {"gem"}
    assert set(t1[t1.rerank == "none"].rerank_label) == {"G"}
    t3 = paper_table(paper_csv("table3_dimensions.csv"))
    true_dim = t3[(t3.model == "resnet50") & (t3.dataset == "oxford5k") & t3.whiten.isna()]
    assert true_dim.value.item() == 58.47
    t2 = paper_table(paper_csv("table2_revisited.csv"))
    assert set(t2.split) == {"easy", "medium", "hard"} and set(t2.metric) == {"mAP", "mP@5", "mP@10"}
    assert set(t2.protocol) == {"revisited"}


def test_unknown_names_are_errors(tmp_path):
    bad = tmp_path / "t.csv"
    bad.write_text("dataset,method,G\nOxford 5k,Nobody,1.0\n")
    with pytest.raises(ValueError, match="unknown method 'Nobody'"):
        paper_table(bad)
    bad.write_text("dataset,method,G\nAtlantis,Baseline,1.0\n")
    with pytest.raises(ValueError, match="unknown dataset 'Atlantis'"):
        paper_table(bad)
    bad.write_text("dataset,method,colour\nOxford 5k,Baseline,1.0\n")
    with pytest.raises(ValueError, match="cannot read column 'colour'"):
        paper_table(bad)


def test_datasets_outside_the_paper_are_found_by_their_registry_label(tmp_path):
    from retrbench.datasets import DATASETS

    entry = DATASETS.get("ukbench")
    f = tmp_path / "t.csv"
    f.write_text(f"dataset,method,G\n{entry.label},Baseline,3.5\n")
    rows = paper_table(f)
    assert rows.dataset.item() == "ukbench" and rows.protocol.item() == entry.info.protocol


def test_registry_labels_are_the_papers_names():
    """Own runs of the paper's models and datasets are named as the paper prints them, so they
    share rows with :func:`paper_table`'s."""
    from retrbench.backbones import BACKBONES
    from retrbench.datasets import DATASETS

    assert {printed: BACKBONES.label(name) for printed, name in PAPER_MODELS.items()} == {p: p for p in PAPER_MODELS}
    assert {printed: DATASETS.label(name) for printed, (name, _) in PAPER_DATASETS.items()} == {p: p for p in PAPER_DATASETS}
    for printed, (name, protocol) in PAPER_DATASETS.items():
        assert DATASETS.get(name).info.protocol == protocol, printed


@pytest.mark.parametrize("name, layout", PAPER_TABLES)
def test_latex_of_the_paper_tables(name, layout):
    tidy = paper_table(paper_csv(name))
    check_latex(table(tidy, layout, "latex"), table_frame(tidy, layout))
