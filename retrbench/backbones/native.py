"""Backbones that also compute their upstream global descriptor (``--pooling native``).

:class:`NativeBackbone` is what the retrieval-fine-tuned families build (:mod:`.gem_ap`,
:mod:`.cirtorch`, :mod:`.insclr`): like every backbone, ``forward`` gives the unpooled
last-convolution map; ``native`` gives the descriptor exactly as the upstream code computes it
(the network's ``descriptor``), and the post-hoc whitenings shipped in a checkpoint (dirtorch's
PCA, cirtorch's ``Lw``) are kept as :attr:`NativeBackbone.shipped_whitening` and applied by
:meth:`NativeBackbone.whiten_shipped`, as upstream does after extraction.

Also the steps those families share: a seeded random network (:func:`random_native`), the
checkpoint's own input normalisation (:func:`with_normalisation`) and the depth check
(:func:`check_depth`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor, nn

from ..utils.checkpoint import CheckpointError
from .base import Backbone, BackboneInfo, finish, new_network, refuse_weights_with_random

__all__ = ["NativeBackbone", "check_depth", "random_native", "with_normalisation"]

logger = logging.getLogger(__name__)


class NativeBackbone(Backbone):
    """A :class:`Backbone` whose network also computes its own (upstream) global descriptor.

    ``forward(x)``: the ``(B, C, H', W')`` last-convolution map, like every backbone.
    ``native(x)``: ``(B, 3, H, W)`` normalised images -> ``(B, D)`` descriptors, L2-normalised
    as upstream does (``net.descriptor``).

    Attributes:
        shipped_whitening: post-hoc whitenings stored in the checkpoint, by name (dirtorch:
            the PCA's dataset, e.g. ``'Landmarks_clean'``; cirtorch: ``'<dataset>'`` for
            single-scale and ``'<dataset>/ms'`` for multi-scale ``Lw``); each maps ``(N, D)``
            numpy descriptors to whitened, L2-normalised ones with upstream's default settings.
        upstream_config: the checkpoint's own description of the network (dirtorch
            ``model_options``, cirtorch ``meta`` without ``Lw``, InsCLR's inferred head).
    """

    def __init__(
        self,
        net: nn.Module,
        info: BackboneInfo,
        name: str,
        weights_id: str,
        *,
        shipped_whitening: Mapping[str, Callable[[np.ndarray], np.ndarray]] | None = None,
        upstream_config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(net, info, name, weights_id)
        self.shipped_whitening = dict(shipped_whitening or {})
        self.upstream_config = dict(upstream_config or {})

    def native(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W) -> (B, D)``: the network's own global descriptor, L2-normalised as upstream."""
        return self.net.descriptor(x)

    def whiten_shipped(self, descriptors: np.ndarray, name: str | None = None) -> np.ndarray:
        """Apply the checkpoint's post-hoc whitening ``name`` (the only one if None) to ``(N, D)`` descriptors."""
        if not self.shipped_whitening:
            raise KeyError(f"{self.name}: this checkpoint ships no post-hoc whitening")
        if name is None:
            if len(self.shipped_whitening) > 1:
                raise KeyError(f"{self.name}: name one of {sorted(self.shipped_whitening)}")
            name = next(iter(self.shipped_whitening))
        if name not in self.shipped_whitening:
            raise KeyError(f"{self.name}: no shipped whitening {name!r}; available: {sorted(self.shipped_whitening)}")
        return self.shipped_whitening[name](descriptors)


def random_native(
    make: Callable[[], nn.Module], info: BackboneInfo, name: str, weights: Any, config: dict[str, Any]
) -> NativeBackbone:
    """A seeded random network of a native family (``pretrained=False``), with ``config`` as its upstream config."""
    refuse_weights_with_random(weights)
    return finish(
        new_network(make, pretrained=False), info, name, "random-init", NativeBackbone, upstream_config=config
    )


def with_normalisation(info: BackboneInfo, mean: Any, std: Any, path: Path, where: str) -> BackboneInfo:
    """``info`` with the checkpoint's own input normalisation, when it states one that differs."""
    if mean is None or std is None:
        return info
    try:
        m, s = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {where} mean / std are not numbers: {mean!r}, {std!r}") from e
    if len(m) != 3 or len(s) != 3:
        raise CheckpointError(f"{path}: {where} mean / std must have 3 values: {mean!r}, {std!r}")
    if np.allclose(m, info.mean, atol=1e-6) and np.allclose(s, info.std, atol=1e-6):
        return info
    logger.info("%s: using the checkpoint's input normalisation mean=%s std=%s", path, m, s)
    return dataclasses.replace(info, mean=m, std=s)


def check_depth(path: Path, found: int | None, depth: int, family: str, by_depth: Mapping[int, str]) -> None:
    """``CheckpointError`` when a checkpoint holds a ResNet of another depth, naming the entry to use instead."""
    if found is not None and found != depth:
        other = f"; use {by_depth[found]}" if found in by_depth else ""
        raise CheckpointError(f"{path}: a ResNet-{found} {family} checkpoint, not ResNet-{depth}{other}")
