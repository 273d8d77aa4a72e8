"""Helpers shared by the backbone tests: upstream-shaped random weights and independent references."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
CARDS = Path(__file__).resolve().parents[2] / "models"


def random_like(sd: dict[str, Tensor], seed: int) -> dict[str, Tensor]:
    """Random values for a state dict's names and shapes (meta tensors welcome), keeping activations finite.

    Convolutions / linears: He-normal; BatchNorm: weight in [0.3, 0.6], small bias and mean,
    variance in [0.8, 1.2], so a deep residual stack neither explodes nor dies.
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in sd.items():
        shape = tuple(v.shape)
        if k.endswith("num_batches_tracked"):
            out[k] = torch.randint(1, 10_000, (), generator=g)
        elif k.endswith("running_var"):
            out[k] = 0.8 + 0.4 * torch.rand(shape, generator=g)
        elif k.endswith(("running_mean", "bias")):
            out[k] = 0.05 * torch.randn(shape, generator=g)
        elif k.endswith("weight") and len(shape) == 1:  # BatchNorm scale
            out[k] = 0.3 + 0.3 * torch.rand(shape, generator=g)
        elif k.endswith("weight"):
            fan_in = int(torch.tensor(shape[1:]).prod())
            out[k] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
        else:
            out[k] = torch.randn(shape, generator=g)
    return out


def on_meta(make):
    """``make()`` built on the meta device (names and shapes only, no memory, no init)."""
    with torch.device("meta"):
        return make()


def loaded(make, sd: dict[str, Tensor]) -> nn.Module:
    """A reference module built on meta and given ``sd`` (strict, every key)."""
    net = on_meta(make)
    net.load_state_dict(sd, strict=True, assign=True)
    return net.eval()


def tv_resnet(depth: int):
    """torchvision's ResNet-50 or -101 constructor."""
    return {50: torchvision.models.resnet50, 101: torchvision.models.resnet101}[depth]


def tv_layer4(net: torchvision.models.ResNet, x: Tensor) -> Tensor:
    """torchvision ResNet up to layer4, written out."""
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    return net.layer4(net.layer3(net.layer2(net.layer1(x))))


def gem_ref(f: Tensor, p: float) -> Tensor:
    """GeM by hand: ``(mean over H, W of max(f, 1e-6)^p)^(1/p)``, ``(B, C, H, W) -> (B, C)``."""
    return f.clamp(min=1e-6).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


def l2(v: Tensor, eps: float = 0.0) -> Tensor:
    """Rows divided by ``norm + eps``."""
    return v / (v.norm(dim=1, keepdim=True) + eps)


def close(a: Tensor, b: Tensor) -> None:
    """``a`` is finite, not all zero, and equal to ``b`` up to float32 rounding."""
    assert torch.isfinite(a).all() and a.abs().max() > 0
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def old_pickle_names(path: Path) -> None:
    """Rename, in a legacy (non-zip) torch file, the modules numpy 2 / scikit-learn >= 0.22 pickle under
    to those of the 2018-2019 files (``numpy.core.multiarray``, ``sklearn.decomposition.pca``)."""
    data = path.read_bytes()
    new = data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    new = new.replace(b"sklearn.decomposition._pca\n", b"sklearn.decomposition.pca\n")
    assert new != data
    path.write_bytes(new)


class Shell:
    """Pickles as a call to ``os.system``: what a malicious checkpoint would hold."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def token_inputs(seed: int = 0) -> list[Tensor]:
    """Two small batches for the token models: a square one and a non-square one that is no multiple of
    any patch size (so the input rule resizes it and the position embeddings are resampled to a
    non-square grid)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 98, 98, generator=g), torch.randn(2, 3, 101, 150, generator=g)]


def fitted(x: Tensor, patch: int) -> Tensor:
    """The input rule written out: bilinear resize to the nearest multiple of ``patch`` per side."""
    H, W = x.shape[-2:]
    size = (max(1, round(H / patch)) * patch, max(1, round(W / patch)) * patch)  # no .5 ties at these sizes
    return x if size == (H, W) else torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)


def close_rel(a: Tensor, b: Tensor, rtol: float = 1e-4) -> None:
    """``a`` equals ``b`` up to float32 rounding accumulated through a transformer (relative to ``b``'s scale)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.isfinite(a).all() and b.abs().max() > 0
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * float(b.abs().max()))


def meta_layout(make) -> dict[str, tuple[int, ...]]:
    """Names and shapes of ``make()``'s state dict, built on the meta device."""
    return {k: tuple(v.shape) for k, v in on_meta(make).state_dict().items()}
