"""Layers that upstream retrieval architectures build into their networks.

:class:`GeM` is the one GeM of the backbones package: the learnable pooling layer of
deep-image-retrieval (``adpool``), cirtorch (``pool``) and InsCLR (``combiner.pool``), kept
here because those checkpoints store its ``p`` as a parameter of the network. (The pooling
stage, :mod:`retrbench.pooling`, has its own GeM over extracted maps; a stage does not import a
sibling stage.) L2 normalisation in these networks is :func:`retrbench.utils.linalg.l2n`
(cirtorch's ``l2n``) or ``F.normalize`` where upstream uses that.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GeM"]


class GeM(nn.Module):
    """Generalised mean pooling ``(mean_{H,W} clamp(x, eps)^p)^(1/p)``: ``(B, C, H, W) -> (B, C, 1, 1)``.

    Args:
        p: initial exponent.
        eps: lower clamp of the activations before the power.
        learned: ``p`` is a parameter ``p`` of shape (1,) (dirtorch ``adpool.p``, cirtorch
            ``pool.p``, InsCLR ``combiner.pool.p``); else a plain float (InsCLR's default).
        full_kernel: average with ``avg_pool2d`` over the whole map as cirtorch does; else with
            ``adaptive_avg_pool2d(., 1)`` as dirtorch and InsCLR do (same value up to rounding).
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6, *, learned: bool = True, full_kernel: bool = False) -> None:
        super().__init__()
        if learned:
            self.p = nn.Parameter(torch.ones(1) * p)
        else:
            self.p = float(p)
        self.eps = eps
        self.full_kernel = full_kernel

    def forward(self, x: Tensor) -> Tensor:
        y = x.clamp(min=self.eps).pow(self.p)
        y = F.avg_pool2d(y, (y.size(-2), y.size(-1))) if self.full_kernel else F.adaptive_avg_pool2d(y, 1)
        return y.pow(1.0 / self.p)

    def extra_repr(self) -> str:
        p = "learned" if isinstance(self.p, nn.Parameter) else f"{self.p:g}"
        return f"p={p}, eps={self.eps}, full_kernel={self.full_kernel}"
