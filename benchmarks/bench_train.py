"""InsCLR training throughput (images/s) of ``retrbench.train.train`` on this machine.

Runs one short training stage on ``--n`` synthetic JPEGs (smooth noise, 4:3 and 3:4, written to a
temporary folder) and reads the per-step times from the run's ``log.csv``. A step embeds every
batch image twice (un-augmented, no gradient; augmented, with gradients), mines, computes the loss
against the batch and the cross-batch memory and takes an Adam step; image loading is included
(it overlaps with compute when ``--workers`` > 0), checkpoints are not. The first step is left out
of the median (warm-up). Candidate-set extraction before the stage is timed separately.

Variants: the default trainable parameters (EfficientNet-Lite0: stages 5-6 and the head
convolution; the early blocks are frozen, so no gradient is computed through them) and, with
``--full``, every parameter trainable, to show what freezing saves.

Usage: ``python benchmarks/bench_train.py [--model efficientnet_lite0] [--size 224] [--steps 6]
[--tuples 4] [--tuple-k 2] [--n 32] [--threads N] [--workers 1] [--device auto] [--full]``.
``efficientnet_lite0`` uses its real weights, other models a seeded random initialisation.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from retrbench.backbones import BACKBONES
from retrbench.train import InsCLRConfig, train
from retrbench.utils.device import resolve_device


def write_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        w, h = (512, 384) if i % 2 == 0 else (384, 512)
        low = rng.integers(0, 256, (h // 32, w // 32, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((w, h), Image.Resampling.BICUBIC)
        arr = np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, (h, w, 3))
        paths.append(folder / f"img{i:04d}.jpg")
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(paths[-1], quality=90)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--size", type=int, default=224, help="training resolution")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--tuples", type=int, default=4, help="tuples per batch")
    ap.add_argument("--tuple-k", type=int, default=2)
    ap.add_argument("--n", type=int, default=32, help="synthetic training images")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--full", action="store_true", help="also time with every parameter trainable")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = resolve_device(a.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_images(Path(tmp), a.n)
        variants = [("default (early blocks frozen)", None)] + ([("all parameters", r".")] if a.full else [])
        for label, trainable in variants:
            pretrained = a.model == "efficientnet_lite0"
            bb = BACKBONES.create(a.model) if pretrained else BACKBONES.create(a.model, pretrained=False)
            cfg = InsCLRConfig(
                model=a.model, dataset="bench", image_size=a.size, stages=(a.steps,), lr=(1e-5,), candidates_k=10,
                tuple_k=a.tuple_k, tuples_per_batch=a.tuples, selection_threshold=-1.0, mining_min_sim=-1.0,
                trainable=trainable, workers=a.workers, device=a.device, checkpoint_every=10**6,
            )  # fmt: skip
            out = Path(tmp) / f"run{len(rows)}"
            t0 = time.perf_counter()
            res = train(cfg, out, backbone=bb, images=paths)
            wall = time.perf_counter() - t0
            log = pd.read_csv(res.log)
            steady = log["step_s"].iloc[1:] if len(log) > 1 else log["step_s"]
            step_s = float(steady.median())
            n_trainable = sum(p.numel() for p in bb.parameters() if p.requires_grad)
            rows.append(
                {
                    "variant": label,
                    "trainable params (M)": n_trainable / 1e6,
                    "batch images": int(log["images"].iloc[-1]),
                    "step s (median)": step_s,
                    "images/s": float(log["images"].iloc[-1]) / step_s,
                    "run wall s (incl. candidates, plot)": wall,
                }
            )
    print(f"{a.model} at {a.size}px on {dev} ({torch.get_num_threads()} threads), {a.steps} steps of "
          f"{a.tuples} tuples x {a.tuple_k + 1} images; each image embedded with and without augmentation")  # fmt: skip
    print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".2f"))


if __name__ == "__main__":
    main()
