"""``retrbench download NAME``: public datasets into the layout their loaders expect."""

from __future__ import annotations

import argparse
from pathlib import Path

from .main import command


def _args(d: argparse.ArgumentParser) -> None:
    from ..datasets.download import SOURCES

    d.add_argument("name", choices=sorted(SOURCES), help="dataset to download")
    d.add_argument("--data-root", type=Path, default=None, help="data root (default: $RETRBENCH_DATA or ~/.cache/retrbench/data)")
    d.add_argument("--base-url", default=None, help="mirror replacing the official host (official paths kept)")
    d.add_argument("--keep-archives", action="store_true", help="keep the archives in <data-root>/_downloads/")


@command(
    "download",
    args=_args,
    order=30,
    help="download a public dataset into the layout its loader expects (resumes; verifies checksums)",
    examples=("retrbench download roxford5k --data-root /data",),
)
def cmd_download(a: argparse.Namespace) -> int:
    from ..datasets.download import download_dataset

    root = download_dataset(a.name, a.data_root, base_url=a.base_url, keep_archives=a.keep_archives)
    print(f"{a.name}: ready under {root}")
    return 0
