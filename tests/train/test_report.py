"""Run reports: the step log (append, cut back on resume), per-stage summaries, the plot, measurement labels."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from retrbench.train.report import (
    LOG_COLUMNS,
    StepLog,
    plot_log,
    stage_rows,
    true_labels,
    truncate_log,
    write_stage_summary,
)
from retrbench.types import Query, RetrievalDataset


def row(stage: int, g: int, loss: float, **kw: float) -> dict:
    base = {"stage": stage, "step": g, "global_step": g, "loss": loss, "batch_loss": loss, "memory_loss": 0.0, "images": 6, "step_s": 2.0,
            "tuple_size": 2.0, "kept_frac": 0.5, "mined": 1.0, "member_sim": 0.7, "true_before": 0, "n_before": 0,
            "true_after": 0, "n_after": 0, "true_mined": 0, "n_mined": 0}  # fmt: skip
    return {**base, **kw}


def write_log(path: Path, rows: list[dict]) -> None:
    with StepLog(path) as log:
        for r in rows:
            log.write(r)


def read(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_step_log_writes_one_header_and_appends(tmp_path):
    p = tmp_path / "log.csv"
    write_log(p, [row(0, 1, 1.0)])
    write_log(p, [row(0, 2, 0.5, extra=3)])  # a second call appends; unknown keys are ignored
    rows = read(p)
    assert list(rows[0]) == list(LOG_COLUMNS)
    assert [r["global_step"] for r in rows] == ["1", "2"] and rows[1]["loss"] == "0.5" and rows[0]["lr"] == ""
    assert p.read_text().count("stage,step") == 1


def test_truncate_log_drops_the_rows_after_the_checkpoint(tmp_path):
    p = tmp_path / "log.csv"
    write_log(p, [row(0, g, 1.0 / g) for g in (1, 2, 3, 4)])
    truncate_log(p, 2)
    rows = read(p)
    assert [r["global_step"] for r in rows] == ["1", "2"] and list(rows[0]) == list(LOG_COLUMNS)
    before = p.read_text()
    truncate_log(p, 9)  # nothing to drop: unchanged
    assert p.read_text() == before
    truncate_log(tmp_path / "missing.csv", 1)  # no log yet: nothing to do
    assert not (tmp_path / "missing.csv").exists()


def test_stage_rows_summarise_each_stage(tmp_path):
    p = tmp_path / "log.csv"
    rows = [row(0, g, 10.0 - g, true_before=1, n_before=2, true_after=1, n_after=1, true_mined=g, n_mined=4) for g in range(1, 11)]
    rows += [row(1, g, 1.0, mined=3.0, images=4, step_s=1.0) for g in range(11, 13)]
    write_log(p, rows)
    s0, s1 = stage_rows(p, {1: 0.75})
    assert (s0["stage"], s0["steps"], s1["stage"], s1["steps"]) == (0, 10, 1, 2)
    assert s0["loss_first"] == 9.0 and s0["loss_last"] == 0.0  # first and last tenth of the stage
    assert s0["precision_before"] == 0.5 and s0["precision_after"] == 1.0
    assert s0["precision_mined"] == pytest.approx(sum(range(1, 11)) / 40)
    assert s0["images_per_s"] == 3.0 and s1["images_per_s"] == 4.0 and s1["mined_per_anchor"] == 3.0
    assert "precision_before" not in s1  # nothing measured
    assert "candidate_topk_precision" not in s0 and s1["candidate_topk_precision"] == 0.75
    assert stage_rows(tmp_path / "none.csv", {}) == []


def test_stage_summary_keeps_an_earlier_candidate_precision(tmp_path):
    write_stage_summary(tmp_path, [{"stage": 0, "steps": 2, "candidate_topk_precision": 0.6}])
    write_stage_summary(tmp_path, [{"stage": 0, "steps": 3}, {"stage": 1, "steps": 1, "candidate_topk_precision": 0.9}])
    got = json.loads((tmp_path / "summary.json").read_text())["stages"]
    assert got == [{"stage": 0, "steps": 3, "candidate_topk_precision": 0.6}, {"stage": 1, "steps": 1, "candidate_topk_precision": 0.9}]
    assert (tmp_path / "stages.csv").read_text().splitlines()[0] == "stage,steps,candidate_topk_precision"


def test_plot_log_draws_a_png(tmp_path):
    p = tmp_path / "log.csv"
    write_log(p, [row(s, g, 1.0, n_before=2, true_before=1, n_after=1, true_after=1, n_mined=1, true_mined=0) for s, g in [(0, 1), (0, 2), (1, 3)]])
    png = plot_log(p, tmp_path / "plots" / "training.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_true_labels_from_ground_truth():
    gnd = (
        {"easy": np.array([0, 1]), "hard": np.array([2]), "junk": np.array([], dtype=np.int64)},
        {"easy": np.array([2]), "hard": np.array([3]), "junk": np.array([], dtype=np.int64)},  # overlaps: merged
        {"easy": np.array([5]), "hard": np.array([], dtype=np.int64), "junk": np.array([6]), "bbx": np.array([0.0, 1.0, 2.0, 3.0])},
    )
    ds = RetrievalDataset("t", Path("."), tuple(f"{i}.jpg" for i in range(8)), (Query("q1"), Query("q2"), Query("q3")), gnd, "revisited")
    lab = true_labels(ds)
    assert lab[0] == lab[1] == lab[2] == lab[3] and lab[5] == lab[6]
    assert lab[0] != lab[5]  # the query box ("bbx") is not a list of images
    assert lab[4] == -1 and lab[7] == -1 and lab.dtype == np.int64
