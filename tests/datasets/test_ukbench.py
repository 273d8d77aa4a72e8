"""UKBench loader: groups of 4 in the public layout, incomplete groups, the real subset."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_path
from PIL import Image

from retrbench.datasets import DATASETS
from retrbench.datasets.ukbench import load_ukbench


def _jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 90)).save(buf, format="JPEG")
    return buf.getvalue()


JPEG = _jpeg_bytes()


def _make(folder: Path, numbers) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in numbers:
        (folder / f"ukbench{i:05d}.jpg").write_bytes(JPEG)


def _check_groups(ds) -> None:
    """Every image queries its own group of 4 (itself included), nothing junk."""
    for q, g in zip(ds.queries, ds.gnd, strict=True):
        group = {int(ds.images[i][7:12]) // 4 for i in g["ok"]}
        assert len(g["ok"]) == 4 and group == {int(q.image[7:12]) // 4}
        assert ds.images.index(q.image) in g["ok"]
        assert g["junk"].size == 0 and g["ok"].dtype == np.int64 and g["junk"].dtype == np.int64


def test_layout(tmp_path: Path) -> None:
    _make(tmp_path / "ukbench", range(12))
    (tmp_path / "ukbench" / "readme.txt").write_text("not an image")
    ds = DATASETS.create("ukbench", data_root=tmp_path)
    assert ds.protocol == "ukbench" and ds.root == tmp_path / "ukbench"
    assert ds.images == tuple(f"ukbench{i:05d}.jpg" for i in range(12))
    assert [q.image for q in ds.queries] == list(ds.images)
    assert all(q.bbox is None for q in ds.queries)
    assert ds.gnd[5]["ok"].tolist() == [4, 5, 6, 7]
    _check_groups(ds)
    assert ds.notes["images"].startswith("12 images, 3 groups") and "subset" in ds.notes["images"]
    assert ds.notes["query_in_database"].startswith("yes")


def test_full_subfolder(tmp_path: Path) -> None:
    _make(tmp_path / "ukbench" / "full", range(8))
    ds = load_ukbench(tmp_path)
    assert ds.root == tmp_path / "ukbench" / "full" and len(ds.images) == 8
    assert all((ds.root / p).is_file() for p in ds.images)


def test_no_images(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"ukbench%05d\.jpg"):
        load_ukbench(tmp_path)


def test_incomplete_group(tmp_path: Path) -> None:
    _make(tmp_path / "ukbench", [i for i in range(12) if i != 6])
    with pytest.raises(FileNotFoundError, match=r"1 of 3 groups .*ukbench00006\.jpg"):
        load_ukbench(tmp_path)
    ds = load_ukbench(tmp_path, allow_missing=True)
    assert ds.images == tuple(f"ukbench{i:05d}.jpg" for i in (0, 1, 2, 3, 8, 9, 10, 11))
    assert ds.gnd[5]["ok"].tolist() == [4, 5, 6, 7]  # ukbench00009 -> its re-indexed group
    _check_groups(ds)
    assert "dropped 1 incomplete groups (3 images" in ds.notes["missing"]


def test_group_gap(tmp_path: Path) -> None:
    _make(tmp_path / "ukbench", [*range(4), *range(8, 12)])
    with pytest.raises(FileNotFoundError, match="4 images missing"):
        load_ukbench(tmp_path)
    assert len(load_ukbench(tmp_path, allow_missing=True).images) == 8


@pytest.mark.realdata
def test_real_ukbench() -> None:
    root = shared_path("ukbench").parent
    ds = DATASETS.create("ukbench", data_root=root)
    assert len(ds.images) == 56 and len(ds.queries) == 56
    assert len({i // 4 for i in range(len(ds.images))}) == 14 and "14 groups" in ds.notes["images"]
    assert all((ds.root / p).is_file() for p in ds.images)
    _check_groups(ds)
