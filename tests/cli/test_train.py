"""``retrbench train insclr``: the config from defaults < YAML < flags, and the handler's output."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import retrbench.train.loop as loop
from retrbench.cli.train import add_method_parsers, build_config, run_train_command
from retrbench.train.config import InsCLRConfig


def parser() -> argparse.ArgumentParser:
    """``retrbench``'s shape: a ``train`` command whose methods come from :func:`add_method_parsers`."""
    p = argparse.ArgumentParser()
    add_method_parsers(p.add_subparsers(dest="command").add_parser("train"))
    return p


def test_cli_builds_the_config_from_yaml_and_flags(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("image_size: 96\nmargin: 0.3\nstages: [5, 5]\n")
    a = parser().parse_args(["train", "insclr", "--out", str(tmp_path / "o"), "--config", str(y), "--dataset", "folder:/x", "--margin", "0.5", "--lr", "1e-4,3e-5", "--no-amp", "--no-memory-negatives"])
    cfg = build_config(a)
    assert (cfg.image_size, cfg.margin, cfg.stages, cfg.lr, cfg.dataset, cfg.amp) == (96, 0.5, (5, 5), (1e-4, 3e-5), "folder:/x", False)
    assert cfg.memory_negatives is False and a.method == "insclr"
    assert build_config(parser().parse_args(["train", "insclr", "--out", "o"])) == InsCLRConfig()


def test_cli_handler_trains_and_prints_where_the_outputs_are(tmp_path, monkeypatch, capsys):
    seen = {}

    def fake_train(cfg, out, **kw):
        seen.update(cfg=cfg, out=out, **kw)
        o = Path(out)
        return loop.TrainResult(o, o / "last.pth", None, o / "log.csv", o / "training.png", [{"stage": 0, "steps": 2}], 12.5)

    monkeypatch.setattr(loop, "train", fake_train)
    a = parser().parse_args(["train", "insclr", "--out", str(tmp_path), "--model", "efficientnet_lite0", "--stages", "2", "--lr", "1e-4", "--no-progress"])
    assert run_train_command(a) == 0
    out = capsys.readouterr().out
    assert f"--weights {tmp_path / 'last.pth'}" in out and "12.50 images/s" in out
    assert seen["cfg"].stages == (2,) and seen["eval_labels"] is None and seen["restart"] is False


def test_cli_measure_labels_passes_the_datasets_true_labels(tmp_path, monkeypatch):
    from retrbench.types import Query, RetrievalDataset

    gnd = ({"ok": np.array([0, 2]), "junk": np.array([], dtype=np.int64)},)
    ds = RetrievalDataset("t", tmp_path, ("a.jpg", "b.jpg", "c.jpg"), (Query("q"),), gnd, "ukbench")
    seen = {}

    def fake_train(cfg, out, **kw):
        seen.update(kw)
        o = Path(out)
        return loop.TrainResult(o, o / "last.pth", None, o / "log.csv", o / "training.png")

    import retrbench.datasets

    monkeypatch.setattr(retrbench.datasets, "load_dataset", lambda name, root: ds)
    monkeypatch.setattr(loop, "train", fake_train)
    a = parser().parse_args(["train", "insclr", "--out", str(tmp_path), "--dataset", "t", "--measure-labels", "--no-progress"])
    assert run_train_command(a) == 0
    np.testing.assert_array_equal(seen["eval_labels"], [0, -1, 0])
