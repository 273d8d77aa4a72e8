"""Steps 7-8: one training step on a hand-built case, and the staged loop on a tiny network."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from retrbench.backbones import BACKBONES, Backbone, BackboneInfo
from retrbench.train.candidates import CandidateSets
from retrbench.train.checkpoint import StageState
from retrbench.train.loop import Batch, _step, train
from retrbench.train.memory import CrossBatchMemory, DatasetBank
from retrbench.train.network import Net, Normalise, set_trainable
from retrbench.train.report import LOG_COLUMNS
from retrbench.train.views import TrainViews, collate
from retrbench.utils.images import ImageSpec, load_image

from .helpers import CFG, load, tiny, write_views


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory):
    return write_views(tmp_path_factory.mktemp("views"))


# --------------------------------------------------------------------------------------------
# One step, by hand: solid-colour images and a network whose embedding is the image's colour

COLOURS = [(200, 30, 30), (190, 50, 30), (200, 30, 60), (30, 200, 30), (40, 190, 50), (30, 30, 200), (210, 40, 40), (30, 210, 40), (40, 40, 210)]
LABELS = np.array([0, 0, 0, 1, 1, 2, 0, 1, 2])  # red, green, blue
TUPLES = [np.array([0, 1, 3]), np.array([4, 5, 2])]  # anchor first; 3 and 5, 2 are not the anchor's colour
CANDS = [[1, 8, 6], [0, 6, 2], [0, 1, 6], [4, 7, 0], [7, 5, 8], [8, 3, 4], [0, 1, 2], [3, 4, 5], [5, 6, 7]]


def colour_net() -> Backbone:
    conv = nn.Conv2d(3, 3, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(3)[:, :, None, None])
    return Backbone(conv, BackboneInfo(3, 1, (0.0,) * 3, (1.0,) * 3), "colour", "identity")


def test_step_selects_mines_updates_the_bank_and_memory(tmp_path):
    paths = []
    for i, c in enumerate(COLOURS):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (20, 16), c).save(paths[-1])
    # independent oracle: the embedding of an image is its L2-normalised mean colour (GeM p=1, identity conv)
    true = np.stack([load_image(ImageSpec(p, None, 16)).float().mean(dim=(1, 2)).numpy() for p in paths])
    true /= np.linalg.norm(true, axis=1, keepdims=True)

    cfg = CFG.replace(image_size=16, candidates_k=3, selection_threshold=0.9, mining_rounds=2, mining_first_k=1, mining_growth=1.0, mining_min_sim=0.9, gem_p=1.0)
    bb = colour_net()
    net = Net(bb, set_trainable(bb, "."), Normalise(bb.info.mean, bb.info.std, torch.device("cpu")), 1.0, False)
    in_batch = np.concatenate(TUPLES)
    start = torch.from_numpy(true.astype(np.float32))
    start[in_batch] = 0  # the step must write the batch's embeddings before judging similarities
    memory = CrossBatchMemory(len(paths), 3)
    memory.enqueue(torch.from_numpy(true.astype(np.float32)), torch.arange(len(paths)))
    st = StageState(torch.optim.Adam(net.params, lr=1e-2), torch.amp.GradScaler("cpu", enabled=False), DatasetBank(start), memory)
    cands = CandidateSets(np.array(CANDS), -np.tile(np.arange(3, dtype=np.float32), (len(paths), 1)))
    aug, plain, idx = collate([TrainViews(paths, cfg)[(int(i), 0, 0, s)] for s, i in enumerate(in_batch)])
    w0 = bb.net.weight.detach().clone()

    row = _step(cfg, net=net, state=st, cands=cands, batch=Batch(TUPLES, aug, plain, idx), labels=LABELS)

    # selection keeps 1 of tuple A ([0, 1], 3 rejected) and none of tuple B ([4], 5 and 2 rejected);
    # mining: pool A = {6, 8}, pool B = {7, 8}; 8 (blue) is never similar enough, 6 and 7 are taken
    sim = true @ true.T
    assert row["tuples"] == 2 and row["images"] == 6 and row["memory_entries"] == 9
    assert row["tuple_size"] == 1.5 and row["kept_frac"] == 0.25 and row["pool"] == 2.0 and row["mined"] == 1.0
    assert row["member_sim"] == pytest.approx(np.mean([sim[0, 1], sim[0, 3], sim[4, 5], sim[4, 2]]), abs=1e-5)
    assert (row["true_before"], row["n_before"], row["true_after"], row["n_after"], row["true_mined"], row["n_mined"]) == (1, 4, 1, 1, 2, 2)
    assert row["loss"] > 0 and np.isfinite(row["loss"])
    np.testing.assert_allclose(st.bank.features[in_batch].numpy(), true[in_batch], atol=1e-5)  # written with the pre-step network
    assert memory.index[:6].tolist() == in_batch.tolist() and int(memory.ptr) == 6  # the augmented batch entered the memory
    assert not torch.equal(bb.net.weight, w0) and not bb.training


def test_step_without_labels_measures_nothing(tmp_path):
    paths = []
    for i, c in enumerate(COLOURS):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (20, 16), c).save(paths[-1])
    cfg = CFG.replace(image_size=16, candidates_k=3, selection_threshold=0.9, mining_rounds=0, gem_p=1.0)
    bb = colour_net()
    net = Net(bb, set_trainable(bb, "."), Normalise(bb.info.mean, bb.info.std, torch.device("cpu")), 1.0, False)
    st = StageState(torch.optim.Adam(net.params, lr=1e-2), torch.amp.GradScaler("cpu", enabled=False), DatasetBank(torch.zeros(9, 3)), CrossBatchMemory(9, 3))
    in_batch = np.concatenate(TUPLES)
    aug, plain, idx = collate([TrainViews(paths, cfg)[(int(i), 0, 0, s)] for s, i in enumerate(in_batch)])
    cands = CandidateSets(np.array(CANDS), np.zeros((9, 3), np.float32))
    row = _step(cfg, net=net, state=st, cands=cands, batch=Batch(TUPLES, aug, plain, idx), labels=None)
    assert row["mined"] == 0.0 and row["memory_entries"] == 0  # no mining rounds; the memory was empty
    assert row["n_before"] == row["n_after"] == row["n_mined"] == 0


# --------------------------------------------------------------------------------------------
# The loop


def test_training_writes_a_loadable_checkpoint_log_and_plot(tmp_path, images):
    paths, labels = images
    bb = tiny()
    before = {k: v.clone() for k, v in bb.net.state_dict().items()}
    res = train(CFG.replace(trainable=r"^conv2\."), tmp_path / "run", backbone=bb, images=paths, eval_labels=labels)
    for name in ("last.pth", "stage0.pth", "stage1.pth", "state.pth", "log.csv", "training.png", "stages.csv", "summary.json", "config.yaml"):
        assert (tmp_path / "run" / name).is_file(), name
    assert res.insclr_checkpoint is None and res.images_per_s > 0
    sd = load(res.last)
    fresh = tiny().net
    fresh.load_state_dict(sd, strict=True)  # the network's own layout
    assert torch.equal(sd["conv1.weight"], before["conv1.weight"])  # frozen
    assert not torch.equal(sd["conv2.weight"], before["conv2.weight"])  # fine-tuned
    assert torch.equal(sd["bn1.running_mean"], before["bn1.running_mean"])  # BN statistics kept (bn_eval)
    assert all(torch.equal(sd[k], v) for k, v in load(tmp_path / "run" / "stage1.pth").items())  # last = after the last stage
    with open(res.log) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["global_step"]) for r in rows] == [1, 2, 3, 4, 5, 6] and list(rows[0]) == list(LOG_COLUMNS)
    assert [(int(r["stage"]), int(r["step"])) for r in rows] == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)]
    assert [float(r["lr"]) for r in rows] == [1e-3] * 3 + [5e-4] * 3
    for r in rows:
        tuples = int(r["tuples"])
        assert tuples == CFG.tuples_per_batch and int(r["images"]) == CFG.batch_images
        assert int(r["n_before"]) == tuples * CFG.tuple_k  # every image has a label: every member measured
        assert 1 <= float(r["tuple_size"]) <= CFG.tuple_k + 1
        assert int(r["n_after"]) == round((float(r["tuple_size"]) - 1) * tuples)  # kept members, anchors excluded
        assert int(r["n_mined"]) == round(float(r["mined"]) * tuples)  # every mined positive measured
        assert 0 <= int(r["true_mined"]) <= int(r["n_mined"]) and 0 <= int(r["true_after"]) <= int(r["n_after"])
    assert int(rows[0]["memory_entries"]) == len(paths)  # the memory starts from the descriptors
    assert [s["stage"] for s in res.stages] == [0, 1]
    for s, (lo, hi) in zip(res.stages, [(0, 3), (3, 6)], strict=True):
        true_mined, n_mined = (sum(int(r[c]) for r in rows[lo:hi]) for c in ("true_mined", "n_mined"))
        assert n_mined > 0 and s["precision_mined"] == pytest.approx(true_mined / n_mined)
        assert 0 <= s["candidate_topk_precision"] <= 1


def test_training_refuses_too_few_images_and_misaligned_labels(tmp_path, images):
    paths, labels = images
    with pytest.raises(ValueError, match="need at least 4 training images"):
        train(CFG, tmp_path / "a", backbone=tiny(), images=paths[:3])
    with pytest.raises(ValueError, match="eval_labels has 3 entries for 20 images"):
        train(CFG, tmp_path / "b", backbone=tiny(), images=paths, eval_labels=labels[:3])


def test_augmented_memory_initialisation_fills_the_memory(tmp_path, images):
    paths, _ = images
    res = train(CFG.replace(stages=(1,), lr=(1e-3,), memory_init="augmented", memory_size=7), tmp_path / "run", backbone=tiny(), images=paths, plot=False)
    with open(res.log) as f:
        (r,) = list(csv.DictReader(f))
    assert int(r["memory_entries"]) == 7
    res = train(CFG.replace(stages=(1,), lr=(1e-3,), memory_init="none"), tmp_path / "none", backbone=tiny(), images=paths, plot=False)
    with open(res.log) as f:
        (r,) = list(csv.DictReader(f))
    assert int(r["memory_entries"]) == 0


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
