"""The paper's table layouts, LaTeX structure, plots and the report CLI."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from retrbench.config import RunConfig, stable_hash
from retrbench.reporting import method_label, notes, paper_table, plot, rerank_label, table, table_frame
from retrbench.results import append_results, tidy_rows
from retrbench.types import Metric

PAPER = Path(__file__).resolve().parents[1].parent / "shared" / "paper"
PAPER_TABLES = [("table1_rerank.csv", "table1"), ("table2_revisited.csv", "table2"), ("table3_dimensions.csv", "table3")]


def paper_csv(name: str) -> Path:
    p = PAPER / name
    if not p.exists():
        pytest.skip(f"the paper's tables are not available: {p} is absent")
    return p


def synthetic_rows(seed: int = 0) -> list[dict]:
    """Tidy rows of two models x two datasets (classic and revisited) x whitening x rerank."""
    rng = np.random.default_rng(seed)
    rows = []
    for model in ("resnet50", "simclr2x+simclr4x"):
        for dataset, protocol in (("oxford5k", "classic"), ("roxford5k", "revisited")):
            for whiten in (32, 64, None):
                for rerank in ("none", "aqe", "dba+aqe"):
                    cfg = RunConfig(model=model, dataset=dataset, pooling="rmac", whiten=whiten, rerank=rerank)
                    splits = ["all"] if protocol == "classic" else ["easy", "medium", "hard"]
                    metrics = [Metric(s, m, float(rng.uniform(10, 90))) for s in splits for m in ("mAP", "mP@5", "mP@10")]
                    note = "whitening dim 64 capped to 50: test" if whiten == 64 else ""
                    prov = {
                        "config_id": stable_hash(cfg.to_dict()),
                        "dim": 2048 if whiten is None else min(whiten, 50),
                        "whitening": {"requested_dim": whiten, "dim": 50, "capped": bool(note), "note": note},
                    }
                    rows += tidy_rows(cfg, metrics, protocol=protocol, provenance=prov)
    return rows


# ------------------------------------------------------------------------------ paper round trip


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


def test_paper_table_names_and_settings():
    t1 = paper_table(paper_csv("table1_rerank.csv"))
    row = t1[(t1.model == "simclr2x+simclr4x") & (t1.dataset == "oxford5k") & (t1.rerank == "dba+aqe+dfs")]
    assert row.value.item() == 81.99 and row.pooling.item() == "rmac" and row.whiten.item() == 512
    assert set(t1[t1.model == "gem_ap_r101"].pooling) == {"gem"}
    t3 = paper_table(paper_csv("table3_dimensions.csv"))
    true_dim = t3[(t3.model == "resnet50") & (t3.dataset == "oxford5k") & t3.whiten.isna()]
    assert true_dim.value.item() == 58.47
    t2 = paper_table(paper_csv("table2_revisited.csv"))
    assert set(t2.split) == {"easy", "medium", "hard"} and set(t2.metric) == {"mAP", "mP@5", "mP@10"}


def test_names():
    assert method_label("simclr2x+simclr4x") == "SimClr2x+SimClr4x"
    assert method_label("resnet50") == "Baseline" and method_label("gem_ap_r101") == "GeM (AP)"
    assert method_label("moco_v2+simclr-4x") == "MoCov2+SimClr4x"
    assert method_label("timm:vit_small") == "timm:vit_small"
    assert method_label("mine", {"mine": "Ours"}) == "Ours"
    assert rerank_label("none") == "G" and rerank_label("dba+aqe+dfs") == "G+DBA+AQE+DFS"
    assert rerank_label("aqe:k=5") == "G+AQE(k=5)"


# ---------------------------------------------------------------------------- own results


def test_tables_of_own_results():
    df = pd.DataFrame(synthetic_rows())
    t1 = table_frame(df, "table1")
    assert list(t1.columns) == ["G", "G+AQE", "G+DBA+AQE"]
    datasets = list(dict.fromkeys(t1.index.get_level_values(0)))
    assert datasets == ["Oxford 5k", "rOxford 5k (Medium)"]
    # the whitening varies within a model, so it is part of the method's name ...
    assert "Baseline / 32-d" in t1.index.get_level_values(1) and "SimClr2x+SimClr4x / true dim" in t1.index.get_level_values(1)
    # ... unless filtered
    t1w = table_frame(df, "table1", where={"whiten": 32})
    assert list(t1w.index.get_level_values(1)) == ["Baseline", "SimClr2x+SimClr4x"] * 2
    want = df[(df.model == "resnet50") & (df.dataset == "roxford5k") & (df.whiten == 32) & (df.rerank == "aqe") & (df.split == "medium") & (df.metric == "mAP")]
    assert t1w.loc[("rOxford 5k (Medium)", "Baseline"), "G+AQE"] == want.value.item()
    t2 = table_frame(df, "table2", where={"rerank": "none", "whiten": "none"})
    assert t2.shape == (2, 9) and list(dict.fromkeys(t2.columns.get_level_values(0))) == ["Easy", "Medium", "Hard"]
    t3 = table_frame(df, "table3", where={"rerank": "none"})
    assert list(t3.columns) == ["32", "64", "True dim"] and t3.shape == (4, 3)
    long = table_frame(df, "long")
    assert len(long) == len(df)
    assert notes(df) == [f"{m} on {d} (rmac): whitening dim 64 capped to 50: test" for m in ("resnet50", "simclr2x+simclr4x") for d in ("oxford5k", "roxford5k")]
    for fmt in ("markdown", "csv", "html", "latex"):
        assert table(df, "long", fmt)
    html = table(df, "table3", "html", where={"rerank": "none"})
    assert "<table" in html and "font-weight: bold" in html and html._repr_html_() == html
    with pytest.raises(ValueError, match="layout"):
        table(df, "table9")
    with pytest.raises(ValueError, match="format"):
        table(df, "table1", "docx")
    with pytest.raises(ValueError, match="revisited"):
        table(df[df.dataset == "oxford5k"], "table2")


def test_missing_cells_show_as_dashes():
    df = pd.DataFrame(synthetic_rows())
    df = df[~((df.model == "resnet50") & (df.rerank == "aqe"))]
    md = table(df, "table1", "markdown", where={"whiten": 64})
    assert "| Baseline" in md and "--" in md
    tex = table(df, "table1", "latex", where={"whiten": 64})
    assert " -- " in tex


# ---------------------------------------------------------------------------- LaTeX structure


def _cells(row: str) -> int:
    """Number of columns a LaTeX table row spans (``\\multicolumn{n}`` counts n)."""
    row = row.strip().removesuffix("\\\\")
    n = 0
    for cell in row.split("&"):
        m = re.search(r"\\multicolumn\{(\d+)\}", cell)
        n += int(m.group(1)) if m else 1
    return n


def check_latex(tex: str, frame: pd.DataFrame) -> None:
    for env in set(re.findall(r"\\begin\{(\w+)\}", tex)):
        assert tex.count(f"\\begin{{{env}}}") == tex.count(f"\\end{{{env}}}")
    assert tex.count("\\toprule") == 1 and tex.count("\\bottomrule") == 1
    assert tex.index("\\toprule") < tex.index("\\midrule") < tex.index("\\bottomrule")
    assert "\\cline" not in tex  # booktabs rules only
    spec = re.search(r"\\begin\{tabular\}\{([lcr]+)\}", tex).group(1)
    assert len(spec) == 2 + frame.shape[1]
    body = tex[tex.index("\\toprule") : tex.index("\\bottomrule")]
    rows = [ln for ln in body.splitlines() if ln.strip().endswith("\\\\")]
    assert all(_cells(r) == len(spec) for r in rows), [r for r in rows if _cells(r) != len(spec)]
    assert rows[len(rows) - len(frame) - 1].startswith("Dataset & Method")
    data = rows[-len(frame) :]
    assert sum("\\multirow" in r for r in data) == frame.index.get_level_values(0).nunique()
    # bold exactly on the best value of each column within each dataset group
    bold = np.array([[("\\textbf{" in c) for c in r.removesuffix("\\\\").split("&")[2:]] for r in data])
    values = frame.to_numpy(float)
    groups = frame.index.get_level_values(0)
    for g in groups.unique():
        sel = np.asarray(groups == g)
        best = np.nanmax(values[sel], axis=0)
        want = np.isclose(values[sel], best) & ~np.isnan(values[sel])
        np.testing.assert_array_equal(bold[sel], want)


@pytest.mark.parametrize("name, layout", PAPER_TABLES)
def test_latex_of_the_paper_tables(name, layout):
    tidy = paper_table(paper_csv(name))
    check_latex(table(tidy, layout, "latex"), table_frame(tidy, layout))


@pytest.mark.parametrize("layout, where", [("table1", None), ("table2", {"whiten": 32}), ("table3", {"rerank": "aqe"})])
def test_latex_of_own_results(layout, where):
    df = pd.DataFrame(synthetic_rows())
    df.loc[df.model == "resnet50", "model"] = "my_model"  # needs escaping
    tex = table(df, layout, "latex", where=where)
    check_latex(tex, table_frame(df, layout, where=where))
    assert "my\\_model" in tex
    wrapped = table(df, layout, "latex", where=where, caption="Results")
    assert "\\begin{table}" in wrapped and "\\caption{Results}" in wrapped
    check_latex(wrapped, table_frame(df, layout, where=where))


# ------------------------------------------------------------------------------------- plots


def assert_images(paths: list[Path]) -> None:
    assert [p.suffix for p in paths] == [".png", ".pdf"]
    with Image.open(paths[0]) as im:
        im.verify()
    with Image.open(paths[0]) as im:
        assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200
    blob = paths[1].read_bytes()
    assert blob.startswith(b"%PDF-") and b"%%EOF" in blob[-64:]


def test_plots_are_valid_images(tmp_path):
    df = pd.DataFrame(synthetic_rows())
    dims = plot(df, "dims", tmp_path / "a", where={"rerank": "none"})
    assert dims == [tmp_path / "a" / "dims.png", tmp_path / "a" / "dims.pdf"]
    assert_images(dims)
    assert_images(plot(df, "rerank", tmp_path / "b", where={"whiten": 32}))
    with pytest.raises(ValueError, match="kind"):
        plot(df, "pie", tmp_path)
    with pytest.raises(ValueError, match="dimensions"):
        plot(df, "dims", tmp_path, where={"whiten": "none"})


def test_plots_of_the_paper_tables(tmp_path):
    assert_images(plot(paper_table(paper_csv("table3_dimensions.csv")), "dims", tmp_path, dpi=50))
    assert_images(plot(paper_table(paper_csv("table1_rerank.csv")), "rerank", tmp_path, dpi=40))


# --------------------------------------------------------------------------------------- CLI


def test_table_and_plot_cli(tmp_path, capsys):
    from retrbench.reporting_cli import main

    append_results(synthetic_rows(), tmp_path / "res")
    assert main(["table", str(tmp_path / "res"), "--layout", "table1", "--format", "latex", "--where", "whiten=32"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("\\begin{tabular}{llrrr}") and "capped to 50" in err
    assert main(["table", str(tmp_path / "res" / "results.jsonl"), "--layout", "table3", "--where", "rerank=none,aqe", "--out", str(tmp_path / "t.md")]) == 0
    assert "| Dataset" in (tmp_path / "t.md").read_text()
    assert main(["plot", str(tmp_path / "res"), "--kind", "dims", "--out", str(tmp_path / "plots"), "--where", "rerank=none"]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "plots" / "dims.png"), str(tmp_path / "plots" / "dims.pdf")]
    assert main(["table", str(tmp_path / "nowhere")]) == 2
    if PAPER.exists():
        assert main(["table", str(PAPER / "table2_revisited.csv"), "--layout", "table2", "--format", "csv"]) == 0
        printed = capsys.readouterr().out.strip().splitlines()
        assert printed == (PAPER / "table2_revisited.csv").read_text().strip().splitlines()  # the very same file
    assert main(["table", str(tmp_path / "res"), "--where", "colour=red"]) == 2
