"""COIL-20 loader: numeric (object, view) order, self as junk, alternative folders, real data."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_path
from PIL import Image

from retrbench.datasets import DATASETS
from retrbench.datasets.coil20 import load_coil20


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (4, 4), 128).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png_bytes()


def _make(folder: Path, objects=(2, 10), views=range(72)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for o in objects:
        for v in views:
            (folder / f"obj{o}__{v}.png").write_bytes(PNG)


def _object(name: str) -> int:
    return int(name[3 : name.index("__")])


def _check(ds) -> None:
    for i, (q, g) in enumerate(zip(ds.queries, ds.gnd, strict=True)):
        assert ds.images[i] == q.image and q.bbox is None
        assert g["junk"].tolist() == [i] and i not in g["ok"]
        assert {_object(ds.images[j]) for j in g["ok"]} == {_object(q.image)}
        assert g["ok"].dtype == np.int64


def test_layout_numeric_order(tmp_path: Path) -> None:
    _make(tmp_path / "coil20")
    ds = DATASETS.create("coil20", data_root=tmp_path)
    assert ds.protocol == "map" and ds.root == tmp_path / "coil20" and len(ds.images) == 144
    assert ds.images[:3] == ("obj2__0.png", "obj2__1.png", "obj2__2.png")
    assert ds.images[10] == "obj2__10.png" and ds.images[72] == "obj10__0.png"
    assert all(len(g["ok"]) == 71 for g in ds.gnd)
    assert ds.gnd[0]["ok"].tolist() == list(range(1, 72))
    _check(ds)
    assert ds.notes["images"].startswith("144 images, 2 objects")


@pytest.mark.parametrize("sub", ["coil20/coil-20-proc", "coil-20-proc"])
def test_original_folder_name(tmp_path: Path, sub: str) -> None:
    _make(tmp_path / sub, objects=(1,))
    ds = load_coil20(tmp_path)
    assert ds.root == tmp_path / sub and len(ds.images) == 72
    assert all((ds.root / p).is_file() for p in ds.images)


def test_missing_views(tmp_path: Path) -> None:
    _make(tmp_path / "coil20")
    (tmp_path / "coil20" / "obj10__5.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 views missing.*obj10__5\.png"):
        load_coil20(tmp_path)
    ds = load_coil20(tmp_path, allow_missing=True)
    assert len(ds.images) == 143 and "obj10__5.png" not in ds.images
    assert [len(g["ok"]) for g in ds.gnd] == [71] * 72 + [70] * 71
    _check(ds)
    assert "1 of 144 views absent" in ds.notes["missing"]


def test_no_images(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="obj<o>__<v>.png"):
        load_coil20(tmp_path)


@pytest.mark.realdata
def test_real_coil20() -> None:
    root = shared_path("coil20").parent
    ds = DATASETS.create("coil20", data_root=root)
    assert len(ds.images) == 1440 and len(ds.queries) == 1440
    assert len({_object(n) for n in ds.images}) == 20
    assert all(len(g["ok"]) == 71 for g in ds.gnd)
    assert ds.images[72] == "obj2__0.png"
    _check(ds)
