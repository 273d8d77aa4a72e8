"""Backbone weights: find, download and verify a weights file, rename its keys, load it with every key accounted for.

Reading a file is :mod:`retrbench.utils.checkpoint` (``torch.load(weights_only=True)``, shared
with the training code); hashing and downloading are :mod:`retrbench.utils.io`. What is
specific to backbones is here: where an entry's file is (:func:`resolve_weights`: an explicit
path, the weights cache ``retrbench.utils.paths.weights_cache_dir()``, or a verified download),
the published digest prefixes of files upstream publishes no full checksum for
(:func:`verify_published_digest`), renaming to the target architecture's parameter names
(:func:`remap_state_dict`) and strict loading (:func:`strict_load`, :func:`load_into`).

Example::

    path = resolve_weights(info, weights)            # explicit path, cache, or download
    sd = remap_state_dict(read_state_dict(path), [(r"^module\\.", "")])
    strict_load(net, sd, ignore=(r"^classifier\\.",))
"""

from __future__ import annotations

import hashlib
import re
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ..utils.checkpoint import CheckpointError, preview_keys, split_weights_key
from ..utils.io import download, sha256_file
from ..utils.paths import weights_cache_dir
from .base import BackboneInfo

__all__ = [
    "PUBLISHED_DIGEST_PREFIX",
    "load_into",
    "remap_state_dict",
    "resolve_weights",
    "strict_load",
    "verify_published_digest",
]

_SHOW = 10  # keys listed per category in strict_load errors

# Checksums that upstream publishes only in part: torchvision's file names embed the first 8 hex
# digits of the sha256 (torch.hub checks them the same way); the MoCo README lists an md5 prefix.
PUBLISHED_DIGEST_PREFIX: dict[str, tuple[str, str]] = {
    "resnet50-0676ba61.pth": ("sha256", "0676ba61"),
    "resnet50-19c8e357.pth": ("sha256", "19c8e357"),
    "moco_v1_200ep_pretrain.pth.tar": ("md5", "b251726a"),
    "moco_v2_200ep_pretrain.pth.tar": ("md5", "59fd9945"),
    "moco_v2_800ep_pretrain.pth.tar": ("md5", "a04e12f8"),
}
"""Published file name -> (hash algorithm, published prefix of its hex digest)."""


# --------------------------------------------------------------------------------------------
# Finding the file


def resolve_weights(
    info: BackboneInfo,
    weights: str | Path | None,
    *,
    cache_dir: Path | None = None,
    how_to_get: str = "",
    alternatives: Sequence[str] = (),
    keyed: bool = False,
) -> Path:
    """Path of the weights file to load for a backbone.

    Order: the explicit ``weights`` path (must exist); ``<cache_dir>/<name>`` for each of
    ``alternatives`` (other published file names); ``<cache_dir>/<info.weights_file>``; a
    download of ``info.url`` into the cache (verified against ``info.sha256``). ``cache_dir``
    defaults to :func:`retrbench.utils.paths.weights_cache_dir`.

    ``FILE#KEY`` (the state dict under the top-level ``KEY`` of ``FILE``; a path that is an
    existing file is taken whole, ``#`` and all): with ``keyed=True``, for callers that read
    the file with :func:`~retrbench.utils.checkpoint.read_state_dict` and identify it with
    :func:`~retrbench.utils.checkpoint.weights_digest`, it is returned as given; otherwise it
    is refused, since the entry reads a checkpoint of a fixed layout.

    Raises:
        FileNotFoundError: ``weights`` does not exist, or there is no cached file and no URL
            (the message says where it looked, how to pass ``--weights`` and ``how_to_get``).
        CheckpointError: ``FILE#KEY`` without ``keyed``.
    """
    if weights is not None:
        p = Path(weights).expanduser()
        file, key = split_weights_key(weights)
        if not file.is_file():
            raise FileNotFoundError(f"weights file not found: {file}" + (" (it is a directory)" if file.is_dir() else ""))
        if key is not None and not keyed:
            who = f"{info.label} weights" if info.label else "the weights of this model"
            raise CheckpointError(
                f"{file}: #{key} would pick a nested state dict, but {who} are read whole (a fixed checkpoint "
                f"layout): pass the file itself, --weights {file}"
            )
        return p
    root = Path(cache_dir) if cache_dir is not None else weights_cache_dir()
    for name in alternatives:
        if (root / name).is_file():
            return root / name
    cached = root / info.weights_file if info.weights_file else None
    if cached is not None and cached.is_file():
        return cached
    if info.url:
        name = info.weights_file or Path(urllib.parse.urlparse(info.url).path).name
        return download(info.url, root / name, sha256=info.sha256)
    looked = f"looked for {cached}" if cached is not None else f"no file name is known to look for in {root}"
    source = f" ({info.weights_source})" if info.weights_source else ""
    raise FileNotFoundError(
        f"no weights available for this backbone{source}: {looked}, and no download URL is published. "
        f"Put the file there, set RETRBENCH_CACHE, or pass its path with --weights PATH (weights=PATH in Python)."
        + (f"\n  {how_to_get}" if how_to_get else "")
    )


