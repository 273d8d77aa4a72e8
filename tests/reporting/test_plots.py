"""Figures (retrbench/reporting/plots.py): valid PNG and PDF files of own and paper results."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from retrbench.reporting import paper_table, plot

from .helpers import frame, paper_csv


def assert_images(paths: list[Path]) -> None:
    assert [p.suffix for p in paths] == [".png", ".pdf"]
    with Image.open(paths[0]) as im:
        im.verify()
    with Image.open(paths[0]) as im:
        assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200
    blob = paths[1].read_bytes()
    assert blob.startswith(b"%PDF-") and b"%%EOF" in blob[-64:]


def test_plots_are_valid_images(tmp_path):
    df = frame()
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


def test_rerank_bars_follow_the_table1_order():
    from retrbench.reporting.plots import _plot_rerank
    from retrbench.reporting.tables import prepare

    path = paper_csv("table1_rerank.csv")
    fig = _plot_rerank(prepare(paper_table(path), None))
    header = path.read_text().splitlines()[0].split(",")[2:]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == header
