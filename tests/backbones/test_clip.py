"""OpenAI CLIP ViT-B/16 and ViT-L/14: TorchScript archives scripted from OpenAI's ``CLIP`` (``_vit_refs.RefCLIP``,
float16 weights as ``convert_weights`` leaves them) are read without running TorchScript, load the image
tower with every key, and give OpenAI's image embedding (``encode_image``) and patch tokens after
``ln_post``, at 224 (OpenAI's own size) and a non-square size (open_clip's resampling). A plain
state dict with the same names loads the same. The image towers have 2 blocks and the text towers 1
block and a 1000-word vocabulary here (full size under ``-m slow``); every ``visual.*`` name and
shape of the full-size towers is checked on meta.
"""

from __future__ import annotations

import copy
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from retrbench.backbones import BACKBONES
from retrbench.backbones.clip import (
    CLIP_INFO,
    CLIP_SPECS,
    build_clip,
    clip_visual_layout,
    make_clip_vit,
    read_torchscript_tensors,
)
from retrbench.utils.checkpoint import CheckpointError
from retrbench.utils.io import sha256_file

from ._helpers import CARDS, Shell, close_rel, fitted, meta_layout, on_meta, random_like
from ._vit_refs import RefCLIP, to_openai_half

FAST = dict(vocab=1000, t_layers=1)
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")


def reference(name: str, layers: int | None = None, **text) -> RefCLIP:
    s = CLIP_SPECS[name]
    return RefCLIP(s.embed, s.grid * s.patch, s.patch, s.width, layers or s.layers, **text)


@pytest.mark.parametrize("name, sha", [("clip_vitb16", "5806e77cd80f8b59"), ("clip_vitl14", "b8cca3fd41ae0c99")])
def test_registered_with_metadata(name: str, sha: str) -> None:
    spec, info = CLIP_SPECS[name], BACKBONES.get(name).info
    assert info == CLIP_INFO[name] and (info.channels, info.patch_size) == (spec.width, spec.patch)
    assert info.url == f"https://openaipublic.azureedge.net/clip/models/{info.sha256}/{spec.file}" and info.sha256.startswith(sha)
    assert info.mean == (0.48145466, 0.4578275, 0.40821073) and info.licence == "MIT" and (CARDS / info.card).is_file()
    assert "proj" in info.native_descriptor


@pytest.mark.parametrize("name", sorted(CLIP_SPECS))
def test_full_size_layout_is_openais(name: str) -> None:
    full = meta_layout(lambda: reference(name))
    assert {k: v for k, v in full.items() if k.startswith("visual.")} == clip_visual_layout(CLIP_SPECS[name])
    assert {"token_embedding.weight", "text_projection", "logit_scale", "ln_final.weight", "input_resolution"} <= set(full)
    assert full["token_embedding.weight"] == (49408, 512 if name == "clip_vitb16" else 768) or name == "clip_vitl14"


def write_archive(name: str, path: Path, seed: int, layers: int | None = 2, **text) -> RefCLIP:
    """A TorchScript archive of RefCLIP with random float16 weights; returns the float32 reference on those values."""
    ref = reference(name, layers, **(text or FAST))
    floats = {k: v for k, v in ref.state_dict().items() if v.is_floating_point()}
    ref.load_state_dict(random_like(floats, seed), strict=False)
    with torch.no_grad():
        ref.visual.proj.mul_(0.05)  # keep the embedding at a moderate scale
    to_openai_half(ref)
    torch.jit.save(torch.jit.script(ref.eval()), str(path))
    return copy.deepcopy(ref).float().eval()


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, RefCLIP]]:
    out = {}
    for i, name in enumerate(sorted(CLIP_SPECS)):
        path = tmp_path_factory.mktemp(name) / CLIP_SPECS[name].file
        out[name] = (path, write_archive(name, path, 30 + i))
    return out


def _check(bb, ref: RefCLIP, spec) -> None:
    g = torch.Generator().manual_seed(4)
    for x in (torch.randn(2, 3, 224, 224, generator=g), torch.randn(2, 3, 101, 150, generator=g)):
        with torch.no_grad():
            emb, tokens = ref.visual.embed_and_tokens(fitted(x, spec.patch))
            y, d = bb(x), bb.native(x)
        assert y.shape == (2, spec.width, bb.info.map_side(x.shape[-2]), bb.info.map_side(x.shape[-1])) and d.shape == (2, spec.embed)
        close_rel(y, tokens)
        close_rel(d, emb)


