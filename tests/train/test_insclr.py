"""Steps 7-8: configuration, the training loop on a tiny network, resume, outputs and their loading."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from retrbench.backbones import BACKBONES, Backbone, BackboneInfo
from retrbench.train.cli import add_train_subcommand, build_config
from retrbench.train.insclr import (
    LOG_COLUMNS,
    InsCLRConfig,
    default_trainable,
    embed,
    insclr_state_dict,
    train,
    true_labels,
)
from retrbench.types import Query, RetrievalDataset


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 2, 1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, 2, 1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


def tiny() -> Backbone:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Backbone(Tiny(), BackboneInfo(16, 4, (0.5,) * 3, (0.5,) * 3), "tiny", "tiny-init")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], np.ndarray]:
    """4 'instances' (blocky colour patterns) x 5 noisy views, 48x40 PNGs."""
    root = tmp_path_factory.mktemp("views")
    rng = np.random.default_rng(0)
    paths, labels = [], []
    for c in range(4):
        base = np.asarray(Image.fromarray(rng.integers(0, 255, (6, 6, 3)).astype(np.uint8)).resize((48, 40), Image.Resampling.NEAREST))
        for v in range(5):
            view = np.clip(base.astype(int) + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
            paths.append(root / f"c{c}_v{v}.png")
            Image.fromarray(view).save(paths[-1])
            labels.append(c)
    return paths, np.array(labels)


CFG = InsCLRConfig(
    model="tiny", dataset="synthetic", image_size=32, stages=(3, 3), lr=(1e-3, 5e-4), candidates_k=6, tuple_k=2,
    tuples_per_batch=3, selection_threshold=0.5, mining_min_sim=0.5, workers=0, checkpoint_every=2, batch_size_extract=8,
)  # fmt: skip


def state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_config_roundtrips_and_validates(tmp_path):
    cfg = CFG.replace(lr=(3e-4,), aug_scale=(0.5, 1.0))
    p = tmp_path / "c.yaml"
    p.write_text(cfg.to_yaml())
    assert InsCLRConfig.from_yaml(p) == cfg
    assert cfg.stage_lr(0) == cfg.stage_lr(1) == 3e-4 and CFG.stage_lr(1) == 5e-4
    assert CFG.batch_images == 9
    for bad in ({"lr": (1e-3, 1e-4, 1e-5)}, {"tuple_k": 10}, {"mining_score": "median"}, {"memory_init": "x"}, {"stages": ()}, {"tuple_separation": 7}):
        with pytest.raises(ValueError):
            CFG.replace(**bad)
    with pytest.raises(ValueError, match="unknown InsCLRConfig keys"):
        InsCLRConfig.from_dict({"modle": "x"})


def test_true_labels_from_ground_truth():
    gnd = (
        {"easy": np.array([0, 1]), "hard": np.array([2]), "junk": np.array([], dtype=np.int64)},
        {"easy": np.array([2]), "hard": np.array([3]), "junk": np.array([], dtype=np.int64)},  # overlaps: merged
        {"easy": np.array([5]), "hard": np.array([], dtype=np.int64), "junk": np.array([6])},
    )
    ds = RetrievalDataset("t", Path("."), tuple(f"{i}.jpg" for i in range(8)), (Query("q1"), Query("q2"), Query("q3")), gnd, "revisited")
    lab = true_labels(ds)
    assert lab[0] == lab[1] == lab[2] == lab[3] and lab[5] == lab[6] and lab[0] != lab[5]
    assert lab[4] == -1 and lab[7] == -1


def test_default_trainable():
    assert default_trainable(tiny()) == "."
    eff = Backbone(nn.Module(), BackboneInfo(1, 1, (0,) * 3, (1,) * 3), "efficientnet_lite0", "x")
    assert "blocks\\.[56]" in default_trainable(eff)


def test_training_writes_a_loadable_checkpoint_log_and_plot(tmp_path, images):
    paths, labels = images
    bb = tiny()
    before = {k: v.clone() for k, v in bb.net.state_dict().items()}
    res = train(CFG.replace(trainable=r"^conv2\."), tmp_path / "run", backbone=bb, images=paths, eval_labels=labels)
    for name in ("last.pth", "stage0.pth", "stage1.pth", "state.pth", "log.csv", "training.png", "stages.csv", "summary.json", "config.yaml"):
        assert (tmp_path / "run" / name).is_file(), name
    assert res.insclr_checkpoint is None and res.images_per_s > 0
    sd = state(res.last)
    fresh = tiny().net
    fresh.load_state_dict(sd, strict=True)  # the network's own layout
    assert torch.equal(sd["conv1.weight"], before["conv1.weight"])  # frozen
    assert not torch.equal(sd["conv2.weight"], before["conv2.weight"])  # fine-tuned
    assert torch.equal(sd["bn1.running_mean"], before["bn1.running_mean"])  # BN statistics kept (bn_eval)
    with open(res.log) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["global_step"]) for r in rows] == [1, 2, 3, 4, 5, 6] and list(rows[0]) == list(LOG_COLUMNS)
    assert all(float(r["tuple_size"]) >= 1 and float(r["mined"]) >= 0 for r in rows)
    assert int(rows[0]["memory_entries"]) == len(paths)  # the memory starts from the descriptors
    assert [s["stage"] for s in res.stages] == [0, 1]
    assert 0 <= res.stages[0]["precision_mined"] <= 1 and "candidate_topk_precision" in res.stages[1]


@pytest.fixture(scope="module")
def uninterrupted(images, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, torch.Tensor], list[str]]:
    res = train(CFG, tmp_path_factory.mktemp("full"), backbone=tiny(), images=images[0], plot=False)
    with open(res.log) as f:
        return state(res.last), [r["loss"] for r in csv.DictReader(f)]


@pytest.mark.parametrize(
    ("cut_at", "saved_at"),
    [
        (3, 2),  # stage 0 step 3 is lost: resume mid-stage from the checkpoint at step 2 (memories restored)
        (4, 3),  # stage 1 step 1 is lost: resume from the end of stage 0 (stage 1 candidate sets recomputed)
    ],
)
def test_resumed_run_equals_uninterrupted_run(tmp_path, images, uninterrupted, cut_at, saved_at):
    paths, _ = images

    class Stop(Exception):
        pass

    def stop(row: dict) -> None:
        if row["global_step"] == cut_at:
            raise Stop

    with pytest.raises(Stop):
        train(CFG, tmp_path / "cut", backbone=tiny(), images=paths, on_step=stop, plot=False)
    assert state(tmp_path / "cut" / "state.pth")["global_step"] == saved_at
    resumed = train(CFG, tmp_path / "cut", backbone=tiny(), images=paths, plot=False)
    full_weights, full_losses = uninterrupted
    got = state(resumed.last)
    assert all(torch.equal(full_weights[k], got[k]) for k in full_weights)
    with open(resumed.log) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["global_step"]) for r in rows] == [1, 2, 3, 4, 5, 6]  # the lost step logged once
    assert [r["loss"] for r in rows] == full_losses


def test_resume_refuses_another_configuration_unless_restarted(tmp_path, images):
    paths, _ = images
    cfg = CFG.replace(stages=(2,), lr=(1e-3,))
    w_first = state(train(cfg, tmp_path / "run", backbone=tiny(), images=paths, plot=False).last)["conv2.weight"]
    with pytest.raises(ValueError, match=r"another configuration \(lr: \[0.001\] -> \[0.005\]\)"):
        train(cfg.replace(lr=(5e-3,)), tmp_path / "run", backbone=tiny(), images=paths, plot=False)
    done = train(cfg.replace(workers=1, checkpoint_every=5), tmp_path / "run", backbone=tiny(), images=paths, plot=False)  # runtime fields may change
    assert torch.equal(state(done.last)["conv2.weight"], w_first)  # nothing left to do
    again = train(cfg.replace(lr=(5e-3,)), tmp_path / "run", backbone=tiny(), images=paths, restart=True, plot=False)
    assert not torch.equal(state(again.last)["conv2.weight"], w_first)


def test_cli_builds_the_config_from_yaml_and_flags(tmp_path):
    p = argparse.ArgumentParser()
    add_train_subcommand(p.add_subparsers(dest="command"))
    y = tmp_path / "c.yaml"
    y.write_text("image_size: 96\nmargin: 0.3\nstages: [5, 5]\n")
    a = p.parse_args(["train", "insclr", "--out", str(tmp_path / "o"), "--config", str(y), "--dataset", "folder:/x", "--margin", "0.5", "--lr", "1e-4,3e-5", "--no-amp", "--no-memory-negatives"])
    cfg = build_config(a)
    assert (cfg.image_size, cfg.margin, cfg.stages, cfg.lr, cfg.dataset, cfg.amp) == (96, 0.5, (5, 5), (1e-4, 3e-5), "folder:/x", False)
    assert cfg.memory_negatives is False
    assert callable(a.handler)
    assert build_config(p.parse_args(["train", "insclr", "--out", "o"])) == InsCLRConfig()


@pytest.mark.slow
def test_efficientnet_lite0_checkpoint_loads_in_the_registry(tmp_path, images):
    paths, _ = images
    bb = BACKBONES.create("efficientnet_lite0", pretrained=False)
    cfg = CFG.replace(model="efficientnet_lite0", stages=(1,), lr=(1e-2,), tuples_per_batch=2)
    res = train(cfg, tmp_path / "eff", backbone=bb, images=paths[:8], plot=False)
    loaded = BACKBONES.create("efficientnet_lite0", weights=res.last)  # timm names, strict
    init = BACKBONES.create("efficientnet_lite0", pretrained=False).net.state_dict()
    got = loaded.net.state_dict()
    assert torch.equal(got["conv_stem.weight"], init["conv_stem.weight"])  # frozen early blocks
    assert not torch.equal(got["conv_head.weight"], init["conv_head.weight"])  # fine-tuned head conv
    assert loaded.weights_id != "random-init"


@pytest.mark.slow
def test_resnet_checkpoints_load_as_resnet50_and_as_insclr_entry(tmp_path):
    from retrbench.train.insclr import _net_state

    bb = BACKBONES.create("resnet50", pretrained=False)
    torch.save(_net_state(bb), tmp_path / "last.pth")  # what train() writes as last.pth
    again = BACKBONES.create("resnet50", weights=tmp_path / "last.pth")
    assert all(torch.equal(a, b) for a, b in zip(again.net.state_dict().values(), bb.net.state_dict().values(), strict=True))
    ck = insclr_state_dict(bb, gem_p=3.0)
    assert ck is not None
    torch.save(ck, tmp_path / "last_insclr.pth")
    ins = BACKBONES.create("insclr_r50_instre", weights=tmp_path / "last_insclr.pth")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ins.native(x), embed(bb, x, 3.0), rtol=1e-4, atol=1e-5)
    assert insclr_state_dict(tiny()) is None


def test_cli_handler_trains_and_prints_where_the_outputs_are(tmp_path, monkeypatch, capsys):
    import retrbench.train.insclr as insclr

    seen = {}

    def fake_train(cfg, out, **kw):
        seen.update(cfg=cfg, out=out, **kw)
        o = Path(out)
        return insclr.TrainResult(o, o / "last.pth", None, o / "log.csv", o / "training.png", [{"stage": 0, "steps": 2}], 12.5)

    monkeypatch.setattr(insclr, "train", fake_train)
    p = argparse.ArgumentParser()
    add_train_subcommand(p.add_subparsers(dest="command"))
    a = p.parse_args(["train", "insclr", "--out", str(tmp_path), "--model", "efficientnet_lite0", "--stages", "2", "--lr", "1e-4", "--no-progress"])
    assert a.handler(a) == 0
    out = capsys.readouterr().out
    assert f"--weights {tmp_path / 'last.pth'}" in out and "12.50 images/s" in out
    assert seen["cfg"].stages == (2,) and seen["eval_labels"] is None and seen["restart"] is False
