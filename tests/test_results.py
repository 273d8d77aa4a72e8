import json

import pandas as pd
import pytest

from retrbench.config import RunConfig
from retrbench.results import RunResult, append_results, load_results, render, tidy_rows, wide_table
from retrbench.types import Metric

METRICS = [Metric("easy", "mAP", 80.0), Metric("medium", "mAP", 60.5), Metric("hard", "mAP", 30.25), Metric("medium", "mP@5", 70.0)]


def rows(model="m1", pooling="gem"):
    cfg = RunConfig(model=model, pooling=pooling, dataset="demo")
    return tidy_rows(cfg, METRICS, protocol="revisited", provenance={"weights_sha256": "abc", "n_queries": 3})


def test_tidy_rows_carry_config_and_provenance():
    r = rows()
    assert len(r) == 4
    assert {"model", "pooling", "whiten", "dataset", "split", "metric", "value", "weights_sha256", "retrbench_version", "date"} <= set(r[0])
    assert r[2]["split"] == "hard" and r[2]["value"] == 30.25


def test_append_and_load_roundtrip(tmp_path):
    append_results(rows("m1"), tmp_path)
    append_results(rows("m2"), tmp_path)
    df = load_results(tmp_path)
    assert len(df) == 8 and set(df.model) == {"m1", "m2"}
    (tmp_path / "results.jsonl").write_text("{broken\n")
    with pytest.raises(ValueError, match="results.jsonl:1"):
        load_results(tmp_path)


def test_wide_table_orders_splits_and_renders():
    df = pd.DataFrame(rows("m1") + rows("m2", "rmac"))
    t = wide_table(df)
    assert list(t.columns.get_level_values("split")) == ["easy", "medium", "medium", "hard"]
    assert t.loc[("m2", "rmac", "none", "none"), ("demo", "hard", "mAP")] == 30.25
    md = render(t, "markdown").splitlines()
    assert [c.strip() for c in md[0].strip("|").split("|")] == ["model", "pooling", "whiten", "rerank", "Easy mAP", "Medium mAP", "Medium mP@5", "Hard mAP"]
    assert [c.strip() for c in md[3].strip("|").split("|")][-1] == "30.25"
    tex = render(t, "latex")
    assert tex.count("\\toprule") == 1 and "\\bottomrule" in tex and "\\midrule" in tex
    assert render(t, "csv").splitlines()[0].startswith("model,pooling,whiten,rerank")
    with pytest.raises(ValueError, match="unknown table format"):
        render(t, "docx")


def test_run_result_value_and_reprs():
    res = RunResult(RunConfig(), rows())
    assert res.value("mAP", "medium") == 60.5
    assert "<table" in res._repr_html_()
    with pytest.raises(KeyError):
        res.value("mAP")
    json.dumps(res.rows)


def test_metrics_keep_the_configuration_so_runs_concatenate():
    a = RunResult(RunConfig(model="m1", pooling="gem"), rows("m1", "gem"))
    b = RunResult(RunConfig(model="m2", pooling="rmac"), rows("m2", "rmac"))
    both = pd.concat([a.metrics, b.metrics])
    assert {"model", "pooling", "whiten", "rerank", "dataset", "split", "metric", "value"} <= set(both.columns)
    assert both.groupby("model")["value"].count().to_dict() == {"m1": 4, "m2": 4}
    assert set(both.loc[both.model == "m2", "pooling"]) == {"rmac"}


def test_latex_escapes_names():
    res = RunResult(RunConfig(model="efficientnet_lite0"), rows("efficientnet_lite0"))
    tex = res.to_latex()
    assert "efficientnet\\_lite0" in tex and "efficientnet_lite0" not in tex


def test_per_query_table():
    import numpy as np

    res = RunResult(RunConfig(), rows(), query_ids=("q0", "q1"), query_ap={"easy": np.array([0.5, np.nan]), "hard": np.array([1.0, 0.25])})
    pq = res.per_query
    assert list(pq.columns) == ["query", "image", "split", "AP"] and len(pq) == 4
    hard = pq[pq.split == "hard"].set_index("image")["AP"]
    assert hard.to_dict() == {"q0": 100.0, "q1": 25.0}
    assert pq[(pq.split == "easy") & (pq.image == "q1")]["AP"].isna().all()
