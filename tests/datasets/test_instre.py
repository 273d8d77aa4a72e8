"""INSTRE loader on a tiny gnd_instre.mat built with scipy.io.savemat in the public structure."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import scipy.io as sio
from PIL import Image

from retrbench.datasets import DATASETS
from retrbench.datasets.instre import load_instre


def _jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buf, format="JPEG")
    return buf.getvalue()


JPEG = _jpeg_bytes()
IMLIST = [
    "INSTRE-S1/01a_canada_book/001.jpg",
    "INSTRE-S1/01a_canada_book/002.jpg",
    "INSTRE-S2/01_aquarium/001.jpg",
    "INSTRE-M/01/001.jpg",
    "INSTRE-S2/01_aquarium/002.jpg",
]
QIMLIST = ["INSTRE-S1/01a_canada_book/099.jpg", "INSTRE-S2/01_aquarium/099.jpg"]
# As in the public file: ok 1-based, bbx (x0, y0, x1, y1) as a 1 x 4 row.
OK_1BASED = [[1, 2, 4], [3, 5]]
BBX = [[12.0, 30.0, 410.0, 388.0], [1.0, 2.0, 7.0, 8.0]]


def _cell(strings: list[str]) -> np.ndarray:
    arr = np.empty((1, len(strings)), dtype=object)
    arr[0, :] = strings
    return arr


def _write_mat(path: Path, imlist=IMLIST, qimlist=QIMLIST, ok=OK_1BASED, bbx=BBX, drop: str | None = None) -> None:
    gnd = np.empty((1, len(ok)), dtype=[("ok", "O"), ("bbx", "O")])
    for i, (o, b) in enumerate(zip(ok, bbx, strict=True)):
        gnd[0, i]["ok"] = np.array([o], dtype=np.float64)  # MATLAB doubles, 1 x m
        gnd[0, i]["bbx"] = np.array([b], dtype=np.float64)
    variables = {"imlist": _cell(imlist), "qimlist": _cell(qimlist), "gnd": gnd}
    if drop:
        del variables[drop]
    path.parent.mkdir(parents=True, exist_ok=True)
    sio.savemat(str(path), variables)


def _make(root: Path, images: bool = True, **kw) -> Path:
    ddir = root / "instre"
    _write_mat(ddir / "gnd_instre.mat", **kw)
    if images:
        for p in kw.get("imlist", IMLIST) + kw.get("qimlist", QIMLIST):
            (ddir / p).parent.mkdir(parents=True, exist_ok=True)
            (ddir / p).write_bytes(JPEG)
    return ddir


def test_built_mat_has_the_public_structure(tmp_path: Path) -> None:
    """The readers found in public code index it as mat['imlist'][0][i][0] and mat['gnd'][0][i][0] / [1]."""
    _write_mat(tmp_path / "g.mat")
    mat = sio.loadmat(str(tmp_path / "g.mat"))
    assert str(mat["imlist"][0][1][0]) == IMLIST[1]
    assert mat["gnd"][0][0][0].tolist() == [[1, 2, 4]] and mat["gnd"][0][1][1].tolist() == [BBX[1]]


def test_instre_layout(tmp_path: Path) -> None:
    ddir = _make(tmp_path)
    ds = DATASETS.create("instre", data_root=tmp_path)
    assert ds.name == "instre" and ds.protocol == "map" and ds.root == ddir
    assert ds.images == tuple(IMLIST)
    assert [q.image for q in ds.queries] == QIMLIST
    assert ds.queries[0].bbox == (12.0, 30.0, 410.0, 388.0)
    assert [g["ok"].tolist() for g in ds.gnd] == [[0, 1, 3], [2, 4]]  # 1-based -> 0-based
    assert all(g["junk"].size == 0 and g["ok"].dtype == np.int64 for g in ds.gnd)
    assert all((ds.root / p).is_file() for p in (*ds.images, *(q.image for q in ds.queries)))
    assert ds.notes["query_in_database"].startswith("no")
    assert "bbx" in ds.notes["query_crop"] and "md5" in ds.notes["ground_truth"]
    assert "non-standard size" in ds.notes["ground_truth"]


def test_crop_queries_false_and_xywh(tmp_path: Path) -> None:
    _make(tmp_path, bbx=[[12.0, 30.0, 100.0, 50.0], [1.0, 2.0, 7.0, 8.0]])
    assert load_instre(tmp_path, crop_queries=False).queries[0].bbox is None
    ds = load_instre(tmp_path, bbox_format="xywh")
    assert ds.queries[0].bbox == (12.0, 30.0, 112.0, 80.0) and "xywh" in ds.notes["query_crop"]


def test_unordered_corners_are_read_as_xywh(tmp_path: Path) -> None:
    _make(tmp_path, bbx=[[120.0, 30.0, 100.0, 50.0], BBX[1]])  # x1 < x0: only (x, y, w, h) makes sense
    ds = load_instre(tmp_path)
    assert ds.queries[0].bbox == (120.0, 30.0, 220.0, 80.0)
    assert "read as xywh (some boxes are not ordered corners)" in ds.notes["query_crop"]
    with pytest.raises(ValueError, match=r"gnd\(1\).*bbox_format='xywh'"):
        load_instre(tmp_path, bbox_format="xyxy")
    with pytest.raises(ValueError, match="bbox_format"):
        load_instre(tmp_path, bbox_format="cxcywh")


def test_the_query_images_decide_the_box_format(tmp_path: Path) -> None:
    # 8 x 8 query images: (1, 2, 7, 8) fits as corners, not as x, y, w, h (2 + 8 > 8 + 1)
    _make(tmp_path, bbx=[[1.0, 1.0, 3.0, 3.0], [1.0, 2.0, 7.0, 8.0]])
    ds = load_instre(tmp_path)
    assert ds.queries[1].bbox == (1.0, 2.0, 7.0, 8.0) and "only the xyxy reading keeps every box inside" in ds.notes["query_crop"]
    # both readings fit: the id base decides (1-based MATLAB file -> corners; 0-based -> x, y, w, h)
    _make(tmp_path, bbx=[[1.0, 1.0, 3.0, 3.0], [1.0, 2.0, 6.0, 5.0]])
    assert load_instre(tmp_path).queries[1].bbox == (1.0, 2.0, 6.0, 5.0)
    _make(tmp_path, bbx=[[1.0, 1.0, 3.0, 3.0], [1.0, 2.0, 6.0, 5.0]], ok=[[0, 1, 3], [2, 4]])
    ds = load_instre(tmp_path)
    assert ds.queries[1].bbox == (1.0, 2.0, 7.0, 7.0) and "0-based ids go with xywh" in ds.notes["query_crop"]


def test_id_base_is_detected_or_given(tmp_path: Path) -> None:
    _make(tmp_path, ok=[[0, 1], [3]])  # an index 0: 0-based (the InsCLR authors' reading)
    ds = load_instre(tmp_path)
    assert [g["ok"].tolist() for g in ds.gnd] == [[0, 1], [3]] and "ids 0-based (an index 0 occurs)" in ds.notes["query_crop"]
    with pytest.raises(ValueError, match=r"gnd\(1\).*1-based indices in \[1, 5\]"):
        load_instre(tmp_path, id_base=1)
    _make(tmp_path, ok=[[1], [6]])  # 6 > 5 images, and no 0: assumed 1-based, then out of range
    with pytest.raises(ValueError, match=r"gnd\(2\).*\[1, 5\]"):
        load_instre(tmp_path)
    _make(tmp_path, ok=[[0], [5]])  # 0 and N: neither
    with pytest.raises(ValueError, match="neither 0-based nor 1-based"):
        load_instre(tmp_path)


def test_query_listed_in_imlist_is_its_own_junk(tmp_path: Path) -> None:
    _make(tmp_path, imlist=IMLIST + [QIMLIST[1]])
    ds = load_instre(tmp_path)
    assert ds.gnd[1]["junk"].tolist() == [5] and ds.gnd[0]["junk"].size == 0
    assert ds.notes["query_in_database"].startswith("1 query images")


def test_missing_images(tmp_path: Path) -> None:
    ddir = _make(tmp_path)
    (ddir / IMLIST[1]).unlink()
    (ddir / QIMLIST[1]).unlink()
    with pytest.raises(FileNotFoundError, match=r"2 of 7 images are missing.*002\.jpg, INSTRE-S2/01_aquarium/099"):
        load_instre(tmp_path)
    ds = load_instre(tmp_path, allow_missing=True)
    assert ds.images == tuple(p for p in IMLIST if p != IMLIST[1])
    assert [q.image for q in ds.queries] == QIMLIST[:1]
    assert [ds.images[i] for i in ds.gnd[0]["ok"]] == [IMLIST[0], IMLIST[3]]
    assert "dropped 1 of 5 database images and 1 of 2 queries" in ds.notes["missing"]


def test_check_images_false(tmp_path: Path) -> None:
    _make(tmp_path, images=False)
    with pytest.raises(FileNotFoundError, match="7 of 7"):
        load_instre(tmp_path)
    ds = load_instre(tmp_path, check_images=False)
    assert len(ds.images) == 5 and len(ds.queries) == 2 and "images_checked" in ds.notes


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"gnd_instre\.mat not found.*INSTRE-S1"):
        load_instre(tmp_path)
    _make(tmp_path, images=False, drop="qimlist")
    with pytest.raises(ValueError, match=r"lacks variables \['qimlist'\]"):
        load_instre(tmp_path, check_images=False)
    # a v7.3 (HDF5) file: 116-byte text, 8-byte subsystem offset, version 0x0200, endian 'IM'
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2018 HDF5 schema 1.00 .".ljust(
        116
    )
    (tmp_path / "instre" / "gnd_instre.mat").write_bytes(header + b"\x00" * 8 + b"\x00\x02IM" + b"\x00" * 384)
    with pytest.raises(ValueError, match=r"v7\.3 \(HDF5\)"):
        load_instre(tmp_path, check_images=False)
    (tmp_path / "instre" / "gnd_instre.mat").write_text("not a mat file")
    with pytest.raises(ValueError, match="not a MATLAB"):
        load_instre(tmp_path, check_images=False)
