"""Where retrbench keeps data and caches; every root is an argument with an environment default."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["default_cache_root", "default_data_root", "weights_cache_dir", "safe_name"]


def default_cache_root() -> Path:
    """``$RETRBENCH_CACHE`` if set, else ``$XDG_CACHE_HOME/retrbench`` (``~/.cache/retrbench``)."""
    env = os.environ.get("RETRBENCH_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "retrbench"


def default_data_root() -> Path:
    """``$RETRBENCH_DATA`` if set, else ``<cache root>/data``."""
    env = os.environ.get("RETRBENCH_DATA")
    return Path(env).expanduser() if env else default_cache_root() / "data"


def weights_cache_dir() -> Path:
    """``$RETRBENCH_CACHE/weights`` if that is set, else torch hub's ``<hub dir>/checkpoints``.

    The hub directory follows torch's rule (``$TORCH_HOME/hub``, else
    ``$XDG_CACHE_HOME/torch/hub``, else ``~/.cache/torch/hub``) without importing torch.
    """
    env = os.environ.get("RETRBENCH_CACHE")
    if env:
        return Path(env).expanduser() / "weights"
    torch_home = os.environ.get("TORCH_HOME")
    if torch_home:
        hub = Path(torch_home).expanduser() / "hub"
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        hub = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "torch" / "hub"
    return hub / "checkpoints"


def safe_name(text: str) -> str:
    """``text`` with every character outside ``[A-Za-z0-9_.+-]`` replaced by ``_`` (folder names)."""
    import re

    return re.sub(r"[^A-Za-z0-9_.+-]", "_", text)
