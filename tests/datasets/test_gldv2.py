"""GLDv2 retrieval: loader on a tiny built folder, mAP@100 against hand-worked values and a DELF-style loop."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from retrbench.datasets import DATASETS
from retrbench.datasets.gldv2 import load_gldv2


def _jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (90, 90, 200)).save(buf, format="JPEG")
    return buf.getvalue()


JPEG = _jpeg_bytes()
INDEX = ["00a1b2c3d4e5f607", "fedcba9876543210", "0123456789abcdef", "abcdef0123456789", "1111222233334444"]
TEST = ["9a8b7c6d5e4f3a2b", "0223456789abcdef", "0323456789abcdef", "0423456789abcdef", "0523456789abcdef"]
SOLUTION = [
    "id,images,Usage",
    f"{TEST[0]},None,Ignored",
    f"{TEST[1]},{INDEX[1]} {INDEX[2]},Public",
    f"{TEST[2]},{INDEX[2]},Private",
    f"{TEST[3]},{INDEX[4]} {INDEX[0]},Private",
    f"{TEST[4]},None,Public",  # a test image without matches: not a query
]


def _path(split: str, i: str) -> str:
    return f"{split}/{i[0]}/{i[1]}/{i[2]}/{i}.jpg"


def _make(root: Path, images: bool = True, solution: list[str] = SOLUTION) -> Path:
    ddir = root / "gldv2"
    ddir.mkdir(parents=True)
    (ddir / "index.csv").write_text("id\n" + "\n".join(INDEX) + "\n")
    (ddir / "test.csv").write_text("id\n" + "\n".join(TEST) + "\n")
    (ddir / "retrieval_solution_v2.1.csv").write_text("\n".join(solution) + "\n")
    if images:
        for split, ids in (("index", INDEX), ("test", TEST)):
            for i in ids:
                (ddir / _path(split, i)).parent.mkdir(parents=True, exist_ok=True)
                (ddir / _path(split, i)).write_bytes(JPEG)
    return ddir


# ----------------------------------------------------------------------------- loader


def test_gldv2_layout_and_splits(tmp_path: Path) -> None:
    ddir = _make(tmp_path)
    ds = DATASETS.create("gldv2", data_root=tmp_path)
    assert ds.name == "gldv2" and ds.protocol == "gldv2" and ds.root == ddir
    assert ds.images == tuple(_path("index", i) for i in INDEX)
    assert [q.image for q in ds.queries] == [_path("test", i) for i in TEST[1:4]]
    assert all(q.bbox is None for q in ds.queries)
    assert [g["ok"].tolist() for g in ds.gnd] == [[1, 2], [2], [4, 0]]
    assert all(g["junk"].size == 0 for g in ds.gnd)
    assert all((ds.root / p).is_file() for p in ds.images)
    assert "3 of 3 test images with matches" in ds.notes["split"] and "md5" in ds.notes["ground_truth"]
    public = load_gldv2(tmp_path, split="public")
    private = load_gldv2(tmp_path, split="private")
    assert [q.image for q in public.queries] == [_path("test", TEST[1])]
    assert [q.image for q in private.queries] == [_path("test", i) for i in TEST[2:4]]
    assert public.images == ds.images and private.gnd[1]["ok"].tolist() == [4, 0]
    with pytest.raises(ValueError, match="split"):
        load_gldv2(tmp_path, split="val")


def test_gldv2_missing_images(tmp_path: Path) -> None:
    ddir = _make(tmp_path)
    (ddir / _path("index", INDEX[2])).unlink()
    (ddir / _path("test", TEST[3])).unlink()
    with pytest.raises(FileNotFoundError, match=r"2 of 8 images are missing.*index/0/1/2/0123456789abcdef\.jpg"):
        load_gldv2(tmp_path)
    ds = load_gldv2(tmp_path, allow_missing=True)
    assert len(ds.images) == 4 and len(ds.queries) == 2
    assert [[ds.images[i] for i in g["ok"]] for g in ds.gnd] == [[_path("index", INDEX[1])], []]
    assert "dropped 1 of 5 database images and 1 of 3 queries" in ds.notes["missing"]
    assert len(load_gldv2(tmp_path, check_images=False).images) == 5


@pytest.mark.parametrize(
    "row, match",
    [
        (f"{TEST[1]},{INDEX[1]},Secret", "Usage must be"),
        (f"{TEST[1]},deadbeefdeadbeef,Public", r"not in index\.csv"),
        (f"ffff000011112222,{INDEX[1]},Public", r"not in test\.csv"),
        (f"{TEST[1]},{INDEX[1]}", "3 fields"),
        (f"{TEST[1]},a-b,Public", "bad index image ids"),
    ],
)
def test_gldv2_bad_solution_rows(tmp_path: Path, row: str, match: str) -> None:
    _make(tmp_path, images=False, solution=[SOLUTION[0], row])
    with pytest.raises(ValueError, match=rf"retrieval_solution_v2\.1\.csv row 2: .*{match}"):
        load_gldv2(tmp_path, check_images=False)


def test_gldv2_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"retrieval_solution_v2\.1\.csv not found"):
        load_gldv2(tmp_path)
    ddir = _make(tmp_path, images=False)
    (ddir / "test.csv").unlink()
    assert "test_ids_checked" in load_gldv2(tmp_path, check_images=False).notes
