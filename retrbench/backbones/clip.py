"""CLIP ViT-B/16 and ViT-L/14 image towers (Radford et al. 2021), from OpenAI's published files.

The files are what openai/CLIP's ``clip.load`` downloads: ``https://openaipublic.azureedge.net/clip/models/
<sha256>/ViT-B-16.pt`` and ``.../ViT-L-14.pt``, where ``<sha256>`` is the file's published sha256
(``clip.load`` checks it; so does retrbench's download). They are TorchScript archives of the whole
CLIP model, weights mostly in float16. retrbench reads them **without running TorchScript**
(:func:`read_torchscript_tensors`: the archive's pickle is read with a restricted unpickler that
builds only tensors and attribute holders, so nothing in the file is executed) and also accepts a
plain state dict with the same names (open_clip's ``open_clip_pytorch_model.bin``). The image
tower's keys (``visual.*``: ``class_embedding``, ``positional_embedding``, ``conv1`` (no bias),
``ln_pre``, ``transformer.resblocks.N.{ln_1, attn.in_proj_*, attn.out_proj, ln_2, mlp.c_fc,
mlp.c_proj}``, ``ln_post``, ``proj``) must be exactly those of the architecture
(:func:`clip_visual_layout`); the text tower and ``logit_scale`` are ignored. timm's
``checkpoint_filter_fn`` renames them to its ``VisionTransformer`` (``pre_norm=True``, QuickGELU,
LayerNorm eps 1e-5: timm's ``vit_*_clip_quickgelu_224``; ``proj`` becomes ``head``, bias zero), which
they load into with every key, in float32.

Map: the patch tokens after ``ln_post`` (width channels: 768 / 1024); native: the image embedding as
``CLIP.encode_image`` computes it, ``ln_post(class token) @ proj`` (512 / 768, not normalised), what
retrieval papers use. Position embeddings: OpenAI's code runs at 224 only; other sizes resample with
open_clip's ``resize_pos_embed`` rule, which is timm's (:data:`~retrbench.backbones.vit.SIZE_RULE`).
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..utils.checkpoint import CheckpointError, read_state_dict
from .base import BACKBONES, BackboneInfo
from .vit import SIZE_RULE, TokenBackbone, build_token_backbone, check_layout, token_info

__all__ = ["CLIP_MEAN", "CLIP_SPECS", "CLIP_STD", "ClipSpec", "build_clip", "clip_visual_layout", "read_torchscript_tensors"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_URL = "https://openaipublic.azureedge.net/clip/models"


@dataclass(frozen=True)
class ClipSpec:
    """One OpenAI CLIP image tower: width, depth, heads (width / 64), patch, grid at 224, embedding size."""

    label: str
    width: int
    layers: int
    heads: int
    patch: int
    grid: int
    embed: int
    file: str
    sha256: str

    @property
    def url(self) -> str:
        return f"{_URL}/{self.sha256}/{self.file}"


CLIP_SPECS: dict[str, ClipSpec] = {
    "clip_vitb16": ClipSpec("ViT-B/16", 768, 12, 12, 16, 14, 512, "ViT-B-16.pt", "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f"),
    "clip_vitl14": ClipSpec("ViT-L/14", 1024, 24, 16, 14, 16, 768, "ViT-L-14.pt", "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836"),
}
"""Registry name -> image tower; sha256 as published in openai/CLIP's ``_MODELS`` URLs."""


def clip_visual_layout(spec: ClipSpec, layers: int | None = None) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the ``visual.*`` entries of an OpenAI CLIP state dict (``layers``: tests only)."""
    w = spec.width
    out: dict[str, tuple[int, ...]] = {
        "visual.class_embedding": (w,),
        "visual.positional_embedding": (1 + spec.grid * spec.grid, w),
        "visual.proj": (w, spec.embed),
        "visual.conv1.weight": (w, 3, spec.patch, spec.patch),
        "visual.ln_pre.weight": (w,),
        "visual.ln_pre.bias": (w,),
    }
    for i in range(spec.layers if layers is None else layers):
        b = f"visual.transformer.resblocks.{i}."
        out.update({b + "attn.in_proj_weight": (3 * w, w), b + "attn.in_proj_bias": (3 * w,)})
        out.update({b + "attn.out_proj.weight": (w, w), b + "attn.out_proj.bias": (w,)})
        out.update({b + "ln_1.weight": (w,), b + "ln_1.bias": (w,)})
        out.update({b + "mlp.c_fc.weight": (4 * w, w), b + "mlp.c_fc.bias": (4 * w,)})
        out.update({b + "mlp.c_proj.weight": (w, 4 * w), b + "mlp.c_proj.bias": (w,)})
        out.update({b + "ln_2.weight": (w,), b + "ln_2.bias": (w,)})
    out.update({"visual.ln_post.weight": (w,), "visual.ln_post.bias": (w,)})
    return out


def make_clip_vit(spec: ClipSpec, layers: int | None = None) -> nn.Module:
    """timm's ``VisionTransformer`` configured as OpenAI's image tower (timm's ``vit_*_clip_quickgelu_224``), head = ``proj``."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=spec.grid * spec.patch,
        patch_size=spec.patch,
        embed_dim=spec.width,
        depth=spec.layers if layers is None else layers,
        num_heads=spec.heads,
        mlp_ratio=4.0,
        qkv_bias=True,
        pre_norm=True,  # ln_pre; also makes the patch projection bias-free, as conv1 is
        norm_layer=partial(nn.LayerNorm, eps=1e-5),
        act_layer="quick_gelu",
        num_classes=spec.embed,
        global_pool="token",
    )


