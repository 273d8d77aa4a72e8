"""InsCLR training: the staged loop (:func:`train`) and one training step.

One stage (:func:`train` runs ``len(config.stages)`` of them):

1. candidate sets from the current model (:mod:`.candidates`; cached in ``OUT/candidates/``);
2. the un-augmented bank starts from those descriptors, the cross-batch memory is filled
   (``memory_init``) (:mod:`.memory`);
3. each step: sample tuples (:mod:`.tuples`); embed the batch without augmentation (no
   gradient) and write it to the bank; mini-batch selection and pseudo-positive mining on the
   bank (:mod:`.mining`); embed the augmented batch (gradients); loss against the batch and the
   memory (:mod:`.loss`); optimiser step; the augmented embeddings enter the memory.

The embedding is ``L2(GeM_p(backbone(x)))`` (:mod:`.network`); the files of the output
directory are listed in :mod:`.checkpoint`. Checkpoints are written atomically every
``checkpoint_every`` steps and at the end of every stage; calling :func:`train` again with the
same directory resumes from ``state.pth``. The batches and augmentations of a step depend only
on ``(seed, stage, step)``, so on a CPU a resumed run gives the same weights as an
uninterrupted one.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..backbones import BACKBONES, Backbone
from ..extraction import FeatureCache
from ..utils.device import resolve_device
from ..utils.io import sha256_file, stable_hash
from .candidates import CandidateSets, candidate_sets, describe, load_or_compute
from .checkpoint import RunDir, StageState, load_resume, net_state, save_checkpoint, save_torch, write_config
from .config import InsCLRConfig
from .loss import insclr_loss
from .memory import CrossBatchMemory, DatasetBank
from .mining import mine, pair_precision, select
from .network import Net, Normalise, default_trainable, embed_plain, set_trainable, train_mode
from .report import StepLog, plot_log, stage_rows, truncate_log, write_stage_summary
from .tuples import TupleSampler, tuple_candidate_set
from .views import TrainViews, collate

__all__ = ["Batch", "TrainResult", "train"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` wrote.

    Attributes:
        out: the output directory.
        last: the fine-tuned network's state dict (``--model NAME --weights last``).
        insclr_checkpoint: ``last_insclr.pth`` for ResNet-50/101 backbones, else None.
        log, plot: per-step CSV log and its plot.
        stages: per-stage summary rows (see ``stages.csv``).
        images_per_s: training throughput over the steps run by this call (batch images per
            second; each is embedded with and without augmentation).
    """

    out: Path
    last: Path
    insclr_checkpoint: Path | None
    log: Path
    plot: Path
    stages: list[dict[str, Any]] = field(default_factory=list)
    images_per_s: float = float("nan")


@dataclass(frozen=True)
class Batch:
    """The images of one step.

    Attributes:
        tuples: the step's tuples: int64 dataset indices, anchor first.
        aug: ``(B, 3, S, S)`` uint8 augmented views (the tuples concatenated, in order).
        plain: ``B`` un-augmented ``(3, H, W)`` uint8 views.
        idx: ``(B,)`` int64 dataset indices.
    """

    tuples: list[np.ndarray]
    aug: Tensor
    plain: list[Tensor]
    idx: Tensor


def _resolve(config: InsCLRConfig, backbone: Backbone | None, images: Sequence[str | Path] | None) -> tuple[Backbone, list[Path], bool]:
    """The network, the training images and whether their EXIF orientation is applied (the
    dataset's default: users' folders yes, benchmarks no; explicit image lists: no)."""
    if backbone is None:
        backbone = BACKBONES.create(config.model, weights=config.weights)
    exif = False
    if images is None:
        from ..datasets import load_dataset

        ds = load_dataset(config.dataset, config.data_root)
        images = [Path(ds.root) / p for p in ds.images]
        exif = ds.exif_orientation
    paths = [Path(p) for p in images]
    if len(paths) < config.tuple_k + 2:
        raise ValueError(f"need at least {config.tuple_k + 2} training images, got {len(paths)}")
    return backbone, paths, exif


