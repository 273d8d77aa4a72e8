"""BatchNorm re-calibration: re-estimate the running statistics on the dataset being evaluated.

The retrieval paper runs each frozen model once over the evaluation images in training mode
(forward only) before extracting in eval mode. :func:`recalibrate_bn` does that on given
batches; :func:`recalibration_specs` picks the images; :func:`recalibrate_on_images` loads them
with :func:`retrbench.utils.images.load_image` and calls :func:`recalibrate_bn`.

What the statistics are. With ``momentum=None`` PyTorch keeps a cumulative average: after
``k`` batches ``running_mean`` is the mean of the ``k`` per-batch means and ``running_var`` the
mean of the ``k`` per-batch *unbiased* variances (each over ``B * H * W`` values per channel).
Every batch weighs the same whatever its size, and the average of within-batch variances leaves
out the spread of the batch means; with equal-size batches the mean is exactly the mean over all
the images. Batch composition also matters because, in training mode, every BatchNorm
normalises with the statistics of its current batch, so deeper layers see inputs that depend on
which images share a batch (and the last layers' statistics shift with the batch size). Batches
hold images of one input size only (no padding, which would enter the statistics).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..utils.device import resolve_device
from ..utils.images import DEFAULT_MAX_PIXELS, ImageSpec, load_image

__all__ = ["batchnorm_layers", "recalibrate_bn", "recalibrate_on_images", "recalibration_specs"]

logger = logging.getLogger(__name__)

_BN = nn.modules.batchnorm._BatchNorm  # BatchNorm1d/2d/3d and SyncBatchNorm


def batchnorm_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of every BatchNorm layer of ``module`` that tracks running statistics."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, _BN) and m.track_running_stats]


@torch.no_grad()
def recalibrate_bn(backbone: nn.Module, batches: Iterable[Tensor], *, momentum: float | None = None) -> nn.Module:
    """Re-estimate the running statistics of every BatchNorm layer of ``backbone`` from ``batches``.

    Each BatchNorm layer's running mean / var are reset and its ``momentum`` set to ``momentum``
    (None: cumulative average over the batches; see the module docstring). The backbone then
    runs forward (no gradients) over the normalised ``(B, 3, H, W)`` batches with only its
    BatchNorm layers in training mode (dropout and the rest stay in eval mode), and ends in eval
    mode with every BatchNorm's original ``momentum``. Layers that the forward pass never
    reached keep their previous statistics. Parameters are not changed.

    Returns:
        ``backbone`` (modified in place).

    Raises:
        ValueError: ``batches`` is empty (nothing would be estimated).
    """
    layers = [m for _, m in batchnorm_layers(backbone)]
    if not layers:
        logger.info("recalibrate_bn: %s has no BatchNorm layer; nothing to do", type(backbone).__name__)
    saved = {
        id(m): (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(), m.momentum)
        for m in layers
    }
    seen: set[int] = set()
    hooks = [m.register_forward_pre_hook(lambda mod, _inp: seen.add(id(mod))) for m in layers]
    ref = next(iter(backbone.parameters()), None)
    if ref is None:
        ref = next(iter(backbone.buffers()), None)
    device = ref.device if ref is not None else torch.device("cpu")
    n = 0
    try:
        backbone.eval()
        for m in layers:
            m.reset_running_stats()
            m.momentum = momentum
            m.train()
        for x in batches:
            backbone(x.to(device))
            n += 1
    finally:
        for h in hooks:
            h.remove()
        backbone.eval()
        for m in layers:
            mean, var, count, mom = saved[id(m)]
            m.momentum = mom
            if id(m) not in seen or n == 0:  # never reached: keep what it had
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)
    if n == 0:
        raise ValueError("recalibrate_bn: no batches given")
    if len(seen) < len(layers):
        logger.info(
            "recalibrate_bn: %d of %d BatchNorm layers were not used and kept their statistics",
            len(layers) - len(seen),
            len(layers),
        )
    return backbone


def recalibration_specs(
    image_paths: Sequence[str | Path],
    n: int,
    seed: int = 0,
    *,
    size: int,
    root: str | Path | None = None,
    exif: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> list[ImageSpec]:
    """Choose ``n`` whole images of the evaluated dataset for BatchNorm re-calibration.

    A uniform sample without replacement, drawn by ``numpy.random.default_rng(seed)`` from
    ``image_paths`` (pass the database images: queries are crops of those or extra photos of the
    same scenes), returned in the drawn (shuffled) order so that batches mix scenes; all of them
    when ``n >= len(image_paths)``. Each becomes ``ImageSpec(root / path, None, size, exif=exif,
    max_pixels=max_pixels)``: the whole image at the extraction size, no query box.
    """
    if n <= 0:
        raise ValueError(f"recalibration_specs: n must be positive, got {n}")
    if not image_paths:
        raise ValueError("recalibration_specs: no images to choose from")
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(image_paths))[:n]
    base = Path(root) if root is not None else None
    paths = [base / image_paths[i] if base is not None else Path(image_paths[i]) for i in idx]
    return [ImageSpec(p, None, size, exif=exif, max_pixels=max_pixels) for p in paths]


class _Specs(torch.utils.data.Dataset):
    def __init__(self, specs: Sequence[ImageSpec]) -> None:
        self.specs = specs

    def __len__(self) -> int:
        return len(self.specs)

    def __getitem__(self, i: int) -> Tensor:
        return load_image(self.specs[i])


def _equal_size_batches(images: Iterable[Tensor], batch_size: int) -> Iterable[Tensor]:
    """Stack images of one size into batches of ``batch_size``, in arrival order; then the partial ones."""
    pending: dict[tuple[int, ...], list[Tensor]] = {}
    for img in images:
        group = pending.setdefault(tuple(img.shape), [])
        group.append(img)
        if len(group) == batch_size:
            yield torch.stack(group)
            group.clear()
    for group in pending.values():
        if group:
            yield torch.stack(group)


def recalibrate_on_images(
    backbone: nn.Module,
    specs: Sequence[ImageSpec],
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 8,
    device: str | torch.device = "auto",
    *,
    workers: int = 0,
    momentum: float | None = None,
) -> nn.Module:
    """:func:`recalibrate_bn` over the images of ``specs``, decoded as extraction does.

    Images are loaded with :func:`retrbench.utils.images.load_image` (``workers`` decoding processes),
    batched only with images of the same input size (``batch_size`` at most; the remainder of each
    size forms a smaller batch, which weighs as much as a full one in the cumulative average),
    scaled to [0, 1] and normalised with ``mean`` / ``std``. The backbone is moved to ``device``.
    """
    dev = resolve_device(device) if isinstance(device, str) else device
    backbone.to(dev)
    mean_t = torch.tensor(list(mean), dtype=torch.float32, device=dev).view(1, 3, 1, 1)
    std_t = torch.tensor(list(std), dtype=torch.float32, device=dev).view(1, 3, 1, 1)
    loader = torch.utils.data.DataLoader(_Specs(specs), batch_size=None, num_workers=workers)

    def batches() -> Iterable[Tensor]:
        for x in _equal_size_batches(loader, batch_size):
            x = x.to(dev).float().div_(255.0)
            yield (x - mean_t) / std_t

    return recalibrate_bn(backbone, batches(), momentum=momentum)