@pytest.mark.parametrize("name", sorted(CLIP_SPECS))
def test_archive_equals_openais_forward(name: str, archives, tmp_path: Path) -> None:
    path, ref = archives[name]
    raw = read_torchscript_tensors(path)
    assert raw["visual.conv1.weight"].dtype == torch.float16 and raw["visual.ln_pre.weight"].dtype == torch.float32
    masks = {f"transformer.resblocks.{i}.attn_mask" for i in range(ref.transformer.layers)}  # plain tensor attributes
    assert set(raw) == set(ref.state_dict()) | masks  # the scripted module's parameters and buffers, by name
    bb = build_clip(name, weights=path, layers=2)
    assert bb.weights_id == sha256_file(path)
    _check(bb, ref, CLIP_SPECS[name])
    plain = tmp_path / "open_clip_pytorch_model.bin"  # the same names as a plain state dict
    torch.save({k: v.clone() for k, v in raw.items()}, plain)
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        torch.testing.assert_close(build_clip(name, weights=plain, layers=2).native(x), bb.native(x), rtol=0, atol=0)


@pytest.mark.slow
def test_full_size_vitb16_archive_equals_openais_forward(tmp_path: Path) -> None:
    path = tmp_path / "ViT-B-16.pt"
    ref = write_archive("clip_vitb16", path, 40, layers=None, vocab=49408, t_layers=12)
    _check(BACKBONES.create("clip_vitb16", weights=path), ref, CLIP_SPECS["clip_vitb16"])


def test_wrong_truncated_and_unsafe_files_are_refused(archives, tmp_path: Path) -> None:
    b16, _ = archives["clip_vitb16"]
    with pytest.raises(CheckpointError, match=r"not a CLIP ViT-L/14 checkpoint(.|\n)*looks like ViT-B-16\.pt: use the entry clip_vitb16"):
        build_clip("clip_vitl14", weights=b16, layers=2)
    raw = read_torchscript_tensors(b16)
    del raw["visual.ln_post.bias"]
    torch.save(raw, tmp_path / "missing.bin")
    with pytest.raises(CheckpointError, match=r"1 missing, 0 unexpected(.|\n)*'visual\.ln_post\.bias'"):
        build_clip("clip_vitb16", weights=tmp_path / "missing.bin", layers=2)
    torch.save({"cls_token": torch.zeros(1, 1, 8)}, tmp_path / "dino.pth")
    with pytest.raises(CheckpointError, match=r"expected OpenAI's ViT-B-16\.pt \(a TorchScript archive\)"):
        build_clip("clip_vitb16", weights=tmp_path / "dino.pth", layers=2)
    truncated = tmp_path / "ViT-B-16.pt"
    truncated.write_bytes(b16.read_bytes()[: 1 << 20])
    with pytest.raises(CheckpointError, match="truncated or not a"):
        build_clip("clip_vitb16", weights=truncated, layers=2)
    evil = tmp_path / "evil.pt"
    marker = tmp_path / "ran"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("evil/data.pkl", pickle.dumps(Shell(f"touch {marker}"), protocol=2))
        zf.writestr("evil/code/__torch__.py", "")
    with pytest.raises(CheckpointError, match=r"refused: its TorchScript pickle asks for (posix|os)\.system(.|\n)*nothing was run"):
        build_clip("clip_vitb16", weights=evil, layers=2)
    assert not marker.exists()


def test_timm_architecture_matches_the_layout() -> None:
    """timm's filter renames every visual.* key onto the timm model (proj -> head, zero bias)."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    for name, spec in CLIP_SPECS.items():
        vit = on_meta(lambda s=spec: make_clip_vit(s))
        lay = clip_visual_layout(spec)
        sd = checkpoint_filter_fn({k: torch.empty(s, device="meta") for k, s in lay.items()}, vit)
        assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in vit.state_dict().items()}, name
        assert "patch_embed.proj.bias" not in sd and vit.blocks[0].mlp.act.__class__.__name__ == "QuickGELU"
        del vit