def _hexdigest(path: Path, algo: str) -> str:
    if algo == "sha256":
        return sha256_file(path)
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def verify_published_digest(path: str | Path) -> None:
    """Check a file named as a published checkpoint against the digest prefix upstream publishes.

    Only files whose name is in :data:`PUBLISHED_DIGEST_PREFIX` are checked; a mismatch means a
    corrupt or partial download, or another file under the published name.

    Raises:
        CheckpointError: naming the expected prefix and the actual digest.
    """
    p = Path(path)
    if p.name not in PUBLISHED_DIGEST_PREFIX:
        return
    algo, prefix = PUBLISHED_DIGEST_PREFIX[p.name]
    digest = _hexdigest(p, algo)
    if not digest.startswith(prefix):
        raise CheckpointError(
            f"{p}: not the published {p.name}: its {algo} is {digest}, but the published one starts with "
            f"{prefix}. A corrupt or partial download? Delete the file and try again (or rename it if it is "
            f"your own checkpoint)."
        )


# --------------------------------------------------------------------------------------------
# Renaming and loading


def remap_state_dict(sd: Mapping[str, Tensor], rules: Iterable[tuple[str, str]]) -> dict[str, Tensor]:
    """Rename keys with regex rules, applied in order (each ``re.sub`` sees the previous result).

    Rules match anywhere unless anchored; write them so that a renamed key cannot match a later
    rule unintentionally (e.g. anchor with ``^`` and rename ``_bn0`` before ``_bn1``). Values are
    not copied. ``ValueError`` if two keys end up with the same name.

    Example: ``remap_state_dict(sd, [(r"^module\\.", ""), (r"\\.fc\\.", ".head.")])``.
    """
    compiled = [(re.compile(pat), rep) for pat, rep in rules]
    out: dict[str, Tensor] = {}
    source: dict[str, str] = {}
    for k, v in sd.items():
        new = k
        for pat, rep in compiled:
            new = pat.sub(rep, new)
        if new in out:
            raise ValueError(f"remap_state_dict: {source[new]!r} and {k!r} both map to {new!r}")
        out[new] = v
        source[new] = k
    return out


def strict_load(module: nn.Module, sd: Mapping[str, Tensor], *, ignore: tuple[str, ...] = ()) -> None:
    """Load ``sd`` into ``module``, requiring every key on both sides to match in name and shape.

    Args:
        module: target; its parameters and buffers are overwritten in place.
        sd: state dict with the module's own names (see :func:`remap_state_dict`).
        ignore: regex patterns (``re.search``) of keys allowed to be missing from ``sd``, unused
            in ``sd``, or of a different shape; such module entries keep their current values.

    Raises:
        ValueError: listing missing, unexpected and shape-mismatched keys (first 10 of each, with counts).
    """
    pats = [re.compile(p) for p in ignore]

    def ignored(k: str) -> bool:
        return any(p.search(k) for p in pats)

    own = module.state_dict()
    missing = [k for k in own if k not in sd and not ignored(k)]
    unexpected = [k for k in sd if k not in own and not ignored(k)]
    mismatched = [k for k in sd if k in own and tuple(sd[k].shape) != tuple(own[k].shape)]
    bad_shape = [k for k in mismatched if not ignored(k)]
    if missing or unexpected or bad_shape:
        name = type(module).__name__
        lines = [
            f"state dict does not fit {name}: {len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(bad_shape)} with another shape"
        ]
        if missing:
            lines.append(f"  missing from the checkpoint ({len(missing)}): {preview_keys(missing)}")
        if unexpected:
            lines.append(f"  unexpected in the checkpoint ({len(unexpected)}): {preview_keys(unexpected)}")
        if bad_shape:
            shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in bad_shape[:_SHOW]]
            more = f" ... ({len(bad_shape) - _SHOW} more)" if len(bad_shape) > _SHOW else ""
            lines.append(f"  shape mismatch ({len(bad_shape)}): " + "; ".join(shapes) + more)
        if ignore:
            lines.append(f"  (ignored patterns: {list(ignore)})")
        raise ValueError("\n".join(lines))
    skip = set(mismatched)
    result = module.load_state_dict({k: v for k, v in sd.items() if k in own and k not in skip}, strict=False)
    assert not result.unexpected_keys and all(ignored(k) for k in result.missing_keys), result


def load_into(
    net: nn.Module, sd: Mapping[str, Tensor], path: str | Path, *, ignore: tuple[str, ...] = (), hint: str = ""
) -> None:
    """:func:`strict_load` with BatchNorm counters filled in and errors naming the file.

    Checkpoints saved before PyTorch 0.4.1 (e.g. torchvision's ``resnet50-19c8e357.pth``) have
    no ``num_batches_tracked`` buffers; those absent are set to 0 (they only matter for BatchNorm
    in training mode with ``momentum=None``). Every other key must match in name and shape,
    except the checkpoint-side keys matched by ``ignore``.

    Raises:
        CheckpointError: listing missing, unexpected and reshaped keys, followed by ``hint``.
    """
    sd = dict(sd)
    for k, v in net.state_dict().items():
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = torch.zeros((), dtype=v.dtype)
    try:
        strict_load(net, sd, ignore=ignore)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}" + (f"\n  {hint}" if hint else "")) from e