# --------------------------------------------------------------------------------------------
# TorchScript archives, read as data

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
_IDENTITY_LISTS = ("build_intlist", "build_tensorlist", "build_doublelist", "build_boollist", "build_complexlist")


class _ScriptObject:
    """Stands for an object of the archive's TorchScript classes (``__torch__.*``): keeps its attributes only."""

    def __setstate__(self, state: Any) -> None:
        self.__dict__["attrs"] = state if isinstance(state, dict) else {}


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


def _rebuild_tensor(storage: Tensor, offset: int, size: tuple, stride: tuple, *_: Any) -> Tensor:
    return torch.as_strided(storage, tuple(size), tuple(stride), offset)


class _Refused(Exception):
    pass


def is_torchscript_archive(path: str | Path) -> bool:
    """True for a zip holding ``<root>/code/`` (what ``torch.jit.save`` writes; ``torch.save`` does not)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.split("/")[1:2] == ["code"] for n in zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def read_torchscript_tensors(path: str | Path) -> dict[str, Tensor]:
    """Every tensor attribute of a TorchScript archive, by dotted attribute path (``visual.conv1.weight``).

    Runs nothing from the archive: ``data.pkl`` is unpickled with only tensor rebuilding, storage
    types, ``OrderedDict``, ``torch.device`` and TorchScript's list / type-tag helpers allowed;
    objects of the archive's own classes become attribute holders. The names are those of the
    scripted module's ``state_dict()`` for its parameters and buffers; plain tensor attributes
    (CLIP's text blocks keep their causal ``attn_mask`` so) come too.

    Raises:
        CheckpointError: truncated or not a TorchScript archive, big-endian data, or a pickle that
            asks for anything else (named; nothing is called).
    """
    p = Path(path)
    try:
        zf = zipfile.ZipFile(p)
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{p}: truncated or not a TorchScript archive ({type(e).__name__}: {e})") from e
    with zf:
        roots = [n[: -len("/data.pkl")] for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(roots) != 1:
            raise CheckpointError(f"{p}: not a TorchScript archive (no <root>/data.pkl)")
        root = roots[0]
        if f"{root}/byteorder" in zf.namelist() and zf.read(f"{root}/byteorder").strip() != b"little":
            raise CheckpointError(f"{p}: big-endian TorchScript archives are not supported")
        storages: dict[str, Tensor] = {}

        class Unpickler(pickle.Unpickler):
            def find_class(self, module: str, name: str) -> Any:
                if module == "__torch__" or module.startswith("__torch__."):
                    return _ScriptObject
                if (module, name) in (("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")):
                    return _rebuild_tensor
                if module == "torch" and name in _STORAGE_DTYPES:
                    return _StorageType(_STORAGE_DTYPES[name])
                if (module, name) == ("collections", "OrderedDict"):
                    return collections.OrderedDict
                if (module, name) == ("torch", "device"):
                    return torch.device
                if module == "torch.jit._pickle" and name in _IDENTITY_LISTS:
                    return lambda x: x
                if (module, name) == ("torch.jit._pickle", "restore_type_tag"):
                    return lambda value, _type: value
                raise _Refused(f"{module}.{name}")

            def persistent_load(self, pid: Any) -> Tensor:
                kind, stype, key, _location, numel = pid
                if kind != "storage" or not isinstance(stype, _StorageType):
                    raise _Refused(f"persistent id {kind!r}")
                if key not in storages:
                    raw = bytearray(zf.read(f"{root}/data/{key}"))
                    itemsize = torch.empty((), dtype=stype.dtype).element_size()
                    if len(raw) != numel * itemsize:
                        raise EOFError(f"storage {key} holds {len(raw)} bytes, not {numel * itemsize}")
                    storages[key] = torch.frombuffer(raw, dtype=stype.dtype) if raw else torch.empty(0, dtype=stype.dtype)
                return storages[key]

        try:
            obj = Unpickler(io.BytesIO(zf.read(f"{root}/data.pkl"))).load()
        except _Refused as e:
            raise CheckpointError(
                f"{p}: refused: its TorchScript pickle asks for {e}, which is not tensor data; nothing was run"
            ) from e
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, RuntimeError, zipfile.BadZipFile) as e:
            raise CheckpointError(f"{p}: truncated or not a TorchScript archive ({type(e).__name__}: {e})") from e
    out: dict[str, Tensor] = {}

    def walk(o: _ScriptObject, prefix: str, seen: set[int]) -> None:
        if id(o) in seen:
            return
        seen.add(id(o))
        for k, v in getattr(o, "attrs", {}).items():
            if isinstance(v, Tensor):
                out[prefix + k] = v
            elif isinstance(v, _ScriptObject):
                walk(v, f"{prefix}{k}.", seen)

    if not isinstance(obj, _ScriptObject):
        raise CheckpointError(f"{p}: not a TorchScript module archive (its data.pkl holds a {type(obj).__name__})")
    walk(obj, "", set())
    return out


def read_clip_state_dict(path: str | Path) -> dict[str, Tensor]:
    """OpenAI-named CLIP weights of a TorchScript archive (``ViT-B-16.pt``) or of a plain state dict."""
    if is_torchscript_archive(path):
        return read_torchscript_tensors(path)
    return read_state_dict(path, strip="module.", fmt="CLIP")


# --------------------------------------------------------------------------------------------
# Entries


def _openai_cache(file: str):
    def find() -> Path | None:
        p = Path(os.path.expanduser("~/.cache/clip")) / file  # clip.load's default download_root
        return p if p.is_file() else None

    return find


def _info(name: str, spec: ClipSpec, order: int) -> BackboneInfo:
    return token_info(
        label=f"CLIP {spec.label}",
        order=order,
        help=f"OpenAI CLIP {spec.label} image tower: patch tokens after ln_post ({spec.width} channels, patch "
        f"{spec.patch}), native = image embedding ({spec.embed}-d)",
        channels=spec.width,
        patch=spec.patch,
        native=f"image embedding ln_post(class token) @ proj ({spec.embed}-d, as CLIP.encode_image; not normalised)",
        mean=CLIP_MEAN,
        std=CLIP_STD,
        weights_source=f"openai/CLIP {spec.file}",
        weights_file=spec.file,
        url=spec.url,
        sha256=spec.sha256,
        licence="MIT",
        card="clip.md",
        find_local=_openai_cache(spec.file),
    )


CLIP_INFO: dict[str, BackboneInfo] = {n: _info(n, s, 88 + i) for i, (n, s) in enumerate(CLIP_SPECS.items())}


def build_clip(name: str, weights: str | Path | None = None, pretrained: bool = True, *, layers: int | None = None) -> TokenBackbone:
    """An OpenAI CLIP image tower: map = patch tokens after ``ln_post``, native = the image embedding.

    Args:
        name: ``clip_vitb16`` or ``clip_vitl14``.
        weights: ``ViT-B-16.pt`` / ``ViT-L-14.pt`` (or a state dict with their names); None:
            ``~/.cache/clip``, the weights cache, then the published URL (sha256 checked).
        layers: fewer blocks (tests only).
    """
    spec = CLIP_SPECS[name]

    def read(path: Path, vit: nn.Module) -> dict[str, Tensor]:
        from timm.models.vision_transformer import checkpoint_filter_fn

        sd = read_clip_state_dict(path)
        visual = {k: v for k, v in sd.items() if k.startswith("visual.")}
        width = visual["visual.conv1.weight"].shape[0] if "visual.conv1.weight" in visual else None
        other = [n for n, s in CLIP_SPECS.items() if n != name and s.width == width]
        hint = (
            f"the file looks like {CLIP_SPECS[other[0]].file}: use the entry {other[0]}"
            if other
            else f"expected OpenAI's {spec.file} (a TorchScript archive) or a state dict with its names (visual.*)"
        )
        check_layout(visual, clip_visual_layout(spec, layers), path, f"CLIP {spec.label}", hint=hint)
        visual = {k: v.float() for k, v in visual.items()}  # the published files are float16
        return checkpoint_filter_fn(visual, vit)

    make = lambda: make_clip_vit(spec, layers)  # noqa: E731
    return build_token_backbone(name, CLIP_INFO[name], make, SIZE_RULE, read, weights, pretrained)


def _register(name: str) -> None:
    @BACKBONES.register(name, aliases=(name.replace("clip_", "clip_openai_"),), info=CLIP_INFO[name])
    def factory(weights: str | Path | None = None, pretrained: bool = True) -> TokenBackbone:
        return build_clip(name, weights, pretrained)


for _name in CLIP_SPECS:
    _register(_name)
