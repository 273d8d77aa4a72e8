"""The run directory: checkpoint files and their layouts, state.pth, resuming bit-identically, refusing another config."""

from __future__ import annotations

import csv

import pytest
import torch

from retrbench.backbones import BACKBONES
from retrbench.train.checkpoint import (
    STATE_FORMAT,
    RunDir,
    StageState,
    insclr_state_dict,
    load_resume,
    net_state,
    save_checkpoint,
)
from retrbench.train.loop import train
from retrbench.train.memory import CrossBatchMemory, DatasetBank
from retrbench.train.network import embed

from .helpers import CFG, load, tiny, write_views


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory):
    return write_views(tmp_path_factory.mktemp("views"))


def stage_state(bb) -> StageState:
    opt = torch.optim.Adam(list(bb.net.parameters()), lr=2e-3)
    memory = CrossBatchMemory(4, 2)
    memory.enqueue(torch.ones(3, 2), torch.tensor([4, 5, 6]))
    return StageState(opt, torch.amp.GradScaler("cpu", enabled=False), DatasetBank(torch.eye(3, 2)), memory)


def test_save_and_load_a_mid_stage_checkpoint(tmp_path):
    run, bb = RunDir(tmp_path), tiny()
    st = stage_state(bb)
    save_checkpoint(run, backbone=bb, config=CFG, stage=1, step=2, global_step=5, base_weights_id="w0", stage_state=st)
    saved = load(run.state)
    assert set(saved) == {"format", "config", "stage", "step", "global_step", "base_weights_id", "net", "optimizer", "scaler", "bank", "memory"}
    assert saved["format"] == STATE_FORMAT and saved["config"] == CFG.to_dict()
    assert set(load(run.last)) == set(bb.net.state_dict()) and not run.last_insclr.exists()  # not a ResNet
    r = load_resume(run, CFG.replace(workers=3, device="cpu"))  # runtime fields may change
    assert r is not None and (r.stage, r.step, r.global_step, r.base_weights_id) == (1, 2, 5, "w0")
    assert all(torch.equal(r.net[k], v) for k, v in net_state(bb).items())
    assert r.mid_stage is not None and torch.equal(r.mid_stage["bank"], torch.eye(3, 2))
    fresh = StageState(torch.optim.Adam(list(tiny().net.parameters()), lr=1e-3), torch.amp.GradScaler("cpu", enabled=False), DatasetBank(r.mid_stage["bank"]), CrossBatchMemory(4, 2))
    fresh.restore(r.mid_stage)
    assert fresh.memory.index.tolist() == [4, 5, 6, -1] and int(fresh.memory.ptr) == 3
    assert fresh.optimizer.param_groups[0]["lr"] == 2e-3


def test_end_of_stage_checkpoint_has_no_stage_state(tmp_path):
    run = RunDir(tmp_path)
    save_checkpoint(run, backbone=tiny(), config=CFG, stage=1, step=0, global_step=3, base_weights_id="w0")
    r = load_resume(run, CFG)
    assert r is not None and r.mid_stage is None and (r.stage, r.step) == (1, 0)
    assert load_resume(RunDir(tmp_path / "empty"), CFG) is None


def test_load_resume_refuses_unknown_formats_and_other_configs(tmp_path):
    run = RunDir(tmp_path)
    save_checkpoint(run, backbone=tiny(), config=CFG, stage=0, step=2, global_step=2, base_weights_id="w0")
    with pytest.raises(ValueError, match=r"another configuration \(margin: 0.4 -> 0.2, seed: 0 -> 1\)"):
        load_resume(run, CFG.replace(margin=0.2, seed=1))
    state = load(run.state)
    torch.save({**state, "format": 99}, run.state)
    with pytest.raises(ValueError, match="unknown state format 99"):
        load_resume(run, CFG)


@pytest.fixture(scope="module")
def uninterrupted(images, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, torch.Tensor], list[str]]:
    res = train(CFG, tmp_path_factory.mktemp("full"), backbone=tiny(), images=images[0], plot=False)
    with open(res.log) as f:
        return load(res.last), [r["loss"] for r in csv.DictReader(f)]


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
    assert load(tmp_path / "cut" / "state.pth")["global_step"] == saved_at
    resumed = train(CFG, tmp_path / "cut", backbone=tiny(), images=paths, plot=False)
    full_weights, full_losses = uninterrupted
    got = load(resumed.last)
    assert all(torch.equal(full_weights[k], got[k]) for k in full_weights)
    with open(resumed.log) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["global_step"]) for r in rows] == [1, 2, 3, 4, 5, 6]  # the lost step logged once
    assert [r["loss"] for r in rows] == full_losses


def test_resume_refuses_another_configuration_unless_restarted(tmp_path, images):
    paths, _ = images
    cfg = CFG.replace(stages=(2,), lr=(1e-3,))
    w_first = load(train(cfg, tmp_path / "run", backbone=tiny(), images=paths, plot=False).last)["conv2.weight"]
    with pytest.raises(ValueError, match=r"another configuration \(lr: \[0.001\] -> \[0.005\]\)"):
        train(cfg.replace(lr=(5e-3,)), tmp_path / "run", backbone=tiny(), images=paths, plot=False)
    done = train(cfg.replace(workers=1, checkpoint_every=5), tmp_path / "run", backbone=tiny(), images=paths, plot=False)  # runtime fields may change
    assert torch.equal(load(done.last)["conv2.weight"], w_first)  # nothing left to do
    again = train(cfg.replace(lr=(5e-3,)), tmp_path / "run", backbone=tiny(), images=paths, restart=True, plot=False)
    assert not torch.equal(load(again.last)["conv2.weight"], w_first)


def test_insclr_layout_only_for_resnets():
    assert insclr_state_dict(tiny()) is None


@pytest.mark.slow
def test_resnet_checkpoints_load_as_resnet50_and_as_insclr_entry(tmp_path):
    bb = BACKBONES.create("resnet50", pretrained=False)
    torch.save(net_state(bb), tmp_path / "last.pth")  # what train() writes as last.pth
    again = BACKBONES.create("resnet50", weights=tmp_path / "last.pth")
    assert all(torch.equal(a, b) for a, b in zip(again.net.state_dict().values(), bb.net.state_dict().values(), strict=True))
    ck = insclr_state_dict(bb, gem_p=3.0)
    assert ck is not None
    torch.save(ck, tmp_path / "last_insclr.pth")
    ins = BACKBONES.create("insclr_r50_instre", weights=tmp_path / "last_insclr.pth")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ins.native(x), embed(bb, x, 3.0), rtol=1e-4, atol=1e-5)
