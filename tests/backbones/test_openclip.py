"""``open_clip:`` names: image towers equal open_clip's own computation, at the model's size and at another
size that open_clip (or timm, for a timm trunk) builds itself. Tiny model configs registered with
``open_clip.add_model_config`` keep it fast. Skipped (with the reason) when open-clip-torch is absent.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

from retrbench.backbones import BACKBONES, TokenBackbone
from retrbench.backbones.openclip import parse_open_clip_spec

from ._helpers import close_rel

TEXT = {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}
CONFIGS = {
    "rb-tiny-vit": {"embed_dim": 48, "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16}, "text_cfg": TEXT},
    "rb-tiny-timm": {"embed_dim": 192, "vision_cfg": {"image_size": 64, "timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False,
                                                      "timm_pool": "map", "timm_proj": "none"}, "text_cfg": TEXT},  # fmt: skip
    "rb-tiny-rn": {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16}, "text_cfg": TEXT},
}


@pytest.fixture(scope="module")
def open_clip(tmp_path_factory: pytest.TempPathFactory):
    oc = pytest.importorskip("open_clip", reason="open-clip-torch is an optional extra (pip install 'retrbench[clip]')")
    root = tmp_path_factory.mktemp("oc_configs")
    for name, cfg in CONFIGS.items():
        (root / f"{name}.json").write_text(json.dumps(cfg))
    oc.add_model_config(root)
    return oc


def test_spec_parsing() -> None:
    assert parse_open_clip_spec("ViT-B-16:laion2b_s34b_b88k") == ("ViT-B-16", "laion2b_s34b_b88k")
    assert parse_open_clip_spec("ViT-B-16") == ("ViT-B-16", None)
    assert parse_open_clip_spec("hf-hub:timm/ViT-B-16-SigLIP") == ("hf-hub:timm/ViT-B-16-SigLIP", None)
    with pytest.raises(ValueError, match="expected open_clip:ARCH:PRETRAINED"):
        parse_open_clip_spec("ViT-B-16:")


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "open_clip", None)  # import open_clip -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'retrbench\[clip\]'"):
        BACKBONES.create("open_clip:ViT-B-16:openai")


def test_vit_tower_equals_open_clip(open_clip) -> None:
    bb = BACKBONES.create("open_clip:rb-tiny-vit", pretrained=False)
    assert isinstance(bb, TokenBackbone) and bb.name == bb.info.label == "open_clip:rb-tiny-vit"
    assert (bb.info.channels, bb.info.patch_size, bb.weights_id) == (64, 16, "random-init")
    visual = bb.net.visual
    pos = visual.positional_embedding.detach().clone()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 64, 64, generator=g)
    with torch.no_grad():
        out = visual.forward_intermediates(x, indices=1, normalize_intermediates=True, output_fmt="NCHW")
        torch.testing.assert_close(bb.native(x), visual(x), rtol=0, atol=0)
        torch.testing.assert_close(bb(x), out["image_intermediates"][-1], rtol=0, atol=0)
    # another size, built by open_clip itself: force_image_size + its resize_pos_embed on load
    other = open_clip.create_model("rb-tiny-vit", force_image_size=(48, 80))
    sd = {f"visual.{k}": v for k, v in visual.state_dict().items()}
    open_clip.model.resize_pos_embed(sd, other)
    other.visual.load_state_dict({k[len("visual.") :]: v for k, v in sd.items()})
    x2 = torch.randn(2, 3, 50, 77, generator=g)  # -> 48x80 by the input rule: a 3x5 grid
    xf = torch.nn.functional.interpolate(x2, size=(48, 80), mode="bilinear", align_corners=False)
    with torch.no_grad():
        ref = other.visual.forward_intermediates(xf, indices=1, normalize_intermediates=True, output_fmt="NCHW")
        close_rel(bb.native(x2), ref["image_features"], 1e-5)
        close_rel(bb(x2), ref["image_intermediates"][-1], 1e-5)
    assert torch.equal(visual.positional_embedding, pos)  # the model is never modified


def test_timm_tower_equals_open_clip(open_clip) -> None:
    bb = BACKBONES.create("open_clip:rb-tiny-timm", pretrained=False)
    trunk = bb.net.tokens.vit
    assert trunk.global_pool == "map" and bb.info.channels == 192
    g = torch.Generator().manual_seed(6)
    tower = copy.deepcopy(bb.net)
    for size in ((224, 224), (48, 80)):
        trunk_ref = copy.deepcopy(trunk)
        if size != (224, 224):
            trunk_ref.set_input_size(img_size=size)  # timm resamples its position embeddings itself
        x = torch.randn(2, 3, *size, generator=g)
        with torch.no_grad():
            tokens = trunk_ref.forward_features(x)
            ref_map = tokens[:, trunk_ref.num_prefix_tokens :].reshape(2, size[0] // 16, size[1] // 16, -1).permute(0, 3, 1, 2)
            close_rel(bb(x), ref_map, 1e-5)
            close_rel(bb.native(x), tower.head(trunk_ref.forward_head(tokens)), 1e-5)


def test_weights_file_and_errors(open_clip, tmp_path: Path) -> None:
    model = open_clip.create_model("rb-tiny-vit").eval()
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "epoch_32.pt")
    bb = BACKBONES.create("open_clip:rb-tiny-vit", weights=tmp_path / "epoch_32.pt")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(bb.native(x), model.visual(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"name the pretrained weights, open_clip:rb-tiny-vit:TAG"):
        BACKBONES.create("open_clip:rb-tiny-vit")
    with pytest.raises(ValueError, match=r"image tower is a ModifiedResNet(.|\n)*only vision transformers"):
        BACKBONES.create("open_clip:rb-tiny-rn", pretrained=False)
    with pytest.raises(ValueError, match="pretrained=False"):
        BACKBONES.create("open_clip:rb-tiny-vit", weights=tmp_path / "epoch_32.pt", pretrained=False)
