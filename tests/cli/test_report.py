"""``retrbench table | plot`` (retrbench/cli/report.py) on own results and the paper's CSV tables."""

from __future__ import annotations

from pathlib import Path

from retrbench.cli import main
from retrbench.results import append_results

PAPER = Path(__file__).resolve().parents[2].parent / "shared" / "paper"


def rows() -> list[dict]:
    from tests.reporting.helpers import synthetic_rows  # noqa: PLC0415  (the reporting tests' rows)

    return synthetic_rows()


def test_table_and_plot_cli(tmp_path, capsys):
    append_results(rows(), tmp_path / "res")
    assert main(["table", str(tmp_path / "res"), "--layout", "table1", "--format", "latex", "--where", "whiten=32"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("\\begin{tabular}{llrrr}") and "capped to 50" in err
    assert main(["table", str(tmp_path / "res" / "results.jsonl"), "--layout", "table3", "--where", "rerank=none,aqe", "--out", str(tmp_path / "t.md")]) == 0
    assert (tmp_path / "t.md").read_text().startswith("| Dataset")
    assert main(["plot", str(tmp_path / "res"), "--kind", "dims", "--out", str(tmp_path / "plots"), "--where", "rerank=none"]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "plots" / "dims.png"), str(tmp_path / "plots" / "dims.pdf")]
    assert main(["table", str(tmp_path / "nowhere")]) == 1
    assert main(["table", str(tmp_path / "res"), "--where", "colour=red"]) == 1
    assert "no column 'colour'" in capsys.readouterr().err


def test_table_of_the_papers_csv_is_the_file(capsys):
    path = PAPER / "table2_revisited.csv"
    if not path.exists():
        import pytest

        pytest.skip(f"the paper's tables are not available: {path} is absent")
    assert main(["table", str(path), "--layout", "table2", "--format", "csv"]) == 0
    assert capsys.readouterr().out.strip().splitlines() == path.read_text().strip().splitlines()  # the very same file
