"""Every entry of BACKBONES, built and run the same way (as timm's tests/test_models.py does for its models).

Parametrised over the registry itself, so a new entry is tested without writing a test: it is
built with ``pretrained=False`` (seeded random weights, no file, no network), run once on a
small input, and its map checked against the geometry its :class:`BackboneInfo` states. Also the
names that resolvers build (``timm:``, ``hf-hub:``) and the refusal of a file given as a model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from retrbench.backbones import BACKBONES, Backbone, BackboneInfo

# Entries over 1e9 parameters (4 GB in float32) are built on the meta device only and not run, with
# the reason: their seeded random init alone takes ~20 s and 5 GB on CPU. Today that is DINOv2 ViT-g
# (1.1B, with and without registers), whose forward is checked at reduced depth in test_dinov2.py;
# simclr4x (375M) and DINOv2 ViT-L (304M) run like the others.
_MAX_PARAMS = 1_000_000_000
_H, _W = 64, 80  # small, and not square: height and width must not be swapped


def _input_side(info: BackboneInfo, side: int) -> int:
    """``side``, raised to the smallest input for which the entry's map has at least one cell."""
    while info.map_side(side) < 1:
        side += 1
    return side


def _meta_params(name: str) -> int | None:
    """Parameters of the entry built on the meta device (no memory, no init), or None if it cannot be."""
    try:
        with torch.device("meta"):
            bb = BACKBONES.create(name, pretrained=False)
    except Exception:
        return None
    assert isinstance(bb, Backbone)
    return sum(p.numel() for p in bb.parameters())


@pytest.mark.parametrize("name", BACKBONES.list())
def test_entry_builds_and_runs(name: str) -> None:
    entry = BACKBONES.get(name)
    info = entry.info
    assert isinstance(info, BackboneInfo)
    assert entry.label and entry.help and "\n" not in entry.help, "every entry needs a label and a one-line help"
    assert info.label == entry.label and info.help == entry.help

    n_params = _meta_params(name)
    if n_params is not None and n_params > _MAX_PARAMS:
        pytest.skip(f"{name}: {n_params / 1e6:.0f}M parameters ({4 * n_params / 1e9:.1f} GB) is too heavy for CPU CI (built on meta only)")
    bb = BACKBONES.create(name, pretrained=False)
    assert isinstance(bb, Backbone)
    assert not bb.training and not any(p.requires_grad for p in bb.parameters())
    assert bb.info.label == info.label and bb.info.channels == info.channels

    h, w = _input_side(info, _H), _input_side(info, _W)
    x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    x = (x - torch.tensor(info.mean).view(1, 3, 1, 1)) / torch.tensor(info.std).view(1, 3, 1, 1)
    with torch.no_grad():
        y = bb(x)
    assert y.shape[:2] == (1, info.channels) and y.dim() == 4
    # (h', w') as the entry's geometry says, up to one cell of rounding
    assert abs(y.shape[2] - info.map_side(h)) <= 1 and abs(y.shape[3] - info.map_side(w)) <= 1, (y.shape, h, w)
    assert torch.isfinite(y).all()

    if callable(getattr(bb, "native", None)):
        with torch.no_grad():
            d = bb.native(x)
        assert d.dim() == 2 and d.shape[0] == 1 and d.shape[1] > 0
        assert torch.isfinite(d).all()
    if info.patch_size is not None:  # token models: one cell per patch under the input rule
        assert info.input_rule == "resize-to-patch-multiple" and info.stride == info.patch_size
        assert y.shape[2:] == (info.map_side(h), info.map_side(w)) and callable(getattr(bb, "native", None))
        assert info.native_descriptor


def test_registry_order_is_the_papers() -> None:
    """Tables list the paper's models first, in the paper's row order."""
    labels = [e.label for e in BACKBONES]
    paper = ["Baseline", "SimClr1x", "SimClr2x", "SimClr4x", "MoCov1", "MoCov2"]
    assert labels[: len(paper)] == paper
    assert labels.index("AmDim") < labels.index("GeM (AP)") < labels.index("Random")
    assert BACKBONES.label("mocov2_800ep") == "MoCov2 (800ep)" and BACKBONES.label("chance") == "Random"


def test_timm_name_builds_through_the_registry() -> None:
    bb = BACKBONES.create("timm:resnet18", pretrained=False)
    assert bb.name == bb.info.label == "timm:resnet18" and bb.weights_id == "random-init"
    assert (bb.info.channels, bb.info.stride) == (512, 32)
    with torch.no_grad():
        assert bb(torch.zeros(1, 3, _H, _W)).shape == (1, 512, 2, 3)
    assert BACKBONES.is_known("timm:resnet18") and "timm:resnet18" not in BACKBONES


def test_hf_hub_offline_gives_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path))  # empty: nothing cached
    with pytest.raises(RuntimeError, match=r"hf-hub:timm/resnet18\.a1_in1k: could not fetch .*Hugging Face Hub"):
        BACKBONES.create("hf-hub:timm/resnet18.a1_in1k", pretrained=False)


@pytest.mark.parametrize("name", ["net.pth", "weights/model.safetensors", "ckpt.pth.tar"])
def test_a_file_is_not_a_model(name: str) -> None:
    with pytest.raises(ValueError, match=rf"--model '{name}' is a file: .*--model timm:resnet50 --weights {name}"):
        BACKBONES.create(name)
