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


def _strict_json(text: str) -> list[dict]:
    def refuse(token: str) -> None:
        raise ValueError(f"not JSON: bare {token}")

    return [json.loads(line, parse_constant=refuse) for line in text.splitlines() if line]


def test_undefined_metrics_are_null_in_the_file_and_nan_when_read(tmp_path):
    import math

    import numpy as np

    from retrbench.evaluation import evaluate
    from retrbench.results import EmptyMetricWarning

    # no query has an easy positive: Easy mAP / mP@k are NaN (before: bare NaN tokens in results.jsonl)
    gnd = [{"easy": [], "hard": [1], "junk": []}, {"easy": [], "hard": [0], "junk": [2]}]
    metrics = evaluate(np.array([[1, 0, 2], [0, 1, 2]]), gnd, "revisited", kappas=(1,))
    cfg = RunConfig(model="m1", dataset="demo")
    with pytest.warns(EmptyMetricWarning) as rec:
        r = tidy_rows(cfg, metrics, protocol="revisited", provenance={"n_queries": 2, "ratio": float("inf"), "arr": np.array([np.nan, 1.0])})
    assert [str(w.message) for w in rec] == [
        f"demo: split 'easy' metric {m!r} has no value (no query of this split has a positive image); it is written as null"
        for m in ("mAP", "mP@1")
    ]
    assert math.isnan(r[0]["value"])  # the rows in memory keep NaN
    append_results(r, tmp_path)
    written = _strict_json((tmp_path / "results.jsonl").read_text())
    assert [w["value"] for w in written[:2]] == [None, None] and written[2]["value"] == 100.0
    assert written[0]["ratio"] is None and written[0]["arr"] == [None, 1.0]
    df = load_results(tmp_path)
    assert df["value"].dtype == float and df["value"].isna().sum() == 2 and df.loc[2, "value"] == 100.0
    table = wide_table(df)
    assert table[("demo", "medium", "mAP")].iloc[0] == 100.0 and np.isnan(table[("demo", "easy", "mAP")].iloc[0])
    assert "|         -- |" in render(table, "markdown")


def test_zero_queries_warn_and_write_null(tmp_path):
    import numpy as np

    from retrbench.evaluation import evaluate
    from retrbench.results import EmptyMetricWarning, json_safe

    metrics = evaluate(np.zeros((0, 3), dtype=np.int64), [], "map", kappas=(1,))
    with pytest.warns(EmptyMetricWarning):
        r = tidy_rows(RunConfig(dataset="demo"), metrics, protocol="map", provenance={})
    append_results(r, tmp_path)
    assert all(row["value"] is None for row in _strict_json((tmp_path / "results.jsonl").read_text()))
    assert json_safe({"a": (float("nan"), np.float32("-inf"), np.int64(3))}) == {"a": [None, None, 3]}
