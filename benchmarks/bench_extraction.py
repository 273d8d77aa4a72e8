"""Extraction throughput (images/s): retrbench's ``extract()`` against a plain torchvision loop.

Both paths run the same network (two instances with identical weights), the same input size
(longer side ``--size``, Lanczos resampling), the same normalisation and the same pooling (GeM,
p=3), on ``--n`` JPEGs written to a temporary folder with the sizes of Oxford / Paris photos
(half 1024x768, half 768x1024):

* ``plain``: one image at a time: PIL decode, ``torchvision.transforms`` Resize + ToTensor +
  Normalize, ``model(x[None])``, pooling; no workers, no batching, no cache.
* ``retrbench``: ``retrbench.extraction.extract`` (decoding in ``--workers`` processes, batches of
  equal-size images up to ``--batch-size``, channels-last), no feature cache.

Each path is warmed up on two images first; the descriptors of both paths are compared (max
relative difference printed). ``efficientnet_lite0`` uses its real weights, the others a seeded
random initialisation (throughput does not depend on the weights).

Usage: ``python benchmarks/bench_extraction.py [--size 512] [--n 32] [--models efficientnet_lite0,resnet50]
[--threads N] [--workers 2] [--batch-size 8] [--device cpu]``; ``--models all`` takes every registry
entry (except the ``random`` baseline) plus ``resnet50`` (``timm:resnet50`` while the registry has
none). AMDIM-Medium at 512 px is ~0.39 TMAC per image: give it a small ``--n``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from retrbench.backbones import BACKBONES, Backbone
from retrbench.extraction import ImageSpec, extract, resolve_device
from retrbench.pooling import gem

_REAL_WEIGHTS = {"efficientnet_lite0"}


def write_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` JPEGs (quality 90), alternately 1024x768 and 768x1024, of smooth noise plus grain."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        w, h = (1024, 768) if i % 2 == 0 else (768, 1024)
        low = rng.integers(0, 256, (h // 32, w // 32, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((w, h), Image.Resampling.BICUBIC)
        arr = np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, (h, w, 3))
        p = folder / f"img{i:04d}.jpg"
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(p, quality=90)
        paths.append(p)
    return paths


def model_names(arg: str) -> list[str]:
    if arg != "all":
        return [m.strip() for m in arg.split(",") if m.strip()]
    names = [n for n in BACKBONES.list() if n != "random"]
    if "resnet50" not in names:
        names.insert(1, "timm:resnet50")
    return names


def build(name: str) -> Backbone:
    if name == "resnet50" and "resnet50" not in BACKBONES:
        name = "timm:resnet50"
    return BACKBONES.create(name, pretrained=name in _REAL_WEIGHTS)


def _scaled(w: int, h: int, size: int) -> tuple[int, int]:
    s = size / max(w, h)
    return max(1, round(w * s)), max(1, round(h * s))


@torch.inference_mode()
def plain_loop(model: torch.nn.Module, paths: list[Path], size: int, mean, std, device: torch.device) -> np.ndarray:
    """The straightforward reference: PIL + torchvision transforms, batch 1, no workers, no cache."""
    to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    out = []
    for p in paths:
        img = Image.open(p).convert("RGB")
        w, h = _scaled(*img.size, size)
        img = transforms.Resize((h, w), interpolation=transforms.InterpolationMode.LANCZOS)(img)
        x = to_tensor(img).unsqueeze(0).to(device)
        out.append(gem(model(x)).float().cpu().numpy()[0])
    return np.stack(out)


def run_one(name: str, paths: list[Path], args: argparse.Namespace, device: torch.device) -> dict:
    plain_bb, fast_bb = build(name).to(device), build(name)
    mean, std = plain_bb.info.mean, plain_bb.info.std
    specs = [ImageSpec(p, None, args.size) for p in paths]

    def fast(sp: list[ImageSpec]) -> np.ndarray:
        return extract(
            fast_bb, gem, sp, mean=mean, std=std, device=device,
            batch_size=args.batch_size, workers=args.workers, cache=None,
        )  # fmt: skip

    plain_loop(plain_bb, paths[:2], args.size, mean, std, device)  # warm-up
    fast(specs[:2])
    t0 = time.perf_counter()
    ref = plain_loop(plain_bb, paths, args.size, mean, std, device)
    t_plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    got = fast(specs)
    t_fast = time.perf_counter() - t0
    rel = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12))
    return {
        "model": name,
        "weights": "real" if name in _REAL_WEIGHTS else "random",
        "plain": len(paths) / t_plain,
        "retrbench": len(paths) / t_fast,
        "rel_diff": rel,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512, help="longer side of the network input")
    ap.add_argument("--n", type=int, default=32, help="number of images")
    ap.add_argument("--models", default="all", help="comma-separated names (registry, timm:, hub:) or 'all'")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    ap.add_argument("--workers", type=int, default=2, help="retrbench decoding processes")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    print(
        f"size {args.size}, {args.n} images (1024x768 / 768x1024 JPEG), GeM p=3, device {device}, "
        f"{args.threads} threads, retrbench: batch {args.batch_size}, {args.workers} workers; "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    print(f"{'model':<20} {'weights':<7} {'plain img/s':>12} {'retrbench img/s':>16} {'ratio':>6} {'max rel diff':>13}")
    with tempfile.TemporaryDirectory(prefix="bench-extraction-") as tmp:
        paths = write_images(Path(tmp), args.n)
        for name in model_names(args.models):
            r = run_one(name, paths, args, device)
            print(
                f"{r['model']:<20} {r['weights']:<7} {r['plain']:>12.2f} {r['retrbench']:>16.2f} "
                f"{r['retrbench'] / r['plain']:>6.2f} {r['rel_diff']:>13.1e}",
                flush=True,
            )


if __name__ == "__main__":
    main()