def train(
    config: InsCLRConfig,
    out: str | Path,
    *,
    backbone: Backbone | None = None,
    images: Sequence[str | Path] | None = None,
    eval_labels: np.ndarray | None = None,
    restart: bool = False,
    progress: bool = False,
    plot: bool = True,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Fine-tune a backbone with InsCLR on an unlabelled collection; resumes from ``out`` when it holds a run.

    Args:
        config: the run's configuration.
        out: output directory (see :mod:`retrbench.train.checkpoint` for its files).
        backbone: the network to fine-tune (default: ``config.model`` / ``config.weights`` from
            the registry). It is modified in place.
        images: training image files (default: the database images of ``config.dataset``).
        eval_labels: optional true label per image (``-1``: none), used only to *measure* the
            precision of tuples and mined positives in the log; training never reads it.
        restart: ignore a run already in ``out`` and start over.
        progress: show a tqdm progress bar with the loss and mining statistics.
        plot: draw ``training.png`` at the end (about a second; the CSV log is always written).
        on_step: called with each step's log row after the step (tests use it to interrupt).
    """
    from tqdm.auto import tqdm

    run = RunDir(Path(out))
    run.root.mkdir(parents=True, exist_ok=True)
    cfg = config
    backbone, paths, exif = _resolve(cfg, backbone, images)
    n = len(paths)
    if eval_labels is not None and len(eval_labels) != n:
        raise ValueError(f"eval_labels has {len(eval_labels)} entries for {n} images")
    labels = None if eval_labels is None else np.asarray(eval_labels, dtype=np.int64)
    device = resolve_device(cfg.device)
    pattern = cfg.trainable or default_trainable(backbone)
    backbone.to(device, memory_format=torch.channels_last)
    net = Net(backbone, set_trainable(backbone, pattern), Normalise(backbone.info.mean, backbone.info.std, device), cfg.gem_p, bool(cfg.amp and device.type == "cuda"))
    views = TrainViews(paths, cfg, exif=exif)

    # --- where to start
    if restart:
        run.state.unlink(missing_ok=True)
        run.log.unlink(missing_ok=True)
    resumed = load_resume(run, cfg)
    start_stage, start_step, base_weights_id = 0, 0, backbone.weights_id
    if resumed is not None:
        backbone.net.load_state_dict(resumed.net)
        start_stage, start_step, base_weights_id = resumed.stage, resumed.step, resumed.base_weights_id
        truncate_log(run.log, resumed.global_step)
        log.info("resuming %s at stage %d step %d", run.root, start_stage, start_step)
    else:
        run.log.unlink(missing_ok=True)
    write_config(run, cfg)
    run.candidates.mkdir(exist_ok=True)

    global_step = sum(cfg.stages[:start_stage]) + start_step
    bar = tqdm(total=sum(cfg.stages), initial=global_step, desc="insclr", unit="step", disable=not progress)
    cand_prec: dict[int, float] = {}
    run_images, run_time = 0, 0.0
    try:
        with StepLog(run.log) as step_log:
            for stage in range(start_stage, len(cfg.stages)):
                mid = resumed.mid_stage if resumed is not None and stage == start_stage else None
                cands, st = _start_stage(run, cfg, net=net, views=views, paths=paths, stage=stage, base_weights_id=base_weights_id, mid_stage=mid, progress=progress)
                resumed = None
                if labels is not None:  # measured over anchors that have a true label
                    has = labels >= 0
                    top = cands.indices[has, : cfg.tuple_k]
                    cand_prec[stage] = float((labels[top] == labels[has, None]).mean()) if has.any() else float("nan")

                # --- the steps
                sampler = TupleSampler(cands, cfg.tuples_per_batch, cfg.tuple_k, cfg.seed, stage, cfg.tuple_separation)
                steps = list(range(start_step if stage == start_stage else 0, cfg.stages[stage]))
                plan = [sampler.tuples(t) for t in steps]
                keys = [[(int(i), stage, t, slot) for slot, i in enumerate(np.concatenate(tp))] for t, tp in zip(steps, plan, strict=True)]
                loader = torch.utils.data.DataLoader(
                    views, batch_sampler=keys, num_workers=min(cfg.workers, os.cpu_count() or 1), collate_fn=collate,
                    pin_memory=device.type == "cuda",
                )  # fmt: skip
                t0 = time.perf_counter()  # step time includes waiting for the images, not checkpoints
                for t, tuples, (aug, plain, idx) in zip(steps, plan, loader, strict=True):
                    row = _step(cfg, net=net, state=st, cands=cands, batch=Batch(tuples, aug, plain, idx), labels=labels)
                    global_step += 1
                    dt = time.perf_counter() - t0
                    run_images += len(idx)
                    run_time += dt
                    row.update(stage=stage, step=t + 1, global_step=global_step, lr=st.optimizer.param_groups[0]["lr"], step_s=dt, images_per_s=len(idx) / dt)
                    step_log.write(row)
                    bar.update(1)
                    bar.set_postfix(stage=stage, loss=f"{row['loss']:.3f}", size=f"{row['tuple_size']:.2f}", mined=f"{row['mined']:.1f}", refresh=False)
                    if (t + 1) % cfg.checkpoint_every == 0 and t + 1 != cfg.stages[stage]:
                        step_log.flush()
                        save_checkpoint(run, backbone=backbone, config=cfg, stage=stage, step=t + 1, global_step=global_step, base_weights_id=base_weights_id, stage_state=st)
                    if on_step is not None:
                        on_step(row)
                    t0 = time.perf_counter()
                # --- end of stage: the network after it, then a state that starts the next stage
                step_log.flush()
                save_torch(net_state(backbone), run.stage(stage))
                save_checkpoint(run, backbone=backbone, config=cfg, stage=stage + 1, step=0, global_step=global_step, base_weights_id=base_weights_id)
    finally:
        bar.close()

    if plot:
        plot_log(run.log, run.plot)
    stages = stage_rows(run.log, cand_prec)
    write_stage_summary(run.root, stages)
    ins = run.last_insclr if run.last_insclr.exists() else None
    return TrainResult(run.root, run.last, ins, run.log, run.plot, stages, run_images / run_time if run_time else float("nan"))


def _start_stage(
    run: RunDir,
    cfg: InsCLRConfig,
    *,
    net: Net,
    views: TrainViews,
    paths: Sequence[Path],
    stage: int,
    base_weights_id: str,
    mid_stage: dict[str, Any] | None,
    progress: bool,
) -> tuple[CandidateSets, StageState]:
    """Candidate sets from the model as it is at the start of ``stage``, the memories and the optimiser.

    ``mid_stage`` (a :class:`~retrbench.train.checkpoint.Resume`'s entries) restores the bank,
    memory, optimiser and scaler of a run saved inside this stage; its candidate sets are read
    from their cache file (recomputed with the resumed network, with a warning, if it is gone).
    """
    backbone, device, n = net.backbone, net.device, len(paths)
    weights_id = base_weights_id if stage == 0 else sha256_file(run.stage(stage - 1))
    meta = {"weights_id": weights_id, "model": backbone.name, "image_size": cfg.image_size, "gem_p": cfg.gem_p, "images": stable_hash([str(p) for p in paths], 32), **({"exif": True} if views.exif else {})}
    key = stable_hash(meta, 20)
    cand_path = run.candidates / f"stage{stage}-{key}.npz"
    descriptors: np.ndarray | None = None
    if mid_stage is not None and cand_path.is_file():
        cands = CandidateSets.load(cand_path)
    else:
        if mid_stage is not None:
            log.warning("%s is missing: recomputing the candidate sets with the resumed network", cand_path)
        feat_cache = FeatureCache(run.candidates / "features", f"stage{stage}-{key}", meta)
        descriptors = describe(
            backbone, paths, cfg.image_size, mean=backbone.info.mean, std=backbone.info.std, gem_p=cfg.gem_p,
            cache=feat_cache, device=device, batch_size=cfg.batch_size_extract, workers=cfg.workers,
            progress=progress, desc=f"stage {stage} candidates", exif=views.exif,
        )  # fmt: skip
        cands = load_or_compute(cand_path, lambda d=descriptors: candidate_sets(d, cfg.candidates_k), n)

    if mid_stage is not None:
        bank = DatasetBank(mid_stage["bank"]).to(device)
    else:
        assert descriptors is not None
        bank = DatasetBank(torch.from_numpy(descriptors)).to(device)
    memory = CrossBatchMemory(cfg.memory_size or n, bank.features.shape[1]).to(device)
    st = StageState(
        optimizer=torch.optim.Adam(net.params, lr=cfg.stage_lr(stage), weight_decay=cfg.weight_decay),
        scaler=torch.amp.GradScaler(device.type, enabled=net.amp),
        bank=bank,
        memory=memory,
    )
    if mid_stage is not None:
        st.restore(mid_stage)
    elif cfg.memory_init == "descriptors":
        memory.enqueue(bank.features, torch.arange(n, device=device))
    elif cfg.memory_init == "augmented":
        _fill_memory_augmented(memory, net=net, views=views, batch_size=cfg.batch_size_extract, stage=stage)
    return cands, st


@torch.no_grad()
def _fill_memory_augmented(memory: CrossBatchMemory, *, net: Net, views: TrainViews, batch_size: int, stage: int) -> None:
    """InsCLR's memory initialisation: one augmented view of every image (up to the memory size)."""
    net.backbone.eval()
    n = min(len(views), memory.capacity)
    for start in range(0, n, batch_size):
        ids = list(range(start, min(n, start + batch_size)))
        e = net(torch.stack([views.memory_view(i, stage) for i in ids]))
        memory.enqueue(e, torch.tensor(ids, device=e.device))


def _step(cfg: InsCLRConfig, *, net: Net, state: StageState, cands: CandidateSets, batch: Batch, labels: np.ndarray | None) -> dict[str, Any]:
    """One training step on ``batch``; returns its log row (the columns the step knows, see ``LOG_COLUMNS``).

    ``labels`` (measurement only) adds the ``true_*`` / ``n_*`` pair counts.
    """
    dev, bank, memory = net.device, state.bank, state.memory
    # un-augmented views -> the dataset bank (no gradient), then every similarity judgement
    net.backbone.eval()
    bank.update(batch.idx, embed_plain(net, batch.plain))
    sel = select(bank, batch.tuples, cfg.selection_threshold)
    in_batch = batch.idx.numpy()
    class_sets: list[np.ndarray] = []
    slot_class = np.empty(len(in_batch), dtype=np.int64)
    pos_of = {int(i): j for j, i in enumerate(in_batch)}
    mined_n, pool_n, st = [], [], dict.fromkeys(("true_before", "n_before", "true_after", "n_after", "true_mined", "n_mined"), 0)
    for s in sel:
        pool = tuple_candidate_set(cands, s.kept, exclude=np.setdiff1d(in_batch, s.kept))
        got = mine(bank, s.kept, pool, rounds=cfg.mining_rounds, first_k=cfg.mining_first_k, growth=cfg.mining_growth, min_sim=cfg.mining_min_sim, score=cfg.mining_score)
        mined_n.append(len(got))
        pool_n.append(len(pool))
        c = len(class_sets)
        class_sets.append(np.concatenate([s.kept, got]))
        for i in s.kept:
            slot_class[pos_of[int(i)]] = c
        for r in s.rejected:  # a hard negative of its tuple: a class of its own
            slot_class[pos_of[int(r)]] = len(class_sets)
            class_sets.append(np.array([r], dtype=np.int64))
        if labels is not None:
            for name, others in (("before", s.members[1:]), ("after", s.kept[1:]), ("mined", got)):
                ok, tot = pair_precision(s.anchor, others, labels)
                st[f"true_{name}"] += ok
                st[f"n_{name}"] += tot

    # augmented views -> loss against the batch and the memory
    mem_f, mem_i = memory.entries()
    train_mode(net.backbone, cfg.bn_eval)
    feats = net(batch.aug)
    loss, ls = insclr_loss(
        feats, torch.as_tensor(slot_class, device=dev), class_sets, mem_f, mem_i,
        margin=cfg.margin, pos_margin=cfg.pos_margin, memory_weight=cfg.memory_weight, memory_negatives=cfg.memory_negatives,
    )  # fmt: skip
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    if cfg.grad_clip > 0:
        state.scaler.unscale_(state.optimizer)
        torch.nn.utils.clip_grad_norm_(net.params, cfg.grad_clip)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    memory.enqueue(feats.detach(), batch.idx.to(dev))
    net.backbone.eval()

    members = sum(len(s.members) - 1 for s in sel)
    kept = sum(len(s.kept) - 1 for s in sel)
    return {
        "loss": float(loss.detach()),
        **ls,
        "memory_entries": int(mem_i.shape[0]),
        "tuples": len(sel),
        "images": len(in_batch),
        "member_sim": float(np.mean(np.concatenate([s.similarity for s in sel]))),
        "tuple_size": float(np.mean([len(s.kept) for s in sel])),
        "kept_frac": kept / members if members else float("nan"),
        "pool": float(np.mean(pool_n)),
        "mined": float(np.mean(mined_n)),
        **st,
    }
